"""Replicas over one PostgreSQL: writes on one are seen by the others, late starters catch up, outages heal."""

from __future__ import annotations

import collections
import io
import json
import os
import re
import subprocess
import sys
import threading
import time
import urllib.request
from dataclasses import replace
from pathlib import Path

import grpc
import psycopg
import pytest

from chronorec.server.core.demo import generate_demo
from chronorec.server.core.pg_store import PostgresEventStore
from chronorec.v1 import catalog_pb2, common_pb2, models_pb2, recommender_pb2
from pgcluster import postgres_cluster, postgres_url  # noqa: F401 - fixtures

# The propagation bound the replicas promise (p99 in the benchmark); a test allows it per change.
BOUND_S = 1.0
DEMO_ITEMS = 360


def event(event_id: str, user: str, item: str, t: float = 1_700_000_000.0) -> common_pb2.Event:
    message = common_pb2.Event(event_id=event_id, user_id=user, item_id=item, action="click")
    message.timestamp.FromSeconds(int(t))
    return message


def history_length(replica, user: str) -> int:
    return replica.recommender.Recommend(recommender_pb2.RecommendRequest(user_id=user, k=3), timeout=10).history_length


def wait_until(check, timeout: float = 10.0, interval: float = 0.005) -> float:
    """Seconds until `check()` held; fails past `timeout`."""
    started = time.perf_counter()
    while not check():
        if time.perf_counter() - started > timeout:
            raise AssertionError(f"not reached within {timeout} s")
        time.sleep(interval)
    return time.perf_counter() - started


def in_memory_matches_log(replica, url: str) -> None:
    """The replica's catalog and interaction state hold exactly what PostgreSQL holds."""
    with PostgresEventStore(url, read_only=True) as store:
        items = {item.item_id: item for item in store.iter_items()}
        events = store.count_events()
        seq = store.max_change_seq()
    engine = replica.engine
    assert engine.follower.wait_for(seq, timeout=10)
    assert {i: engine.catalog.get(i) for i in engine.catalog} == items
    assert engine.state.event_count == events
    with engine.manager.acquire() as model:
        assert len(model.index) == len(items)


@pytest.fixture
def replicas(postgres_url, start_server, tiny_repo):
    # postgres_url first: its database is dropped after the servers stop, not under them.
    """Factory of replicas over the test's database and one model repository (demo loaded once)."""

    def start(n: int = 1, **overrides):
        return [start_server(tiny_repo, db=postgres_url, demo=True, **overrides) for _ in range(n)]

    return start


def scrape(replica) -> str:
    port = replica.running.metrics_port
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        return response.read().decode()


def test_replicas_load_the_demo_once_and_name_each_other_in_get_status(replicas, postgres_url, tiny_repo,
                                                                       tiny_bert_dir):
    from chronorec.trainer.export import publish_base_model

    # B does not follow the repository pointer, so a version activated through A shows as skew.
    a, b = replicas(1, metrics_port=0) + replicas(1, watch_interval_s=0)
    with psycopg.connect(postgres_url) as conn:
        upserts = conn.execute("SELECT count(*) FROM item_changes WHERE kind = 'upsert'").fetchone()[0]
    assert upserts == DEMO_ITEMS  # the second replica found the catalog loaded under the lock
    names = {a.engine.replica_name, b.engine.replica_name}
    assert len(names) == 2

    def both_listed_serving() -> bool:
        status = a.models.GetStatus(models_pb2.GetStatusRequest(), timeout=5)
        return ({r.name for r in status.replicas} == names
                and all(r.serving_version == status.serving_version for r in status.replicas))

    wait_until(both_listed_serving, timeout=3 * a.engine.heartbeat_interval_s + 2)
    status = a.models.GetStatus(models_pb2.GetStatusRequest(), timeout=5)
    assert [r.this_replica for r in status.replicas if r.name == a.engine.replica_name] == [True]
    assert status.applied_seq == a.engine.follower.cursor > 0
    metrics = scrape(a)
    assert f'chronorec_replicas{{version="{status.serving_version}"}} 2.0' in metrics
    assert "chronorec_replica_version_skew 0.0" in metrics
    assert "chronorec_replication_connected 1.0" in metrics

    newer = publish_base_model(tiny_bert_dir, tiny_repo, activate=False)
    a.models.ActivateVersion(models_pb2.ActivateVersionRequest(version=newer, wait=True), timeout=60)
    wait_until(lambda: "chronorec_replica_version_skew 1.0" in scrape(a), timeout=10, interval=0.1)
    versions = {r.name: r.serving_version for r in a.models.GetStatus(models_pb2.GetStatusRequest(), timeout=5).replicas}
    assert versions == {a.engine.replica_name: newer, b.engine.replica_name: status.serving_version}


def test_feedback_on_one_replica_is_seen_by_the_other_within_the_bound(replicas):
    a, b = replicas(2)
    item = sorted(a.engine.catalog)[0]
    lags = []
    for n in range(5):
        user = f"new-user-{n}"
        a.recommender.Feedback(recommender_pb2.FeedbackRequest(events=[event(f"e-{n}", user, item)]), timeout=10)
        assert history_length(a, user) == 1  # read-your-writes on the replica written to
        lags.append(wait_until(lambda: history_length(b, user) == 1, timeout=5))
    assert max(lags) < BOUND_S, lags


def test_catalog_changes_on_one_replica_reach_the_other(replicas, postgres_url):
    a, b = replicas(2)
    new = common_pb2.Item(item_id="fresh-1", title="Orbital mechanics for beginners", text="Kepler's laws", category="astronomy")
    b.catalog.UpsertItems(catalog_pb2.UpsertItemsRequest(items=[new]), timeout=10)

    def a_has_it() -> bool:
        try:
            return a.catalog.GetItem(catalog_pb2.GetItemRequest(item_id="fresh-1"), timeout=5).item.title == new.title
        except grpc.RpcError:
            return False

    assert wait_until(a_has_it, timeout=5) < BOUND_S
    with a.engine.manager.acquire() as model:
        assert "fresh-1" in model.index  # indexed, so Recommend can return it

    # A newer upsert of the same item from A, then a delete from B: A ends with the delete.
    a.catalog.UpsertItems(catalog_pb2.UpsertItemsRequest(items=[common_pb2.Item(item_id="fresh-1", title="Renamed")]),
                          timeout=10)
    b.engine.follower.wait_for(a.engine.follower.cursor, timeout=5)
    b.catalog.DeleteItems(catalog_pb2.DeleteItemsRequest(item_ids=["fresh-1"]), timeout=10)

    def a_lost_it() -> bool:
        try:
            a.catalog.GetItem(catalog_pb2.GetItemRequest(item_id="fresh-1"), timeout=5)
            return False
        except grpc.RpcError as error:
            return error.code() == grpc.StatusCode.NOT_FOUND

    assert wait_until(a_lost_it, timeout=5) < BOUND_S
    for replica in (a, b):
        in_memory_matches_log(replica, postgres_url)


def test_writes_by_another_process_reach_every_replica(replicas, postgres_url):
    (a,) = replicas(1)
    items, _ = generate_demo(n_items=40, n_users=2)
    with PostgresEventStore(postgres_url) as importer:
        extra = [replace(item, item_id=f"imported-{item.item_id}") for item in items]
        importer.bulk_import(extra, [])
    wait_until(lambda: "imported-" + items[0].item_id in a.engine.catalog, timeout=5)
    in_memory_matches_log(a, postgres_url)


def test_a_replica_started_late_catches_up_with_writes_made_while_it_loaded(replicas, postgres_url):
    (a,) = replicas(1)
    item = sorted(a.engine.catalog)[0]
    stop = threading.Event()
    written = []

    def write() -> None:
        n = 0
        while not stop.is_set():
            a.recommender.Feedback(recommender_pb2.FeedbackRequest(events=[event(f"w-{n}", f"u{n % 7}", item)]),
                                   timeout=10)
            written.append(n)
            n += 1

    writer = threading.Thread(target=write)
    writer.start()
    try:
        time.sleep(0.3)
        (late,) = replicas(1)
    finally:
        stop.set()
        writer.join()
    assert len(written) > 0
    in_memory_matches_log(late, postgres_url)
    in_memory_matches_log(a, postgres_url)


def test_postgres_restarted_under_load_writes_get_pushback_and_replicas_recover(replicas, postgres_cluster,
                                                                                postgres_url):
    a, b = replicas(2)
    item = sorted(a.engine.catalog)[0]
    outcomes: list[tuple[str, grpc.StatusCode, str]] = []
    acknowledged: list[str] = []
    stop = threading.Event()

    def write(replica, tag: str) -> None:
        n = 0
        while not stop.is_set():
            event_id = f"{tag}-{n}"
            try:
                _, call = replica.recommender.Feedback.with_call(
                    recommender_pb2.FeedbackRequest(events=[event(event_id, f"u-{tag}", item)]), timeout=10)
                acknowledged.append(event_id)
            except grpc.RpcError as error:
                trailers = dict(error.trailing_metadata() or ())
                outcomes.append((event_id, error.code(), trailers.get("grpc-retry-pushback-ms", "")))
                time.sleep(0.05)
            n += 1

    writers = [threading.Thread(target=write, args=(r, tag)) for r, tag in ((a, "a"), (b, "b"))]
    for w in writers:
        w.start()
    try:
        time.sleep(0.3)
        postgres_cluster.stop("immediate")
        # Down until a write has met the outage (a call in flight when it began may take a while
        # to fail), so the pushback is observed whatever the machine's speed.
        wait_until(lambda: bool(outcomes), timeout=30)
        postgres_cluster.start()
        # Writes succeed again on both replicas without a restart.
        count = len(acknowledged)
        wait_until(lambda: len(acknowledged) > count + 20, timeout=30)
    finally:
        stop.set()
        for w in writers:
            w.join()
    assert outcomes, "the outage refused no write"
    assert {code for _, code, _ in outcomes} == {grpc.StatusCode.UNAVAILABLE}
    assert all(pushback.isdigit() and int(pushback) > 0 for _, _, pushback in outcomes)
    with psycopg.connect(postgres_url) as conn:
        stored = {row[0] for row in conn.execute("SELECT event_id FROM events")}
    assert set(acknowledged) <= stored  # no acknowledged event was lost
    for replica in (a, b):
        in_memory_matches_log(replica, postgres_url)


def test_torchrun_trains_on_two_ranks_publishes_once_and_every_replica_swaps_without_a_failed_call(
        postgres_url, start_server, tmp_path, tiny_bert_dir):
    """The trainer reads PostgreSQL under torchrun (2 CPU processes, gloo): both ranks end the
    steps with identical weights, rank 0 alone publishes, and both replicas move to the new version
    while they answer Recommend."""
    from chronorec.server.core.demo import generate_drift_dataset
    from chronorec.server.core.repository import ModelRepository
    from chronorec.trainer import distributed
    from chronorec.trainer.export import load_base_model, publish_base_model

    drift = generate_drift_dataset(seed=7, anchor=1_790_000_000.0)
    with PostgresEventStore(postgres_url) as store:
        store.bulk_import(drift.items, drift.events)
    models = tmp_path / "models"
    base = publish_base_model(tiny_bert_dir, models, activate=True, max_length=64)
    a, b = (start_server(models, db=postgres_url, watch_interval_s=0.2) for _ in range(2))
    users = sorted({e.user_id for e in drift.events})[:5]
    failures: list[str] = []
    calls = [0]
    stop = threading.Event()

    def load(replica) -> None:
        n = 0
        while not stop.is_set():
            try:
                history_length(replica, users[n % len(users)])
                calls[0] += 1
            except grpc.RpcError as error:
                failures.append(f"{error.code()}: {error.details()}")
            n += 1
            time.sleep(0.01)  # steady traffic, leaving the cores to the trainer

    loaders = [threading.Thread(target=load, args=(r,)) for r in (a, b)]
    for loader in loaders:
        loader.start()
    try:
        env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
        done = subprocess.run(
            [str(Path(sys.executable).parent / "torchrun"), "--nproc-per-node", "2", "-m", "chronorec.trainer.cli",
             "--verbose", "run", "--db", postgres_url, "--models", str(models), "--steps", "2", "--batch-size", "16",
             "--eval-every", "2", "--no-tune", "--max-eval-instances", "40", "--threads", "1", "--force", "--no-progress",
             "--json"],
            capture_output=True, text=True, timeout=400, env=env, cwd=tmp_path)
        assert done.returncode == 0, done.stderr[-3000:]
        published = [v for v in ModelRepository(models).list_versions() if v != base]
        assert len(published) == 1, published  # rank 1 published nothing
        new = published[0]
        for replica in (a, b):
            wait_until(lambda: replica.engine.serving_version() == new, timeout=60, interval=0.05)
    finally:
        stop.set()
        for loader in loaders:
            loader.join()
    digests = dict(re.findall(r"rank (\d) of 2: weights digest (\w+)", done.stderr))
    assert set(digests) == {"0", "1"} and digests["0"] == digests["1"], done.stderr[-3000:]
    module, _ = load_base_model(tiny_bert_dir)
    assert distributed.weights_digest(module) != digests["0"]  # the steps changed the weights
    outcomes = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    assert sorted(o["status"] for o in outcomes) == ["activated", "trained-shard"]
    assert not failures and calls[0] > 0, failures[:5]


def test_killing_a_replica_under_load_fails_no_idempotent_call_and_loses_no_acknowledged_event(
        postgres_url, tiny_repo, tmp_path):
    """Two replica processes behind the client's round_robin; one is killed with SIGKILL while
    threads send Recommend and Feedback (with event ids) as fast as they can."""
    from bench.common import ServerProcess
    from chronorec.client.client import ChronorecClient, ChronorecClientError, FeedbackEvent
    from chronorec.server.core.demo import ensure_demo

    with PostgresEventStore(postgres_url) as store:
        ensure_demo(store)
        item_ids = [item.item_id for item in store.iter_items()][:20]
    replicas = [ServerProcess(postgres_url, tiny_repo, tmp_path / f"replica-{n}.log", int8=False,
                              extra=["--replica-name", f"r{n}"]) for n in range(2)]
    failures: list[str] = []
    acknowledged: list[str] = []
    calls = collections.Counter()
    stop = threading.Event()
    try:
        for replica in replicas:
            replica.wait_serving(120)
        target = ",".join(r.target for r in replicas)

        def load(worker: int) -> None:
            with ChronorecClient(target, timeout=10) as client:
                n = 0
                while not stop.is_set():
                    user = f"failover-{worker}-{n % 5}"
                    try:
                        if n % 2:
                            client.recommend(user, k=5)
                            calls["recommend"] += 1
                        else:
                            event_id = f"kill-{worker}-{n}"
                            client.feedback([FeedbackEvent(user, item_ids[n % len(item_ids)], "click", event_id=event_id)])
                            acknowledged.append(event_id)
                            calls["feedback"] += 1
                    except ChronorecClientError as error:
                        failures.append(f"{error.code.name}: {error.message}")
                    n += 1

        workers = [threading.Thread(target=load, args=(w,)) for w in range(4)]
        for worker in workers:
            worker.start()
        time.sleep(1.5)
        before = sum(calls.values())
        replicas[0].proc.kill()  # SIGKILL: no goodbye, open calls cut
        replicas[0].proc.wait()
        time.sleep(2.0)
        stop.set()
        for worker in workers:
            worker.join()
    finally:
        stop.set()
        for replica in replicas:
            replica.stop()
    assert not failures, failures[:5]
    assert before > 0 and sum(calls.values()) > before + 10 and calls["recommend"] and calls["feedback"]
    with psycopg.connect(postgres_url) as conn:
        stored = {row[0] for row in conn.execute("SELECT event_id FROM events WHERE event_id LIKE 'kill-%'")}
    assert set(acknowledged) <= stored


def test_chronorec_import_with_db_writes_straight_into_the_shared_store_and_replicas_pick_it_up(replicas, postgres_url,
                                                                                               tmp_path):
    from chronorec.client.cli import main as chronorec

    (a,) = replicas(1)
    data = tmp_path / "dataset"
    data.mkdir()
    (data / "items.jsonl").write_text(json.dumps({"item_id": "cli-1", "title": "Imported without a server"}) + "\n")
    (data / "events.jsonl").write_text(json.dumps({"event_id": "cli-e1", "user_id": "cli-user", "item_id": "cli-1",
                                                   "action": "like", "timestamp": 1_700_000_000}) + "\n")
    out = io.StringIO()
    assert chronorec(["import", "--db", postgres_url, str(data)], out=out) == 0
    assert "events stored 1" in out.getvalue() and "chronorec@" not in out.getvalue()  # no credentials echoed
    wait_until(lambda: "cli-1" in a.engine.catalog and history_length(a, "cli-user") == 1, timeout=5)
