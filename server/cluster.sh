#!/usr/bin/env bash
# A local cluster in one command: a throwaway PostgreSQL in var/pg and two chronorec replicas sharing it.
#
#   server/cluster.sh            # PostgreSQL on 127.0.0.1:55432, replicas on 50051 and 50052; Ctrl-C stops all
#
# Settings (environment): CHRONOREC_DATA_DIR (var), CHRONOREC_PG_PORT (55432), CHRONOREC_CLUSTER_PORTS
# ("50051 50052": one replica per port), CHRONOREC_MODELS (DATA_DIR/models, the repository both replicas
# read), CHRONOREC_PG_BIN (the folder of initdb and pg_ctl; default the newest /usr/lib/postgresql/*/bin),
# CHRONOREC_SETUP=0 to skip installing into .venv. The database stays in var/pg between runs; delete the
# folder for an empty one.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT="$(pwd)"
if [ "${CHRONOREC_SETUP:-1}" != 0 ]; then
  CHRONOREC_EXTRAS=cpu,trainer,postgres server/setup.sh
fi
DATA_DIR="${CHRONOREC_DATA_DIR:-var}"
MODELS="${CHRONOREC_MODELS:-$DATA_DIR/models}"
PG_PORT="${CHRONOREC_PG_PORT:-55432}"
read -r -a PORTS <<< "${CHRONOREC_CLUSTER_PORTS:-50051 50052}"
mkdir -p "$DATA_DIR"
PG_DIR="$(cd "$DATA_DIR" && pwd)/pg"

# The server binaries: Debian keeps them off PATH, one folder per major version.
PG_BIN="${CHRONOREC_PG_BIN:-}"
if [ -z "$PG_BIN" ]; then
  PG_BIN="$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1 || true)"
  [ -n "$PG_BIN" ] || PG_BIN="$(dirname "$(command -v pg_ctl 2>/dev/null || echo /nonexistent/pg_ctl)")"
fi
if [ ! -x "$PG_BIN/pg_ctl" ] || [ ! -x "$PG_BIN/initdb" ]; then
  echo "no PostgreSQL server binaries (initdb, pg_ctl) found: apt-get install -y postgresql, or set CHRONOREC_PG_BIN" >&2
  exit 1
fi
# initdb refuses to run as root: the server then runs as the `postgres` user, on a folder it owns.
AS_PG=()
if [ "$(id -u)" = 0 ]; then
  id postgres >/dev/null 2>&1 || { echo "running as root needs a 'postgres' user to run PostgreSQL as" >&2; exit 1; }
  AS_PG=(runuser -u postgres --)
fi
mkdir -p "$PG_DIR"
[ ${#AS_PG[@]} -eq 0 ] || chown postgres "$PG_DIR"
if [ ! -s "$PG_DIR/data/PG_VERSION" ]; then
  echo "creating a PostgreSQL cluster in $PG_DIR/data ..."
  "${AS_PG[@]}" "$PG_BIN/initdb" -D "$PG_DIR/data" -U chronorec --auth=trust -E UTF8 --locale=C >"$PG_DIR/initdb.log"
fi

PIDS=()
stop_all() {
  trap - INT TERM EXIT
  echo
  echo "stopping the replicas and PostgreSQL ..."
  for pid in "${PIDS[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
  for pid in "${PIDS[@]}"; do wait "$pid" 2>/dev/null || true; done
  "${AS_PG[@]}" "$PG_BIN/pg_ctl" -D "$PG_DIR/data" -m fast -w stop >/dev/null 2>&1 || true
  echo "stopped"
}
# Ctrl-C (or a TERM) is the way to stop: everything stops and the script ends well.
trap 'stop_all; exit 0' INT TERM
trap stop_all EXIT

"${AS_PG[@]}" "$PG_BIN/pg_ctl" -D "$PG_DIR/data" -l "$PG_DIR/server.log" -w -t 60 \
  -o "-p $PG_PORT -k $PG_DIR -c listen_addresses=127.0.0.1" start >/dev/null
URL="postgresql://chronorec@127.0.0.1:$PG_PORT/chronorec"
.venv/bin/python - "$PG_PORT" <<'EOF'
import sys

import psycopg

with psycopg.connect(f"postgresql://chronorec@127.0.0.1:{sys.argv[1]}/postgres", autocommit=True) as conn:
    if conn.execute("SELECT 1 FROM pg_database WHERE datname = 'chronorec'").fetchone() is None:
        conn.execute("CREATE DATABASE chronorec")
EOF
echo "PostgreSQL on 127.0.0.1:$PG_PORT (data in $PG_DIR/data, log $PG_DIR/server.log)"

if [ ! -s "$MODELS/encoder/CURRENT" ]; then
  echo "exporting the packaged MiniLM encoder to ONNX into $MODELS ..."
  .venv/bin/chronorec-train export-base --models "$MODELS"
fi

# Every replica gets the same database and model repository. They start together: the first to
# take the store's advisory lock loads the demo catalog into the empty database, the others find it.
TARGET=""
for i in "${!PORTS[@]}"; do
  port="${PORTS[$i]}"
  .venv/bin/chronorec-server --db "$URL" --models "$MODELS" --data-dir "$DATA_DIR/replica-$((i + 1))" \
    --port "$port" --replica-name "replica-$((i + 1))" --log-text >"$DATA_DIR/replica-$((i + 1)).log" 2>&1 &
  PIDS+=("$!")
  TARGET="${TARGET:+$TARGET,}127.0.0.1:$port"
done

echo "waiting for ${#PORTS[@]} replicas to serve (logs in $DATA_DIR/replica-N.log) ..."
.venv/bin/python - "$TARGET" "${PIDS[@]}" <<'EOF'
import os
import sys
import time

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

target, pids = sys.argv[1], sys.argv[2:]
for address, pid in zip(target.split(","), pids):
    stub = health_pb2_grpc.HealthStub(grpc.insecure_channel(address))
    while True:
        try:
            os.kill(int(pid), 0)
        except ProcessLookupError:
            sys.exit(f"the replica on {address} exited; see its log")
        try:
            if stub.Check(health_pb2.HealthCheckRequest(), timeout=1).status == health_pb2.HealthCheckResponse.SERVING:
                break
        except grpc.RpcError:
            pass
        time.sleep(0.2)
EOF
echo
echo "cluster ready: ${#PORTS[@]} replicas over $URL"
echo "client target: $TARGET"
echo "  .venv/bin/chronorec --target $TARGET status"
echo "  .venv/bin/chronorec --target $TARGET recommend demo-user-001"
echo "Ctrl-C stops everything."
# Until Ctrl-C, or until a replica exits by itself (then everything stops).
status=0
wait -n "${PIDS[@]}" || status=$?
if [ "$status" -eq 0 ]; then
  # A replica stops cleanly (status 0) only on a signal: Ctrl-C reached the whole group, and the
  # replica's exit woke this wait before the shell ran its own INT trap (bash leaves a SIGINT to a
  # child that handles it).
  stop_all
  exit 0
fi
echo "a replica exited by itself (status $status); see $DATA_DIR/replica-N.log" >&2
exit 1
