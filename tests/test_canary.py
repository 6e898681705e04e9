"""Canary traffic over a real server: a stable, sticky split under load, promote and abort (by hand, by the rule, by the trainer) with no failed call."""

from __future__ import annotations

import io
import itertools
import shutil
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest

from chronorec.client.cli import main as cli
from chronorec.client.client import ChronorecClient, ChronorecClientError, FeedbackEvent
from chronorec.server.core.canary import user_bucket
from chronorec.server.core.catalog import Event, Item
from chronorec.server.core.repository import ModelRepository
from chronorec.server.core.store import EventStore
from chronorec.trainer.export import publish_base_model
from chronorec.v1 import models_pb2
from conftest import ANCHOR

DAY = 86400.0
USERS = 10_000
SHARE = 20.0


@pytest.fixture
def db(tmp_path):
    path = tmp_path / "canary.db"
    items = [Item(f"item-{n:03d}", f"Film {n}", text=f"topic {n % 7}", category=f"c{n % 3}",
                  published_at=ANCHOR - 400 * DAY) for n in range(120)]
    events = [Event(f"e-{u}-{n}", f"fan-{u}", f"item-{(u * 5 + n) % 120:03d}", "like", ANCHOR - 5 * DAY + 60 * n)
              for u in range(40) for n in range(6)]
    with EventStore(path) as store:
        store.bulk_import(items, events)
    return path


@pytest.fixture(scope="module")
def three_versions(tmp_path_factory, tiny_repo_template, tiny_bert_dir):
    """A repository serving version 1, with two more published beside it (same weights, other names)."""
    root = tmp_path_factory.mktemp("canary-repo") / "models"
    shutil.copytree(tiny_repo_template, root)
    first = ModelRepository(root).current()
    second = publish_base_model(tiny_bert_dir, root, activate=False)
    third = publish_base_model(tiny_bert_dir, root, activate=False)
    return root, (first, second, third)


@pytest.fixture
def world(start_server, three_versions, tmp_path, db):
    template, versions = three_versions
    models = tmp_path / "models"
    shutil.copytree(template, models)
    return (start_server(models, db=db), *versions)


class Traffic:
    """Recommend calls in the background for as long as it runs; every failure is kept."""

    def __init__(self, target: str, threads: int = 3):
        self.client = ChronorecClient(target, max_retries=0)
        self.failures: list[str] = []
        self.calls = 0
        self.versions: set[str] = set()
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._run, args=(n,), daemon=True) for n in range(threads)]

    def _run(self, n: int) -> None:
        for step in itertools.count():
            if self._stop.is_set():
                return
            user = f"fan-{(n * 13 + step) % 40}" if step % 2 else f"visitor-{n}-{step}"
            try:
                self.versions.add(self.client.recommend(user, k=3, at=ANCHOR).model_version)
                self.calls += 1
            except ChronorecClientError as error:
                self.failures.append(f"{error.code.name}: {error.message}")

    def __enter__(self) -> "Traffic":
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=30)
        self.client.close()


def test_the_split_is_within_3_points_over_10000_users_and_sticky(world):
    server, first, second, _ = world
    with ChronorecClient(server.target) as client:
        started = client.activate(second, canary_percent=SHARE)
        assert (started.serving_version, started.canary_version, started.canary_percent) == (first, second, SHARE)
        status = client.status()
        assert status.canary.candidate_version == second and status.canary.percent == SHARE
        loaded = {v.role: v for v in status.loaded_versions}
        assert loaded["current"].version == first and loaded["canary"].version == second
        assert all(v.memory_bytes > 0 for v in loaded.values()) and status.resident_memory_bytes > 0

        users = [f"user-{n}" for n in range(USERS)]
        with ThreadPoolExecutor(8) as pool:  # under load: eight callers at once
            served = dict(zip(users, pool.map(lambda u: client.recommend(u, k=3, at=ANCHOR).model_version, users)))
        share = 100.0 * sum(v == second for v in served.values()) / USERS
        assert abs(share - SHARE) <= 3.0, share
        assert set(served.values()) == {first, second}
        # Exactly the stable hash's choice, so every server on the repository makes the same one.
        assert all((served[u] == second) == (user_bucket(second, u) < SHARE) for u in users)

        # Sticky: asked again (in batches this time), each user is served by the same version.
        again = {}
        for chunk in range(0, 2000, 250):
            batch = client.recommend_batch(users[chunk:chunk + 250], k=3, at=ANCHOR)
            again.update({u: e.result.model_version for u, e in zip(users[chunk:chunk + 250], batch.entries)})
        assert all(again[u] == served[u] for u in again)
        # Anonymous requests stay on the current version.
        anonymous = client.recommend(history=[{"item_id": "item-001", "action": "like", "timestamp": ANCHOR - 60}],
                                     k=3, at=ANCHOR)
        assert anonymous.model_version == first


def test_bad_canary_requests(world):
    server, first, second, third = world
    with ChronorecClient(server.target) as client:
        for percent in (150.0, -1.0, 100.5):
            with pytest.raises(ChronorecClientError) as info:
                client.activate(second, canary_percent=percent)
            assert info.value.code == grpc.StatusCode.INVALID_ARGUMENT and "between 0 and 100" in info.value.message
        with pytest.raises(grpc.RpcError) as raw:
            server.models.ActivateVersion(models_pb2.ActivateVersionRequest(version=second, canary_percent=float("nan")))
        assert raw.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        with pytest.raises(ChronorecClientError) as info:
            client.activate(first, canary_percent=10)
        assert info.value.code == grpc.StatusCode.FAILED_PRECONDITION  # serving already
        for call in (client.promote_canary, client.abort_canary):
            with pytest.raises(ChronorecClientError) as info:
                call()
            assert info.value.code == grpc.StatusCode.FAILED_PRECONDITION  # none runs

        client.activate(second, canary_percent=10)
        with pytest.raises(ChronorecClientError) as info:
            client.activate(third, canary_percent=10)
        assert info.value.code == grpc.StatusCode.FAILED_PRECONDITION and second in info.value.message
        for call in (lambda: client.activate(third), client.rollback):
            with pytest.raises(ChronorecClientError) as info:
                call()
            assert info.value.code == grpc.StatusCode.FAILED_PRECONDITION

    # By hand, from the command line: abort, then a new canary promoted.
    out = io.StringIO()
    assert cli(["--target", server.target, "canary", "abort"], out=out) == 0
    assert f"aborted {second}: {first} serves everyone" in out.getvalue()
    assert cli(["--target", server.target, "activate", third, "--canary", "50"], out=out) == 0
    assert cli(["--target", server.target, "canary", "promote"], out=out) == 0
    assert f"promoted: {third} serves everyone" in out.getvalue()
    assert ModelRepository(server.config.models).current() == third
    assert server.engine.manager.loaded()[0][1].version == third and len(server.engine.manager.loaded()) == 1


def drive(client: ChronorecClient, candidate: str, click_candidate: int, click_current: int, done, limit_s: float = 120):
    """A scripted audience until `done()`: every recommendation's items are logged as impressions;
    one in `click_candidate` of the candidate's recommendations (one in `click_current` of the
    current version's) gets a click on its first item (0: never)."""
    deadline = time.monotonic() + limit_s
    for n in itertools.count():
        if done() or time.monotonic() > deadline:
            return
        user = f"audience-{n}"
        result = client.recommend(user, k=3, at=ANCHOR)
        events = [FeedbackEvent(user, item.item_id, "impression", ANCHOR - 1, recommendation_id=result.recommendation_id,
                                position=rank) for rank, item in enumerate(result.items, start=1)]
        every = click_candidate if result.model_version == candidate else click_current
        if every and n % every == 0:
            events.append(FeedbackEvent(user, result.items[0].item_id, "click", ANCHOR - 1,
                                        recommendation_id=result.recommendation_id, position=1))
        client.feedback(events)


def test_the_rule_promotes_and_aborts_with_no_failed_call(world):
    server, first, second, third = world
    repository = ModelRepository(server.config.models)
    with ChronorecClient(server.target) as client, Traffic(server.target) as traffic:
        # A better candidate: promoted once each side logged 60 impressions.
        client.activate(second, canary_percent=50, min_impressions=60, max_ctr_drop=0.0)
        drive(client, second, click_candidate=2, click_current=10, done=lambda: client.status().canary is None)
        status = client.status()
        assert status.canary is None and status.last_canary_outcome.startswith(f"promoted {second} over {first}")
        assert repository.current() == second and repository.read_canary() is None
        assert client.recommend("anyone", k=3, at=ANCHOR).model_version == second

        # A worse one: aborted, and everyone is back on the current version.
        client.activate(third, canary_percent=50, min_impressions=60, max_ctr_drop=0.0)
        drive(client, third, click_candidate=0, click_current=3, done=lambda: client.status().canary is None)
        status = client.status()
        assert status.last_canary_outcome.startswith(f"aborted {third}")
        assert repository.current() == second and repository.read_canary() is None
        assert {client.recommend(f"u{n}", k=3, at=ANCHOR).model_version for n in range(50)} == {second}
        assert [v.version for v in status.loaded_versions] == [second]
        time.sleep(0.5)  # traffic keeps flowing after the last switch
    assert traffic.failures == [] and traffic.calls > 50
    assert traffic.versions == {first, second, third}


def test_the_trainer_starts_a_canary_the_server_follows(start_server, tmp_path, tiny_bert_dir, one_torch_thread):
    from chronorec.server.core.demo import generate_drift_dataset
    from chronorec.trainer.pipeline import EXIT_ACTIVATED, EXIT_FAILED, RunSettings, run_once

    drift = generate_drift_dataset(seed=7, n_items=200, n_users=20, n_events_per_user=30, anchor=ANCHOR)
    db, models = tmp_path / "trainer.db", tmp_path / "models"
    with EventStore(db) as store:
        store.bulk_import(drift.items, drift.events)
    base = publish_base_model(tiny_bert_dir, models, activate=True, max_length=64)
    server = start_server(models, db=db)
    quick = dict(steps=2, batch_size=16, lr=2e-3, tune=False, progress=False, max_eval_instances=60, threads=1)

    assert run_once(db, models, RunSettings(**quick, canary=150.0)).exit_code == EXIT_FAILED
    outcome = run_once(db, models, RunSettings(**quick, force=True, canary=30.0, canary_min_impressions=500,
                                               canary_max_ctr_drop=0.01))
    assert (outcome.exit_code, outcome.status) == (EXIT_ACTIVATED, "canary"), outcome.message
    repository = ModelRepository(models)
    assert repository.current() == base  # nobody switched
    with ChronorecClient(server.target) as client:
        deadline = time.monotonic() + 60
        while client.status().canary is None and time.monotonic() < deadline:
            time.sleep(0.2)
        canary = client.status().canary
        assert canary.candidate_version == outcome.version and canary.percent == 30.0
        assert (canary.min_impressions, canary.max_ctr_drop) == (500, 0.01)
        assert canary.decision.startswith("wait: candidate has 0 of 500 impressions")
        served = {client.recommend(f"user-{n}", k=3, at=ANCHOR).model_version for n in range(200)}
        assert served == {base, outcome.version}
        client.promote_canary()
    assert repository.current() == outcome.version
