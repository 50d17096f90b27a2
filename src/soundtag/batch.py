"""Batch runs: expand inputs (files, folders, @lists) and tag them in 1..N worker processes."""

from __future__ import annotations

import logging
import multiprocessing
from collections.abc import Iterable, Iterator
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

from .audio import AUDIO_EXTENSIONS, AudioError
from .tagger import Tagger, TaggerOptions, TagResult

log = logging.getLogger(__name__)


def expand_inputs(items: Iterable[str]) -> Iterator[tuple[str, str | None]]:
    """(path, error) per input: files as given; folders recursively (audio extensions, sorted);
    ``@list.txt`` one path per line (blank lines and # comments skipped). A folder without audio
    or an unreadable list is yielded with its error."""
    for item in items:
        if item.startswith("@"):
            listing = Path(item[1:])
            try:
                lines = listing.read_text(encoding="utf-8").splitlines()
            except (OSError, UnicodeDecodeError) as exc:
                yield item, f"cannot read list file ({exc.strerror or exc})"
                continue
            yield from expand_inputs(s.strip() for s in lines if s.strip() and not s.strip().startswith("#"))
        elif Path(item).is_dir():
            found = sorted(
                str(p) for p in Path(item).rglob("*") if p.is_file() and p.suffix.lower() in AUDIO_EXTENSIONS
            )
            if not found:
                yield item, "directory contains no audio files"
            for p in found:
                yield p, None
        else:
            yield item, None


_worker_tagger: Tagger | None = None


def _init_worker(options: TaggerOptions) -> None:
    global _worker_tagger
    _worker_tagger = Tagger(options)


def _tag_one(path: str) -> tuple[str, TagResult | None, str | None]:
    return tag_one(_worker_tagger, path)


def tag_one(tagger: Tagger, path: str) -> tuple[str, TagResult | None, str | None]:
    """(path, result, None) or (path, None, one-line error): bad input never raises."""
    _, result, error = next(tagger.tag_files([path]))
    return path, result, None if error is None else error_message(path, error)


def error_message(path: str, exc: Exception) -> str:
    """The cause in one line, without the path the record already carries."""
    if isinstance(exc, AudioError):
        text = str(exc)
        return text[len(path) + 2 :] if text.startswith(f"{path}: ") else text
    if isinstance(exc, MemoryError):
        return "out of memory while decoding"
    log.debug("unexpected error on %s", path, exc_info=exc)  # a decoder bug must not end a batch
    return f"{type(exc).__name__}: {exc}"


def tag_paths(paths: list[str], options: TaggerOptions, jobs: int = 1, tagger: Tagger | None = None) -> Iterator[tuple[str, TagResult | None, str | None]]:
    """Tag paths in order; with jobs > 1 in worker processes that each load the model once."""
    if jobs <= 1 or len(paths) <= 1:
        tagger = tagger or Tagger(options)
        for path, result, error in tagger.tag_files(paths):
            yield path, result, None if error is None else error_message(path, error)
        return
    # spawn, not fork: the parent may run threads (prefetch, XNNPACK), which fork would copy half-way
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=jobs, mp_context=context, initializer=_init_worker, initargs=(options,)) as pool:
        yield from pool.map(_tag_one, paths, chunksize=1)
