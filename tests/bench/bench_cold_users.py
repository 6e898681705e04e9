"""Cold-user study: NDCG@10 of one chronorec method against the history text's token limit and the encoder's precision, with each one's encode cost.

    python -m tests.bench.bench_cold_users --data ../shared/data/ml-100k          # fp32 and int8 x 32/64/128 tokens
    python -m tests.bench.bench_cold_users --precisions int8 --lengths 64,128     # a part of the grid (results merge)

Each cell is one `chronorec-eval` run (temporal protocol, `--methods chronorec-untuned-time`,
sweeps off) with `max_length` set; for int8 the evaluation's cached base version is published with
the int8 graph in the fp32 graph's place, so the evaluation runs exactly the weights `--int8`
serves. Beside each cell: CPU milliseconds of one cold user's short-term vector (one history
text of the test window, encoded alone on one thread, as a cold Recommend does), and the paired
NDCG@10 difference to fp32 at 128 tokens (bootstrap over test events). Results merge into
`cold_users.json` in --out, so the grid can be run in parts.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from .common import DEFAULT_OUT, REPO_ROOT, log, print_table

METHOD = "chronorec-untuned-time"
REFERENCE = ("fp32", 128)


def prepare_cache(cache: Path, precision: str, max_length: int) -> Path:
    """The evaluation's cached base version for this cell (published here so int8 can swap graphs)."""
    from chronorec.server.core.manifest import load_manifest
    from chronorec.server.core.repository import ModelRepository
    from chronorec.trainer.chronorec_methods import EvalSettings, _digest
    from chronorec.trainer.export import publish_base_model

    settings = EvalSettings(max_length=max_length, cache_dir=str(cache))
    base = settings.base_folder().resolve()
    root = settings.cache_root() / f"base-{_digest(str(base), max_length)}"
    repo = ModelRepository(root)
    version = repo.current()
    if version is None:
        version = publish_base_model(base, root, activate=True, max_length=max_length, base_model=str(base), int8=True)
    folder = repo.version_dir(version)
    manifest = load_manifest(folder)
    if precision == "int8" and (folder / "model.fp32.onnx").exists() is False:
        shutil.copyfile(folder / manifest.onnx_file, folder / "model.fp32.onnx")
        shutil.copyfile(folder / manifest.int8_file, folder / manifest.onnx_file)
    return folder


def history_texts(data: Path, n: int, seed: int = 0) -> list[str]:
    """History texts of `n` test-window events (what a cold Recommend encodes), seeded sample."""
    from chronorec.server.core.importers import detect_and_load
    from chronorec.trainer.data import event_log_from, load_training_data

    items, events = detect_and_load(data)
    training = load_training_data(event_log_from(items, events))
    queries = [e.query for e in training.valid]
    rng = np.random.default_rng(seed)
    return [queries[i] for i in rng.choice(len(queries), min(n, len(queries)), replace=False)]


def encode_cost(folder: Path, texts: list[str]) -> dict:
    """CPU ms per single-text encode on one thread (median), and the tokens the encoder read."""
    from chronorec.server.core.encoder import OnnxEncoder

    encoder = OnnxEncoder(folder, intra_op_threads=1)
    try:
        for text in texts[:10]:
            encoder.encode([text])
        cpu = []
        for text in texts:
            started = time.process_time()
            encoder.encode([text])
            cpu.append(time.process_time() - started)
        tokens = [len(e.ids) for e in encoder._tokenizer.encode_batch(texts)]
    finally:
        encoder.close()
    return {"cpu_ms_median": float(np.median(cpu) * 1000), "cpu_ms_mean": float(np.mean(cpu) * 1000),
            "tokens_mean": float(np.mean(tokens)), "texts": len(texts)}


def run_eval(data: Path, cache: Path, max_length: int, out: Path) -> dict:
    settings = json.dumps({"max_length": max_length, "cache_dir": str(cache), "sweeps": False})
    command = [sys.executable, "-m", "chronorec.trainer.evaluate", "--data", str(data), "--protocol", "temporal",
               "--methods", METHOD, "--plugin", "chronorec.trainer.chronorec_methods", "--settings", settings,
               "--out", str(out), "--no-progress"]
    started = time.perf_counter()
    proc = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"chronorec-eval failed ({proc.returncode}): {proc.stderr[-2000:]}")
    report = json.loads((out / "report.json").read_text())
    entry = report["protocols"]["temporal"]["methods"][METHOD]
    per_instance = np.load(out / "per_instance.npz")[f"temporal/{METHOD}/NDCG@10"]
    return {"ndcg10": entry["metrics"]["NDCG@10"]["mean"], "ci95": entry["metrics"]["NDCG@10"].get("ci95"),
            "hr10": entry["metrics"]["HR@10"]["mean"], "eval_seconds": time.perf_counter() - started,
            "per_instance": per_instance.tolist(), "load_average": list(os.getloadavg())}


def paired(a: list[float], b: list[float], seed: int = 0, rounds: int = 2000) -> dict:
    """Mean of a - b over the same test events with a bootstrap 95% interval."""
    diff = np.asarray(a) - np.asarray(b)
    rng = np.random.default_rng(seed)
    means = diff[rng.integers(0, len(diff), size=(rounds, len(diff)))].mean(axis=1)
    return {"mean": float(diff.mean()), "ci95": [float(np.percentile(means, 2.5)), float(np.percentile(means, 97.5))]}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--data", type=Path, default=REPO_ROOT.parent / "shared" / "data" / "ml-100k")
    parser.add_argument("--precisions", default="fp32,int8")
    parser.add_argument("--lengths", default="32,64,128")
    parser.add_argument("--cost-texts", type=int, default=200, help="history texts timed per cell")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--work", type=Path, default=None, help="scratch folder (default <out>/cold-users-work, kept)")
    args = parser.parse_args(argv)
    work = args.work or args.out / "cold-users-work"
    work.mkdir(parents=True, exist_ok=True)
    path = args.out / "cold_users.json"
    result = json.loads(path.read_text()) if path.exists() else {"cells": {}}
    texts = history_texts(args.data, args.cost_texts)
    for precision in args.precisions.split(","):
        for max_length in (int(x) for x in args.lengths.split(",")):
            key = f"{precision}-{max_length}"
            cache = work / f"cache-{key}"
            folder = prepare_cache(cache, precision, max_length)
            cost = encode_cost(folder, texts)
            log(f"{key}: {cost['cpu_ms_median']:.2f} ms CPU per cold history text ({cost['tokens_mean']:.0f} tokens); evaluating")
            figures = run_eval(args.data, cache, max_length, work / f"report-{key}")
            log(f"{key}: NDCG@10 {figures['ndcg10']:.4f} in {figures['eval_seconds']:.0f} s")
            result["cells"][key] = {"precision": precision, "max_length": max_length, **cost, **figures}
            args.out.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(result) + "\n")
    reference = result["cells"].get(f"{REFERENCE[0]}-{REFERENCE[1]}")
    rows = []
    for key, cell in sorted(result["cells"].items(), key=lambda kv: (kv[1]["precision"], kv[1]["max_length"])):
        if reference is not None:
            cell["vs_fp32_128"] = paired(cell["per_instance"], reference["per_instance"])
        diff = cell.get("vs_fp32_128")
        rows.append([cell["precision"], cell["max_length"], cell["tokens_mean"], cell["cpu_ms_median"], cell["hr10"],
                     cell["ndcg10"], f"{diff['mean']:+.4f} [{diff['ci95'][0]:+.4f}, {diff['ci95'][1]:+.4f}]" if diff else "-",
                     cell["load_average"][0]])
    path.write_text(json.dumps(result) + "\n")
    print_table(f"Cold users on {args.data.name}: {METHOD}, temporal protocol",
                ["precision", "max tokens", "tokens read", "CPU ms/text", "HR@10", "NDCG@10", "vs fp32-128 [95% CI]",
                 "load"], rows)
    log(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
