"""Benchmark 2: many concurrent single-text Encode calls over gRPC against the same texts sent as batches of 32."""

from __future__ import annotations

import statistics
import threading
import time

from .bench_encode import demo_texts
from . import common
from .common import Context, ServerProcess, log, print_table, target

BATCH = 32
ROUNDS = 2


def _batched(stub, texts: list[str]) -> float:
    """Texts/s sending batches of 32, one call at a time."""
    from chronorec.v1 import encoder_pb2

    started = time.perf_counter()
    for start in range(0, len(texts), BATCH):
        stub.Encode(encoder_pb2.EncodeRequest(texts=texts[start : start + BATCH]), timeout=120)
    return len(texts) / (time.perf_counter() - started)


def _single(stub, texts: list[str], concurrency: int) -> tuple[float, list[str]]:
    """Texts/s sending one text per call with `concurrency` calls in flight; and the failures."""
    from chronorec.v1 import encoder_pb2

    # Futures from one thread keep the client's own CPU use (2 cores shared with the server) low.
    window = threading.Semaphore(concurrency)
    failures: list[str] = []
    done = threading.Event()
    remaining = [len(texts)]
    lock = threading.Lock()

    def finished(future) -> None:
        error = future.exception()
        if error is not None:
            failures.append(f"{error.code().name}: {error.details()}" if hasattr(error, "code") else repr(error))
        window.release()
        with lock:
            remaining[0] -= 1
            if remaining[0] == 0:
                done.set()

    started = time.perf_counter()
    for text in texts:
        window.acquire()
        stub.Encode.future(encoder_pb2.EncodeRequest(texts=[text]), timeout=120).add_done_callback(finished)
    done.wait()
    return len(texts) / (time.perf_counter() - started), failures


def run(ctx: Context) -> dict:
    from chronorec.server.core.store import EventStore

    folder = ctx.work / "microbatch"
    folder.mkdir(parents=True, exist_ok=True)
    db = folder / "chronorec.db"
    EventStore(db).close()  # an empty catalog: this benchmark is about the encoder only
    models = ctx.fresh_repo("microbatch")
    server = ServerProcess(db, models, folder / "server.log", int8=ctx.int8)
    try:
        server.wait_serving()
        encoder, _, _ = server.stubs()
        base = demo_texts()
        n = ctx.sizes.microbatch_texts
        texts = [base[i % len(base)] for i in range(n)]
        concurrency = ctx.sizes.microbatch_concurrency
        _batched(encoder, texts[: 4 * BATCH])  # warm-up
        _single(encoder, texts[: 2 * concurrency], concurrency)
        batched, single, failures = [], [], []
        # Alternating rounds, so other load on the machine hits both modes alike.
        for round_ in range(ROUNDS):
            batched.append(_batched(encoder, texts))
            rate, failed = _single(encoder, texts, concurrency)
            single.append(rate)
            failures.extend(failed)
            log(f"micro-batching round {round_ + 1}/{ROUNDS}: batch-32 {batched[-1]:.1f}/s, single {single[-1]:.1f}/s")
    finally:
        server.stop()
    b, s = statistics.median(batched), statistics.median(single)
    ratio = s / b
    print_table(
        f"Micro-batching: {n} texts, Encode over gRPC on loopback, server {'int8' if ctx.int8 else 'fp32'}, median of {ROUNDS}",
        ["mode", "calls", "in flight", "texts/s", "x batch-32"],
        [
            [f"batches of {BATCH}", (n + BATCH - 1) // BATCH, 1, b, 1.0],
            ["single text per call", n, concurrency, s, ratio],
        ],
    )
    met = ratio >= 0.70 and not failures
    print(f"  target single-text >= 70% of batch-32: {ratio:.1%} {target(met)} (failed calls {len(failures)})")
    for failure in sorted(set(failures))[:5]:
        print(f"  failed call: {failure}")
    result = {
        "texts": n,
        "concurrency": concurrency,
        "batch32_texts_per_s": b,
        "single_texts_per_s": s,
        "rounds": {"batch32": batched, "single": single},
        "failed_calls": len(failures),
        "failures": sorted(set(failures))[:10],
        "targets": {"single_ge_70pct_of_batch32": {"value": ratio, "met": met}},
    }
    ctx.write("microbatch", result)
    return result


def main(argv=None) -> None:
    common.main(__doc__, run, argv)


if __name__ == "__main__":
    main()
