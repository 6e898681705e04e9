"""The model repository: versioned encoder directories and an atomically replaced serving pointer."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import secrets
import shutil
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Iterator

from chronorec.server.core.errors import NotFound
from chronorec.server.core.manifest import (
    MANIFEST_FILE,
    TOKENIZER_FILE,
    Manifest,
    ManifestError,
    ManifestUnreadable,
    load_manifest,
)

log = logging.getLogger("chronorec.repository")

POINTER_FILE = "CURRENT"
HISTORY_FILE = "HISTORY"
# The canary in progress (a JSON CanaryPlan), beside the pointer; absent when none runs.
CANARY_FILE = "CANARY"
STAGING_PREFIX = ".staging-"
SERVING_SETTINGS_FILE = "serving.json"


@dataclass(frozen=True)
class ServingSettings:
    """How the server indexes a version: what a publisher must match to prepare one for it.

    The server writes these into the repository at start; the trainer's prepare step reads
    them, so the vector-cache folder, the int8 choice and the HNSW graph are never mirrored
    by hand in the trainer's flags.
    """

    vector_cache: bool
    vector_cache_dir: str | None  # None: the default folder under the repository root
    prefer_int8: bool
    hnsw_m: int
    hnsw_ef_construction: int
    hnsw_ef_search: int

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "ServingSettings":
        """Parse and type-check; ValueError on anything else (unknown keys are ignored)."""
        data = json.loads(text)
        if not isinstance(data, dict):
            raise ValueError("serving settings are not a JSON object")
        values = {}
        for spec in fields(cls):
            if spec.name not in data:
                raise ValueError(f"serving settings lack {spec.name!r}")
            value = data[spec.name]
            if spec.name in ("vector_cache", "prefer_int8"):
                ok = isinstance(value, bool)
            elif spec.name == "vector_cache_dir":
                ok = value is None or (isinstance(value, str) and bool(value))
            else:
                ok = isinstance(value, int) and not isinstance(value, bool) and value > 0
            if not ok:
                raise ValueError(f"serving setting {spec.name!r} has the invalid value {value!r}")
            values[spec.name] = value
        return cls(**values)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _inside(folder: Path, name: str) -> bool:
    """Whether `folder/name`, links resolved, is still inside `folder`."""
    try:
        return (folder / name).resolve().is_relative_to(folder.resolve())
    except (OSError, RuntimeError):  # a link loop
        return False


def _write_atomically(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    with open(tmp, "w", encoding="utf-8") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


@dataclass(frozen=True)
class VersionInfo:
    """A version folder as the repository sees it: its manifest, or why it cannot serve."""

    version: str
    manifest: Manifest | None
    problem: str = ""  # empty when the version is usable

    @property
    def usable(self) -> bool:
        return not self.problem


class ModelRepository:
    """`<root>/encoder/<version>/` directories plus the `CURRENT` pointer and activation `HISTORY`."""

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)
        self.encoder_dir = self.root / "encoder"

    def ensure(self) -> "ModelRepository":
        self.encoder_dir.mkdir(parents=True, exist_ok=True)
        return self

    def write_serving_settings(self, settings: ServingSettings) -> None:
        """Record how this server indexes versions (`serving.json`, replaced atomically)."""
        self.ensure()
        _write_atomically(self.root / SERVING_SETTINGS_FILE, settings.to_json() + "\n")

    def read_serving_settings(self) -> ServingSettings | None:
        """The settings a server recorded, or None when none did or the file is unreadable."""
        path = self.root / SERVING_SETTINGS_FILE
        try:
            return ServingSettings.from_json(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return None
        except (OSError, UnicodeDecodeError, ValueError) as exc:
            log.warning("ignoring the serving settings in %s: %s", path, exc)
            return None

    def version_dir(self, version: str) -> Path:
        return self.encoder_dir / version

    def describe(self, version: str) -> "VersionInfo | None":
        """What `version` is, or None when it is no version at all.

        None: no such folder, a hidden (staging) name, a manifest that is missing or not a JSON
        object (a half-written copy), or model and tokenizer files absent. A manifest that
        parses but breaks the schema gives a VersionInfo whose `problem` says why: that version
        is listed but can never serve.
        """
        if not version or version.startswith(".") or "/" in version or version in (".", ".."):
            return None
        path = self.version_dir(version)
        if (path / MANIFEST_FILE).exists() and not _inside(path, MANIFEST_FILE):
            return VersionInfo(version, None, f"{MANIFEST_FILE} links outside the version folder")
        try:
            manifest = load_manifest(path)
        except (OSError, ManifestUnreadable):
            return None
        except ManifestError as exc:
            return VersionInfo(version, None, f"invalid manifest: {exc}")
        model = path / manifest.onnx_file
        try:
            complete = model.is_file() and model.stat().st_size > 0 and (path / TOKENIZER_FILE).is_file()
        except OSError:
            complete = False
        if not complete:
            return None
        # The server reads nothing outside the version folder, links included.
        for name in (manifest.onnx_file, manifest.int8_file, TOKENIZER_FILE):
            if name is not None and (path / name).exists() and not _inside(path, name):
                return VersionInfo(version, None, f"{name} links outside the version folder")
        return VersionInfo(version, manifest, "")

    def is_complete(self, version: str) -> bool:
        """A version is complete when its manifest is valid and its model and tokenizer exist."""
        info = self.describe(version)
        return info is not None and info.usable

    def describe_versions(self) -> list["VersionInfo"]:
        """Every version, usable or not, oldest first (by manifest creation time, then name)."""
        try:
            children = [c.name for c in self.encoder_dir.iterdir() if c.is_dir() and not c.name.startswith(".")]
        except OSError:  # no repository (yet, or it vanished)
            return []
        found = [info for info in map(self.describe, children) if info is not None]
        return sorted(found, key=lambda info: (info.manifest.created_at if info.manifest else "", info.version))

    def list_versions(self) -> list[str]:
        """Usable versions, oldest first (by manifest creation time, then name)."""
        return [info.version for info in self.describe_versions() if info.usable]

    def current(self) -> str | None:
        """The serving version named by the pointer, or None when nothing was activated."""
        try:
            name = (self.encoder_dir / POINTER_FILE).read_text(encoding="utf-8").strip()
        except FileNotFoundError:
            return None
        return name or None

    def history(self) -> list[str]:
        try:
            text = (self.encoder_dir / HISTORY_FILE).read_text(encoding="utf-8")
        except FileNotFoundError:
            return []
        return [line.strip() for line in text.splitlines() if line.strip()]

    @staticmethod
    def new_version_name() -> str:
        return time.strftime("v%Y%m%d-%H%M%S", time.gmtime()) + "-" + secrets.token_hex(2)

    @contextlib.contextmanager
    def stage_version(self, version: str | None = None) -> Iterator[tuple[str, Path]]:
        """Yield `(version, staging_dir)`; on success the directory is renamed into place.

        A failure (or a kill) leaves at most a `.staging-*` directory, which is never listed
        or served.
        """
        self.ensure()
        version = version or self.new_version_name()
        if self.version_dir(version).exists():
            raise FileExistsError(f"model version {version} already exists")
        staging = self.encoder_dir / f"{STAGING_PREFIX}{version}-{secrets.token_hex(3)}"
        staging.mkdir()
        try:
            yield version, staging
            for child in staging.iterdir():
                if child.is_file():
                    with open(child, "rb") as handle:
                        os.fsync(handle.fileno())
            _fsync_dir(staging)
            os.rename(staging, self.version_dir(version))
            _fsync_dir(self.encoder_dir)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise

    def activate(self, version: str) -> None:
        """Make `version` the serving one (pointer replaced atomically) and record it in HISTORY."""
        if not self.is_complete(version):
            raise NotFound(f"model version {version!r} does not exist or is incomplete")
        self.ensure()
        history = self.history()
        if not history or history[-1] != version:
            history.append(version)
        _write_atomically(self.encoder_dir / HISTORY_FILE, "\n".join(history[-100:]) + "\n")
        _write_atomically(self.encoder_dir / POINTER_FILE, version + "\n")

    def _history_before_current(self) -> list[str]:
        current = self.current()
        history = self.history()
        while history and history[-1] == current:
            history.pop()
        while history and not self.is_complete(history[-1]):
            history.pop()
        if not history:
            raise NotFound("no previous model version to roll back to")
        return history

    def previous(self) -> str:
        """The complete version that was active before the current one."""
        return self._history_before_current()[-1]

    def rollback(self) -> str:
        """Re-activate the version that served before the current one; returns it."""
        history = self._history_before_current()
        previous = history[-1]
        _write_atomically(self.encoder_dir / HISTORY_FILE, "\n".join(history) + "\n")
        _write_atomically(self.encoder_dir / POINTER_FILE, previous + "\n")
        return previous

    def read_canary(self) -> str | None:
        """The recorded canary plan's text, or None when no canary runs."""
        try:
            return (self.encoder_dir / CANARY_FILE).read_text(encoding="utf-8")
        except FileNotFoundError:
            return None

    def write_canary(self, text: str) -> None:
        """Record a canary plan (replaced atomically)."""
        self.ensure()
        _write_atomically(self.encoder_dir / CANARY_FILE, text.rstrip("\n") + "\n")

    def clear_canary(self) -> None:
        """Forget the canary plan (no error when there is none)."""
        try:
            os.unlink(self.encoder_dir / CANARY_FILE)
        except FileNotFoundError:
            return
        _fsync_dir(self.encoder_dir)

    def clean_staging(self) -> int:
        """Remove staging directories left by killed writers; returns how many."""
        removed = 0
        if self.encoder_dir.is_dir():
            for child in self.encoder_dir.iterdir():
                if child.is_dir() and child.name.startswith(STAGING_PREFIX):
                    shutil.rmtree(child, ignore_errors=True)
                    removed += 1
        return removed


__all__ = [
    "CANARY_FILE",
    "HISTORY_FILE",
    "MANIFEST_FILE",
    "POINTER_FILE",
    "SERVING_SETTINGS_FILE",
    "ModelRepository",
    "ServingSettings",
    "VersionInfo",
]
