"""Durable files: atomic writes, checksums, an exclusive lock for a result file, no-follow opens."""

from __future__ import annotations

import errno
import fcntl
import hashlib
import os
import re
import secrets
from collections.abc import Callable, Iterator
from pathlib import Path

from .errors import OutputError

CHUNK_BYTES = 1 << 20  # read size for checksums
NEW_FILE_MODE = 0o644  # before the umask: what open() gives any new file
NEW_FILE_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW  # a new file, never one planted there
TEMP_TOKEN_BYTES = 8  # random bytes in a temp file's name (as hex)
TEMP_NAME_TRIES = 100  # random names tried before giving up (each taken one is a collision or an attack)
LOCK_TRIES = 100  # times a locker re-opens a lock file that was released (unlinked) under it


def create_beside(path: str | Path) -> tuple[int, Path]:
    """A new, empty temp file in path's folder (same file system: it can be renamed onto path), opened for
    writing with O_EXCL | O_NOFOLLOW under an unpredictable name ``.NAME.RANDOM.tmp``; (fd, its path).

    As tempfile.mkstemp, but with the mode any new file gets (mkstemp's is 0600, whatever the umask)."""
    path = Path(path)
    for _ in range(TEMP_NAME_TRIES):
        tmp = path.with_name(f".{path.name}.{secrets.token_hex(TEMP_TOKEN_BYTES)}.tmp")
        try:
            return os.open(tmp, NEW_FILE_FLAGS, NEW_FILE_MODE), tmp
        except FileExistsError:
            continue
    raise FileExistsError(errno.EEXIST, f"no free temp file name beside {path.name}", str(path.parent))


def remove_stale_temps(path: str | Path) -> int:
    """Remove the temp files create_beside(path) made for a run that was killed; only while holding the
    lock that guards path (no live run is writing one then). Returns how many."""
    path = Path(path)
    name = re.compile(rf"\.{re.escape(path.name)}\.[0-9a-f]{{{2 * TEMP_TOKEN_BYTES}}}\.tmp")
    removed = 0
    try:
        entries = list(os.scandir(path.parent))
    except OSError:
        return 0
    for entry in entries:
        if name.fullmatch(entry.name):
            try:
                os.unlink(entry.path)
                removed += 1
            except OSError:
                pass
    return removed


def fsync_dir(path: str | Path) -> None:
    """Make a rename or unlink in this folder durable (best effort: some file systems refuse)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write_bytes(path: str | Path, data: bytes, verify: Callable[[Path], None] | None = None) -> Path:
    """Write a file so that readers see either the old content or the whole new one. ``verify``: called
    with the written temp file before it takes the path; what it raises leaves nothing written."""
    path = Path(path)
    fd, tmp = create_beside(path)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        if verify is not None:
            verify(tmp)
        os.replace(tmp, path)
        fsync_dir(path.parent)
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
        return os.open(path, flags, NEW_FILE_MODE)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise OutputError("is a symbolic link; refusing to write through it (remove it and retry)", str(path)) from None
        raise


class FileLock:
    """An exclusive, non-blocking advisory lock (flock) on ``path``; released on close or process death.

    The lock file holds the owner's pid for the error message. ``release()`` removes it while still
    holding the lock, so a locker that opened the file before that may get a lock on a file no longer at
    ``path``: each locker checks, once it holds the flock, that ``path`` is still the very file it locked
    (same device and inode), and starts over if not. So at most one run holds the file at ``path``.
    """

    def __init__(self, path: str | Path, what: str) -> None:
        self.path = Path(path)
        self._fd = -1
        for _ in range(LOCK_TRIES):
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, NEW_FILE_MODE)
            except OSError as exc:
                raise OutputError(f"cannot create lock file {self.path.name} ({exc.strerror})", what) from None
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                owner = os.pread(fd, 32, 0).decode("ascii", "replace").strip() or "?"
                os.close(fd)
                raise OutputError(f"in use by another soundtag run (pid {owner}); wait for it or choose another "
                                  "--output", what) from None
            if self._still_at_path(fd):
                self._fd = fd
                break
            os.close(fd)  # its holder released (removed) it before we got it: lock the file there now
        else:
            raise OutputError(f"cannot lock {self.path.name}: it is removed and re-created over and over", what)
        os.ftruncate(self._fd, 0)
        os.pwrite(self._fd, f"{os.getpid()}\n".encode(), 0)

    def _still_at_path(self, fd: int) -> bool:
        try:
            there = os.stat(self.path, follow_symlinks=False)
        except FileNotFoundError:
            return False
        mine = os.fstat(fd)
        return (there.st_dev, there.st_ino) == (mine.st_dev, mine.st_ino)

    def release(self) -> None:
        """Remove the lock file (only if it is still ours), then let go of the lock."""
        if self._fd < 0:
            return
        try:
            if self._still_at_path(self._fd):
                self.path.unlink()
        except OSError:
            pass  # left in place: harmless, the next locker takes it over
        os.close(self._fd)
        self._fd = -1
