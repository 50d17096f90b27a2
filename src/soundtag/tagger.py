"""The facade: TaggerOptions (validated when built) and Tagger(options, model=None).

    audio -> the model's windows (windows.py) -> its log-mel (features.py) -> the model (model.py) -> report (scoring.py)

Every number (sample rate, window, front end, labels) comes from the loaded model's spec (spec.py).
One loaded model can serve many option sets (a server, a corpus actor): ``Tagger(options, model)``.
"""

from __future__ import annotations

import logging
import math
import os
import threading
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO

import numpy as np

from .audio import DEFAULT_MAX_DURATION_S, AudioStream, downmix
from .errors import AudioError, CancelledError, ModelError, OptionsError
from .labels import Label
from .model import ACCELERATORS, GPU_PRECISIONS, Model
from .paths import resolve_model_path
from .results import TagResult, WindowResult
from .scoring import Scorer
from .sed import FrameTimeline, PostProcessing, file_frames
from .spec import DEFAULT_WINDOW_S
from .windows import iter_windows, prefetch

if TYPE_CHECKING:
    from .stream import TagStream

log = logging.getLogger(__name__)

MIN_HOP_S = 0.1  # s; a finer hop only repeats the model on near-identical windows
MAX_HOP_S = 7 * 24 * 3600.0  # s; a hop of a week: longer than any input soundtag accepts by default
MAX_THREADS = 64  # LiteRT threads per process, whatever is asked


@dataclass(frozen=True)
class TaggerOptions:
    """How to load the model and what to report. Validated on construction (no model needed).

    The fields mean what the `soundtag tag` flags of the same names mean; a server or a corpus actor
    builds one per request or job over one loaded model (`Tagger(options, model)`).

    Attributes:
        model_path: The .tflite to load; None: `$SOUNDTAG_MODEL`, then the cache `soundtag fetch` fills.
        top_k: Categories reported per clip and per window (1 to the model's classes).
        threshold: Report only scores >= this (every class), in [0, 1]; also the event threshold.
        thresholds: Per-class thresholds by name or MID, in [0, 1].
        hop_s: Seconds between window starts (less than the 10 s window overlaps windows; >= 0.1).
        aggregate: The clip score from the window scores: "max" or "mean".
        allow: Report only these classes (names or MIDs).
        deny: Never report these classes (names or MIDs).
        num_threads: LiteRT CPU threads; None: one per core, up to 4.
        prefetch: Decode and compute the next window's log-mel in a thread while the model runs.
        max_duration_s: Inputs that declare or decode to more seconds are refused (TooLongError).
        max_windows: Inputs of more windows at `hop_s` are refused (None: no limit; a server's cap).
        embeddings: Also the embedding (CNN14: 2048-d) per window and per clip (fp32 and int8 models).
        accelerator: "cpu", "gpu" (LiteRT's GPU accelerator, proven by a probe at load) or "auto".
        gpu_precision: The GPU's arithmetic, "fp16" or "fp32"; None: fp16 for the fp16 log-mel model.
        sed: How a sound event detection model's framewise scores become events (`soundtag.sed`).

    Raises:
        OptionsError: A value outside its domain (a ValueError), as soon as the options are built.
        UnknownClassError: A class name or MID in `allow`, `deny` or `thresholds` that the labels
            lack (a KeyError); the message names the closest label.
    """

    model_path: str | None = None  # .tflite; None: $SOUNDTAG_MODEL, then the user cache
    top_k: int = 5  # categories reported per clip and per window (up to the model's classes)
    threshold: float | None = None  # report only scores >= this (all classes), in [0, 1]
    thresholds: Mapping[str, float] | None = None  # per-class thresholds by name or MID, in [0, 1]
    hop_s: float = DEFAULT_WINDOW_S  # seconds between window starts (< the model's 10 s window overlaps windows)
    aggregate: str = "max"  # clip score from window scores: "max" or "mean"
    allow: Sequence[str] | None = None  # report only these classes (names or MIDs)
    deny: Sequence[str] | None = None  # never report these classes (names or MIDs)
    num_threads: int | None = None  # LiteRT CPU threads; None: one per core up to 4
    prefetch: bool = True  # decode + log-mel the next window in a thread while the model runs
    max_duration_s: float = DEFAULT_MAX_DURATION_S  # longer inputs are refused (s)
    max_windows: int | None = None  # inputs of more windows at hop_s are refused (None: no limit; a server's cap)
    embeddings: bool = False  # also the embedding (CNN14: 2048-d) per window and per clip (fp32/int8 models)
    accelerator: str = "cpu"  # "cpu", "gpu" (LiteRT's GPU accelerator, proven by a probe) or "auto"
    gpu_precision: str | None = None  # GPU arithmetic "fp16" or "fp32"; None: fp16 for the fp16 log-mel model, else fp32
    sed: PostProcessing = PostProcessing()  # SED models: how framewise scores become events (sed.py)

    def __post_init__(self) -> None:
        try:
            hop = float(self.hop_s)
        except (TypeError, ValueError):
            raise OptionsError(f"hop_s must be a number of seconds, got {self.hop_s!r}") from None
        if not (math.isfinite(hop) and hop >= MIN_HOP_S):
            raise OptionsError(f"hop_s must be a finite number of seconds >= {MIN_HOP_S}, got {self.hop_s!r}")
        if hop > MAX_HOP_S:  # beyond any input's length, and 1e308 s is no sample count
            raise OptionsError(f"hop_s must be at most {MAX_HOP_S:g} s, got {self.hop_s!r}")
        if self.max_windows is not None and (isinstance(self.max_windows, bool) or not isinstance(self.max_windows, int)
                                             or self.max_windows < 1):
            raise OptionsError(f"max_windows must be an integer >= 1, got {self.max_windows!r}")
        if self.num_threads is not None and (isinstance(self.num_threads, bool) or not isinstance(self.num_threads, int)
                                             or self.num_threads < 1):
            raise OptionsError(f"num_threads must be an integer >= 1, got {self.num_threads!r}")
        if not (isinstance(self.max_duration_s, (int, float)) and math.isfinite(self.max_duration_s)
                and self.max_duration_s > 0):
            raise OptionsError(f"max_duration_s must be a finite number of seconds > 0, got {self.max_duration_s!r}")
        if self.accelerator not in ACCELERATORS:
            raise OptionsError(f"accelerator must be one of {', '.join(ACCELERATORS)}, got {self.accelerator!r}")
        if self.gpu_precision not in (None, *GPU_PRECISIONS):
            raise OptionsError(f"gpu_precision must be one of {', '.join(GPU_PRECISIONS)}, got {self.gpu_precision!r}")
        if not isinstance(self.sed, PostProcessing):
            raise OptionsError(f"sed must be a soundtag.sed.PostProcessing, got {type(self.sed).__name__}")
        self.scorer()  # top_k, thresholds, aggregate, class names

    def scorer(self, labels: Sequence[Label] | None = None, class_defaults: Sequence[float | None] | None = None) -> Scorer:
        """The Scorer of these options over a model's labels (spec.labels; default AudioSet's) and its
        per-class default thresholds (spec.thresholds: a trained head's), which apply where neither
        threshold nor thresholds names the class."""
        return Scorer(self.top_k, self.threshold, self.thresholds, self.allow, self.deny, self.aggregate, labels,
                      class_defaults)

    def hop_samples(self, sample_rate: int) -> int:
        """hop_s in samples of a model's rate."""
        return round(float(self.hop_s) * sample_rate)

    def duration_limit(self, window_s: float = DEFAULT_WINDOW_S) -> tuple[float, str]:
        """(seconds, the flag that sets it): the longest input accepted, from max_duration_s and, with
        max_windows, the duration whose windows at hop_s stay within it (window rule: at most
        1 + (duration - window_s) / hop + 1 windows; window_s: the model's)."""
        limit = (float(self.max_duration_s), "--max-duration")
        if self.max_windows is not None:
            by_windows = float(window_s) + max(0, self.max_windows - 2) * float(self.hop_s)
            if by_windows < limit[0]:
                limit = (by_windows, f"--max-windows {self.max_windows} at a hop of {float(self.hop_s):g} s")
        return limit

    @property
    def threads(self) -> int | None:
        """LiteRT threads, capped to what the machine can use."""
        if self.num_threads is None:
            return None
        return min(self.num_threads, os.cpu_count() or 1, MAX_THREADS)


def load_model(options: TaggerOptions, weight_cache: bool = True) -> Model:
    """The model the options name; a cached model that fails to load says how to rebuild it.
    ``weight_cache``: see Model."""
    path, cached = resolve_model_path(options.model_path)
    try:
        return Model(path, num_threads=options.threads, accelerator=options.accelerator,
                          gpu_precision=options.gpu_precision, weight_cache=weight_cache)
    except ModelError as exc:
        if cached:
            raise ModelError(f"{exc.reason}; run 'soundtag fetch' again to rebuild the cached model", exc.path) from None
        raise


class Tagger:
    """Sound-event tagger over a PANNs model: files, waveforms or live audio in, tags and events out.

    `Tagger(options)` loads the model the options name; `Tagger(options, model)` shares an already
    loaded one (a `Model` holds one LiteRT interpreter: share it between taggers in one thread).

    Args:
        options: What to load and what to report; None: the defaults (`TaggerOptions()`).
        model: An already loaded model to use instead of loading `options.model_path`.

    Attributes:
        options: The options it was built with.
        model: The loaded model.
        spec: What the model is (`ModelSpec`: sample rate, window, labels, outputs).

    Raises:
        ModelNotFoundError: No model given, none in `$SOUNDTAG_MODEL` and none in the cache.
        ModelError: The file is not a model soundtag can run, fails to load or to pass its GPU probe,
            or `embeddings` was asked of a model without that output.
    """

    def __init__(self, options: TaggerOptions | None = None, model: Model | None = None) -> None:
        self.options = options or TaggerOptions()
        self.model = model if model is not None else load_model(self.options)
        self.spec = self.model.spec
        self.scorer = self.options.scorer(self.spec.labels, self.spec.thresholds)
        self.hop = self.options.hop_samples(self.spec.sample_rate)
        if self.options.embeddings and not self.model.has_embedding:
            why = ("a sound event detection model has no clip embedding (its fc1 runs per time step); use a "
                   "clip model (Cnn14) for embeddings") if self.spec.framewise else (
                   "the fp16 model keeps the model card's single-output signature; use the fp32 or int8 "
                   "model of 'soundtag convert' for embeddings")
            raise ModelError(f"has no embedding output ({why})", str(self.model.path))

    @classmethod
    def from_model_path(cls, path: str | Path, **options) -> Tagger:
        """A Tagger over the model at `path`; `options` are TaggerOptions fields."""
        return cls(TaggerOptions(model_path=str(path), **options))

    def stream(self, sample_rate: int, channels: int = 1, limited: bool = False) -> TagStream:
        """A stream that tags live audio as it arrives (the code path of `listen` and the WebSocket).

        Args:
            sample_rate: The rate of the PCM blocks that will be fed (resampled to the model's).
            channels: Channels of the blocks (averaged to mono).
            limited: Apply the options' duration limit to the stream's audio too (a server's
                streams; a microphone may listen for ever).

        Returns:
            TagStream: Its `feed(block)` returns the windows and event changes the block completes,
                its `close()` the last window and the closing events.
        """
        from .stream import TagStream

        return TagStream(self, sample_rate, channels,
                         limit=self.options.duration_limit(self.spec.window_s) if limited else None)

    # --- inference -------------------------------------------------------------------------
    def _inputs(self, windows: Iterable[tuple[int, int, np.ndarray]]) -> Iterator[tuple[int, int, np.ndarray]]:
        """(start, real_samples, waveform) -> (start, real_samples, model input): the host log-mel, or
        the samples for a waveform model (its log-mel is in the graph)."""
        for start, n, wave in windows:
            yield start, n, self.model.features(wave)

    def _run(self, feats: Iterable[tuple[int, int, np.ndarray]], cancel: threading.Event | None = None) -> _Windows:
        starts, valid, probs, embs = [], [], [], []
        for start, n, lm in feats:
            if cancel is not None and cancel.is_set():
                raise CancelledError(f"cancelled after {len(starts)} window(s)")
            if not np.isfinite(lm).all():
                raise AudioError(f"non-finite model input in the window at {start / self.spec.sample_rate:.2f} s")
            p, e = self.model.run(lm)
            starts.append(start)
            valid.append(n)
            probs.append(p)
            embs.append(e)
        spec = self.spec
        return _Windows(np.array(starts), np.array(valid), np.array(probs, dtype=np.float32).reshape(-1, spec.num_classes),
                        np.array(embs, dtype=np.float32) if self.options.embeddings else None,
                        np.array(embs, dtype=np.float32).reshape(-1, spec.segments, spec.num_classes) if spec.framewise else None)

    def tag_waveform(self, waveform: np.ndarray, sample_rate: int | None = None, path: str | None = None) -> TagResult:
        """Tag a waveform held in memory.

        Args:
            waveform: Float samples, mono [samples] or [samples, channels] (averaged).
            sample_rate: Its rate in Hz, resampled to the model's; None: already at `spec.sample_rate`.
            path: The name to put in the result.

        Returns:
            The TagResult (clip tags, windows, events; framewise scores for an SED model).

        Raises:
            AudioError: An empty or misshapen array, or NaN/Inf samples.
            TooLongError: Longer than the options allow.
            InferenceError: The model produced a non-finite or out-of-range score.
        """
        import soxr

        x = np.asarray(waveform, dtype=np.float32)
        if x.ndim == 2 and x.shape[1] > 0:
            x = downmix(x)
        if x.ndim != 1 or x.size == 0:
            raise AudioError("waveform must be a non-empty 1-D array (or [samples, channels])", path)
        if not np.isfinite(x).all():
            raise AudioError("waveform has non-finite samples (NaN or Inf)", path)
        rate = self.spec.sample_rate
        sample_rate = rate if sample_rate is None else sample_rate
        duration = x.size / sample_rate
        if sample_rate != rate:
            x = soxr.resample(x, sample_rate, rate, quality="HQ")
        feats = self._inputs(iter_windows([x], self.hop, self.spec.window_samples))
        return self._result(path, duration, self._run(prefetch(feats) if self.options.prefetch else feats))

    def tag_file(self, source: str | os.PathLike | BinaryIO, name: str | None = None,
                 cancel: threading.Event | None = None) -> TagResult:
        """Decode and tag one file, streaming (any format, rate, channels and length).

        Args:
            source: A path, or a seekable binary file object (an upload).
            name: The path to put in the result for a file object.
            cancel: Set it to stop between two windows (a server's client has gone).

        Returns:
            The TagResult: clip tags, windows, events (and framewise scores for an SED model).

        Raises:
            AudioError: Missing, empty, truncated, non-audio or hostile input, NaN samples; the
                message names the cause in one line (`.path` is the file).
            TooLongError: The input declares or decodes to more than the options allow.
            InferenceError: The model produced a non-finite or out-of-range score.
            CancelledError: `cancel` was set.
        """
        if hasattr(source, "read"):
            item = (name or str(getattr(source, "name", "<upload>")), source)
        else:
            item = (os.fspath(source), os.fspath(source))
        _, result, error = next(self._tag_sources([item], cancel))
        if error is not None:
            raise error
        return result

    def tag_files(self, paths: Iterable[str | Path]) -> Iterator[tuple[str, TagResult | None, Exception | None]]:
        """Tag many files in order; a file that fails is reported and the batch goes on.

        With `prefetch` the next window is decoded and its log-mel computed in a background thread
        while the model runs, across file boundaries too, so a batch of short clips overlaps decoding
        one file with the model on the previous one.

        Args:
            paths: Audio files (folders and @lists are expanded by the command line, not here).

        Returns:
            An iterator of `(path, result, None)` or `(path, None, error)`, one per path, in order;
            `error` is the SoundtagError that `tag_file` would have raised.
        """
        return self._tag_sources([(os.fspath(p), os.fspath(p)) for p in paths])

    def _tag_sources(self, sources: list[tuple[str, object]], cancel: threading.Event | None = None
                     ) -> Iterator[tuple[str, TagResult | None, Exception | None]]:
        """tag_files over (name, path or binary file object) pairs."""
        paths = [name for name, _ in sources]
        max_s, limit = self.options.duration_limit(self.spec.window_s)

        def produce() -> Iterator[tuple[str, object]]:
            for path, source in sources:
                try:
                    stream = AudioStream(source, max_duration_s=max_s, name=path, limit=limit,
                                         sample_rate=self.spec.sample_rate)
                    for item in self._inputs(iter_windows(stream, self.hop, self.spec.window_samples)):
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
                w = self._run(windows(), cancel)  # consumes the file's windows, then its end marker
                yield path, self._result(path, end[0].duration_s, w), None
            except Exception as exc:
                if getattr(exc, "path", "") is None:
                    exc.path = path  # a SoundtagError raised without knowing the file
                yield path, None, exc

    # --- reporting -------------------------------------------------------------------------
    def select(self, scores: np.ndarray):
        """Top-k allowed categories whose score clears their threshold, best first."""
        return self.scorer.select(scores)

    def events(self, starts_s: np.ndarray, ends_s: np.ndarray, probs: np.ndarray):
        """Merge consecutive windows where an allowed class stays above its event threshold."""
        return self.scorer.events(starts_s, ends_s, probs)

    def _result(self, path, duration_s, w: _Windows) -> TagResult:
        sr = self.spec.sample_rate
        starts_s = w.starts / sr
        ends_s = (w.starts + w.valid) / sr
        probs = w.probs
        clip = self.scorer.aggregate_windows(probs)
        windows = tuple(WindowResult(float(s), float(e), self.select(p)) for s, e, p in zip(starts_s, ends_s, probs))
        timeline = None
        if w.segmentwise is not None:
            fe = self.spec.front_end
            timeline = FrameTimeline(w.segmentwise, w.starts, self.spec.frames_per_segment, self.spec.frames, fe.hop,
                                     sr, file_frames(int((w.starts + w.valid).max()), fe.hop))
            events = self.scorer.frame_events(timeline, self.options.sed, float(duration_s))
        else:
            events = self.events(starts_s, ends_s, probs)
        return TagResult(
            path=path,
            duration_s=float(duration_s),
            clip=self.select(clip),
            windows=windows,
            events=events,
            clip_scores=clip,
            window_scores=probs,
            window_starts_s=starts_s,
            clip_embedding=None if w.embeddings is None else self.scorer.aggregate_windows(w.embeddings),
            window_embeddings=w.embeddings,
            timeline=timeline,
        )


@dataclass(frozen=True)
class _FileEnd:
    duration_s: float


@dataclass(frozen=True)
class _Windows:
    starts: np.ndarray  # [windows] start samples
    valid: np.ndarray  # [windows] real samples in each
    probs: np.ndarray  # [windows, classes]
    embeddings: np.ndarray | None  # [windows, embedding size] when asked
    segmentwise: np.ndarray | None = None  # [windows, steps, classes] of a SED model
