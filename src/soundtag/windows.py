"""10 s windows over a stream of 32 kHz blocks, and a prefetch thread that overlaps decoding with the model.

The window rule (the same for files, waveforms and, later, streams):
- audio of at most 10 s: one window at 0, zero-padded to 10 s;
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

from . import features

WINDOW_SAMPLES = features.CLIP_SAMPLES  # 320 000 samples: the model's fixed input
WINDOW_S = WINDOW_SAMPLES / features.SAMPLE_RATE  # 10 s
PREFETCH_DEPTH = 2  # windows decoded ahead of the model: bounded memory (2 x 1.3 MB)


def window_starts(num_samples: int, hop: int, window: int = WINDOW_SAMPLES) -> list[int]:
    """Start samples of the windows of num_samples samples under the window rule above."""
    if hop < 1:
        raise ValueError(f"hop must be >= 1 sample, got {hop}")
    if num_samples <= window:
        return [0]
    starts = list(range(0, num_samples - window + 1, hop))
    if starts[-1] + window < num_samples:
        starts.append(num_samples - window)
    return starts


def iter_windows(blocks: Iterable[np.ndarray], hop: int, window: int = WINDOW_SAMPLES) -> Iterator[tuple[int, int, np.ndarray]]:
    """(start, real_samples, window) over a stream of blocks: exactly the windows of
    window_starts(total, hop). Holds at most one window plus one block, whatever the hop."""
    if hop < 1:
        raise ValueError(f"hop must be >= 1 sample, got {hop}")
    buf = np.zeros(0, np.float32)
    buf_start = 0  # absolute sample index of buf[0]
    next_start = 0  # absolute start of the next hop-aligned window
    last_end = 0  # absolute end of the last window yielded (0: none yet)
    for block in blocks:
        buf = np.concatenate([buf, np.asarray(block, np.float32)])
        while buf_start + buf.size >= next_start + window:
            i = next_start - buf_start
            yield next_start, window, buf[i : i + window].copy()
            last_end = next_start + window
            next_start += hop
        # keep what the next window needs, and the last `window` samples for an end-aligned final one
        keep_from = max(buf_start, min(next_start, buf_start + buf.size - window))
        buf, buf_start = buf[keep_from - buf_start :], keep_from
    total = buf_start + buf.size
    if total == 0:
        return
    if last_end == 0:  # at most 10 s in all: one zero-padded window
        out = np.zeros(window, np.float32)
        out[:total] = buf
        yield 0, total, out
    elif last_end < total:  # the audio goes on past the last hop-aligned window
        yield total - window, window, buf[buf.size - window :].copy()


def logmel_windows(windows: Iterable[tuple[int, int, np.ndarray]]) -> Iterator[tuple[int, int, np.ndarray]]:
    """(start, real_samples, waveform) windows -> (start, real_samples, log-mel [1001, 64])."""
    for start, n, wave in windows:
        yield start, n, features.logmel(wave)


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
