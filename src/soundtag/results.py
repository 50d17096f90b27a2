"""Result types and THE record: the one JSON-able dict per input that every output format, the batch
runner and the coming HTTP API are built from.

A record is ``{"path", "duration_s", "tags", "windows", "events"}`` for a tagged input or
``{"path", "error"}`` for a failed one. Paths are kept as Python gives them: a file name that is not
valid UTF-8 holds surrogate escapes (``os.fsencode(record["path"])`` gives the original bytes back).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from .sed import FrameTimeline

SCORE_DIGITS = 6  # decimals of a score in a record


@dataclass(frozen=True)
class Category:
    """One class and its score.

    Attributes:
        index: The class's row in the model's labels (AudioSet: 0..526).
        mid: Its machine id, e.g. `/m/09x0r` (AudioSet's ontology).
        name: Its display name, e.g. `Speech`.
        score: The probability, in [0, 1].
    """

    index: int  # AudioSet class index, 0..526
    mid: str  # AudioSet machine id, e.g. /m/09x0r
    name: str  # display name, e.g. Speech
    score: float  # probability, 0..1


@dataclass(frozen=True)
class WindowResult:
    """The tags of one window of a file.

    Attributes:
        start_s: Where the window starts in the input, in seconds.
        end_s: Where its real audio ends (less than `start_s` + 10 only for a clip under 10 s).
        categories: Its top tags, best first (top-k, thresholds, allow and deny applied).
    """

    start_s: float
    end_s: float  # end of the real audio in the window (< start_s + 10 only for a clip under 10 s)
    categories: tuple[Category, ...]


@dataclass(frozen=True)
class Event:
    """A class above its threshold over consecutive windows or, for a sound event detection model,
    over consecutive frames (`soundtag.sed`: hysteresis, gaps, minimum length).

    Attributes:
        start_s: Where it starts, in seconds.
        end_s: Where it ends, in seconds.
        index: The class's row in the model's labels.
        mid: The class's machine id.
        name: The class's display name.
        score: The highest window (SED: frame) score within the event.
    """

    start_s: float
    end_s: float
    index: int
    mid: str
    name: str
    score: float  # the highest window (SED: frame) score within the event


@dataclass(frozen=True)
class TagResult:
    """Everything soundtag found in one input.

    Attributes:
        path: The input's name as given (None for a waveform tagged without one).
        duration_s: The decoded duration at the source rate, in seconds.
        clip: The clip's top tags (window scores aggregated by max or mean), best first.
        windows: Each window's tags, in time order.
        events: Classes above their event threshold over consecutive windows (SED: frames).
        clip_scores: Every class's clip score, float32 [classes].
        window_scores: Every class's score per window, float32 [windows, classes].
        window_starts_s: Each window's start in seconds, [windows].
        clip_embedding: The clip's embedding [size] (CNN14: 2048), when asked for; else None.
        window_embeddings: Each window's embedding [windows, size], when asked for; else None.
        timeline: A sound event detection model's framewise scores (`framewise`); else None.
    """

    path: str | None
    duration_s: float  # decoded duration at the source rate
    clip: tuple[Category, ...]
    windows: tuple[WindowResult, ...]
    events: tuple[Event, ...]
    clip_scores: np.ndarray = field(repr=False, compare=False)  # [classes] (527 for AudioSet)
    window_scores: np.ndarray = field(repr=False, compare=False)  # [windows, classes]
    window_starts_s: np.ndarray = field(repr=False, compare=False)  # [windows]
    clip_embedding: np.ndarray | None = field(default=None, repr=False, compare=False)  # [embedding size] (CNN14: 2048), when asked
    window_embeddings: np.ndarray | None = field(default=None, repr=False, compare=False)  # [windows, embedding size]
    timeline: FrameTimeline | None = field(default=None, repr=False, compare=False)  # SED models: framewise scores

    @property
    def framewise(self) -> np.ndarray | None:
        """Framewise scores float32 [frames, classes] over the whole input (SED models; None otherwise),
        frame j at j * frame_hop_s; built on each call from ``timeline`` (24 h is 8.6 M frames: ask
        ``timeline.scores(classes)`` for the columns you need)."""
        return None if self.timeline is None else self.timeline.scores()

    @property
    def frame_hop_s(self) -> float | None:
        """Seconds between framewise scores (10 ms for the CNN14 family); None for a clip model."""
        return None if self.timeline is None else self.timeline.frame_hop_s

    def to_record(self, scores: bool = False) -> dict:
        """The record of this input: the object of its JSONL line and of the HTTP API's answer.

        Args:
            scores: Also every class's clip score (`"clip_scores"`) and each window's (`"scores"`).

        Returns:
            `{"path", "duration_s", "tags", "windows", "events"}`, with `"embedding"` when embeddings
            were asked for; scores rounded to 6 decimals.
        """
        rec = {
            "path": self.path,
            "duration_s": round(self.duration_s, 6),
            "tags": tags_record(self.clip),
            "windows": [{"start_s": w.start_s, "end_s": w.end_s, "tags": tags_record(w.categories)} for w in self.windows],
            "events": [
                {"start_s": e.start_s, "end_s": e.end_s, "label": e.name, "mid": e.mid, "score": round(e.score, SCORE_DIGITS)}
                for e in self.events
            ],
        }
        if self.clip_embedding is not None:
            rec["embedding"] = [float(v) for v in self.clip_embedding]
        if self.timeline is not None:
            rec["frame_hop_s"] = self.timeline.frame_hop_s
        if scores:
            rec["clip_scores"] = [float(v) for v in self.clip_scores]
            for w, row in zip(rec["windows"], self.window_scores):
                w["scores"] = [float(v) for v in row]
            if self.timeline is not None:  # SED: each window's segmentwise scores, steps of segment_s from its start
                rec["segment_s"] = round(self.timeline.segment_s, 6)
                for w, seg in zip(rec["windows"], self.timeline.segmentwise):
                    w["segmentwise"] = [[float(v) for v in step] for step in seg]
        return rec


def error_record(path: str, error: BaseException | str) -> dict:
    """The JSON object of a failed input: its path and the cause in one line (without the path)."""
    return {"path": str(path), "error": error_reason(error)}


def error_reason(error: BaseException | str) -> str:
    """One line naming the cause: a SoundtagError's reason, else the exception type and message."""
    if isinstance(error, str):
        return error
    reason = getattr(error, "reason", None)
    if isinstance(reason, str):
        return reason
    if isinstance(error, MemoryError):
        return "out of memory"
    text = " ".join(str(error).split())
    return f"{type(error).__name__}: {text}" if text else type(error).__name__


def is_record(obj: object) -> bool:
    """A dict shaped like a record (a result or an error), e.g. a line read back for --resume."""
    return isinstance(obj, dict) and isinstance(obj.get("path"), str) and (
        isinstance(obj.get("tags"), list) or isinstance(obj.get("error"), str)
    )


def tags_record(categories) -> list[dict]:
    """Categories as the record's tag objects."""
    return [{"index": c.index, "mid": c.mid, "label": c.name, "score": round(c.score, SCORE_DIGITS)} for c in categories]
