"""Benchmark 1: encode texts/s at batch 1, 8, 32 for PyTorch eager, ONNX Runtime fp32 and int8, and int8's cosine to fp32."""

from __future__ import annotations

import os
import statistics
import time

import numpy as np

from . import common
from .common import Context, log, print_table, target

BATCHES = (1, 8, 32)
ENGINES = ("pytorch", "ort-fp32", "ort-int8")


def demo_texts() -> list[str]:
    """The demo catalog's item texts, exactly as the server encodes them."""
    from chronorec.server.core.demo import generate_demo
    from chronorec.server.core.itemtext import item_text

    items, _ = generate_demo(anchor=0.0)
    return [item_text(item) for item in items]


def run(ctx: Context) -> dict:
    import torch

    from chronorec.server.core.encoder import OnnxEncoder
    from chronorec.server.core.repository import ModelRepository
    from chronorec.trainer.export import load_base_model

    all_texts = demo_texts()
    texts = all_texts[: ctx.sizes.encode_texts]
    repo = ModelRepository(ctx.model_template())
    version_dir = repo.version_dir(repo.current())
    module, tokenizer = load_base_model(ctx.base_model_dir())
    module.eval()
    cores = os.cpu_count() or 1
    # Every engine at its best: one thread and every core (the libraries' default) are both
    # timed and the faster counts, the same rule for all. On shared cores one thread often
    # wins (PyTorch's OpenMP threads spin); on idle ones every core does.
    threads = sorted({1, cores})
    sessions = {
        (engine, t): OnnxEncoder(version_dir, prefer_int8=engine == "ort-int8", intra_op_threads=t)
        for engine in ENGINES[1:]
        for t in threads
    }
    fp32, int8 = sessions[("ort-fp32", cores)], sessions[("ort-int8", cores)]
    assert int8.model_file != fp32.model_file, "the published version has no int8 graph"
    # PyTorch reads as many tokens as the published version, so every engine encodes the same inputs.
    max_length = fp32.max_length


    def passage(batch: int) -> list[str]:
        # Fewer texts at batch 1 keep the slowest cell from dominating the run's time.
        return texts[: max(8, len(texts) // 4)] if batch == 1 else texts

    def run_engine(engine: str, t: int, batch: int) -> int:
        chunk = passage(batch)
        if engine == "pytorch":
            torch.set_num_threads(t)
            module.encode_texts(tokenizer, chunk, batch_size=batch, max_length=max_length)
        else:
            encoder = sessions[(engine, t)]
            for start in range(0, len(chunk), batch):
                encoder.encode(chunk[start : start + batch])
        return len(chunk)

    runs = [(engine, t) for engine in ENGINES for t in threads]
    for engine, t in runs:  # warm-up: first calls allocate and pick kernels
        run_engine(engine, t, 8)
    # Engines interleave inside each repeat, so load from other processes hits all of them alike.
    rates: dict[tuple[str, int, int], list[float]] = {}
    for repeat in range(ctx.sizes.encode_repeats):
        for batch in BATCHES:
            for engine, t in runs:
                started = time.perf_counter()
                n = run_engine(engine, t, batch)
                rates.setdefault((engine, t, batch), []).append(n / (time.perf_counter() - started))
        log(f"encode repeat {repeat + 1}/{ctx.sizes.encode_repeats} done")

    rate: dict[tuple[str, int], float] = {}
    best: dict[tuple[str, int], int] = {}
    for batch in BATCHES:
        for engine in ENGINES:
            by_threads = {t: statistics.median(rates[(engine, t, batch)]) for t in threads}
            best[(engine, batch)] = max(by_threads, key=by_threads.get)
            rate[(engine, batch)] = by_threads[best[(engine, batch)]]
    rows, cells = [], []
    for batch in BATCHES:
        base = rate[("pytorch", batch)]
        for engine in ENGINES:
            r = rate[(engine, batch)]
            others = {t: statistics.median(rates[(engine, t, batch)]) for t in threads if t != best[(engine, batch)]}
            cells.append({"engine": engine, "batch": batch, "threads": best[(engine, batch)], "texts_per_s": r,
                          "ratio_to_pytorch": r / base, "other_thread_counts": {str(t): v for t, v in others.items()}})
            rows.append([batch, engine, best[(engine, batch)], r, r / base,
                         ", ".join(f"{v:.1f} @{t}" for t, v in others.items())])

    # Quality on every demo text: int8 against fp32, and fp32 against PyTorch (export parity).
    v_fp32, v_int8 = fp32.encode(all_texts), int8.encode(all_texts)
    cosine = np.sum(v_fp32 * v_int8, axis=1) / (np.linalg.norm(v_fp32, axis=1) * np.linalg.norm(v_int8, axis=1))
    torch.set_num_threads(1)
    v_torch = module.encode_texts(tokenizer, all_texts, batch_size=32, max_length=max_length).numpy()
    parity = float(np.max(np.abs(v_torch - v_fp32)))

    ratio_fp32 = rate[("ort-fp32", 32)] / rate[("pytorch", 32)]
    ratio_int8 = rate[("ort-int8", 32)] / rate[("pytorch", 32)]
    targets = {
        "ort_fp32_ratio_b32_ge_1.2": {"value": ratio_fp32, "met": ratio_fp32 >= 1.2},
        "ort_int8_ratio_b32_ge_2.5": {"value": ratio_int8, "met": ratio_int8 >= 2.5},
        "int8_mean_cosine_ge_0.99": {"value": float(cosine.mean()), "met": float(cosine.mean()) >= 0.99},
    }
    print_table(
        f"Encode: {len(texts)} demo texts per pass ({len(passage(1))} at batch 1), median of {ctx.sizes.encode_repeats}; "
        f"each engine at its faster of {threads} threads",
        ["batch", "engine", "threads", "texts/s", "x pytorch", "texts/s at the other thread count"],
        rows,
    )
    print(f"int8 cosine to fp32 on {len(all_texts)} demo texts: mean {cosine.mean():.4f}, min {cosine.min():.4f}; "
          f"fp32 ONNX vs PyTorch max |diff| {parity:.2g}")
    for name, t in targets.items():
        print(f"  target {name}: {t['value']:.3f} {target(t['met'])}")
    result = {
        "texts_per_pass": len(texts),
        "repeats": ctx.sizes.encode_repeats,
        "threads_tried": threads,
        "results": cells,
        "int8_cosine": {"mean": float(cosine.mean()), "min": float(cosine.min()), "texts": len(all_texts)},
        "fp32_vs_pytorch_max_abs_diff": parity,
        "targets": targets,
    }
    ctx.write("encode", result)
    return result


def main(argv=None) -> None:
    common.main(__doc__, run, argv)


if __name__ == "__main__":
    main()
