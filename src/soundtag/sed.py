"""Sound event detection in numpy: framewise scores from a DecisionLevel model's segmentwise output,
one timeline over a file's windows, and events at frame resolution (issue #20).

    segmentwise [steps, classes] per window --framewise--> [frames, classes] per window
        --timeline--> [file frames, classes] --median filter, hysteresis, gaps, minimum length--> events

- ``framewise`` is upstream's ``interpolate`` + ``pad_framewise_output`` (pytorch_utils.py): each of
  the 31 steps repeated 32 times (992 frames), padded with the last to the window's 1001 frames.
- ``timeline``: a frame seen by several windows (a hop under the window) takes the score of the window
  whose centre is nearest, where the model saw the most context on both sides; with the default hop
  (one window) the windows abut and each frame has one window. A frame is ``j * frame_hop_s`` into
  the file; an end-aligned last window (windows.py) starts off the frame grid and is placed at the
  nearest frame (at most half a frame, 5 ms, off).
- ``detect``: per class, an optional median filter over time (scipy.ndimage), then hysteresis: an
  event opens where the score reaches its class's on-threshold and lasts while it stays at or above
  the off-threshold; events closer than ``max_gap_s`` merge, and events shorter than
  ``min_duration_s`` are dropped. Onset = first frame's time, offset = (last frame + 1) * frame hop,
  clipped to the file's duration.

Floor 1: numpy and scipy only.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from .errors import OptionsError

# Post-processing defaults for the CNN14 DecisionLevel models. Their scores are constant over each
# 320 ms step, so a median filter shorter than a step changes nothing (default off); an off-threshold
# of half the on-threshold keeps an event through a step that dips (hysteresis); a one-step gap merges.
DEFAULT_OFF_RATIO = 0.5  # off-threshold = this x the class's on-threshold (the event threshold)
DEFAULT_MEDIAN_S = 0.0  # s; median filter length over time, 0: none
DEFAULT_MIN_DURATION_S = 0.0  # s; shorter events are dropped
DEFAULT_MAX_GAP_S = 0.32  # s; events of a class at most this far apart merge (one 320 ms step)
MAX_POST_S = 3600.0  # s; longer filter / gap / minimum settings are refused as mistakes


def framewise(segmentwise: np.ndarray, frames_per_segment: int, frames: int) -> np.ndarray:
    """[steps, classes] -> [frames, classes]: each step repeated ``frames_per_segment`` times, then
    padded with the last row (or cut) to ``frames``."""
    seg = np.asarray(segmentwise)
    out = np.repeat(seg, frames_per_segment, axis=0)
    if out.shape[0] >= frames:
        return out[:frames]
    return np.concatenate([out, np.repeat(out[-1:], frames - out.shape[0], axis=0)])


def file_frames(samples: int, hop: int) -> int:
    """Frames of a file of ``samples`` samples at the model's rate (center=True framing, as one window's)."""
    return 1 + max(0, samples) // hop


def timeline(segmentwise: np.ndarray, starts: np.ndarray, frames_per_segment: int, frames: int, hop: int,
             total_frames: int, classes: np.ndarray | None = None) -> np.ndarray:
    """One [total_frames, classes] framewise timeline of a file from its windows' segmentwise scores
    [windows, steps, classes] (windows of ``frames`` frames starting at sample ``starts``, frame hop
    ``hop`` samples): each frame from the window whose centre is nearest (ties: the earlier), the
    value ``framewise`` gives that window's frame. ``classes``: indices of the columns wanted (None:
    all), so a 24 h file's events need only its active classes' columns, not a [8.6 M, 527] array."""
    seg = np.asarray(segmentwise)
    n_win, steps = seg.shape[:2]
    offsets = np.rint(np.asarray(starts, np.float64) / hop).astype(np.int64)
    t = np.arange(total_frames)
    if n_win > 1:
        centres = offsets + (frames - 1) / 2.0
        owner = np.searchsorted((centres[:-1] + centres[1:]) / 2.0, t, side="left")
    else:
        owner = np.zeros(total_frames, np.int64)
    step = np.minimum(np.clip(t - offsets[owner], 0, frames - 1) // frames_per_segment, steps - 1)
    return seg[owner, step] if classes is None else seg[owner[:, None], step[:, None], np.asarray(classes)[None, :]]


@dataclass(frozen=True)
class FrameTimeline:
    """A file's framewise scores, kept at the model's own resolution: each window's segmentwise scores
    and where the window starts. ``scores()`` gives the [frames, classes] timeline (``timeline``)."""

    segmentwise: np.ndarray  # [windows, steps, classes] float32
    starts: np.ndarray  # [windows] start samples at the model's rate
    frames_per_segment: int  # log-mel frames per step (32)
    window_frames: int  # log-mel frames per window (1001)
    hop: int  # samples per frame (320)
    sample_rate: int  # the model's (32000)
    total_frames: int  # frames of the whole file

    @property
    def frame_hop_s(self) -> float:
        return self.hop / self.sample_rate

    @property
    def segment_s(self) -> float:
        """Seconds per segmentwise step (0.32 for the CNN14 DecisionLevel models)."""
        return self.frames_per_segment * self.frame_hop_s

    def scores(self, classes: np.ndarray | None = None) -> np.ndarray:
        """[total_frames, classes] (or the columns ``classes``), frame j at j * frame_hop_s."""
        return timeline(self.segmentwise, self.starts, self.frames_per_segment, self.window_frames, self.hop,
                        self.total_frames, classes)


@dataclass(frozen=True)
class PostProcessing:
    """How framewise scores become events. Thresholds per class come from the Scorer (its event
    thresholds: --threshold / --thresholds, default 0.5); ``off_ratio`` sets each class's
    off-threshold as a fraction of it (1.0: no hysteresis)."""

    off_ratio: float = DEFAULT_OFF_RATIO
    median_s: float = DEFAULT_MEDIAN_S
    min_duration_s: float = DEFAULT_MIN_DURATION_S
    max_gap_s: float = DEFAULT_MAX_GAP_S

    def __post_init__(self) -> None:
        checks = (("off_ratio", self.off_ratio, 0.0, 1.0), ("median_s", self.median_s, 0.0, MAX_POST_S),
                  ("min_duration_s", self.min_duration_s, 0.0, MAX_POST_S), ("max_gap_s", self.max_gap_s, 0.0, MAX_POST_S))
        for name, value, lo, hi in checks:
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
                    or not lo <= value <= hi:
                raise OptionsError(f"{name} must be a number in [{lo:g}, {hi:g}], got {value!r}")

    def median_frames(self, frame_hop_s: float) -> int:
        """The median filter's length in frames (odd; 1: none)."""
        n = int(round(self.median_s / frame_hop_s))
        return n + 1 if n % 2 == 0 else n


def detect(scores: np.ndarray, frame_hop_s: float, on: np.ndarray, post: PostProcessing = PostProcessing(),
           classes: np.ndarray | None = None, duration_s: float | None = None
           ) -> list[tuple[int, float, float, float]]:
    """Events (class, onset_s, offset_s, peak score) of framewise ``scores`` [frames, classes] under
    per-class on-thresholds ``on`` [classes] (classes with ``on`` = -inf or above 1 never fire);
    ``classes``: a boolean mask of the classes to look at. Sorted by onset, then class."""
    scores = np.asarray(scores, np.float32)
    n_frames = scores.shape[0]
    if n_frames == 0:
        return []
    look = np.ones(scores.shape[1], bool) if classes is None else np.asarray(classes, bool)
    on = np.asarray(on, np.float64)
    look &= np.isfinite(on) & (on <= 1.0)
    if not look.any():
        return []
    m = post.median_frames(frame_hop_s)
    cols = np.flatnonzero(look & (scores.max(axis=0) >= np.where(np.isfinite(on), on, np.inf)))
    if m > 1 and cols.size:
        from scipy.ndimage import median_filter

        filtered = median_filter(scores[:, cols], size=(m, 1), mode="nearest")
    else:
        filtered = scores[:, cols]
    gap = int(round(post.max_gap_s / frame_hop_s))
    shortest = post.min_duration_s
    end_s = n_frames * frame_hop_s if duration_s is None else float(duration_s)
    out = []
    filtered = np.ascontiguousarray(filtered.T)  # [classes, frames]: each class's frames contiguous
    for k, c in enumerate(cols):
        x = filtered[k]
        hi, lo = float(on[c]), float(on[c]) * post.off_ratio
        for a, b in _merge(_hysteresis(x >= hi, x >= lo), gap):
            onset, offset = a * frame_hop_s, min(b * frame_hop_s, end_s)
            if offset - onset + 1e-9 < shortest or offset <= onset:
                continue
            out.append((int(c), round(onset, 6), round(offset, 6), float(x[a:b].max())))
    out.sort(key=lambda e: (e[1], e[0]))
    return out


def _runs(mask: np.ndarray) -> list[tuple[int, int]]:
    """[start, end) of each run of True."""
    d = np.diff(np.concatenate([[0], mask.astype(np.int8), [0]]))
    return list(zip(np.flatnonzero(d == 1).tolist(), np.flatnonzero(d == -1).tolist()))


def _hysteresis(high: np.ndarray, low: np.ndarray) -> list[tuple[int, int]]:
    """Runs of ``low`` that contain at least one ``high`` frame (vectorised: highs counted per run)."""
    d = np.diff(np.concatenate([[0], (low | high).astype(np.int8), [0]]))
    starts, ends = np.flatnonzero(d == 1), np.flatnonzero(d == -1)
    count = np.concatenate([[0], np.cumsum(high, dtype=np.int64)])
    keep = count[ends] > count[starts]
    return list(zip(starts[keep].tolist(), ends[keep].tolist()))


def _merge(runs: list[tuple[int, int]], gap: int) -> list[tuple[int, int]]:
    out: list[tuple[int, int]] = []
    for a, b in runs:
        if out and a - out[-1][1] <= gap:
            out[-1] = (out[-1][0], b)
        else:
            out.append((a, b))
    return out


FLAGS = {"off_ratio": "--off-ratio", "median_s": "--median", "min_duration_s": "--min-event", "max_gap_s": "--max-gap"}


def add_arguments(parser) -> None:
    """The post-processing flags (FLAGS) of `tag`, `corpus` and `eval`, as one argparse group."""
    g = parser.add_argument_group("sound event detection (Cnn14_DecisionLevelMax/Att models): events at frame resolution")
    g.add_argument("--off-ratio", type=float, default=DEFAULT_OFF_RATIO, metavar="R",
                   help=f"an event lasts while its score stays >= R x its threshold (hysteresis; 1: none; default {DEFAULT_OFF_RATIO:g})")
    g.add_argument("--median", type=float, default=DEFAULT_MEDIAN_S, metavar="SECONDS",
                   help=f"median filter over time before thresholding (default {DEFAULT_MEDIAN_S:g}: none)")
    g.add_argument("--min-event", type=float, default=DEFAULT_MIN_DURATION_S, metavar="SECONDS",
                   help=f"drop shorter events (default {DEFAULT_MIN_DURATION_S:g})")
    g.add_argument("--max-gap", type=float, default=DEFAULT_MAX_GAP_S, metavar="SECONDS",
                   help=f"merge events of a class at most this far apart (default {DEFAULT_MAX_GAP_S:g}: one 320 ms step)")


def from_arguments(args) -> PostProcessing:
    """PostProcessing from add_arguments' flags; OptionsError naming the flag."""
    try:
        return PostProcessing(off_ratio=args.off_ratio, median_s=args.median, min_duration_s=args.min_event,
                              max_gap_s=args.max_gap)
    except OptionsError as exc:
        field, _, rest = exc.reason.partition(" ")
        raise OptionsError(f"{FLAGS.get(field, field)} {rest}") from None


class EventTracker:
    """``detect`` over a timeline that arrives in chunks (a live stream): ``push(chunk)`` takes the next
    frames [n, classes] and returns what changed, ``close()`` ends every open event. The events it
    ends are ``detect``'s on the whole timeline (hysteresis, gap merging, minimum length; no median
    filter, which would need frames that have not arrived). An event is announced ("start") once it
    is confirmed (a frame reached the on-threshold) and at least the minimum length; it "ends" once
    the gap after it can no longer be bridged, or at close."""

    def __init__(self, on: np.ndarray, frame_hop_s: float, post: PostProcessing = PostProcessing(),
                 classes: np.ndarray | None = None) -> None:
        if post.median_s > 0:
            raise OptionsError("a median filter needs frames that have not arrived; live events take --median 0")
        self.on = np.asarray(on, np.float64)
        self.look = (np.ones(self.on.size, bool) if classes is None else np.asarray(classes, bool)) & \
            np.isfinite(self.on) & (self.on <= 1.0)
        self.off = self.on * post.off_ratio
        self.hop = frame_hop_s
        self.gap = int(round(post.max_gap_s / frame_hop_s))
        self.shortest = post.min_duration_s
        self.frames = 0  # frames pushed so far
        self._run: dict[int, list] = {}  # class -> [start, end, has_high, peak] of the low run in progress
        self._event: dict[int, list] = {}  # class -> [start, end, peak, announced] of the last confirmed event

    def push(self, chunk: np.ndarray) -> list[tuple[str, int, float, float, float]]:
        """(kind "start" or "end", class, onset_s, offset_s so far, peak) for each change, in time order."""
        x = np.asarray(chunk, np.float32)
        f0, n = self.frames, x.shape[0]
        self.frames += n
        out: list = []
        hit = self.look & ((x >= np.minimum(self.off, self.on)).any(axis=0) if n else np.zeros(self.on.size, bool))
        for c in sorted(set(np.flatnonzero(hit).tolist()) | set(self._run) | set(self._event)):
            col = x[:, c]
            high, low = col >= self.on[c], col >= self.off[c]
            runs = _runs(low | high)
            for a, b in runs:
                a_abs, b_abs = f0 + a, f0 + b
                has, peak = bool(high[a:b].any()), float(col[a:b].max())
                run = self._run.pop(c, None)
                if run is not None and run[1] == a_abs:  # continues across the chunk boundary
                    a_abs, has, peak = run[0], has or run[2], max(peak, run[3])
                elif run is not None:
                    self._finish(c, run, out)
                if b < n:  # the run ended inside this chunk
                    self._finish(c, [a_abs, b_abs, has, peak], out)
                else:
                    self._run[c] = [a_abs, b_abs, has, peak]
                    if has:
                        self._confirm(c, a_abs, b_abs, peak, out, final=False)
            if not runs and c in self._run:
                self._finish(c, self._run.pop(c), out)
            self._expire(c, out)
        return out

    def close(self) -> list[tuple[str, int, float, float, float]]:
        out: list = []
        for c in sorted(self._run):
            self._finish(c, self._run.pop(c), out)
        for c in sorted(self._event):
            self._end(c, out)
        return out

    def _finish(self, c: int, run: list, out: list) -> None:
        if run[2]:
            self._confirm(c, run[0], run[1], run[3], out, final=True)

    def _confirm(self, c: int, a: int, b: int, peak: float, out: list, final: bool) -> None:
        ev = self._event.get(c)
        if ev is not None and ev[1] < a and a - ev[1] > self.gap:
            self._end(c, out)
            ev = None
        if ev is None:
            ev = self._event[c] = [a, b, peak, False]
        else:
            ev[1], ev[2] = max(ev[1], b), max(ev[2], peak)
        if not ev[3] and (ev[1] - ev[0]) * self.hop + 1e-9 >= self.shortest:
            ev[3] = True
            out.append(("start", c, round(ev[0] * self.hop, 6), round(ev[1] * self.hop, 6), ev[2]))

    def _expire(self, c: int, out: list) -> None:
        """End the last event once nothing that may still arrive can merge with it."""
        ev = self._event.get(c)
        if ev is None:
            return
        run = self._run.get(c)
        nxt = run[0] if run is not None else self.frames
        if nxt - ev[1] > self.gap:
            self._end(c, out)

    def _end(self, c: int, out: list) -> None:
        ev = self._event.pop(c)
        if (ev[1] - ev[0]) * self.hop + 1e-9 >= self.shortest:
            out.append(("end", c, round(ev[0] * self.hop, 6), round(ev[1] * self.hop, 6), ev[2]))
