"""Tagging: 10 s windows of a waveform -> CNN14 probabilities -> clip tags, timeline, event table."""

from __future__ import annotations

import logging
import math
import queue
import threading
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from . import features
from .audio import AudioStream
from .labels import NUM_CLASSES, labels, lookup
from .model import Cnn14Model

log = logging.getLogger(__name__)

WINDOW_S = features.CLIP_SAMPLES / features.SAMPLE_RATE  # 10 s: the model's fixed input length
DEFAULT_EVENT_THRESHOLD = 0.5  # probability above which a class counts as present in a window
AGGREGATES = ("max", "mean")
PREFETCH_DEPTH = 2  # windows decoded ahead of the model: bounded memory (2 x 1.3 MB)


@dataclass(frozen=True)
class TaggerOptions:
    """How to tag and what to report."""

    model_path: str | None = None  # .tflite; None: $SOUNDTAG_MODEL, then the user cache
    top_k: int = 5  # categories reported per clip and per window (up to 527)
    threshold: float | None = None  # report only scores >= this (all classes)
    thresholds: Mapping[str, float] | None = None  # per-class thresholds by name or MID
    hop_s: float = WINDOW_S  # seconds between window starts (<= 10 s overlaps windows)
    aggregate: str = "max"  # clip score from window scores: "max" or "mean"
    allow: Sequence[str] | None = None  # report only these classes (names or MIDs)
    deny: Sequence[str] | None = None  # never report these classes (names or MIDs)
    num_threads: int | None = None  # LiteRT CPU threads; None: one per core up to 4
    prefetch: bool = True  # decode + log-mel the next window in a thread while the model runs


@dataclass(frozen=True)
class Category:
    index: int
    mid: str
    name: str
    score: float


@dataclass(frozen=True)
class WindowResult:
    start_s: float
    end_s: float
    categories: tuple[Category, ...]


@dataclass(frozen=True)
class Event:
    """A class above its threshold over consecutive windows."""

    start_s: float
    end_s: float
    index: int
    mid: str
    name: str
    score: float  # the highest window score within the event


@dataclass(frozen=True)
class TagResult:
    path: str | None
    duration_s: float  # decoded duration at the source rate
    clip: tuple[Category, ...]
    windows: tuple[WindowResult, ...]
    events: tuple[Event, ...]
    clip_scores: np.ndarray = field(repr=False, compare=False)  # [527]
    window_scores: np.ndarray = field(repr=False, compare=False)  # [windows, 527]
    window_starts_s: np.ndarray = field(repr=False, compare=False)  # [windows]


def window_starts(num_samples: int, hop: int, window: int = features.CLIP_SAMPLES) -> list[int]:
    """Start samples of the windows covering num_samples: one window if it fits, else every hop
    until a window reaches the end (the last one zero-padded)."""
    if num_samples <= window:
        return [0]
    return [i * hop for i in range(1 + math.ceil((num_samples - window) / hop))]


def iter_windows(blocks: Iterable[np.ndarray], hop: int, window: int = features.CLIP_SAMPLES) -> Iterator[tuple[int, int, np.ndarray]]:
    """(start, valid_samples, window) over a stream of blocks: exactly the windows of
    window_starts(total, hop), the last one zero-padded. Holds at most one window plus one block."""
    buf = np.zeros(0, np.float32)
    buf_start = 0  # absolute sample index of buf[0]
    next_start = 0  # absolute start of the next window
    emitted = 0
    for block in blocks:
        buf = np.concatenate([buf, np.asarray(block, np.float32)])
        while buf_start + buf.size >= next_start + window:
            i = next_start - buf_start
            yield next_start, window, buf[i : i + window].copy()
            emitted += 1
            next_start += hop
            drop = min(next_start - buf_start, buf.size)
            buf, buf_start = buf[drop:], buf_start + drop
    total = buf_start + buf.size
    if total == 0:
        return
    for start in window_starts(total, hop, window)[emitted:]:
        valid = buf[start - buf_start : start - buf_start + window]
        out = np.zeros(window, np.float32)
        out[: valid.size] = valid
        yield start, valid.size, out


def _features(windows: Iterable[tuple[int, int, np.ndarray]]) -> Iterator[tuple[int, int, np.ndarray]]:
    """(start, valid, waveform) windows -> (start, valid, log-mel [1001, 64])."""
    for start, n, wave in windows:
        yield start, n, features.logmel(wave)


@dataclass(frozen=True)
class _FileEnd:
    duration_s: float


class _Raised:
    def __init__(self, exc: BaseException) -> None:
        self.exc = exc


def prefetch(items: Iterator, depth: int = PREFETCH_DEPTH) -> Iterator:
    """Run an iterator in a background thread, up to `depth` items ahead (errors re-raised here).

    Decoding (libsndfile/FFmpeg), soxr, scipy.fft and numpy release the GIL, and so does the LiteRT
    invoke, so the next window's audio and log-mel are ready when the model finishes this one.
    """
    q: queue.Queue = queue.Queue(maxsize=depth)
    done = object()
    stop = threading.Event()

    def work() -> None:
        try:
            for item in items:
                q.put(item)
                if stop.is_set():
                    return
            q.put(done)
        except BaseException as exc:  # handed to the consumer
            q.put(_Raised(exc))

    worker = threading.Thread(target=work, name="soundtag-prefetch", daemon=True)
    worker.start()
    try:
        while True:
            item = q.get()
            if item is done:
                return
            if isinstance(item, _Raised):
                raise item.exc
            yield item
    finally:
        stop.set()
        while worker.is_alive():  # unblock a pending put, let the worker see `stop`
            try:
                q.get_nowait()
            except queue.Empty:
                worker.join(timeout=0.01)


class Tagger:
    """CNN14 sound-event tagger. Build with Tagger(TaggerOptions(...)) or Tagger.from_model_path()."""

    def __init__(self, options: TaggerOptions | None = None) -> None:
        from .fetch import resolve_model_path

        self.options = options or TaggerOptions()
        o = self.options
        if not 1 <= o.top_k <= NUM_CLASSES:
            raise ValueError(f"top_k must be between 1 and {NUM_CLASSES}, got {o.top_k}")
        if not 0 < o.hop_s:
            raise ValueError(f"hop_s must be positive, got {o.hop_s}")
        if o.num_threads is not None and o.num_threads < 1:
            raise ValueError(f"num_threads must be >= 1, got {o.num_threads}")
        if o.aggregate not in AGGREGATES:
            raise ValueError(f"aggregate must be one of {', '.join(AGGREGATES)}, got {o.aggregate!r}")
        self.hop = max(1, round(o.hop_s * features.SAMPLE_RATE))
        self.report_mask = _class_mask(o.allow, o.deny)
        self.cutoffs = _cutoffs(o.threshold, o.thresholds)
        self.event_cutoffs = _cutoffs(o.threshold if o.threshold is not None else DEFAULT_EVENT_THRESHOLD, o.thresholds)
        self.model = Cnn14Model(resolve_model_path(o.model_path), num_threads=o.num_threads)

    @classmethod
    def from_model_path(cls, path: str | Path, **options) -> Tagger:
        return cls(TaggerOptions(model_path=str(path), **options))

    # --- inference -------------------------------------------------------------------------
    def _probs(self, feats: Iterable[tuple[int, int, np.ndarray]]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        starts, valid, probs = [], [], []
        for start, n, lm in feats:
            starts.append(start)
            valid.append(n)
            probs.append(self.model(lm))
        return np.array(starts), np.array(valid), np.array(probs, dtype=np.float32).reshape(-1, NUM_CLASSES)

    def tag_waveform(self, waveform: np.ndarray, sample_rate: int = features.SAMPLE_RATE, path: str | None = None) -> TagResult:
        """Tag a mono (or [samples, channels]) float waveform at any sample rate."""
        import soxr

        x = np.asarray(waveform, dtype=np.float32)
        if x.ndim == 2:
            x = x.mean(axis=1)
        if x.ndim != 1 or x.size == 0:
            raise ValueError("waveform must be a non-empty 1-D array (or [samples, channels])")
        if not np.isfinite(x).all():
            raise ValueError("waveform has non-finite samples (NaN or Inf)")
        duration = x.size / sample_rate
        if sample_rate != features.SAMPLE_RATE:
            x = soxr.resample(x, sample_rate, features.SAMPLE_RATE, quality="HQ")
        feats = _features(iter_windows([x], self.hop))
        starts, valid, probs = self._probs(prefetch(feats) if self.options.prefetch else feats)
        return self._result(path, duration, starts, valid, probs)

    def tag_file(self, path: str | Path) -> TagResult:
        """Decode (streaming, any format/rate/channels) and tag a file. Raises AudioError on bad input."""
        _, result, error = next(self.tag_files([path]))
        if error is not None:
            raise error
        return result

    def tag_files(self, paths: Iterable[str | Path]) -> Iterator[tuple[str, TagResult | None, Exception | None]]:
        """(path, result, None) or (path, None, error) per file, in order.

        With ``prefetch`` the next window is decoded and log-mel'd in a background thread while the
        model runs, across file boundaries too, so a batch of short clips overlaps decoding one file
        with the model on the previous one.
        """
        paths = [str(p) for p in paths]

        def produce() -> Iterator[tuple[str, object]]:
            for path in paths:
                try:
                    stream = AudioStream(path)
                    for item in _features(iter_windows(stream, self.hop)):
                        yield path, item
                    yield path, _FileEnd(stream.duration_s)
                except Exception as exc:  # reported for this file; the batch goes on
                    yield path, exc

        items = iter(prefetch(produce()) if self.options.prefetch else produce())
        for path in paths:
            end: list[_FileEnd] = []

            def windows(path: str = path, end: list = end) -> Iterator[tuple[int, int, np.ndarray]]:
                for owner, item in items:
                    if owner != path:
                        continue  # left over from a file whose model step failed
                    if isinstance(item, _FileEnd):
                        end.append(item)
                        return
                    if isinstance(item, Exception):
                        raise item
                    yield item

            try:
                starts, valid, probs = self._probs(windows())
                yield path, self._result(path, end[0].duration_s, starts, valid, probs), None
            except Exception as exc:
                yield path, None, exc

    # --- reporting -------------------------------------------------------------------------
    def select(self, scores: np.ndarray) -> tuple[Category, ...]:
        """Top-k allowed categories whose score clears their threshold, best first."""
        ok = self.report_mask & (scores >= self.cutoffs)
        idx = np.flatnonzero(ok)
        idx = idx[np.argsort(-scores[idx], kind="stable")][: self.options.top_k]
        labs = labels()
        return tuple(Category(int(i), labs[i].mid, labs[i].name, float(scores[i])) for i in idx)

    def events(self, starts_s: np.ndarray, ends_s: np.ndarray, probs: np.ndarray) -> tuple[Event, ...]:
        """Merge consecutive windows where an allowed class stays above its event threshold."""
        labs = labels()
        above = (probs >= self.event_cutoffs) & self.report_mask
        out = []
        for c in np.flatnonzero(above.any(axis=0)):
            on = above[:, c]
            i = 0
            while i < on.size:
                if not on[i]:
                    i += 1
                    continue
                j = i
                while j + 1 < on.size and on[j + 1]:
                    j += 1
                score = float(probs[i : j + 1, c].max())
                out.append(Event(float(starts_s[i]), float(ends_s[j]), int(c), labs[c].mid, labs[c].name, score))
                i = j + 1
        return tuple(sorted(out, key=lambda e: (e.start_s, -e.score)))

    def _result(self, path, duration_s, starts, valid, probs) -> TagResult:
        sr = features.SAMPLE_RATE
        starts_s = starts / sr
        ends_s = (starts + valid) / sr
        clip = probs.max(axis=0) if self.options.aggregate == "max" else probs.mean(axis=0)
        windows = tuple(WindowResult(float(s), float(e), self.select(p)) for s, e, p in zip(starts_s, ends_s, probs))
        return TagResult(
            path=path,
            duration_s=float(duration_s),
            clip=self.select(clip),
            windows=windows,
            events=self.events(starts_s, ends_s, probs),
            clip_scores=clip,
            window_scores=probs,
            window_starts_s=starts_s,
        )


def _class_mask(allow: Sequence[str] | None, deny: Sequence[str] | None) -> np.ndarray:
    mask = np.zeros(NUM_CLASSES, bool) if allow else np.ones(NUM_CLASSES, bool)
    for key in allow or ():
        mask[lookup(key)] = True
    for key in deny or ():
        mask[lookup(key)] = False
    return mask


def _cutoffs(default: float | None, per_class: Mapping[str, float] | None) -> np.ndarray:
    cut = np.full(NUM_CLASSES, -np.inf if default is None else float(default), np.float32)
    for key, value in (per_class or {}).items():
        cut[lookup(key)] = float(value)
    return cut
