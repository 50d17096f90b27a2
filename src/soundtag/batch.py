"""Batch runs: expand inputs (files, folders, @lists), tag them in 1..N processes, send records to sinks.

Every input ends as exactly one record, in input order: a result, or ``{"path", "error"}``. A worker
process that dies (out of memory, a crash in a decoder) costs the file it was working on, which gets
an error record; a fresh worker takes over the rest.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import signal
import sys
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from multiprocessing.connection import wait
from pathlib import Path

from .audio import AUDIO_EXTENSIONS
from .errors import OptionsError
from .results import error_reason, error_record
from .tagger import Tagger, TaggerOptions

log = logging.getLogger(__name__)

APPLEDOUBLE_PREFIX = "._"  # macOS resource-fork companions: not audio, whatever their extension
WORKER_HEADROOM_BYTES = 400 << 20  # per worker beyond ~2x the model file (XNNPACK packs a second copy)


@dataclass
class Counts:
    tagged: int = 0
    failed: int = 0
    skipped: int = 0  # already in the output (--resume)


# --- inputs -------------------------------------------------------------------------------
def expand_inputs(items: Iterable[str], _lists: tuple[str, ...] = ()) -> Iterator[tuple[str, str | None]]:
    """(path, error) per input: files as given; folders recursively (audio extensions, sorted, AppleDouble
    ``._*`` skipped, unreadable subfolders reported); ``@list.txt`` one path per line (blank lines and
    # comments skipped; UTF-8; a list that includes itself is an error)."""
    for item in items:
        if item.startswith("@") and len(item) > 1:
            yield from _expand_list(item, _lists)
        elif os.path.isdir(item):
            yield from _expand_folder(item)
        else:
            yield item, None


def _expand_list(item: str, lists: tuple[str, ...]) -> Iterator[tuple[str, str | None]]:
    listing = Path(item[1:])
    key = os.path.realpath(listing)
    if key in lists:
        chain = " -> ".join([*lists[lists.index(key):], key])
        yield item, f"list includes itself ({chain})"
        return
    try:
        text = listing.read_bytes().decode("utf-8")
    except OSError as exc:
        yield item, f"cannot read list file ({exc.strerror or exc})"
        return
    except UnicodeDecodeError as exc:
        yield item, f"list file is not UTF-8 text (byte {exc.start}: {exc.reason})"
        return
    lines = (s.strip() for s in text.splitlines())
    yield from expand_inputs([s for s in lines if s and not s.startswith("#")], (*lists, key))


def _expand_folder(folder: str) -> Iterator[tuple[str, str | None]]:
    found: list[str] = []
    unreadable: list[tuple[str, str]] = []

    def onerror(exc: OSError) -> None:
        unreadable.append((exc.filename or folder, f"cannot read folder ({exc.strerror or exc})"))

    for root, dirs, files in os.walk(folder, onerror=onerror):
        dirs.sort()
        for name in files:
            if name.startswith(APPLEDOUBLE_PREFIX) or Path(name).suffix.lower() not in AUDIO_EXTENSIONS:
                continue
            p = os.path.join(root, name)
            if os.path.isfile(p):
                found.append(p)
    found.sort()
    yield from unreadable
    if not found and not unreadable:
        yield folder, "directory contains no audio files"
    for p in found:
        yield p, None


# --- limits -------------------------------------------------------------------------------
def cap_jobs(jobs: int, model_path: str | Path | None) -> tuple[int, str | None]:
    """Worker processes the machine can hold: at most one per core, and as many as free memory allows
    for a model of this size. Returns (jobs, warning or None)."""
    if jobs < 1:
        raise OptionsError(f"--jobs must be >= 1, got {jobs}")
    cores = os.cpu_count() or 1
    per_worker = WORKER_HEADROOM_BYTES + 2 * (Path(model_path).stat().st_size if model_path else 0)
    avail = _available_memory()
    by_memory = max(1, avail // per_worker) if avail else jobs
    capped = min(jobs, cores, by_memory)
    if capped == jobs:
        return jobs, None
    return capped, (f"--jobs {jobs} capped to {capped} ({cores} cores, "
                    f"{(avail or 0) / 2**30:.1f} GiB available, ~{per_worker / 2**30:.1f} GiB per worker)")


def _available_memory() -> int | None:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


# --- tagging ------------------------------------------------------------------------------
def tag_paths(paths: list[str], tagger: Tagger, jobs: int = 1) -> Iterator[tuple[str, object, str | None]]:
    """(path, result, None) or (path, None, one-line error) per path, in order; never raises for an input."""
    if jobs <= 1 or len(paths) <= 1:
        for path, result, error in tagger.tag_files(paths):
            yield path, result, None if error is None else error_reason(error)
        return
    yield from _WorkerPool(tagger.options, jobs).run(paths)


def _worker_main(options: TaggerOptions, conn) -> None:
    """A worker process: load the model once, then tag the paths sent until None."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent handles Ctrl-C
    # Results travel through ``conn``; stdout is the parent's results stream (a pipe the workers share).
    # Whatever a worker or a native library in it prints (LiteRT writes to stdout when a GPU model
    # loads) goes to stderr, never into a record the parent is writing.
    sys.stdout.flush()
    os.dup2(2, 1)
    tagger = Tagger(options)
    conn.send(("ready", None, None))
    while (path := conn.recv()) is not None:
        _, result, error = next(tagger.tag_files([path]))
        conn.send((path, result, None if error is None else error_reason(error)))


class _WorkerPool:
    """N spawned workers, one path each at a time. A worker that dies is replaced and its path gets an
    error; results come back in input order."""

    def __init__(self, options: TaggerOptions, jobs: int) -> None:
        # spawn, not fork: the parent runs threads (prefetch, XNNPACK), which fork would copy half-way
        self._ctx = multiprocessing.get_context("spawn")
        self._options = options
        self._jobs = jobs

    def _start(self):
        parent, child = self._ctx.Pipe()
        proc = self._ctx.Process(target=_worker_main, args=(self._options, child), daemon=True)
        proc.start()
        child.close()
        return proc, parent

    def run(self, paths: list[str]) -> Iterator[tuple[str, object, str | None]]:
        todo = list(enumerate(paths))[::-1]
        done: dict[int, tuple] = {}
        busy: dict = {}  # conn -> (proc, index or None while loading)
        next_out = 0
        workers = [self._start() for _ in range(min(self._jobs, len(paths)))]
        for proc, conn in workers:
            busy[conn] = (proc, None)
        try:
            while next_out < len(paths):
                ready = wait(list(busy) + [p.sentinel for p, _ in busy.values()])
                for conn in list(busy):
                    proc, index = busy[conn]
                    if conn not in ready and proc.sentinel not in ready:
                        continue
                    try:
                        msg = conn.recv() if conn.poll() else None
                    except (EOFError, OSError):  # the worker is gone
                        msg = None
                        proc.join(timeout=5)
                    if msg is None and proc.is_alive():
                        continue  # woken by nothing we need
                    if msg is None:
                        if index is None:  # died while loading the model: no file lost, but no worker either
                            raise RuntimeError(f"a worker process could not start ({_exit_text(proc.exitcode)})")
                        done[index] = (paths[index], None,
                                       f"worker process died while tagging this file ({_exit_text(proc.exitcode)})")
                        conn.close()
                        del busy[conn]
                        proc, conn = self._start()  # a fresh worker takes over the rest
                        busy[conn] = (proc, None)
                        continue
                    if msg[0] != "ready":
                        done[index] = msg
                    if todo:
                        index, path = todo.pop()
                        conn.send(path)
                        busy[conn] = (proc, index)
                    else:
                        conn.send(None)
                        del busy[conn]
                while next_out in done:
                    yield done.pop(next_out)
                    next_out += 1
        finally:
            for conn, (proc, _) in busy.items():
                proc.kill()
            for conn, (proc, _) in busy.items():
                proc.join(timeout=5)


def _exit_text(code: int | None) -> str:
    if code is not None and code < 0:
        try:
            name = signal.Signals(-code).name
        except ValueError:
            name = f"signal {-code}"
        hint = ", e.g. out of memory" if -code == signal.SIGKILL else ""
        return f"killed by {name}{hint}"
    return f"exit code {code}"


# --- the batch loop -----------------------------------------------------------------------
def run_batch(
    inputs: list[tuple[str, str | None]],
    tagger: Tagger,
    sinks: list,
    jobs: int = 1,
    done: set[str] | None = None,
    on_error: Callable[[str, str], None] | None = None,
    on_record: Callable[[str, object], None] | None = None,
) -> Counts:
    """Tag the inputs not in ``done``; every record goes to every sink, in input order."""
    done = done if done is not None else set()
    scores = any(getattr(sink, "wants_scores", False) for sink in sinks)  # e.g. Parquet keeps all 527
    counts = Counts()
    todo = [p for p, e in inputs if e is None and p not in done]
    counts.skipped = sum(1 for p, e in inputs if e is None) - len(todo)

    def emit(rec: dict) -> None:
        if "error" in rec:
            counts.failed += 1
            if on_error:
                on_error(rec["path"], rec["error"])
        else:
            counts.tagged += 1
        for sink in sinks:
            sink.write(rec)

    for path, error in inputs:
        if error is not None and path not in done:
            emit(error_record(path, error))
    for path, result, error in tag_paths(todo, tagger, jobs):
        emit(error_record(path, error) if error else result.to_record(scores=scores))
        if on_record:
            on_record(path, result)
    return counts
