"""The GPU benchmark script's CPU fallback at CI size: gpu.sh (without making its venv) runs bench_gpu end to end."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _positive(value) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value) and value > 0


def test_gpu_script_cpu_fallback(tmp_path):
    out = tmp_path / "out"
    env = dict(os.environ, OUT=str(out), PYTHON=sys.executable)
    # No ML-100K folder: the fine-tuning epoch runs a few steps on generated users instead.
    proc = subprocess.run(
        ["bash", str(ROOT / "tests" / "bench" / "gpu.sh"), "--no-venv", "--", "--quick", "--device", "cpu",
         "--data", str(tmp_path / "no-data")],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=240,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads((out / "gpu.json").read_text())
    table = (out / "gpu.md").read_text()

    assert result["conditions"]["device"] == "cpu"
    assert set(result["providers"].values()) == {"CPUExecutionProvider"}
    assert {"fp32", "fp16"} <= set(result["providers"])
    cells = {(c["graph"], c["batch"]) for c in result["encode"]}
    assert {(g, b) for g in result["providers"] for b in (1, 8, 32)} == cells
    assert all(_positive(c["texts_per_s"]) for c in result["encode"])
    fp16 = result["cosine_to_fp32"]["fp16"]
    assert 0.99 <= fp16["min"] <= fp16["mean"] <= 1.0 + 1e-5
    for figures in result["microbatcher"].values():
        assert figures["provider"] == "CPUExecutionProvider"
        assert 0 < figures["one_caller"]["p50_ms"] <= figures["one_caller"]["p99_ms"]
        assert _positive(figures["concurrent"]["texts_per_s"])
    epoch = result["finetune_epoch"]
    assert epoch["device"] == "cpu" and epoch["steps"] == 3 and _positive(epoch["examples_per_second"])
    # No GPU ran, so no target is judged; the table says why.
    assert all(t["met"] is None for t in result["targets"].values())
    assert "n/a (no GPU)" in table and "| batch |" in table
    assert (out / "providers.txt").read_text().startswith("onnxruntime ")
