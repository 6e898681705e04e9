"""Sentence-encoder module, ONNX export with parity and int8 checks, and publishing into the model repository."""

from __future__ import annotations

import copy
import inspect
import logging
import os
import shutil
import time
import warnings
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from chronorec.server.core.manifest import (
    INT8_FILE,
    ONNX_FILE,
    TOKENIZER_FILE,
    TOKENIZER_MAX_LENGTH,
    Manifest,
    TimeModelParams,
    load_tokenizer,
    write_manifest,
)
from chronorec.server.core.repository import ModelRepository

if TYPE_CHECKING:
    from chronorec.server.core.learned_ranker import LearnedRanker

log = logging.getLogger(__name__)

OUTPUT_NAME = "sentence_embedding"
PARITY_TOLERANCE = 1e-4
DEFAULT_OPSET = 17

# Texts every published version is checked on: short and long, padded and unpadded within a
# batch, history-style text with relative times, punctuation, digits, accents and CJK, and one
# text far over the token limit so truncation is compared too.
PARITY_TEXTS: tuple[str, ...] = (
    "jazz",
    "Toy Story (1995) | Animation, Children's, Comedy",
    "2 days ago, rated 5: Toy Story (1995) | Animation ; 3 weeks ago, viewed: Heat (1995) | Action, Crime",
    "just now, liked: a beginner's guide to sourdough bread | cooking",
    "yesterday, clicked: the planets tonight — a telescope guide | astronomy",
    "How do I budget for a two-week trip to Japan? Flights, hotels and rail passes.",
    "Café crème brûlée, naïve façade, São Paulo, Zürich",
    "東京 travel guide | 旅行",
    "football",
    "5 minutes ago, viewed: Champions League final highlights | football ; 4 months ago, purchased: running shoes",
    "programming in rust: ownership, borrowing and lifetimes explained with examples",
    " ".join(["gardening tips for small balconies, herbs, tomatoes and flowers"] * 30),
    "1 2 3 4 5 6 7 8 9 10",
    "A",
    "finance | stocks, bonds and the market this week; what changed and why it matters to savers",
    "hours ago; minutes ago; weeks ago; months ago; years ago",
)


class ParityError(RuntimeError):
    """The exported ONNX graph (or the serving tokenizer) disagrees with the PyTorch module."""


def _accepts_token_type_ids(bert: nn.Module) -> bool:
    try:
        params = inspect.signature(bert.forward).parameters
    except (TypeError, ValueError):
        return False
    return "token_type_ids" in params


class SentenceEncoderModule(nn.Module):
    """A Hugging Face encoder with mean pooling over the attention mask and L2 normalisation.

    The same module is fine-tuned by the trainer and exported to ONNX, so what is trained is
    exactly what is served.
    """

    def __init__(self, bert: nn.Module, *, uses_token_type_ids: bool | None = None):
        super().__init__()
        self.bert = bert
        if uses_token_type_ids is None:
            uses_token_type_ids = _accepts_token_type_ids(bert) and getattr(bert.config, "type_vocab_size", 0) > 0
        self.uses_token_type_ids = bool(uses_token_type_ids)

    @classmethod
    def from_pretrained(cls, model_path: str | os.PathLike, **kwargs: Any) -> "SentenceEncoderModule":
        """Load a local Hugging Face model folder (never the hub)."""
        from transformers import AutoModel

        bert = AutoModel.from_pretrained(str(model_path), local_files_only=True, **kwargs)
        return cls(bert)

    @property
    def config(self):
        return self.bert.config

    @property
    def dimension(self) -> int:
        return int(self.bert.config.hidden_size)

    @property
    def input_names(self) -> list[str]:
        names = ["input_ids", "attention_mask"]
        if self.uses_token_type_ids:
            names.append("token_type_ids")
        return names

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        token_type_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        # By keyword: transformers 5 changed BertModel's positional order.
        inputs = {"input_ids": input_ids, "attention_mask": attention_mask}
        if self.uses_token_type_ids and token_type_ids is not None:
            inputs["token_type_ids"] = token_type_ids
        hidden = self.bert(**inputs).last_hidden_state
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        summed = (hidden * mask).sum(dim=1)
        counts = mask.sum(dim=1).clamp(min=1e-9)
        return F.normalize(summed / counts, p=2.0, dim=1)

    def tokenize(self, tokenizer, texts: Sequence[str], max_length: int = TOKENIZER_MAX_LENGTH) -> dict[str, torch.Tensor]:
        """Model inputs for `texts` on this module's device, tokenized exactly as the server does."""
        batch = tokenizer(
            list(texts), padding=True, truncation=True, max_length=max_length, return_tensors="pt"
        )
        device = next(self.parameters()).device
        return {name: batch[name].to(device) for name in self.input_names if name in batch}

    def encode_texts(
        self,
        tokenizer,
        texts: Sequence[str],
        batch_size: int = 32,
        max_length: int = TOKENIZER_MAX_LENGTH,
    ) -> torch.Tensor:
        """Embed `texts` in eval mode without gradients; returns a CPU float32 tensor (n, dim)."""
        was_training = self.training
        self.eval()
        try:
            out = []
            with torch.inference_mode():
                for start in range(0, len(texts), batch_size):
                    inputs = self.tokenize(tokenizer, texts[start : start + batch_size], max_length)
                    out.append(self(**inputs).float().cpu())
        finally:
            self.train(was_training)
        if not out:
            return torch.zeros((0, self.dimension), dtype=torch.float32)
        return torch.cat(out)


def _eval_cpu_copy(module: SentenceEncoderModule) -> SentenceEncoderModule:
    """An eval-mode CPU view of `module` for export and parity, leaving the trainer's module untouched.

    Dropout in train mode would be exported into the graph, and a GPU module would compare
    against ORT-on-CPU with different kernels, so both go through a CPU copy in eval mode.
    """
    on_cpu = all(p.device.type == "cpu" for p in module.parameters())
    target = module if on_cpu and not module.training else copy.deepcopy(module).cpu()
    return target.eval()


def export_onnx(module: SentenceEncoderModule, out_path: str | os.PathLike, opset: int = DEFAULT_OPSET) -> Path:
    """Export `module` to ONNX with dynamic batch and sequence axes; the output is `sentence_embedding`."""
    out_path = Path(out_path)
    model = _eval_cpu_copy(module)
    names = model.input_names
    # Second row padded so the traced graph keeps the attention-mask path (an all-ones mask
    # lets some attention implementations skip the mask entirely).
    input_ids = torch.tensor([[2, 10, 11, 12, 13, 14, 15, 3], [2, 10, 11, 3, 0, 0, 0, 0]], dtype=torch.long)
    input_ids = input_ids.clamp(max=int(model.config.vocab_size) - 1)
    attention_mask = (input_ids != 0).long()
    attention_mask[:, 0] = 1
    args: tuple[torch.Tensor, ...] = (input_ids, attention_mask)
    if model.uses_token_type_ids:
        args = args + (torch.zeros_like(input_ids),)
    dynamic_axes = {name: {0: "batch", 1: "sequence"} for name in names}
    dynamic_axes[OUTPUT_NAME] = {0: "batch"}
    started = time.perf_counter()
    with warnings.catch_warnings(), torch.no_grad():
        # Tracer warnings about Python-side shape checks are expected for BERT and not actionable.
        warnings.simplefilter("ignore")
        torch.onnx.export(
            model,
            args,
            str(out_path),
            input_names=names,
            output_names=[OUTPUT_NAME],
            dynamic_axes=dynamic_axes,
            opset_version=opset,
            do_constant_folding=True,
            dynamo=False,
        )
    log.info("exported ONNX %s (opset %d) in %.2f s", out_path, opset, time.perf_counter() - started)
    return out_path


def _ort_session(onnx_path: str | os.PathLike):
    import onnxruntime as ort

    return ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])


def _tokenize_numpy(tokenizer, texts: Sequence[str], max_length: int) -> dict[str, np.ndarray]:
    """input_ids / attention_mask / token_type_ids as int64 arrays from either tokenizer kind.

    A `tokenizers.Tokenizer` is used as configured (the server's `load_tokenizer`); a
    transformers tokenizer with the same padding and truncation the trainer uses.
    """
    from tokenizers import Tokenizer

    if isinstance(tokenizer, Tokenizer):
        encodings = tokenizer.encode_batch(list(texts))
        return {
            "input_ids": np.array([e.ids for e in encodings], dtype=np.int64),
            "attention_mask": np.array([e.attention_mask for e in encodings], dtype=np.int64),
            "token_type_ids": np.array([e.type_ids for e in encodings], dtype=np.int64),
        }
    batch = tokenizer(list(texts), padding=True, truncation=True, max_length=max_length, return_tensors="np")
    out = {name: np.asarray(batch[name], dtype=np.int64) for name in ("input_ids", "attention_mask")}
    out["token_type_ids"] = np.asarray(batch.get("token_type_ids", np.zeros_like(out["input_ids"])), dtype=np.int64)
    return out


def _ort_encode(session, inputs: dict[str, np.ndarray]) -> np.ndarray:
    wanted = {i.name for i in session.get_inputs()}
    return session.run([OUTPUT_NAME], {k: v for k, v in inputs.items() if k in wanted})[0]


def check_parity(
    module: SentenceEncoderModule,
    onnx_path: str | os.PathLike,
    tokenizer,
    texts: Sequence[str] = PARITY_TEXTS,
    *,
    tokenizer_json: str | os.PathLike | None = None,
    max_length: int = TOKENIZER_MAX_LENGTH,
    batch_size: int = 4,
    tolerance: float = PARITY_TOLERANCE,
    report: Callable[[str], None] | None = print,
) -> float:
    """Max abs difference between PyTorch and ONNX Runtime embeddings of `texts`; ParityError above `tolerance`.

    Texts run in batches so padding inside a batch is exercised. With `tokenizer_json` the ONNX
    side is fed by the server's tokenizer (`load_tokenizer`), so the check covers what serving
    really computes; its token ids must equal the transformers tokenizer's.
    """
    model = _eval_cpu_copy(module)
    session = _ort_session(onnx_path)
    serving_tokenizer = load_tokenizer(tokenizer_json, max_length) if tokenizer_json is not None else None
    worst = 0.0
    with torch.inference_mode():
        for start in range(0, len(texts), batch_size):
            chunk = list(texts[start : start + batch_size])
            torch_inputs = _tokenize_numpy(tokenizer, chunk, max_length)
            ort_inputs = torch_inputs
            if serving_tokenizer is not None:
                ort_inputs = _tokenize_numpy(serving_tokenizer, chunk, max_length)
                if not np.array_equal(ort_inputs["input_ids"], torch_inputs["input_ids"]):
                    raise ParityError(f"serving tokenizer ids differ from the trainer's on texts {start}..{start + len(chunk) - 1}")
            expected = model(**{k: torch.from_numpy(torch_inputs[k]) for k in model.input_names}).numpy()
            actual = _ort_encode(session, ort_inputs)
            if actual.shape != expected.shape:
                raise ParityError(f"ONNX output shape {actual.shape} differs from PyTorch {expected.shape}")
            worst = max(worst, float(np.max(np.abs(actual - expected))))
    if report is not None:
        report(f"parity: max abs diff torch vs onnxruntime {worst:.3g} over {len(texts)} texts")
    if not worst <= tolerance:  # also catches NaN
        raise ParityError(f"ONNX export differs from PyTorch by {worst:.3g} (> {tolerance:g})")
    return worst


def quantize_int8(onnx_path: str | os.PathLike, out_path: str | os.PathLike) -> Path:
    """Dynamic int8 quantization of the MatMuls, per channel (the defaults lose far more accuracy)."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    # The quantizer logs a pre-processing hint and per-tensor notes on the root logger; they are
    # expected for BERT (MatMul-only settings measured in STACK.md), so keep them out of job logs.
    root = logging.getLogger()
    level = root.level
    root.setLevel(max(level, logging.ERROR))
    try:
        quantize_dynamic(
            str(onnx_path),
            str(out_path),
            op_types_to_quantize=["MatMul"],
            per_channel=True,
            weight_type=QuantType.QInt8,
        )
    finally:
        root.setLevel(level)
    return Path(out_path)


def int8_cosine(
    fp32_path: str | os.PathLike,
    int8_path: str | os.PathLike,
    tokenizer,
    texts: Sequence[str] = PARITY_TEXTS,
    *,
    max_length: int = TOKENIZER_MAX_LENGTH,
    batch_size: int = 16,
) -> dict[str, float]:
    """Cosine between fp32 and int8 embeddings of `texts`: {"mean": ..., "min": ...}."""
    fp32, int8 = _ort_session(fp32_path), _ort_session(int8_path)
    cosines = []
    for start in range(0, len(texts), batch_size):
        inputs = _tokenize_numpy(tokenizer, list(texts[start : start + batch_size]), max_length)
        a, b = _ort_encode(fp32, inputs), _ort_encode(int8, inputs)
        norms = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)
        cosines.append(np.sum(a * b, axis=1) / np.maximum(norms, 1e-12))
    values = np.concatenate(cosines)
    return {"mean": float(values.mean()), "min": float(values.min())}


def _save_tokenizer_json(tokenizer, destination: Path, source_folder: str | os.PathLike | None) -> None:
    """Write the serving tokenizer.json: the fast tokenizer's own backend, else the folder's file."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        backend.save(str(destination))
        return
    if source_folder is not None and (Path(source_folder) / TOKENIZER_FILE).is_file():
        shutil.copyfile(Path(source_folder) / TOKENIZER_FILE, destination)
        return
    raise ValueError("the tokenizer has no tokenizer.json (a fast tokenizer is required for serving)")


def _now_iso() -> str:
    # Milliseconds so versions published within one second still list in creation order.
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds")


def _stage_ranker(ranker: "LearnedRanker | None", staging: Path) -> dict[str, Any] | None:
    """Write the ranker's model into the staged version and load it back; its manifest entry."""
    if ranker is None:
        return None
    from chronorec.server.core.learned_ranker import LearnedRanker

    path = staging / ranker.spec.file
    with open(path, "w", encoding="utf-8") as handle:
        handle.write(ranker.model_text())
        handle.flush()
        os.fsync(handle.fileno())
    LearnedRanker.load(staging, ranker.spec)  # what the server's load check will do
    return ranker.spec.to_dict()


def publish_module(
    module: SentenceEncoderModule,
    tokenizer,
    repository: ModelRepository | str | os.PathLike,
    *,
    base_model: str,
    parent_version: str | None = None,
    time_model: TimeModelParams | None = None,
    metrics: dict[str, Any] | None = None,
    training_window: dict[str, Any] | None = None,
    max_length: int = TOKENIZER_MAX_LENGTH,
    int8: bool = False,
    activate: bool = False,
    parity_texts: Sequence[str] = PARITY_TEXTS,
    extra: dict[str, Any] | None = None,
    tokenizer_source: str | os.PathLike | None = None,
    opset: int = DEFAULT_OPSET,
    ranker: "LearnedRanker | None" = None,
) -> str:
    """Export, check and publish `module` as a new model version; returns the version name.

    With `ranker`, the learned ranker ships in the version (its model file and the manifest's
    `ranker` entry), checked by loading it back from the staged folder as the server will.

    Everything is written into the repository's staging directory and renamed into place only
    after the parity check passed and the manifest is written, so a failure or a kill leaves no
    version the server would load and never moves `CURRENT`.
    """
    repo = repository if isinstance(repository, ModelRepository) else ModelRepository(repository)
    max_positions = getattr(module.config, "max_position_embeddings", None)
    if max_positions is not None and max_length > int(max_positions):
        raise ValueError(f"max_length {max_length} exceeds the model's {max_positions} positions")
    started = time.perf_counter()
    frozen = _eval_cpu_copy(module)  # one copy serves export and parity; the caller's module is untouched
    with repo.stage_version() as (version, staging):
        onnx_path = export_onnx(frozen, staging / ONNX_FILE, opset=opset)
        export_seconds = time.perf_counter() - started
        _save_tokenizer_json(tokenizer, staging / TOKENIZER_FILE, tokenizer_source)
        parity = check_parity(
            frozen, onnx_path, tokenizer, parity_texts, tokenizer_json=staging / TOKENIZER_FILE, max_length=max_length
        )
        int8_file = None
        int8_stats = None
        if int8:
            quantize_int8(onnx_path, staging / INT8_FILE)
            int8_file = INT8_FILE
            int8_stats = int8_cosine(
                onnx_path, staging / INT8_FILE, load_tokenizer(staging / TOKENIZER_FILE, max_length), parity_texts,
                max_length=max_length,
            )
            log.info("int8 cosine to fp32: mean %.4f min %.4f", int8_stats["mean"], int8_stats["min"])
        manifest = Manifest(
            version=version,
            base_model=base_model,
            dimension=module.dimension,
            max_length=max_length,
            time_model=time_model or TimeModelParams(),
            metrics=dict(metrics or {}),
            training_window=training_window,
            parent_version=parent_version,
            created_at=_now_iso(),
            int8_file=int8_file,
            int8_cosine=int8_stats,
            parity_max_abs_diff=parity,
            ranker=_stage_ranker(ranker, staging),
            extra={
                "export": {
                    "exporter": "torch.onnx.export(dynamo=False)",
                    "opset": opset,
                    "inputs": module.input_names,
                    "output": OUTPUT_NAME,
                    "torch": torch.__version__,
                    "export_seconds": round(export_seconds, 3),
                    "parity_texts": len(parity_texts),
                },
                **(extra or {}),
            },
        )
        # Written last: a staging directory without a manifest is incomplete by construction.
        write_manifest(staging, manifest)
    log.info("published model version %s (parity %.3g) in %.1f s", version, parity, time.perf_counter() - started)
    if activate:
        repo.activate(version)
        log.info("activated model version %s", version)
    return version


def load_base_model(model_path: str | os.PathLike) -> tuple[SentenceEncoderModule, Any]:
    """Module and fast tokenizer from a local Hugging Face folder, offline."""
    from transformers import AutoTokenizer

    folder = Path(model_path)
    if not folder.is_dir():
        raise FileNotFoundError(f"model folder {folder} does not exist")
    tokenizer = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    module = SentenceEncoderModule.from_pretrained(folder)
    # A tokenizer that emits no segment ids (RoBERTa-style) means the graph must not take them.
    if "token_type_ids" not in getattr(tokenizer, "model_input_names", ["token_type_ids"]):
        module.uses_token_type_ids = False
    return module, tokenizer


def publish_base_model(
    model_path: str | os.PathLike,
    repository_root: str | os.PathLike,
    *,
    activate: bool = True,
    int8: bool = False,
    max_length: int = TOKENIZER_MAX_LENGTH,
    base_model: str | None = None,
    ranker: "LearnedRanker | None" = None,
) -> str:
    """Publish an untuned local Hugging Face BERT folder as a model version (with a learned ranker
    when given); returns the version name."""
    module, tokenizer = load_base_model(model_path)
    return publish_module(
        module,
        tokenizer,
        ModelRepository(repository_root),
        base_model=base_model or str(Path(model_path).resolve()),
        max_length=max_length,
        int8=int8,
        activate=activate,
        tokenizer_source=model_path,
        ranker=ranker,
    )


__all__ = [
    "OUTPUT_NAME",
    "PARITY_TEXTS",
    "ParityError",
    "SentenceEncoderModule",
    "check_parity",
    "export_onnx",
    "int8_cosine",
    "load_base_model",
    "publish_base_model",
    "publish_module",
    "quantize_int8",
]
