#!/usr/bin/env bash
# The GPU benchmark on a fresh machine: a new venv with the project's `gpu` extra (onnxruntime-gpu)
# and the trainer, then tests/bench/bench_gpu.py; JSON and a markdown table land in $OUT.
#
#   tests/bench/gpu.sh                         # venv in /tmp/chronorec-gpu-venv, results in $OUT (default reports/gpu)
#   tests/bench/gpu.sh --wheels DIR            # offline: install only from wheels in DIR (pip --no-index)
#   tests/bench/gpu.sh --system-site-packages  # reuse the machine's own PyTorch (CUDA build) instead of installing one
#   tests/bench/gpu.sh --no-venv -- --quick    # no install: the current python (CI runs the CPU fallback so)
#
# Arguments after `--` go to bench_gpu.py (--model, --device, --batches, --data, --epoch-steps, ...).
# Without a usable CUDA provider the benchmark runs on the CPU and says so; nothing needs editing.
set -euo pipefail
cd "$(dirname "$0")/../.."

venv="${CHRONOREC_GPU_VENV:-/tmp/chronorec-gpu-venv}"
python="${PYTHON:-python3}"
make_venv=1
wheels=""
site=""
while [ $# -gt 0 ]; do
  case "$1" in
    --no-venv) make_venv=0 ;;
    --venv) venv="$2"; shift ;;
    --wheels) wheels="$2"; shift ;;
    --system-site-packages) site="--system-site-packages" ;;
    --) shift; break ;;
    -h|--help) sed -n '2,12p' "$0"; exit 0 ;;
    *) echo "gpu.sh: unknown option $1 (bench_gpu.py's options go after --)" >&2; exit 2 ;;
  esac
  shift
done
export OUT="${OUT:-reports/gpu}"
mkdir -p "$OUT"

if command -v nvidia-smi >/dev/null 2>&1; then
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$OUT/nvidia-smi.txt" || true
else
  echo "gpu.sh: no nvidia-smi on this machine: the benchmark will run its CPU fallback" >&2
fi

if [ "$make_venv" = 1 ]; then
  started=$(date +%s)
  rm -rf "$venv"
  "$python" -m venv $site "$venv"
  pip_args=(-q --disable-pip-version-check)
  if [ -n "$wheels" ]; then pip_args+=(--no-index --find-links "$wheels"); fi
  # onnxruntime (CPU) and onnxruntime-gpu share one import folder: only the gpu extra goes in.
  # The trainer extra pins torch; PyPI's Linux build of it is the CUDA one.
  if [ -n "$site" ] && "$venv/bin/python" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
    "$venv/bin/pip" install "${pip_args[@]}" -e ".[server,gpu]" transformers onnx tqdm
  else
    "$venv/bin/pip" install "${pip_args[@]}" -e ".[server,gpu,trainer]"
  fi
  echo "gpu.sh: venv $venv ready in $(( $(date +%s) - started )) s" >&2
  run_python="$venv/bin/python"
else
  run_python="${PYTHON:-$(command -v python3)}"
  if [ -x .venv/bin/python ] && [ -z "${PYTHON:-}" ]; then run_python=.venv/bin/python; fi
fi

"$run_python" - <<'PY' | tee "$OUT/providers.txt"
import onnxruntime as ort
print("onnxruntime", ort.__version__, "providers", ort.get_available_providers())
PY
export PYTHONUNBUFFERED=1
"$run_python" -m tests.bench.bench_gpu --out "$OUT" "$@" 2>&1 | tee "$OUT/bench_gpu.log"
