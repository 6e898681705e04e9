#!/usr/bin/env bash
# One command from nothing to the full test suite: sets up .venv with every extra, then runs pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
CHRONOREC_EXTRAS=cpu,trainer,postgres,dashboard,test server/setup.sh
exec .venv/bin/python -m pytest -q "$@"
