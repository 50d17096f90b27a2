"""Download, verify and convert the upstream checkpoint into the user cache.

Every download is checked against the upstream size and md5 unless the caller says otherwise (a
mirror gets the same checks); a connection that closes before its Content-Length is a failed download;
the ``.part`` file is never written through a symlink. Nothing unverified is ever moved into the cache.
"""

from __future__ import annotations

import logging
import os
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path

from .errors import FetchError, OutputError
from .files import file_digest, open_nofollow
from .paths import cache_dir, models_dir

log = logging.getLogger(__name__)

# PANNs CNN14, Zenodo record 3987831 (Kong et al.), weights CC BY 4.0.
UPSTREAM_URL = "https://zenodo.org/record/3987831/files/Cnn14_mAP%3D0.431.pth?download=1"
UPSTREAM_NAME = "Cnn14_mAP=0.431.pth"
UPSTREAM_BYTES = 327_428_481
UPSTREAM_MD5 = "541141fa2ee191a88f24a3219fff024e"
CHUNK_BYTES = 1 << 20  # download read size
RETRIES = 5  # resumed attempts after a broken connection


def download(
    url: str,
    dest: Path,
    expected_bytes: int | None,
    expected_md5: str | None,
    progress: Callable[[int, int | None], None] | None = None,
    timeout_s: float = 60.0,
) -> Path:
    """Download url to dest, resuming a partial ``dest.part``; verify size and md5.

    A mismatch deletes the partial file and raises FetchError: nothing wrong is left cached. With
    ``expected_bytes`` the bytes received are counted (Content-Length is not trusted, and may be absent):
    the download fails as soon as the server announces or sends more, so a mirror cannot fill the disk.
    """
    dest = Path(dest)
    if dest.is_file() and _verified(dest, expected_bytes, expected_md5):
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".part")
    if part.is_symlink():
        raise FetchError(f"{part} is a symbolic link; refusing to write through it (remove it and retry)")
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
                announced = _content_total(resp, have)
                total = expected_bytes or announced
                if expected_bytes is not None and announced is not None and announced > expected_bytes:
                    _too_big(url, part, f"announces {announced} bytes, more than the expected {expected_bytes} bytes")
                with os.fdopen(open_nofollow(part, append=bool(have)), "wb") as f:
                    # one byte past the expected end is enough to know the file is not the one expected
                    limit = None if expected_bytes is None else expected_bytes + 1
                    while chunk := resp.read(CHUNK_BYTES if limit is None else min(CHUNK_BYTES, limit - have)):
                        if expected_bytes is not None and have + len(chunk) > expected_bytes:
                            f.close()
                            _too_big(url, part, f"sent more than the expected {expected_bytes} bytes")
                        f.write(chunk)
                        have += len(chunk)
                        if progress:
                            progress(have, total)
            if announced is not None and have < announced:
                last_error = FetchError(f"connection closed at {have} of {announced} bytes")
            elif expected_bytes is None or have >= expected_bytes:
                break
            else:
                last_error = FetchError(f"connection closed at {have} of {expected_bytes} bytes")
        except urllib.error.HTTPError as exc:
            if exc.code == 416 and have:  # range past the end: already complete
                break
            raise FetchError(f"{url}: HTTP {exc.code} {exc.reason}") from None
        except OutputError as exc:
            raise FetchError(str(exc)) from None
        except (urllib.error.URLError, OSError, ConnectionError) as exc:  # incl. http.client.IncompleteRead
            last_error = exc
        log.warning("download interrupted (%s); resuming (attempt %d)", last_error, attempt + 1)
    else:
        raise FetchError(f"{url}: download failed after {RETRIES} resumes ({last_error}); partial file kept at {part}")
    size = part.stat().st_size
    if expected_bytes is not None and size != expected_bytes:
        part.unlink()
        raise FetchError(f"{url}: got {size} bytes, expected {expected_bytes}; partial file removed")
    if expected_md5 is not None:
        got = file_digest(part, "md5")
        if got != expected_md5:
            part.unlink()
            raise FetchError(f"{url}: md5 {got} does not match the expected {expected_md5}; file removed")
    os.replace(part, dest)
    return dest


def _too_big(url: str, part: Path, reason: str):
    """A server that sends (or announces) more than the expected file: fail now, keep nothing."""
    part.unlink(missing_ok=True)
    raise FetchError(f"{url}: the server {reason}; partial file removed")


def _content_total(resp, have: int) -> int | None:
    length = resp.headers.get("Content-Length")
    return have + int(length) if length and length.isdigit() else None


def _verified(path: Path, expected_bytes: int | None, expected_md5: str | None) -> bool:
    if expected_bytes is not None and path.stat().st_size != expected_bytes:
        return False
    return expected_md5 is None or file_digest(path, "md5") == expected_md5


def fetch(
    url: str = UPSTREAM_URL,
    expected_bytes: int | None = UPSTREAM_BYTES,
    expected_md5: str | None = UPSTREAM_MD5,
    precisions: tuple[str, ...] | None = None,
    progress: Callable[[int, int | None], None] | None = None,
    gpu_check: str = "auto",
) -> Path:
    """Download the checkpoint into the cache, convert and validate it (``gpu_check``: as
    convert.export.convert_checkpoint); returns the models dir."""
    checkpoint = download(url, cache_dir() / UPSTREAM_NAME, expected_bytes, expected_md5, progress)
    try:
        from .convert.export import DEFAULT_PRECISIONS, convert_checkpoint
    except ImportError as exc:
        raise FetchError(f"checkpoint saved at {checkpoint}; converting it needs pip install 'soundtag[convert]' ({exc})") from None
    convert_checkpoint(checkpoint, models_dir(), precisions or DEFAULT_PRECISIONS, gpu_check=gpu_check)
    return models_dir()
