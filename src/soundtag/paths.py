"""Where models live: --model, $SOUNDTAG_MODEL, or the user cache filled by `soundtag fetch`."""

from __future__ import annotations

import os
from pathlib import Path

from .errors import ModelNotFoundError

MODEL_ENV = "SOUNDTAG_MODEL"  # path of the .tflite to use when --model is not given
CACHE_ENV = "SOUNDTAG_CACHE"  # overrides the cache directory
WEIGHT_CACHE_ENV = "SOUNDTAG_WEIGHT_CACHE"  # XNNPACK's packed weights: a directory, or "0" for none
DEFAULT_MODEL_FILE = "cnn14_audioset_fp32.tflite"


def cache_dir() -> Path:
    """$SOUNDTAG_CACHE, else $XDG_CACHE_HOME/soundtag, else ~/.cache/soundtag."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "soundtag"


def models_dir() -> Path:
    return cache_dir() / "models"


def weight_cache_dir() -> Path | None:
    """Where XNNPACK's packed weights go, one file per model and CPU (model.py): $SOUNDTAG_WEIGHT_CACHE,
    else the cache's xnnpack/; None when that variable is "0" or "off" (pack on the heap, no file)."""
    value = os.environ.get(WEIGHT_CACHE_ENV, "")
    if value.lower() in ("0", "off"):
        return None
    return Path(value) if value else cache_dir() / "xnnpack"


def resolve_model_path(explicit: str | Path | None = None) -> tuple[Path, bool]:
    """(path, from_cache): --model, else $SOUNDTAG_MODEL, else the cache; a clear error saying how to get one."""
    if explicit:
        return Path(explicit), False
    if os.environ.get(MODEL_ENV):
        return Path(os.environ[MODEL_ENV]), False
    cached = models_dir() / DEFAULT_MODEL_FILE
    if cached.is_file():
        return cached, True
    raise ModelNotFoundError(
        f"no model: pass --model FILE.tflite, set {MODEL_ENV}, or run 'soundtag fetch' "
        f"(downloads the upstream checkpoint and converts it into {models_dir()}; "
        "needs pip install 'soundtag[convert]')"
    )
