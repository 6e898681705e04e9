"""The `chronorec` commands of similar items, batches, erasure, impressions and canaries, against a real server."""

from __future__ import annotations

import io
import os
import re
import subprocess
import sys

import pytest

from chronorec.client.cli import main as cli
from chronorec.server.core.catalog import Event, Item
from chronorec.server.core.store import EventStore
from chronorec.trainer.export import publish_base_model
from conftest import ANCHOR

DAY = 86400.0


@pytest.fixture
def server(start_server, tiny_repo, tiny_bert_dir, tmp_path):
    db = tmp_path / "cli.db"
    items = [Item(f"item-{n:02d}", f"Film {n}", category=f"c{n % 2}", published_at=ANCHOR - 100 * DAY) for n in range(12)]
    events = [Event(f"e-{u}-{n}", f"user-{u}", f"item-{(u + n) % 12:02d}", "like", ANCHOR - DAY + n) for u in range(3)
              for n in range(4)]
    with EventStore(db) as store:
        store.bulk_import(items, events)
    publish_base_model(tiny_bert_dir, tiny_repo, activate=False)
    return start_server(tiny_repo, db=db)


def run(server, *args: str) -> str:
    out = io.StringIO()
    code = cli(["--target", server.target, *args], out=out, err=out)
    assert code == 0, out.getvalue()
    return out.getvalue()


def test_the_commands(server):
    at = "2026-09-21T14:13:20Z"  # ANCHOR
    similar = run(server, "similar", "item-00", "--k", "3", "--at", at, "--category", "c0")
    assert "like item-00" in similar and "semantic weight" in similar
    assert len(re.findall(r"^\s+\d+\s+item-\d\d", similar, re.M)) == 3
    assert "c1" not in similar.split("cooc", 1)[1]

    batch = run(server, "recommend-batch", "user-0", "user-1", "nobody", "--k", "2", "--at", at)
    assert "3 users, 2 history texts encoded together" in batch and batch.count("recommendation ") == 3

    shown = run(server, "recommend", "user-0", "--k", "2", "--at", at)
    rid = re.search(r"recommendation (\S+)", shown).group(1)
    item = re.search(r"^\s+1\s+(item-\d\d)", shown, re.M).group(1)
    run(server, "feedback", "--user", "user-0", "--item", item, "--action", "impression", "--recommendation-id", rid,
        "--position", "1", "--at", at)
    run(server, "feedback", "--user", "user-0", "--item", item, "--action", "click", "--recommendation-id", rid, "--at", at)
    status = run(server, "status")
    assert re.search(r"^\S+\s+1\s+1\s+1\.0000\s+0\s+1\.0000$", status, re.M), status  # impressions, clicks, CTR, conv., MRR
    assert "resident memory" in status and "current" in status

    repository = server.engine.repository
    candidate = next(v for v in repository.list_versions() if v != repository.current())
    assert "canary" in run(server, "activate", candidate, "--canary", "25", "--min-impressions", "5", "--max-ctr-drop", "0.01")
    canary = run(server, "canary")
    assert f"canary {candidate} serves 25% of users" in canary and "wait: candidate has 0 of 5 impressions" in canary
    assert "canary" in run(server, "status") and "canary" in run(server, "versions")
    assert "aborted" in run(server, "canary", "abort")
    assert "no canary is running (last: aborted" in run(server, "canary")

    erased = run(server, "delete-user", "user-0")
    assert "erased user user-0: 5 events and 1 impressions deleted" in erased
    assert "history 0 events" in run(server, "recommend", "user-0", "--at", at)

    bad = io.StringIO()
    assert cli(["--target", server.target, "feedback", "--user", "u", "--item", item, "--action", "impression"],
               out=bad, err=bad) == 2
    assert "impression needs its recommendation_id and position" in bad.getvalue()
    assert cli(["--target", server.target, "activate", candidate, "--canary", "150"], out=bad, err=bad) == 1
    assert "INVALID_ARGUMENT" in bad.getvalue()


@pytest.mark.parametrize("command", ["versions", "status"])  # a table, and name-value pairs
def test_a_reader_that_goes_away_stops_the_command_without_a_message(server, command):
    """`chronorec versions | head -1`: the pipe's reader is gone before the command writes."""
    read, write = os.pipe()
    os.close(read)
    # Buffered as in a shell (this suite may run unbuffered): the last lines then meet the closed
    # pipe when flushed, which Python would otherwise do at exit, with a message and status 120.
    env = {name: value for name, value in os.environ.items() if name != "PYTHONUNBUFFERED"}
    try:
        done = subprocess.run([sys.executable, "-m", "chronorec.client.cli", "--target", server.target, command],
                              stdout=write, stderr=subprocess.PIPE, timeout=60, env=env)
    finally:
        os.close(write)
    assert done.returncode == 1
    assert done.stderr == b""
    # The same call with a reader prints and succeeds.
    assert "version" in run(server, command)
