"""Fine-tuning recipes measured by the encoder's own retrieval on a data set's validation window, against the base encoder.

Each variant fine-tunes the base encoder on the evaluation's training window (the split and
examples of `chronorec-eval`'s temporal protocol, `SplitContext.training_examples`), chooses its
checkpoint on one half of the validation window's examples and is measured on the other half:
NDCG@10 / HR@10 of the next item among all catalogue items by the encoder alone, with a paired
bootstrap interval (users resampled) of variant - base. Training and validation run only the
trainable top layers over cached states of the frozen ones (`finetune.FrozenPrefix`, shared by the
variants: the frozen layers act as fixed feature extractors, without dropout).

    python -m tests.bench.bench_finetune --data generated
    python -m tests.bench.bench_finetune --data ../shared/data/ml-100k --variants default,whole,trend,distill
    python -m tests.bench.bench_finetune --list

Writes finetune-<data>.json and finetune-<data>.md under --out (default reports/bench/).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Sequence

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np

from .common import ANCHOR, DEFAULT_OUT, _json_default, load_note, log, print_table

# The evaluation's fine-tuning (EvalSettings): 100 steps of 32 newest examples, top 2 layers, lr 2e-4,
# in-batch negatives corrected for their frequency (the "logq" variant; the others vary the recipe
# before that correction, "default").
BASE_STEPS = 100
BASE_BATCH = 32
BASE_LR = 2e-4
BASE_LAYERS = 2
METRICS = ("NDCG@10", "HR@10")
_PHRASE = re.compile(r"(^|; )(just now|yesterday|\d+ (?:minute|hour|day|week|month|year)s? ago), ")


@dataclass(frozen=True)
class Variant:
    """One recipe: what it changes from the evaluation's fine-tuning."""

    name: str
    about: str
    lr: float = BASE_LR
    train_layers: int | None = BASE_LAYERS
    output_norm_only: bool = False  # a per-dimension scale and shift of the pooled vector on a frozen encoder
    keep_best: bool = True
    whole_window: bool = False
    time_negatives: int = 0
    distill: float = 0.0
    plain_history: bool = False  # history text without its relative-time phrases (training and measuring)
    logq: bool = False  # in-batch negatives corrected for their sampling frequency (FinetuneConfig.logq_correction)
    steps: int | None = None  # None: the run's --steps


VARIANTS = {v.name: v for v in (
    Variant("default", "the evaluation's earlier recipe: top 2 layers, lr 2e-4, newest examples, best checkpoint, "
                       "plain in-batch negatives"),
    Variant("last", "as default, the last weights instead of the best checkpoint", keep_best=False),
    Variant("lr5e-5", "as default at lr 5e-5", lr=5e-5),
    Variant("lr1e-3", "as default at lr 1e-3", lr=1e-3),
    Variant("top1", "as default, only the top layer trains", train_layers=1),
    Variant("top4", "as default, the top 4 layers train", train_layers=4),
    Variant("whole", "as default, examples sampled from the whole training window", whole_window=True),
    Variant("trend", "as default, 4 negatives per example among the items trending at its time", time_negatives=4),
    Variant("distill", "as default, plus a distillation term to the base encoder (weight 1)", distill=1.0),
    Variant("distill10", "as default, plus a distillation term to the base encoder (weight 10)", distill=10.0),
    Variant("norm-head", "frozen encoder, only the output LayerNorm trains (a diagonal head), lr 1e-3",
            output_norm_only=True, lr=1e-3, train_layers=0),
    Variant("plain-text", "as default, history text without its relative-time phrases", plain_history=True),
    Variant("logq", "the evaluation's recipe: as default, in-batch negatives corrected for how often each item "
                    "is a positive (logQ)", logq=True),
    Variant("logq-lr5e-5", "as logq at lr 5e-5", logq=True, lr=5e-5),
)}
DEFAULT_VARIANTS = ("default", "last", "lr5e-5", "top1", "whole", "trend", "distill", "norm-head", "plain-text", "logq")


def plain_history(query: str) -> str:
    """The history text with its relative-time phrases removed ("2 days ago, rated 5: X" -> "rated 5: X")."""
    return _PHRASE.sub(r"\1", query)


def load_dataset(data: str, users: int):
    from chronorec.server.core import importers
    from chronorec.trainer.protocols import Dataset

    if data == "generated":
        from chronorec.server.core.demo import generate_drift_dataset

        drift = generate_drift_dataset(seed=7, n_users=users, anchor=ANCHOR)
        return Dataset(drift.items, drift.events), "generated"
    return Dataset(*importers.detect_and_load(data)), Path(data).name


def halves(valid: Sequence, seed: int, selection_max: int, measure_max: int) -> tuple[list, list]:
    """The evaluation's split of the validation examples: one half chooses the checkpoint, the other measures."""
    rng = np.random.default_rng(seed)
    shuffled = [valid[i] for i in rng.permutation(len(valid))]
    half = len(shuffled) // 2
    return shuffled[:half][:selection_max], sorted(shuffled[half:][:measure_max], key=lambda e: e.position)


def with_plain_queries(examples: Sequence) -> list:
    return [replace(e, query=plain_history(e.query)) for e in examples]


def freeze(module, variant: Variant) -> str:
    from chronorec.trainer.finetune import freeze_below

    if not variant.output_norm_only:
        return freeze_below(module, variant.train_layers)
    for parameter in module.parameters():
        parameter.requires_grad = False
    for parameter in module.bert.encoder.layer[-1].output.LayerNorm.parameters():
        parameter.requires_grad = True
    return "output LayerNorm"


@dataclass
class Study:
    """What every variant of one data set shares: examples, item texts, base figures, frozen-state caches."""

    base_folder: Path
    train: list
    selection: list
    measure: list
    item_texts: dict[str, str]
    dataset: Any
    max_length: int
    seed: int = 0
    prefixes: dict[int, Any] = field(default_factory=dict)
    base: dict[str, Any] = field(default_factory=dict)

    def prefix(self, module, tokenizer):
        from chronorec.trainer.finetune import FrozenPrefix, frozen_layers

        frozen = frozen_layers(module)
        if frozen is None:
            return None
        if frozen not in self.prefixes:
            self.prefixes[frozen] = FrozenPrefix(tokenizer, frozen, self.max_length)
        return self.prefixes[frozen]

    def retrieval(self, module, tokenizer, examples) -> tuple[list, dict[str, np.ndarray]]:
        from chronorec.trainer.finetune import encoder_retrieval_per_example

        prefix = self.prefix(module, tokenizer)
        encode = (lambda texts: prefix.encode(module, texts)) if prefix is not None else None
        return encoder_retrieval_per_example(module, tokenizer, examples, self.item_texts,
                                             max_length=self.max_length, encode=encode)


def measure_base(study: Study, plain_text: bool) -> None:
    from chronorec.trainer.export import load_base_model
    from chronorec.trainer.finetune import freeze_below

    started = time.perf_counter()
    module, tokenizer = load_base_model(study.base_folder)
    freeze_below(module, BASE_LAYERS)
    kept, served = study.retrieval(module, tokenizer, study.measure)
    _, plain = study.retrieval(module, tokenizer, with_plain_queries(kept)) if plain_text else (None, {})
    study.base = {"examples": kept, "served": served, "plain": plain, "seconds": time.perf_counter() - started}


def paired(values: np.ndarray, base: np.ndarray, users: np.ndarray) -> dict[str, float]:
    from chronorec.trainer.protocols import bootstrap_ci

    difference = values - base
    low, high = bootstrap_ci(difference, clusters=users)
    return {"value": float(values.mean()), "base": float(base.mean()), "difference": float(difference.mean()),
            "low": float(low), "high": float(high)}


def run_variant(study: Study, variant: Variant, steps: int, eval_every: int | None = None) -> dict[str, Any]:
    from chronorec.trainer.data import newest_examples
    from chronorec.trainer.export import load_base_model
    from chronorec.trainer.finetune import FinetuneConfig, finetune, trending_negatives
    import torch

    started = time.perf_counter()
    steps = variant.steps or steps
    budget = steps * BASE_BATCH
    train = study.train
    if variant.whole_window and budget < len(train):
        picked = np.random.default_rng(study.seed).choice(len(train), budget, replace=False)
        train = [train[i] for i in np.sort(picked)]
    else:
        train = newest_examples(train, budget)
    negatives = trending_negatives(train, study.dataset) if variant.time_negatives else None
    selection = study.selection if variant.keep_best else []
    measure = study.base["examples"]
    if variant.plain_history:
        train, selection, measure = with_plain_queries(train), with_plain_queries(selection), with_plain_queries(measure)
    torch.manual_seed(study.seed)
    module, tokenizer = load_base_model(study.base_folder)
    trained_layers = freeze(module, variant)
    config = FinetuneConfig(steps=steps, batch_size=BASE_BATCH, lr=variant.lr, seed=study.seed,
                            max_valid_queries=len(study.selection) or 1, max_length=study.max_length, device="cpu",
                            progress=False, time_negatives=variant.time_negatives, distill_weight=variant.distill,
                            logq_correction=variant.logq, eval_every=eval_every)
    # The best trained checkpoint (the starting weights do not compete): what the recipe learned.
    # Whether keep-best would have kept it over the starting weights is reported beside it.
    result = finetune(module, tokenizer, train, selection, study.item_texts, config, negatives=negatives,
                      frozen_prefix=study.prefix(module, tokenizer), start_competes=False)
    module.eval()
    kept_examples, metrics = study.retrieval(module, tokenizer, measure)
    assert [e.position for e in kept_examples] == [e.position for e in study.base["examples"]]
    users = np.array([e.user_id for e in kept_examples])
    start = result.evaluations[0] if result.evaluations else {}
    best = next((e for e in result.evaluations if e["step"] == result.best_step), {})
    # Keep-best with the starting weights competing: the trained checkpoint must beat them on the
    # selection half's MRR by min_delta without a lower NDCG@10 there.
    beats_start = bool(best and start and best["MRR"] > start["MRR"] + config.min_delta
                       and best["NDCG@10"] >= start["NDCG@10"])
    out = {
        "variant": variant.name, "about": variant.about, "settings": asdict(variant), "steps": result.steps,
        "train_examples": len(train), "trained_layers": trained_layers, "best_step": result.best_step,
        "selection_start": start, "selection_best": best, "beats_start_on_selection": beats_start,
        "seconds": round(time.perf_counter() - started, 1), "train_seconds": round(result.train_seconds, 1),
        "load_average": [round(x, 2) for x in os.getloadavg()],
    }
    for name in METRICS:
        out[name] = paired(metrics[name], study.base["served"][name], users)
    if not variant.keep_best:
        out["beats_start_on_selection"] = None  # nothing validated: the last weights are used as they are
    out["pipeline_would_use"] = bool(beats_start and out["NDCG@10"]["difference"] > 0)
    return out


def markdown(document: dict[str, Any]) -> str:
    base = document["base"]
    lines = [
        f"Fine-tuning recipes on {document['data']} ({document['measure_examples']} measured validation events, "
        f"{document['n_items']} items, {document['steps']} steps of {BASE_BATCH}, max_length {document['max_length']}; "
        f"{document['load']})",
        "",
        f"Base encoder: NDCG@10 {base['NDCG@10']:.4f}, HR@10 {base['HR@10']:.4f}" + (
            f"; without the relative-time phrases in the history text: NDCG@10 {base['plain_NDCG@10']:.4f}, "
            f"HR@10 {base['plain_HR@10']:.4f}." if "plain_NDCG@10" in base else "."),
        "",
        "| variant | NDCG@10 − base [95% CI] | HR@10 − base [95% CI] | best step | beats start on selection | s |",
        "|---|---|---|---|---|---|",
    ]
    for row in document["variants"]:
        cells = [f"{row[m]['difference']:+.4f} [{row[m]['low']:+.4f}, {row[m]['high']:+.4f}]" for m in METRICS]
        lines.append(f"| {row['variant']} | {cells[0]} | {cells[1]} | {row['best_step']} | "
                     f"{ {True: 'yes', False: 'no', None: '–'}[row['beats_start_on_selection']]} | {row['seconds']:.0f} |")
    return "\n".join(lines) + "\n"


def run(data: str, variants: Sequence[str], *, steps: int, threads: int, out: Path, users: int,
        selection_max: int, measure_max: int, max_length: int, base_model: str | None, seed: int,
        eval_every: int | None = None) -> dict[str, Any]:
    import torch

    from chronorec.trainer.base_model import packaged_minilm
    from chronorec.trainer.chronorec_methods import EvalSettings, SplitContext
    from chronorec.trainer.protocols import temporal_split

    torch.set_num_threads(threads)
    started = time.perf_counter()
    dataset, label = load_dataset(data, users)
    settings = EvalSettings(max_length=max_length, seed=seed)
    context = SplitContext(temporal_split(dataset), settings)
    train, valid = context.training_examples()
    selection, measure = halves(valid, seed, selection_max, measure_max)
    item_texts = {i: context.item_text_of(i) for i in context.item_ids}
    study = Study(Path(base_model) if base_model else packaged_minilm(), train, selection, measure, item_texts,
                  dataset, max_length, seed)
    log(f"{label}: {len(train)} training examples, {len(valid)} validation ({len(selection)} choose the checkpoint, "
        f"{len(measure)} measure), {len(item_texts)} items")
    measure_base(study, any(VARIANTS[name].plain_history for name in variants))
    served, plain = study.base["served"], study.base["plain"]
    log(f"base encoder: NDCG@10 {served['NDCG@10'].mean():.4f} HR@10 {served['HR@10'].mean():.4f} "
        f"({study.base['seconds']:.0f} s)")
    rows: list[dict[str, Any]] = []
    out.mkdir(parents=True, exist_ok=True)
    stem = out / f"finetune-{label}"

    def document() -> dict[str, Any]:
        return {
            "data": label, "path": data, "n_items": len(item_texts), "train_examples": len(train),
            "valid_examples": len(valid), "selection_examples": len(selection),
            "measure_examples": len(study.base["examples"]), "steps": steps, "max_length": max_length,
            "threads": threads, "eval_every": eval_every, "base_model": str(study.base_folder),
            "base": {**{m: float(served[m].mean()) for m in METRICS},
                     **{f"plain_{m}": float(plain[m].mean()) for m in METRICS if m in plain}},
            "variants": rows, "seconds": round(time.perf_counter() - started, 1), "load": load_note(),
        }

    def write() -> dict[str, Any]:
        # After every variant: a run stopped part-way keeps what it measured.
        current = document()
        stem.with_suffix(".json").write_text(json.dumps(current, indent=2, default=_json_default) + "\n")
        stem.with_suffix(".md").write_text(markdown(current))
        return current

    for name in variants:
        row = run_variant(study, VARIANTS[name], steps, eval_every)
        rows.append(row)
        write()
        log(f"{name}: NDCG@10 {row['NDCG@10']['difference']:+.4f} [{row['NDCG@10']['low']:+.4f}, "
            f"{row['NDCG@10']['high']:+.4f}], HR@10 {row['HR@10']['difference']:+.4f}, best step {row['best_step']}, "
            f"beats start {row['beats_start_on_selection']}, {row['seconds']:.0f} s")
    result = write()
    print_table(f"fine-tuning recipes on {label} (variant - base, paired 95% CI)",
                ["variant", "NDCG@10 diff", "CI", "HR@10 diff", "best step", "beats start", "s"],
                [[r["variant"], f"{r['NDCG@10']['difference']:+.4f}", f"[{r['NDCG@10']['low']:+.4f}, {r['NDCG@10']['high']:+.4f}]",
                  f"{r['HR@10']['difference']:+.4f}", r["best_step"], r["beats_start_on_selection"], r["seconds"]]
                 for r in rows])
    log(f"-> {stem}.json, {stem}.md ({result['seconds']:.0f} s, {load_note()})")
    return result


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", default="generated", help="a data set folder/file chronorec-eval reads, or 'generated'")
    parser.add_argument("--variants", default=",".join(DEFAULT_VARIANTS), help="comma-separated (see --list)")
    parser.add_argument("--list", action="store_true", help="list the variants and exit")
    parser.add_argument("--steps", type=int, default=BASE_STEPS, help="optimizer steps per variant")
    parser.add_argument("--threads", type=int, default=2, help="PyTorch CPU threads")
    parser.add_argument("--users", type=int, default=60, help="generated users (with --data generated)")
    parser.add_argument("--selection", type=int, default=500, help="validation examples that choose the checkpoint")
    parser.add_argument("--measure", type=int, default=2000, help="validation examples that measure the variants")
    parser.add_argument("--max-length", type=int, default=None, help="tokens (default: the evaluation's)")
    parser.add_argument("--base-model", default=None, help="Hugging Face folder (default: the packaged MiniLM)")
    parser.add_argument("--eval-every", type=int, default=None,
                        help="steps between validations (default: about 5 per run, as the evaluation)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args(argv)
    if args.list:
        for variant in VARIANTS.values():
            print(f"{variant.name:12s} {variant.about}")
        return 0
    names = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = [v for v in names if v not in VARIANTS]
    if unknown:
        parser.error(f"unknown variant(s): {', '.join(unknown)}; --list shows them")
    from chronorec.trainer.chronorec_methods import EvalSettings

    run(args.data, names, steps=args.steps, threads=args.threads, out=args.out, users=args.users,
        selection_max=args.selection, measure_max=args.measure,
        max_length=args.max_length or EvalSettings().max_length, base_model=args.base_model, seed=args.seed,
        eval_every=args.eval_every)
    return 0


if __name__ == "__main__":
    sys.exit(main())
