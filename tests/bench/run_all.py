"""Run every benchmark in one go (`python -m tests.bench.run_all [--quick]`); tables on stdout, JSON in the output folder."""

from __future__ import annotations

import json
import sys
import time
import traceback

from . import (
    bench_batch,
    bench_canary,
    bench_encode,
    bench_feedback,
    bench_memory,
    bench_microbatch,
    bench_recommend,
    bench_replicas,
    bench_store,
    bench_swap,
)
from .common import conditions, log, parse_args

# Recommend runs before batch, swap, memory and canary: they reuse its servers and catalogs, so
# each catalog is encoded once cold, once for the swap, and later benchmarks restart it warm.
BENCHMARKS = [
    ("encode", bench_encode),
    ("microbatch", bench_microbatch),
    ("feedback", bench_feedback),
    ("recommend", bench_recommend),
    ("batch", bench_batch),
    ("swap", bench_swap),
    ("memory", bench_memory),
    ("canary", bench_canary),
    # Each starts its own throwaway PostgreSQL.
    ("store", bench_store),
    ("replicas", bench_replicas),
]


def main(argv=None) -> int:
    ctx = parse_args(__doc__, argv)
    started = time.perf_counter()
    summary = {"conditions_at_start": conditions(ctx), "benchmarks": {}, "targets": {}}
    failed = []
    try:
        for name, module in BENCHMARKS:
            log(f"=== {name} ===")
            t = time.perf_counter()
            try:
                result = module.run(ctx)
            except Exception:
                traceback.print_exc()
                failed.append(name)
                summary["benchmarks"][name] = {"error": traceback.format_exc(limit=3)}
                continue
            summary["benchmarks"][name] = {"seconds": time.perf_counter() - t}
            for target_name, value in result.get("targets", {}).items():
                summary["targets"][f"{name}.{target_name}"] = value
    finally:
        ctx.close()
    summary["seconds"] = time.perf_counter() - started
    summary["conditions_at_end"] = conditions(ctx)
    ctx.out.mkdir(parents=True, exist_ok=True)
    (ctx.out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(f"\nTargets ({'quick run: sizes too small to judge' if ctx.quick else 'full run'}):")
    for name, value in summary["targets"].items():
        print(f"  {'MET   ' if value['met'] else 'MISSED'} {name} = {value['value']:.4g}")
    print(f"all benchmarks in {summary['seconds']:.0f} s; {'FAILED: ' + ', '.join(failed) if failed else 'all ran'}; results in {ctx.out}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
