"""From probabilities to what is reported: class mask, thresholds, top-k, clip aggregation, events."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np

from .errors import OptionsError
from .labels import Label, labels as audioset_labels, lookup
from .results import Category, Event
from .sed import FrameTimeline, PostProcessing, detect

DEFAULT_EVENT_THRESHOLD = 0.5  # probability above which a class counts as present in a window
AGGREGATES = ("max", "mean")


def check_threshold(value: float, what: str) -> float:
    """A probability threshold: a finite number in [0, 1]."""
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise OptionsError(f"{what} must be a number in [0, 1], got {value!r}") from None
    if not (math.isfinite(v) and 0.0 <= v <= 1.0):
        raise OptionsError(f"{what} must be a number in [0, 1], got {value!r}")
    return v


class Scorer:
    """What to report from window probabilities [windows, classes]; validates its inputs when built.
    ``labels``: the model's (spec.labels; default AudioSet's 527), by which names and MIDs are found.
    ``class_defaults``: a threshold per class or None (spec.thresholds, a trained head's), used for the
    classes that neither ``threshold`` (every class) nor ``thresholds`` (by name) sets."""

    def __init__(
        self,
        top_k: int = 5,
        threshold: float | None = None,
        thresholds: Mapping[str, float] | None = None,
        allow: Sequence[str] | None = None,
        deny: Sequence[str] | None = None,
        aggregate: str = "max",
        labels: Sequence[Label] | None = None,
        class_defaults: Sequence[float | None] | None = None,
    ) -> None:
        self.labels = tuple(labels) if labels is not None else audioset_labels()
        n = len(self.labels)
        if isinstance(top_k, bool) or not isinstance(top_k, (int, np.integer)) or top_k < 1:
            raise OptionsError(f"top_k must be an integer >= 1, got {top_k!r}")
        if aggregate not in AGGREGATES:
            raise OptionsError(f"aggregate must be one of {', '.join(AGGREGATES)}, got {aggregate!r}")
        if isinstance(allow, str) or isinstance(deny, str):
            raise OptionsError("allow and deny are lists of class names or MIDs, not a single string")
        self.top_k = min(int(top_k), n)  # more than the model has: all of them (5 of a trained head's 3)
        self.aggregate = aggregate
        self.mask = class_mask(allow, deny, self.labels)
        default = None if threshold is None else check_threshold(threshold, "threshold")
        if class_defaults is not None and len(class_defaults) != n:
            raise OptionsError(f"class_defaults must have one threshold (or None) per class ({n})")
        defaults = None if default is not None else class_defaults  # --threshold sets every class
        self.cutoffs = cutoffs(default, thresholds, self.labels, defaults)
        self.event_cutoffs = cutoffs(DEFAULT_EVENT_THRESHOLD if default is None else default, thresholds, self.labels,
                                     defaults)

    def aggregate_windows(self, per_window: np.ndarray) -> np.ndarray:
        """Clip value from per-window values [windows, n] (scores or embeddings): max or mean."""
        return per_window.max(axis=0) if self.aggregate == "max" else per_window.mean(axis=0)

    def select(self, scores: np.ndarray) -> tuple[Category, ...]:
        """Top-k allowed categories whose score clears their threshold, best first."""
        ok = self.mask & (scores >= self.cutoffs)
        idx = np.flatnonzero(ok)
        idx = idx[np.argsort(-scores[idx], kind="stable")][: self.top_k]
        labs = self.labels
        return tuple(Category(int(i), labs[i].mid, labs[i].name, float(scores[i])) for i in idx)

    def events(self, starts_s: np.ndarray, ends_s: np.ndarray, probs: np.ndarray) -> tuple[Event, ...]:
        """Merge consecutive windows where an allowed class stays above its event threshold."""
        labs = self.labels
        above = (probs >= self.event_cutoffs) & self.mask
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

    def frame_events(self, timeline: FrameTimeline, post: PostProcessing, duration_s: float) -> tuple[Event, ...]:
        """Events at frame resolution from a SED model's framewise scores (sed.detect), for the allowed
        classes whose peak reaches their event threshold; only those classes' columns are built."""
        peak = timeline.segmentwise.max(axis=(0, 1))
        active = np.flatnonzero(self.mask & (peak >= self.event_cutoffs))
        if active.size == 0:
            return ()
        labs = self.labels
        found = detect(timeline.scores(active), timeline.frame_hop_s, self.event_cutoffs[active], post,
                       duration_s=duration_s)
        out = [Event(on, off, int(active[k]), labs[active[k]].mid, labs[active[k]].name, peak_score)
               for k, on, off, peak_score in found]
        return tuple(sorted(out, key=lambda e: (e.start_s, -e.score)))


def class_mask(allow: Sequence[str] | None, deny: Sequence[str] | None, table: Sequence[Label] | None = None) -> np.ndarray:
    """Classes that may be reported: all, or only `allow`, minus `deny` (names or MIDs of ``table``,
    default AudioSet's)."""
    table = tuple(table) if table is not None else audioset_labels()
    mask = np.zeros(len(table), bool) if allow else np.ones(len(table), bool)
    for key in allow or ():
        mask[lookup(key, table)] = True
    for key in deny or ():
        mask[lookup(key, table)] = False
    return mask


def cutoffs(default: float | None, per_class: Mapping[str, float] | None, table: Sequence[Label] | None = None,
            class_defaults: Sequence[float | None] | None = None) -> np.ndarray:
    """Per-class score cutoffs: the default (none: -inf), then the classes' own defaults (a trained
    head's, where not None), overridden by per-class thresholds."""
    table = tuple(table) if table is not None else audioset_labels()
    cut = np.full(len(table), -np.inf if default is None else float(default), np.float32)
    for i, value in enumerate(class_defaults or ()):
        if value is not None:
            cut[i] = check_threshold(value, f"default threshold of {table[i].name!r}")
    for key, value in (per_class or {}).items():
        cut[lookup(key, table)] = check_threshold(value, f"threshold for {key!r}")
    return cut
