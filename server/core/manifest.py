"""Model manifest schema, time-model parameters and tokenizer settings shared by server and trainer."""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from chronorec.server.core.errors import InvalidArgument

MANIFEST_FILE = "manifest.json"
TOKENIZER_FILE = "tokenizer.json"
ONNX_FILE = "model.onnx"
INT8_FILE = "model.int8.onnx"
TOKENIZER_MAX_LENGTH = 128
MANIFEST_SCHEMA = 1


@dataclass(frozen=True)
class TimeModelParams:
    """Blend, half-lives, windows and score weights of the time-aware ranking."""

    alpha: float = 0.5
    long_term_half_life_days: float = 30.0
    cooccurrence_half_life_days: float = 10.0
    freshness_half_life_days: float = 14.0
    trend_window_days: float = 7.0
    w_semantic: float = 1.0
    w_cooccurrence: float = 1.0
    w_freshness: float = 0.1
    w_trend: float = 0.3
    history_max_events: int = 20
    # Half-life in days of the personal terms (semantic, co-occurrence) over the time since the
    # user's newest event: a user back after weeks away is ranked more by what is popular now
    # than by the session they left. 0 turns it off (the personal terms keep their full weight).
    personal_half_life_days: float = 0.0

    def with_overrides(self, overrides: dict[str, Any]) -> "TimeModelParams":
        """A copy with per-request overrides applied; out-of-bounds values raise InvalidArgument."""
        known = {f.name for f in fields(self)}
        clean: dict[str, Any] = {}
        for name, value in overrides.items():
            if value is None:
                continue
            if name not in known:
                raise InvalidArgument(f"unknown time-model parameter {name!r}")
            low, high = PARAM_BOUNDS[name]
            try:
                number = float(value)
            except (TypeError, ValueError):
                raise InvalidArgument(f"{name} must be a number") from None
            if not math.isfinite(number) or not (low <= number <= high):
                raise InvalidArgument(f"{name} must be within [{low}, {high}], got {value!r}")
            clean[name] = int(number) if name == "history_max_events" else number
        return replace(self, **clean)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any] | None) -> "TimeModelParams":
        known = {f.name for f in fields(cls)}
        return cls().with_overrides({k: v for k, v in (data or {}).items() if k in known})


# Bounds a request override (and a trainer's fit) must respect.
# Half-lives reach down to seconds: on rating and click logs the items of the last minutes of a
# session predict the next one best (on ML-100K the co-occurrence half-life the validation window
# picks is about a minute), so the bound must not cut that off.
PARAM_BOUNDS: dict[str, tuple[float, float]] = {
    "alpha": (0.0, 1.0),
    "long_term_half_life_days": (0.0001, 3650.0),
    "cooccurrence_half_life_days": (0.0001, 3650.0),
    "freshness_half_life_days": (0.01, 3650.0),
    "trend_window_days": (0.01, 365.0),
    "w_semantic": (0.0, 100.0),
    "w_cooccurrence": (0.0, 100.0),
    "w_freshness": (0.0, 100.0),
    "w_trend": (0.0, 100.0),
    "history_max_events": (1, 200),
    "personal_half_life_days": (0.0, 3650.0),
}


@dataclass
class Manifest:
    """What a model version is: its encoder, its time model and how it was made."""

    version: str
    base_model: str
    dimension: int
    max_length: int = TOKENIZER_MAX_LENGTH
    pooling: str = "mean"
    normalize: bool = True
    time_model: TimeModelParams = field(default_factory=TimeModelParams)
    metrics: dict[str, Any] = field(default_factory=dict)
    training_window: dict[str, Any] | None = None
    parent_version: str | None = None
    created_at: str = ""
    onnx_file: str = ONNX_FILE
    int8_file: str | None = None
    int8_cosine: dict[str, float] | None = None
    parity_max_abs_diff: float | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    schema: int = MANIFEST_SCHEMA

    def to_json(self) -> str:
        data = asdict(self)
        data["time_model"] = self.time_model.to_dict()
        return json.dumps(data, indent=2, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "Manifest":
        data = json.loads(text)
        if not isinstance(data, dict):
            raise ValueError("manifest is not a JSON object")
        known = {f.name for f in fields(cls)}
        data = {k: v for k, v in data.items() if k in known}
        data["time_model"] = TimeModelParams.from_dict(data.get("time_model"))
        manifest = cls(**data)
        if int(manifest.dimension) <= 0:
            raise ValueError("manifest dimension must be positive")
        return manifest


def load_manifest(version_dir: str | os.PathLike) -> Manifest:
    """Read and validate `manifest.json` of a version directory."""
    return Manifest.from_json((Path(version_dir) / MANIFEST_FILE).read_text(encoding="utf-8"))


def write_manifest(version_dir: str | os.PathLike, manifest: Manifest) -> None:
    """Write `manifest.json` durably (the caller renames the directory into place)."""
    path = Path(version_dir) / MANIFEST_FILE
    with open(path, "w", encoding="utf-8") as handle:
        handle.write(manifest.to_json())
        handle.flush()
        os.fsync(handle.fileno())


def load_tokenizer(path: str | os.PathLike, max_length: int = TOKENIZER_MAX_LENGTH):
    """A `tokenizers.Tokenizer` configured exactly as the trainer's transformers tokenizer.

    Padding to the longest text in the batch and truncation at `max_length` give the same
    ids as the transformers tokenizer with `padding=True, truncation=True`.
    """
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(path))
    tokenizer.no_padding()
    tokenizer.no_truncation()
    tokenizer.enable_truncation(max_length)
    pad_token = "[PAD]" if tokenizer.token_to_id("[PAD]") is not None else "<pad>"
    tokenizer.enable_padding(pad_id=tokenizer.token_to_id(pad_token) or 0, pad_token=pad_token)
    return tokenizer
