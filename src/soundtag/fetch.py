"""Download, verify and convert the upstream checkpoints into the user cache; the family's registry.

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
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote

from .errors import FetchError, OutputError
from .files import file_digest, open_nofollow
from .paths import cache_dir, models_dir

log = logging.getLogger(__name__)

# PANNs CNN14, Zenodo record 3987831 (Kong et al.), weights CC BY 4.0.
UPSTREAM_URL = "https://zenodo.org/record/3987831/files/Cnn14_mAP%3D0.431.pth?download=1"
UPSTREAM_NAME = "Cnn14_mAP=0.431.pth"
UPSTREAM_BYTES = 327_428_481
UPSTREAM_MD5 = "541141fa2ee191a88f24a3219fff024e"
ZENODO_RECORD = "https://zenodo.org/record/3987831/files/"
CHUNK_BYTES = 1 << 20  # download read size


@dataclass(frozen=True)
class Checkpoint:
    """One upstream checkpoint: where it is, what it must be, where each pin came from."""

    name: str  # what `soundtag fetch NAME` takes
    arch: str  # convert.family.ARCHITECTURES key (also the model files' prefix, lower-cased)
    file: str  # the file on Zenodo record 3987831
    md5: str | None  # None: no pin found; fetch needs --md5 or --no-verify
    bytes: int | None  # None: size not pinned (md5 still checked)
    published_map: float
    pin_source: str  # where the md5/size pin was found (not checked against Zenodo here)
    sample_rate: int = 32_000  # Hz, its front end's (convert.family holds the whole front end)

    @property
    def url(self) -> str:
        return ZENODO_RECORD + quote(self.file) + "?download=1"


# Pins from public code that downloads these files (issue #19 lists them); Cnn14's from the model card.
CHECKPOINTS = {c.name: c for c in (
    Checkpoint("cnn14", "Cnn14", UPSTREAM_NAME, UPSTREAM_MD5, UPSTREAM_BYTES, 0.431,
               "Zenodo 3987831 and the model card (DESIGN.md)"),
    Checkpoint("cnn14-16k", "Cnn14_16k", "Cnn14_16k_mAP=0.438.pth", "362fc5ff18f1d6ad2f6d464b45893f2c", 358_668_570,
               0.438, "public download scripts, as quoted in issue #19", 16_000),
    Checkpoint("cnn14-8k", "Cnn14_8k", "Cnn14_8k_mAP=0.416.pth", None, None, 0.416, "no pin found", 8_000),
    Checkpoint("sed", "Cnn14_DecisionLevelMax", "Cnn14_DecisionLevelMax_mAP=0.385.pth",
               "70539c43c18b6a289b3199c503a82c5a", None, 0.385, "public code, as quoted in issue #20 (size unknown)"),
    Checkpoint("sed-att", "Cnn14_DecisionLevelAtt", "Cnn14_DecisionLevelAtt_mAP=0.425.pth",
               "c8281ca2b9967244b91d557aa941e8ca", None, 0.425, "public code, as quoted in issue #20 (size unknown)"),
    Checkpoint("cnn10", "Cnn10", "Cnn10_mAP=0.380.pth", "bfb1f1f9968938fa8ef4012b8471f5f6", 25_237_595, 0.380,
               "public download scripts, as quoted in issue #19"),
    Checkpoint("cnn6", "Cnn6", "Cnn6_mAP=0.343.pth", "e25e26b84585b14c7754c91e48efc9be", None, 0.343,
               "public download scripts, as quoted in issue #19 (size unknown)"),
    Checkpoint("mobilenetv1", "MobileNetV1", "MobileNetV1_mAP=0.389.pth", "a419303e1c88aa1b9d2ac3811563d371",
               23_639_473, 0.389, "public download scripts, as quoted in issue #19"),
    Checkpoint("mobilenetv2", "MobileNetV2", "MobileNetV2_mAP=0.383.pth", None, None, 0.383, "no pin found"),
    Checkpoint("resnet38", "ResNet38", "ResNet38_mAP=0.434.pth", "bf12f36aaabac4e0855e22d3c3239c1b", 299_615_982,
               0.434, "public download scripts, as quoted in issue #19"),
    Checkpoint("wavegram-logmel-cnn14", "Wavegram_Logmel_Cnn14", "Wavegram_Logmel_Cnn14_mAP=0.439.pth",
               "17fa9ab65af3c0eb5ffbc5f65552c4e1", 328_692_198, 0.439, "public download scripts, as quoted in issue #19"),
)}


def checkpoint(name: str) -> Checkpoint:
    """The registry entry of a name (case-insensitive; an architecture name works too)."""
    key = name.lower().replace("_", "-")
    for c in CHECKPOINTS.values():
        if key in (c.name, c.arch.lower().replace("_", "-")):
            return c
    raise FetchError(f"unknown model {name!r}; choose from {', '.join(CHECKPOINTS)}")
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
    file_name: str = UPSTREAM_NAME,
    arch: str | None = None,
) -> Path:
    """Download a checkpoint into the cache as ``file_name``, convert and validate it (``gpu_check``:
    as convert.export.convert_checkpoint; ``arch``: its architecture); returns the models dir."""
    checkpoint = download(url, cache_dir() / file_name, expected_bytes, expected_md5, progress)
    try:
        from .convert.export import convert_checkpoint
    except ImportError as exc:
        raise FetchError(f"checkpoint saved at {checkpoint}; converting it needs pip install 'soundtag[convert]' ({exc})") from None
    convert_checkpoint(checkpoint, models_dir(), precisions, gpu_check=gpu_check, arch=arch)
    return models_dir()
