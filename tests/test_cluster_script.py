"""server/cluster.sh: PostgreSQL and two replicas from one command, one client target, all gone on Ctrl-C."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import time
from pathlib import Path

from chronorec.client.client import ChronorecClient
from conftest import free_port

ROOT = Path(__file__).resolve().parents[1]


def test_the_cluster_script_serves_one_target_over_two_replicas_and_stops_everything_on_ctrl_c(tmp_path, tiny_repo):
    data = Path("/tmp") / f"chronorec-cluster-{os.getpid()}"  # the socket path must stay short
    env = {**os.environ, "CHRONOREC_SETUP": "0", "CHRONOREC_DATA_DIR": str(data), "CHRONOREC_MODELS": str(tiny_repo),
           "CHRONOREC_PG_PORT": str(free_port()), "CHRONOREC_CLUSTER_PORTS": f"{free_port()} {free_port()}"}
    output = tmp_path / "cluster.out"
    with open(output, "w") as out:
        # A session of its own, as a terminal's Ctrl-C reaches the whole foreground group.
        script = subprocess.Popen([str(ROOT / "server" / "cluster.sh")], stdout=out, stderr=subprocess.STDOUT, env=env,
                                  start_new_session=True)
    try:
        deadline = time.monotonic() + 240
        while "client target:" not in output.read_text():
            assert script.poll() is None and time.monotonic() < deadline, output.read_text()
            time.sleep(0.2)
        target = re.search(r"client target: (\S+)", output.read_text()).group(1)
        assert len(target.split(",")) == 2
        with ChronorecClient(target) as client:
            # Each replica lists the others as of its own last heartbeat (every 2 s): the replica that
            # answers may have beaten before the other's first heartbeat.
            # Calls are balanced over both replicas: four answers in a row must list both.
            deadline, counts = time.monotonic() + 20, []
            while counts[-4:] != [2] * 4 and time.monotonic() < deadline:
                counts.append(len(client.status().replicas))
                time.sleep(0.25)
            assert counts[-4:] == [2] * 4, counts
            assert client.recommend("demo-user-001", k=3).items
        os.killpg(script.pid, signal.SIGINT)
        assert script.wait(60) == 0
    finally:
        if script.poll() is None:
            os.killpg(script.pid, signal.SIGKILL)
        log = output.read_text()
    assert log.rstrip().endswith("stopped"), log
    running = subprocess.run(["pgrep", "-f", str(data)], capture_output=True, text=True).stdout.split()
    assert not running  # no replica and no PostgreSQL process is left
    subprocess.run(["rm", "-rf", str(data)], check=False)
