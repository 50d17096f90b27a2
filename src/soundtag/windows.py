"""A model's windows (CNN14: 10 s at 32 kHz) over a stream of blocks at its rate, and a prefetch thread that overlaps decoding with the model.

The window rule (the same for files, waveforms and, later, streams):
(in samples of the model's rate; ``window`` is the model's ``spec.window_samples``)
- audio of at most one window: one window at 0, zero-padded to the window;
- longer audio: a window every hop while it fits entirely in the audio, then, if the audio goes on past
  the last one, a final window aligned to the end of the audio. Every window of a long file therefore
  holds 10 s of real audio: a 20 s + 1 sample file gives windows at 0, 10 and 10 s + 1 sample, never a
  window of one real sample and 10 s of zeros counted in the clip score and the events.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterable, Iterator

import numpy as np

PREFETCH_DEPTH = 2  # windows decoded ahead of the model: bounded memory (2 x 1.3 MB)


def window_starts(num_samples: int, hop: int, window: int) -> list[int]:
    """Start samples of the windows of num_samples samples under the window rule above."""
    if hop < 1:
        raise ValueError(f"hop must be >= 1 sample, got {hop}")
    if num_samples <= window:
        return [0]
    starts = list(range(0, num_samples - window + 1, hop))
    if starts[-1] + window < num_samples:
        starts.append(num_samples - window)
    return starts


class WindowCutter:
    """The window rule, push-based: ``push(block)`` yields the windows it completes, ``finish()`` the
    last one (zero-padded for audio of at most 10 s, else aligned to the end if audio remains past the
    last hop-aligned window).

    Bounded whatever the block and the hop (issue #18: one 16 MiB WebSocket message at a tiny hop was
    thousands of window copies in one list): the samples live in one buffer of 1.5 windows, filled in
    place (a tiny block costs its own size, not a copy of the window buffer), and ``push`` is a
    generator that cuts each window when the caller takes it, so at most one window copy exists at a
    time. Take every window ``push`` yields before the next call."""

    def __init__(self, hop: int, window: int) -> None:
        if hop < 1:
            raise ValueError(f"hop must be >= 1 sample, got {hop}")
        self.hop, self.window = hop, window
        self._buf = np.zeros(window + window // 2, np.float32)  # samples [_buf_start, _buf_start + _len)
        self._len = 0
        self._buf_start = 0  # absolute sample index of _buf[0]
        self._next = 0  # absolute start of the next hop-aligned window
        self._last_end = 0  # absolute end of the last window given out (0: none yet)

    @property
    def samples(self) -> int:
        """Samples pushed so far."""
        return self._buf_start + self._len

    def push(self, block: np.ndarray) -> Iterator[tuple[int, int, np.ndarray]]:
        """(start, real_samples, window) for each window this block completes, cut one at a time."""
        block = np.asarray(block, np.float32).ravel()
        w = self.window
        step = max(1, w // 4)
        for at in range(0, block.size, step):  # a quarter window at a time: the buffer always has room
            piece = block[at : at + step]
            if self._len + piece.size > self._buf.size:
                self._compact()
            self._buf[self._len : self._len + piece.size] = piece
            self._len += piece.size
            while self.samples >= self._next + w:
                i = self._next - self._buf_start
                start = self._next
                self._last_end = start + w
                self._next += self.hop
                yield start, w, self._buf[i : i + w].copy()

    def _compact(self) -> None:
        """Drop what no window needs any more (all but what the next window needs, and the last
        ``window`` samples for an end-aligned final one), so that a window more fits behind it."""
        keep_from = max(self._buf_start, min(self._next, self.samples - self.window))
        drop = keep_from - self._buf_start
        if drop > 0:
            kept = self._len - drop
            # moved in steps of `drop`, so that no step's source and target overlap (numpy would copy
            # an overlapping source to a temporary first); called when over 1.25 windows are held, of
            # which at most one is kept: at most four steps
            for i in range(0, kept, drop):
                n = min(drop, kept - i)
                self._buf[i : i + n] = self._buf[drop + i : drop + i + n]
            self._buf_start, self._len = keep_from, kept

    def finish(self) -> list[tuple[int, int, np.ndarray]]:
        """The last window under the rule (none for no audio, none if the last window reached the end)."""
        total, w = self.samples, self.window
        if total == 0:
            return []
        if self._last_end == 0:  # at most 10 s in all: one zero-padded window
            out = np.zeros(w, np.float32)
            out[:total] = self._buf[:total]
            return [(0, total, out)]
        if self._last_end < total:  # the audio goes on past the last hop-aligned window
            return [(total - w, w, self._buf[self._len - w : self._len].copy())]
        return []


def iter_windows(blocks: Iterable[np.ndarray], hop: int, window: int) -> Iterator[tuple[int, int, np.ndarray]]:
    """(start, real_samples, window) over a stream of blocks: exactly the windows of
    window_starts(total, hop). Holds at most one window plus one block, whatever the hop."""
    cutter = WindowCutter(hop, window)
    for block in blocks:
        yield from cutter.push(block)
    yield from cutter.finish()


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
