"""Model manifest schema, time-model parameters and tokenizer settings shared by server and trainer."""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Callable

from chronorec.server.core.errors import InvalidArgument

MANIFEST_FILE = "manifest.json"
TOKENIZER_FILE = "tokenizer.json"
ONNX_FILE = "model.onnx"
INT8_FILE = "model.int8.onnx"
TOKENIZER_MAX_LENGTH = 128
MANIFEST_SCHEMA = 1
# The learned rankers this server can load (the manifest's `ranker.kind`).
RANKER_KINDS = ("lightgbm-lambdarank",)
MAX_RANKER_CANDIDATES = 5000
MAX_RANKER_ROUTES = 16
MAX_RANKER_FEATURES = 1000


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
        if not clean:
            return self  # frozen: the same values, without a copy on every request
        return replace(self, **clean)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any] | None) -> "TimeModelParams":
        """Parameters from a manifest's `time_model`: ManifestError names the first bad value.

        Unknown names are ignored (a newer trainer may know more); a missing or null one keeps
        its default.
        """
        if data is None:
            return cls()
        if not isinstance(data, dict):
            raise ManifestError(f"time_model must be an object, got {_json_type(data)}")
        clean: dict[str, Any] = {}
        for spec in fields(cls):
            value = data.get(spec.name)
            if value is None:
                continue
            low, high = PARAM_BOUNDS[spec.name]
            if not _is_number(value) or not math.isfinite(value) or not (low <= value <= high):
                raise ManifestError(f"time_model.{spec.name} must be a number within [{low}, {high}], got {value!r}")
            if spec.name == "history_max_events":
                if value != int(value):
                    raise ManifestError(f"time_model.history_max_events must be a whole number, got {value!r}")
                value = int(value)
            clean[spec.name] = float(value) if spec.type in ("float", float) else value
        return cls(**clean)


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
    # The learned ranker shipped in the version: {"file", "features", "candidates", "second_look", "kind"}; None:
    # the version ranks with the time model's blend alone.
    ranker: dict[str, Any] | None = None

    def to_json(self) -> str:
        data = asdict(self)
        data["time_model"] = self.time_model.to_dict()
        return json.dumps(data, indent=2, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "Manifest":
        """Parse and validate; ManifestUnreadable when it is not a JSON object, else ManifestError."""
        try:
            data = json.loads(text)
        except ValueError as exc:  # also a text that is not UTF-8 JSON
            raise ManifestUnreadable(f"manifest is not valid JSON: {exc}") from None
        if not isinstance(data, dict):
            raise ManifestUnreadable(f"manifest is not a JSON object but {_json_type(data)}")
        return cls.from_dict(data)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "Manifest":
        """Validate every field against MANIFEST_FIELDS; unknown fields are ignored (a newer trainer's)."""
        values: dict[str, Any] = {}
        for name, check in MANIFEST_FIELDS.items():
            if name not in data:
                if name in _REQUIRED_FIELDS:
                    raise ManifestError(f"manifest lacks {name!r}")
                continue
            values[name] = check(name, data[name])
        values["time_model"] = TimeModelParams.from_dict(data.get("time_model"))
        return cls(**values)


class ManifestError(ValueError):
    """A manifest that parses but breaks the schema: its version cannot be served."""


class ManifestUnreadable(ManifestError):
    """A manifest that is not a JSON object at all (missing, truncated, half-written)."""


def _json_type(value: Any) -> str:
    return {dict: "an object", list: "an array", str: "a string", bool: "a boolean", type(None): "null"}.get(
        type(value), "a number"
    )


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _string(name: str, value: Any) -> str:
    if not isinstance(value, str):
        raise ManifestError(f"{name} must be a string, got {_json_type(value)}")
    return value


def _optional_string(name: str, value: Any) -> str | None:
    return None if value is None else _string(name, value)


def _count(limit: int) -> Callable[[str, Any], int]:
    def check(name: str, value: Any) -> int:
        if not isinstance(value, int) or isinstance(value, bool) or not 1 <= value <= limit:
            raise ManifestError(f"{name} must be a whole number within [1, {limit}], got {value!r}")
        return value

    return check


def _boolean(name: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise ManifestError(f"{name} must be true or false, got {value!r}")
    return value


def _object(name: str, value: Any) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise ManifestError(f"{name} must be an object, got {_json_type(value)}")
    return value


def _optional_object(name: str, value: Any) -> dict[str, Any] | None:
    return None if value is None else _object(name, value)


def _optional_numbers(name: str, value: Any) -> dict[str, float] | None:
    if value is None:
        return None
    for key, number in _object(name, value).items():
        if not _is_number(number):
            raise ManifestError(f"{name}.{key} must be a number, got {_json_type(number)}")
    return value


def _optional_number(name: str, value: Any) -> float | None:
    if value is not None and not _is_number(value):
        raise ManifestError(f"{name} must be a number, got {_json_type(value)}")
    return value


def _graph_file(name: str, value: Any) -> str:
    """A file name inside the version folder: the server reads nothing else of the repository."""
    text = _string(name, value)
    if not text or text in (".", "..") or "/" in text or "\\" in text or "\x00" in text:
        # The value is not echoed: it may be a path of the server's own file system.
        raise ManifestError(f"{name} must be a file name inside the version folder (no folder, no '..')")
    return text


def _optional_graph_file(name: str, value: Any) -> str | None:
    return None if value is None else _graph_file(name, value)


def _optional_ranker(name: str, value: Any) -> dict[str, Any] | None:
    """The learned ranker's entry: a file inside the version folder, its feature names, how many candidates."""
    if value is None:
        return None
    entry = _object(name, value)
    kind = entry.get("kind", RANKER_KINDS[0])
    if kind not in RANKER_KINDS:
        raise ManifestError(f"{name}.kind {kind!r} is not one this server loads ({', '.join(RANKER_KINDS)})")
    if "file" not in entry:
        raise ManifestError(f"{name} lacks 'file'")
    _graph_file(f"{name}.file", entry["file"])
    features = entry.get("features")
    if (not isinstance(features, list) or not 1 <= len(features) <= MAX_RANKER_FEATURES
            or not all(isinstance(f, str) and f for f in features)):
        raise ManifestError(f"{name}.features must be a list of 1 to {MAX_RANKER_FEATURES} feature names")
    _count(MAX_RANKER_CANDIDATES)(f"{name}.candidates", entry.get("candidates"))
    second_look = entry.get("second_look", 0)
    if second_look != 0:  # absent (a ranker trained before the second look existed): none
        _count(MAX_RANKER_CANDIDATES)(f"{name}.second_look", second_look)
    routes = entry.get("routes", [])  # absent (a ranker trained before gap routes existed): none
    if not isinstance(routes, list) or len(routes) > MAX_RANKER_ROUTES:
        raise ManifestError(f"{name}.routes must be a list of at most {MAX_RANKER_ROUTES} gap routes")
    for k, route in enumerate(routes):
        _route(f"{name}.routes[{k}]", route)
    return {**entry, "kind": kind}


def _route(name: str, value: Any) -> None:
    """A gap route: {min_gap_s: seconds >= 0, max_gap_s: larger seconds or null, feature: a name}."""
    route = _object(name, value)
    low, high, feature = route.get("min_gap_s"), route.get("max_gap_s"), route.get("feature")
    if not _finite_number(low) or low < 0:
        raise ManifestError(f"{name}.min_gap_s must be a number of seconds >= 0")
    if high is not None and (not _finite_number(high) or high <= low):
        raise ManifestError(f"{name}.max_gap_s must be null or a number of seconds above min_gap_s")
    if not isinstance(feature, str) or not feature:
        raise ManifestError(f"{name}.feature must be a feature name")


def _finite_number(value: Any) -> bool:
    return _is_number(value) and math.isfinite(value)


def _schema(name: str, value: Any) -> int:
    if value != MANIFEST_SCHEMA or isinstance(value, bool):
        raise ManifestError(f"schema {value!r} is not supported (this server reads schema {MANIFEST_SCHEMA})")
    return value


# Longest input the schema admits; whether the graph really reaches it is the load check's job.
MAX_MANIFEST_LENGTH = 65536
MAX_MANIFEST_DIMENSION = 65536

# The one schema of manifest.json: each field's check (time_model has its own, TimeModelParams.from_dict).
MANIFEST_FIELDS: dict[str, Callable[[str, Any], Any]] = {
    "version": _string,
    "base_model": _string,
    "dimension": _count(MAX_MANIFEST_DIMENSION),
    "max_length": _count(MAX_MANIFEST_LENGTH),
    "pooling": _string,
    "normalize": _boolean,
    "metrics": _object,
    "training_window": _optional_object,
    "parent_version": _optional_string,
    "created_at": _string,
    "onnx_file": _graph_file,
    "int8_file": _optional_graph_file,
    "int8_cosine": _optional_numbers,
    "parity_max_abs_diff": _optional_number,
    "extra": _object,
    "schema": _schema,
    "ranker": _optional_ranker,
}
_REQUIRED_FIELDS = ("version", "base_model", "dimension")


def load_manifest(version_dir: str | os.PathLike) -> Manifest:
    """Read and validate `manifest.json` of a version directory.

    OSError when it cannot be read, ManifestUnreadable when it is no JSON object, ManifestError
    when a field breaks the schema.
    """
    raw = (Path(version_dir) / MANIFEST_FILE).read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ManifestUnreadable(f"manifest is not UTF-8: {exc}") from None
    return Manifest.from_json(text)


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
