"""Durable files: atomic writes, checksums, an exclusive lock for a result file, no-follow opens."""

from __future__ import annotations

import errno
import fcntl
import hashlib
import os
from collections.abc import Iterator
from pathlib import Path

from .errors import OutputError

CHUNK_BYTES = 1 << 20  # read size for checksums


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    """Write a file so that readers see either the old content or the whole new one."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


def file_chunks(path: str | Path) -> Iterator[bytes]:
    """A file's bytes in chunks of CHUNK_BYTES (digests and checksums of big files)."""
    with open(path, "rb") as f:
        yield from iter(lambda: f.read(CHUNK_BYTES), b"")


def file_digest(path: str | Path, algorithm: str = "md5") -> str:
    """Hex digest of a file, read in chunks."""
    h = hashlib.new(algorithm)
    for chunk in file_chunks(path):
        h.update(chunk)
    return h.hexdigest()


def open_nofollow(path: str | Path, append: bool) -> int:
    """A file descriptor for writing ``path``, refusing to follow a symlink planted there."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW | (os.O_APPEND if append else os.O_TRUNC)
    try:
        return os.open(path, flags, 0o644)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise OutputError("is a symbolic link; refusing to write through it (remove it and retry)", str(path)) from None
        raise


class FileLock:
    """An exclusive, non-blocking advisory lock (flock) on ``path``; released on close or process death.

    The lock file holds the owner's pid for the error message; it is removed on release.
    """

    def __init__(self, path: str | Path, what: str) -> None:
        self.path = Path(path)
        try:
            self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o644)
        except OSError as exc:
            raise OutputError(f"cannot create lock file {self.path.name} ({exc.strerror})", what) from None
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            owner = os.pread(self._fd, 32, 0).decode("ascii", "replace").strip() or "?"
            os.close(self._fd)
            raise OutputError(f"in use by another soundtag run (pid {owner}); wait for it or choose another --output",
                              what) from None
        os.ftruncate(self._fd, 0)
        os.pwrite(self._fd, f"{os.getpid()}\n".encode(), 0)

    def release(self) -> None:
        if self._fd < 0:
            return
        try:
            self.path.unlink()
        except FileNotFoundError:
            pass
        os.close(self._fd)
        self._fd = -1
