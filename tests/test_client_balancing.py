"""The client balances over replicas with gRPC's round_robin and client-side health checking."""

from __future__ import annotations

import collections
import time

import pytest

from chronorec.client.client import ChronorecClient, channel_target, service_config


def test_a_list_of_addresses_becomes_grpcs_static_list_and_anything_else_passes_unchanged():
    assert channel_target("127.0.0.1:5001,127.0.0.1:5002") == "ipv4:127.0.0.1:5001,127.0.0.1:5002"
    assert channel_target(" 10.0.0.1:5001, 10.0.0.2:5001 ") == "ipv4:10.0.0.1:5001,10.0.0.2:5001"
    assert channel_target("[::1]:5001,[::1]:5002") == "ipv6:[::1]:5001,[::1]:5002"
    for target in ("127.0.0.1:5001", "localhost:50051", "dns:///chronorec.internal:50051",
                   "ipv4:127.0.0.1:1,127.0.0.1:2", "unix:/run/chronorec.sock"):
        assert channel_target(target) == target
    with pytest.raises(ValueError, match="dns:///NAME:PORT"):
        channel_target("a.example:5001,b.example:5001")
    with pytest.raises(ValueError, match="not HOST:PORT"):
        channel_target("127.0.0.1,127.0.0.2:5001")
    with pytest.raises(ValueError, match="all IPv4 or all IPv6"):
        channel_target("127.0.0.1:5001,[::1]:5001")


def test_the_service_config_balances_round_robin_over_healthy_replicas_with_or_without_retries():
    for retries in (0, 4):
        config = service_config(retries, 0.05, 2.0)
        assert config["loadBalancingConfig"] == [{"round_robin": {}}]
        assert config["healthCheckConfig"] == {"serviceName": ""}


def test_calls_spread_over_replicas_and_skip_one_that_reports_not_serving(start_server, tiny_repo, tmp_path):
    a = start_server(tiny_repo, db=tmp_path / "a.db", demo=True)
    b = start_server(tiny_repo, db=tmp_path / "b.db", demo=True)
    names = {a.engine.replica_name: a, b.engine.replica_name: b}

    with ChronorecClient(f"127.0.0.1:{a.port},127.0.0.1:{b.port}") as client:
        def answered_by(n: int) -> collections.Counter:
            return collections.Counter(next(r.name for r in client.status().replicas if r.this_replica)
                                       for _ in range(n))

        assert set(answered_by(20)) == set(names)
        a.running.set_serving(False)  # loading or stopping: its health service says NOT_SERVING
        deadline = time.monotonic() + 5
        while answered_by(1) != collections.Counter({b.engine.replica_name: 1}) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert answered_by(20) == collections.Counter({b.engine.replica_name: 20})
        a.running.set_serving(True)
        deadline = time.monotonic() + 5
        while len(answered_by(10)) < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert set(answered_by(20)) == set(names)
