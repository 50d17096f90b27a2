"""Live tagging: feed PCM blocks of any size, at any rate, get each window's tags as soon as it completes.

One code path for `soundtag listen` and the server's WebSocket: ``Tagger.stream(rate, channels)``.
Fed the samples of a file, a stream gives the windows and scores of ``Tagger.tag_file`` (same window
rule, same soxr resampler run incrementally). It holds at most one window plus one block of audio, and
one running clip aggregate, however long it runs. A sound event detection model's events come at frame
resolution (sed.EventTracker over the frames of each window as it completes): the file's events, but
for frames an end-aligned last window would have owned.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from .audio import MAX_CHANNELS, MAX_SAMPLE_RATE, MIN_SAMPLE_RATE, downmix
from .errors import AudioError, CancelledError, OptionsError, TooLongError
from .results import Category, Event, tags_record
from .windows import WindowCutter

PCM_ENCODINGS = {"f32le": "<f4", "s16le": "<i2", "s32le": "<i4"}  # raw sample formats accepted
INT_SCALE = {"<i2": 32768.0, "<i4": 2147483648.0}  # integer PCM full scale


@dataclass(frozen=True)
class StreamWindow:
    """A completed window: its time span, reported tags and all its scores; ``latency_s`` is the time from
    the block that completed it arriving to this result."""

    start_s: float
    end_s: float
    categories: tuple[Category, ...]
    scores: np.ndarray = field(repr=False, compare=False)
    latency_s: float = 0.0

    def to_record(self) -> dict:
        return {"start_s": round(self.start_s, 6), "end_s": round(self.end_s, 6), "tags": tags_record(self.categories)}


@dataclass(frozen=True)
class StreamEvent:
    """An event opening (``kind="start"``, end and score so far) or closing (``kind="end"``, final)."""

    kind: str
    event: Event

    def to_record(self) -> dict:
        e = self.event
        return {"event": self.kind, "start_s": round(e.start_s, 6), "end_s": round(e.end_s, 6), "label": e.name,
                "mid": e.mid, "score": round(e.score, 6)}


def decode_pcm(data: bytes, encoding: str, channels: int) -> np.ndarray:
    """Raw interleaved PCM bytes -> float32 [frames, channels] in [-1, 1] (a partial frame is an error)."""
    if encoding not in PCM_ENCODINGS:
        raise OptionsError(f"encoding must be one of {', '.join(PCM_ENCODINGS)}, got {encoding!r}")
    dtype = np.dtype(PCM_ENCODINGS[encoding])
    frame = dtype.itemsize * channels
    if len(data) % frame:
        raise AudioError(f"{len(data)} bytes is not a whole number of {channels}-channel {encoding} frames")
    x = np.frombuffer(data, dtype=dtype).reshape(-1, channels)
    scale = INT_SCALE.get(dtype.str)
    return (x.astype(np.float32) / np.float32(scale)) if scale else x.astype(np.float32)


class TagStream:
    """Incremental tagging of one live input (see the module docstring). Build with ``Tagger.stream``."""

    def __init__(self, tagger, sample_rate: int, channels: int = 1, clock: Callable[[], float] = time.perf_counter,
                 limit: tuple[float, str] | None = None):
        import soxr

        if not (isinstance(sample_rate, int) and MIN_SAMPLE_RATE <= sample_rate <= MAX_SAMPLE_RATE):
            raise OptionsError(f"sample_rate must be an integer in {MIN_SAMPLE_RATE}-{MAX_SAMPLE_RATE} Hz, got {sample_rate!r}")
        if not (isinstance(channels, int) and 1 <= channels <= MAX_CHANNELS):
            raise OptionsError(f"channels must be an integer in 1-{MAX_CHANNELS}, got {channels!r}")
        self.tagger, self.sample_rate, self.channels = tagger, sample_rate, channels
        self._clock = clock
        rate = tagger.spec.sample_rate  # the model's
        self._resampler = None if sample_rate == rate else soxr.ResampleStream(sample_rate, rate, 1, "float32", "HQ")
        self._cutter = WindowCutter(tagger.hop, tagger.spec.window_samples)
        self._frames = 0  # source frames fed
        self._windows = 0
        self._clip: np.ndarray | None = None  # running max, or running sum for the mean
        self._open: dict[int, list] = {}  # class -> [start_s, end_s, score] of the open event
        spec = tagger.spec
        self._tracker = None  # a SED model's events at frame resolution (sed.EventTracker)
        if spec.framewise:
            from .sed import EventTracker

            self._tracker = EventTracker(tagger.scorer.event_cutoffs, spec.frame_hop_s, tagger.options.sed,
                                         tagger.scorer.mask)
            self._committed = 0  # frames handed to the tracker
            self._last: tuple[int, np.ndarray] | None = None  # (first frame, framewise) of the last window
        self.closed = False
        self.limit = limit  # (seconds, flag): more audio than this is refused (TaggerOptions.duration_limit)
        self.cancel = threading.Event()  # set from another thread: feed stops between two windows

    @property
    def duration_s(self) -> float:
        return self._frames / self.sample_rate

    def feed(self, samples: np.ndarray) -> list[StreamWindow | StreamEvent]:
        """Samples float [frames] or [frames, channels] in [-1, 1]; returns the windows they complete and the
        events that open or close with them."""
        if self.closed:
            raise AudioError("the stream is closed")
        arrived = self._clock()
        x = np.asarray(samples, dtype=np.float32)
        if x.ndim == 1 and self.channels == 1:
            x = x[:, None]
        if x.ndim != 2 or x.shape[1] != self.channels:
            raise AudioError(f"expected samples shaped [frames, {self.channels}], got {list(x.shape)}")
        if x.size and not np.isfinite(x).all():
            raise AudioError(f"non-finite sample (NaN or Inf) near {self.duration_s:.3f} s")
        if self.limit is not None and (self._frames + x.shape[0]) / self.sample_rate > self.limit[0]:
            raise TooLongError(f"the stream is longer than the maximum {self.limit[0]:g} s ({self.limit[1]})")
        self._frames += x.shape[0]
        mono = downmix(x)
        if self._resampler is not None:
            mono = self._resampler.resample_chunk(mono)
        return self._tag(self._cutter.push(mono), arrived)

    def close(self) -> list[StreamWindow | StreamEvent]:
        """End of input: the last window under the file rule, then every open event closes."""
        if self.closed:
            return []
        arrived = self._clock()
        self.closed = True
        out: list = []
        if self._resampler is not None:
            out += self._tag(self._cutter.push(self._resampler.resample_chunk(np.zeros(0, np.float32), last=True)), arrived)
        out += self._tag(self._cutter.finish(), arrived)
        if self._tracker is not None:
            total = 1 + self._cutter.samples // self.tagger.spec.front_end.hop
            if self._last is not None:
                out += self._frame_events(self._commit(self._last, total - 1))
            out += self._frame_events(self._tracker.close())
        for c in sorted(self._open):
            out.append(self._event("end", c))
        self._open.clear()
        return out

    def _commit(self, last: tuple[int, np.ndarray], upto: int) -> list:
        """Hand the tracker the frames after those committed, up to frame ``upto`` (inclusive), from a window."""
        first, fw = last
        upto = min(upto, first + fw.shape[0] - 1)
        if upto < self._committed:
            return []
        chunk = fw[self._committed - first: upto - first + 1]
        self._committed = upto + 1
        return self._tracker.push(chunk)

    def _frame_events(self, changes: list) -> list[StreamEvent]:
        labs = self.tagger.spec.labels
        heard = round(self._cutter.samples / self.tagger.spec.sample_rate, 6)  # offsets end with the audio, as a file's
        return [StreamEvent(kind, Event(on, min(off, heard), c, labs[c].mid, labs[c].name, peak))
                for kind, c, on, off, peak in changes]

    def _sed_window(self, start: int, n: int, segments: np.ndarray) -> list[StreamEvent]:
        """A SED window's frames, as the file timeline takes them (sed.timeline: each frame from the
        window whose centre is nearest), handed to the tracker as soon as no later regular window
        (one hop on) could own them: with the default hop, every frame of the window at once."""
        from .sed import framewise

        spec = self.tagger.spec
        hop = spec.front_end.hop
        fw = framewise(segments, spec.frames_per_segment, spec.frames)
        first = int(round(start / hop))
        owned = int(np.floor(first + (spec.frames - 1) / 2 + self.tagger.hop / hop / 2))
        real = 1 + (start + n) // hop - 1  # the window's last frame of real audio
        self._last = (first, fw)
        return self._frame_events(self._commit(self._last, min(owned, real)))

    def clip_scores(self) -> np.ndarray | None:
        """Clip scores so far (max or mean over the windows so far, like a file's)."""
        if self._clip is None:
            return None
        return self._clip if self.tagger.scorer.aggregate == "max" else self._clip / self._windows

    def _tag(self, windows, arrived: float) -> list[StreamWindow | StreamEvent]:
        sr = self.tagger.spec.sample_rate
        scorer = self.tagger.scorer
        out: list = []
        for start, n, wave in windows:
            if self.cancel.is_set():
                raise CancelledError(f"cancelled after {self._windows} window(s)")
            lm = self.tagger.model.features(wave)
            if not np.isfinite(lm).all():
                raise AudioError(f"non-finite model input in the window at {start / sr:.2f} s")
            probs, second = self.tagger.model.run(lm)
            self._windows += 1
            if self._clip is None:
                self._clip = probs.copy()
            elif scorer.aggregate == "max":
                np.maximum(self._clip, probs, out=self._clip)
            else:
                self._clip += probs
            start_s, end_s = start / sr, (start + n) / sr
            out.append(StreamWindow(start_s, end_s, scorer.select(probs), probs, self._clock() - arrived))
            if self._tracker is not None:
                out += self._sed_window(start, n, second)
                continue
            above = (probs >= scorer.event_cutoffs) & scorer.mask
            for c in [c for c in self._open if not above[c]]:
                out.append(self._event("end", c))
                del self._open[c]
            for c in np.flatnonzero(above):
                c = int(c)
                if c in self._open:
                    ev = self._open[c]
                    ev[1], ev[2] = end_s, max(ev[2], float(probs[c]))
                else:
                    self._open[c] = [start_s, end_s, float(probs[c])]
                    out.append(self._event("start", c))
        return out

    def _event(self, kind: str, c: int) -> StreamEvent:
        lab = self.tagger.spec.labels[c]
        start_s, end_s, score = self._open[c]
        return StreamEvent(kind, Event(start_s, end_s, c, lab.mid, lab.name, score))
