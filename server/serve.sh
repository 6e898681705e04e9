#!/usr/bin/env bash
# One command from nothing to a serving chronorec on the embedded defaults (MiniLM + demo catalog).
set -euo pipefail
cd "$(dirname "$0")/.."
CHRONOREC_EXTRAS=cpu,trainer,dashboard server/setup.sh
DATA_DIR="${CHRONOREC_DATA_DIR:-var}"
if [ ! -s "$DATA_DIR/models/encoder/CURRENT" ]; then
  echo "exporting the packaged MiniLM encoder to ONNX into $DATA_DIR/models ..."
  .venv/bin/chronorec-train export-base --models "$DATA_DIR/models"
fi
exec .venv/bin/chronorec-server --data-dir "$DATA_DIR" --log-text "$@"
