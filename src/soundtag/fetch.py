"""Find the model; download, verify and convert the upstream checkpoint into the user cache."""

from __future__ import annotations

import hashlib
import logging
import os
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path

log = logging.getLogger(__name__)

# PANNs CNN14, Zenodo record 3987831 (Kong et al.), weights CC BY 4.0.
UPSTREAM_URL = "https://zenodo.org/record/3987831/files/Cnn14_mAP%3D0.431.pth?download=1"
UPSTREAM_NAME = "Cnn14_mAP=0.431.pth"
UPSTREAM_BYTES = 327_428_481
UPSTREAM_MD5 = "541141fa2ee191a88f24a3219fff024e"
MODEL_ENV = "SOUNDTAG_MODEL"  # path of the .tflite to use when --model is not given
CACHE_ENV = "SOUNDTAG_CACHE"  # overrides the cache directory
DEFAULT_MODEL_FILE = "cnn14_audioset_fp32.tflite"
CHUNK_BYTES = 1 << 20  # download read size
RETRIES = 5  # resumed attempts after a broken connection


class ModelNotFoundError(FileNotFoundError):
    """No model given and none in the cache."""


class FetchError(RuntimeError):
    """Download failed or the file is not the expected one."""


def cache_dir() -> Path:
    """$SOUNDTAG_CACHE, else $XDG_CACHE_HOME/soundtag, else ~/.cache/soundtag."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "soundtag"


def models_dir() -> Path:
    return cache_dir() / "models"


def resolve_model_path(explicit: str | Path | None = None) -> Path:
    """--model, else $SOUNDTAG_MODEL, else the cache; a clear error saying how to get one."""
    if explicit:
        return Path(explicit)
    if os.environ.get(MODEL_ENV):
        return Path(os.environ[MODEL_ENV])
    cached = models_dir() / DEFAULT_MODEL_FILE
    if cached.is_file():
        return cached
    raise ModelNotFoundError(
        f"no model: pass --model FILE.tflite, set {MODEL_ENV}, or run 'soundtag fetch' "
        f"(downloads the upstream checkpoint and converts it into {models_dir()}; "
        "needs pip install 'soundtag[convert]')"
    )


def md5sum(path: Path) -> str:
    h = hashlib.md5()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(CHUNK_BYTES), b""):
            h.update(chunk)
    return h.hexdigest()


def download(
    url: str,
    dest: Path,
    expected_bytes: int | None,
    expected_md5: str | None,
    progress: Callable[[int, int | None], None] | None = None,
    timeout_s: float = 60.0,
) -> Path:
    """Download url to dest, resuming a partial ``dest.part``; verify size and md5.

    A mismatch deletes the partial file and raises FetchError: nothing wrong is left cached.
    """
    dest = Path(dest)
    if dest.is_file() and _verified(dest, expected_bytes, expected_md5):
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".part")
    last_error: Exception | None = None
    for attempt in range(1 + RETRIES):
        have = part.stat().st_size if part.exists() else 0
        if expected_bytes is not None and have >= expected_bytes:
            break
        request = urllib.request.Request(url, headers={"Range": f"bytes={have}-"} if have else {})
        try:
            with urllib.request.urlopen(request, timeout=timeout_s) as resp:
                if have and resp.status != 206:  # server ignored the range: start over
                    have = 0
                total = expected_bytes or _content_total(resp, have)
                with open(part, "ab" if have else "wb") as f:
                    while chunk := resp.read(CHUNK_BYTES):
                        f.write(chunk)
                        have += len(chunk)
                        if progress:
                            progress(have, total)
            if expected_bytes is None or have >= expected_bytes:
                break
            last_error = FetchError(f"connection closed at {have} of {expected_bytes} bytes")
        except urllib.error.HTTPError as exc:
            if exc.code == 416 and have:  # range past the end: already complete
                break
            raise FetchError(f"{url}: HTTP {exc.code} {exc.reason}") from None
        except (urllib.error.URLError, OSError, ConnectionError) as exc:
            last_error = exc
        log.warning("download interrupted (%s); resuming (attempt %d)", last_error, attempt + 1)
    else:
        raise FetchError(f"{url}: download failed after {RETRIES} resumes ({last_error}); partial file kept at {part}")
    size = part.stat().st_size
    if expected_bytes is not None and size != expected_bytes:
        part.unlink()
        raise FetchError(f"{url}: got {size} bytes, expected {expected_bytes}; partial file removed")
    if expected_md5 is not None:
        got = md5sum(part)
        if got != expected_md5:
            part.unlink()
            raise FetchError(f"{url}: md5 {got} does not match the expected {expected_md5}; file removed")
    os.replace(part, dest)
    return dest


def _content_total(resp, have: int) -> int | None:
    length = resp.headers.get("Content-Length")
    return have + int(length) if length and length.isdigit() else None


def _verified(path: Path, expected_bytes: int | None, expected_md5: str | None) -> bool:
    if expected_bytes is not None and path.stat().st_size != expected_bytes:
        return False
    return expected_md5 is None or md5sum(path) == expected_md5


def fetch(
    url: str = UPSTREAM_URL,
    expected_bytes: int | None = UPSTREAM_BYTES,
    expected_md5: str | None = UPSTREAM_MD5,
    precisions: tuple[str, ...] | None = None,
    progress: Callable[[int, int | None], None] | None = None,
) -> Path:
    """Download the checkpoint into the cache, convert and validate it; returns the models dir."""
    checkpoint = download(url, cache_dir() / UPSTREAM_NAME, expected_bytes, expected_md5, progress)
    try:
        from .convert.export import DEFAULT_PRECISIONS, convert_checkpoint
    except ImportError as exc:
        raise FetchError(f"checkpoint saved at {checkpoint}; converting it needs pip install 'soundtag[convert]' ({exc})") from None
    convert_checkpoint(checkpoint, models_dir(), precisions or DEFAULT_PRECISIONS)
    return models_dir()
