"""Benchmark 7: the trainer on an event log — examples/s, and NDCG@10 before and after one `chronorec-train run`.

    python -m tests.bench.bench_trainer                               # generated drifting users, MiniLM
    python -m tests.bench.bench_trainer --data ../shared/data/ml-100k  # MovieLens 100K (temporal protocol)
    python -m tests.bench.bench_trainer --quick                       # tiny BERT, seconds (CI smoke)

The world is built the way a deployment builds it: the events go into a real SQLite event store,
the base encoder is exported to ONNX and published as the serving version, and then
`trainer.pipeline.run_once` — what `chronorec-train run` executes — reads the store, fine-tunes,
tunes the time model on the validation window, evaluates candidate and serving version on the
same latest window (temporal protocol, full ranking through the server's ranking code) and gates.

The baseline is in the same run: "before" is the serving version (the untuned base encoder with
the manifest's default time model), and the ablation rows separate what fine-tuning the encoder
moved from what tuning the time model moved.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

from .common import ANCHOR, DEFAULT_OUT, log, print_table

GATE = "NDCG@10"


def _events(data: str, seed: int):
    if data == "generated":
        from chronorec.server.core.demo import generate_drift_dataset

        drift = generate_drift_dataset(seed=seed, anchor=ANCHOR)
        return drift.items, drift.events, "generated drifting users (server.core.demo, seed %d)" % seed
    from chronorec.server.core.importers import detect_and_load

    items, events = detect_and_load(data)
    return items, events, str(Path(data).resolve())


def _base_folder(model: str, work: Path) -> Path:
    if model == "tiny":
        from tinybert import make_tiny_bert

        return make_tiny_bert(work / "tiny-bert")
    from chronorec.trainer.base_model import packaged_minilm

    return packaged_minilm()


def run(args: argparse.Namespace) -> dict:
    import torch

    from chronorec.server.core.store import EventStore
    from chronorec.trainer.export import publish_base_model
    from chronorec.trainer.pipeline import RunSettings, run_once

    work = Path(tempfile.mkdtemp(prefix="chronorec-bench-trainer-"))
    try:
        items, events, source = _events(args.data, args.seed)
        db, models = work / "events.db", work / "models"
        started = time.perf_counter()
        with EventStore(db) as store:
            store.bulk_import(items, events)
        log(f"{len(events)} events, {len(items)} items into {db} in {time.perf_counter() - started:.1f} s")
        base = publish_base_model(_base_folder(args.model, work), models, activate=True, max_length=args.max_length)
        settings = RunSettings(
            steps=args.steps, batch_size=args.batch_size, lr=args.lr, eval_every=args.steps, patience=args.steps,
            threads=args.threads, train_layers=args.train_layers, ablation=True, max_tune_instances=args.max_tune_instances, progress=None,
            prepare=True,
        )
        # common.py pins OMP to one thread for the serving benchmarks; training gets every core here.
        torch.set_num_threads(args.threads)
        started = time.perf_counter()
        outcome = run_once(db, models, settings, report=log)
        seconds = time.perf_counter() - started
        if outcome.status not in ("activated", "gated"):
            raise RuntimeError(f"the trainer did not publish: {outcome.status}: {outcome.message}")
        details = outcome.details
        ablation = details.get("ablation") or {}
        finetune = details.get("finetune") or {}
        # What the version ships: the fine-tuned weights only when they passed both of the trainer's
        # tests (the encoder's own retrieval, then the tuned blend over it), else the starting ones.
        encoder = details.get("encoder") or {}
        shipped = "fine-tuned encoder" if encoder.get("fine_tuned") else "starting weights (fine-tuning not kept)"
        with_ranker = ", learned ranker" if (details.get("ranker") or {}).get("used") else ""
        rows = [
            ("before: serving base encoder, default time model", outcome.serving_metrics),
            ("base encoder, time model tuned on validation", ablation.get("initial_weights_tuned_time_model", {})),
            ("base encoder alone (semantic score only)", ablation.get("initial_weights_encoder_only", {})),
            (f"shipped encoder alone (semantic score only): {shipped}", ablation.get("candidate_encoder_only", {})),
            (f"after: {shipped}, tuned time model{with_ranker}", outcome.candidate_metrics),
        ]
        result = {
            "data": source,
            "events": len(events),
            "items": len(items),
            "model": args.model,
            "max_length": args.max_length,
            "train_layers": args.train_layers,
            "lr": args.lr,
            "steps": finetune.get("steps"),
            "batch_size": args.batch_size,
            "train_examples": finetune.get("examples"),
            "examples_per_second": finetune.get("examples_per_second"),
            "train_seconds": finetune.get("train_seconds"),
            "run_seconds": round(seconds, 1),
            "status": outcome.status,
            "test_instances": details.get("gate", {}).get("instances"),
            "rows": {name: metrics for name, metrics in rows},
            "gate": details.get("gate"),
            "time_model": details.get("time_model"),
            "encoder": encoder,
            "prepare": details.get("prepare"),
            "torch_threads": torch.get_num_threads(),
        }
    finally:
        if not args.keep_work:
            shutil.rmtree(work, ignore_errors=True)
    print_table(
        f"Trainer on {result['data']} ({result['events']} events; {args.model}, max_length {args.max_length}, "
        f"{result['steps']} steps x {args.batch_size}, top {args.train_layers} layers, lr {args.lr:g}; {result['test_instances']} test instances, temporal protocol)",
        ["variant", "HR@10", "NDCG@10", "NDCG@20", "MRR"],
        [[name, m.get("HR@10"), m.get("NDCG@10"), m.get("NDCG@20"), m.get("MRR")] for name, m in rows],
    )
    before, after = outcome.serving_metrics.get(GATE), outcome.candidate_metrics.get(GATE)
    fused = result["encoder"].get("fused_valid")
    if fused:
        low, high = fused["ci95_user_clustered"]
        print(f"validation {fused['metric']} of the tuned blend: fine-tuned {fused['fine_tuned']:.4f}, starting weights "
              f"{fused['starting']:.4f}, paired {fused['difference']:+.4f} [{low:+.4f}, {high:+.4f}]: "
              f"{'fine-tuned weights shipped' if result['encoder'].get('fine_tuned') else 'starting weights shipped'}")
    print(f"training: {result['train_examples']} examples at {result['examples_per_second']:.1f} examples/s "
          f"({result['torch_threads']} torch threads); whole run {seconds:.0f} s; {outcome.status}")
    if before is not None and after is not None:
        print(f"{GATE}: before {before:.4f} -> after {after:.4f} ({after - before:+.4f})")
    return result


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--data", default="generated", help="'generated' or a MovieLens/JSONL folder")
    parser.add_argument("--model", choices=("minilm", "tiny"), default=None, help="minilm (default) or tiny")
    parser.add_argument("--quick", action="store_true", help="tiny BERT, few steps: a smoke run")
    parser.add_argument("--steps", type=int, default=None, help="optimizer steps (default 100; 20 with --quick)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=None, help="default 2e-4 (MiniLM), 2e-3 (tiny)")
    parser.add_argument("--train-layers", type=int, default=2, help="top transformer layers trained (default 2)")
    parser.add_argument("--max-length", type=int, default=64, help="encoder token limit (default 64)")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="torch threads (default: all cores)")
    parser.add_argument("--max-tune-instances", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--keep-work", action="store_true")
    args = parser.parse_args(argv)
    args.model = args.model or ("tiny" if args.quick else "minilm")
    args.steps = args.steps or (20 if args.quick else 100)
    args.lr = args.lr or (2e-3 if args.model == "tiny" else 2e-4)
    result = run(args)
    args.out.mkdir(parents=True, exist_ok=True)
    name = "trainer" if args.data == "generated" else f"trainer-{Path(args.data).name}"
    path = args.out / f"{name}{'-quick' if args.quick else ''}.json"
    path.write_text(json.dumps(result, indent=2, default=str))
    log(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
