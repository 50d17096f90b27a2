"""`soundtag eval`: mAP, mean AUC and d-prime of the tagger on a user's labels, as the PANNs paper
reports them, with per-class AP/AUC and coverage (what was labeled, evaluated, missing and why).

    LABELS (AudioSet segment CSV or path,labels CSV) + clip scores (--predictions P and/or tagging
    the clips in --audio-dir) --> per-class AP and ROC AUC (numpy, tie-aware as scikit-learn)
    --> report: JSON (--output, --format json) or a table

Floor 6: imports the public API below it; only cli.py imports this module.
"""

from __future__ import annotations

import csv
import itertools
import json
import logging
import math
import os
import re
import sys
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .audio import AUDIO_EXTENSIONS, DEFAULT_MAX_DURATION_S
from .batch import APPLEDOUBLE_PREFIX
from .errors import EXIT_FAILED, EXIT_INTERRUPTED, EXIT_OK, EXIT_USAGE, OptionsError, SoundtagError, UnknownClassError
from .files import atomic_write_bytes
from .labels import NUM_CLASSES, Label, labels, lookup
from .results import error_reason
from .scoring import AGGREGATES
from .spec import DEFAULT_WINDOW_S as WINDOW_S

log = logging.getLogger(__name__)

REPORT_FORMATS = ("table", "json")
TABLE_CLASSES = 10  # worst and best classes listed in the table
TABLE_MISSING = 10  # missing clips listed in the table (the JSON report lists all)
LABEL_SEPARATOR = ";"  # between classes in the labels cell of a path,labels CSV
AUDIOSET_SEPARATOR = ","  # between MIDs in AudioSet's quoted positive_labels cell
COMMENT = "#"  # a labels line starting so is a comment
SEGMENT_TIMES = re.compile(r"(?:_[0-9]+(?:\.[0-9]+)?){1,2}$")  # "_30.000", "_30000_40000" after a YTID
PARQUET_SUFFIXES = (".parquet", ".pq")
PARQUET_MAGIC = b"PAR1"  # first bytes of a Parquet file
PARQUET_COLUMNS = ("path", "clip_scores", "error")  # what eval reads of the predictions table
OPTION_FLAGS = {"hop_s": "--hop", "num_threads": "--threads", "max_duration_s": "--max-duration"}  # in messages
FULL_TOP_K = "soundtag tag --top-k 527 --format jsonl"  # how to make predictions that eval can use


# --- data ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Clip:
    """One labeled clip: its name in LABELS, its positive classes, and (path,labels CSV) its file."""

    name: str  # YTID (AudioSet CSV) or the path as written (path,labels CSV)
    positives: frozenset[int]  # class indices
    path: str | None = None  # path,labels CSV: resolved against --audio-dir, else the CSV's folder


@dataclass(frozen=True)
class LabelSet:
    path: str
    kind: str  # "audioset" (YTIDs), "paths" (path,labels) or "folders" (class folders, dataset.py)
    clips: tuple[Clip, ...]
    classes: tuple[Label, ...] = field(default_factory=labels)  # the model's labels (AudioSet's, or a trained head's)


@dataclass(frozen=True)
class Prediction:
    """One input of a predictions file: its 527 clip scores, or why it has none."""

    path: str
    scores: np.ndarray | None  # [527]; None for a failed input
    error: str | None = None


@dataclass
class Coverage:
    """Per labeled clip (by position): its scores or why it has none; where it came from."""

    scores: dict[int, np.ndarray]
    missing: dict[int, str]
    audio: dict[int, str]  # audio file found or tried, by clip
    predicted: int = 0
    tagged: int = 0
    unmatched_predictions: int = 0
    model: str | None = None


# --- metrics ------------------------------------------------------------------------------------
def average_precision(y_true, y_score) -> float:
    """AP of one class exactly as scikit-learn: sum over distinct score thresholds of
    (R_n - R_{n-1}) * P_n. NaN when the class has no positive."""
    y = np.asarray(y_true).astype(bool).ravel()
    s = np.asarray(y_score, dtype=np.float64).ravel()
    positives = int(y.sum())
    if positives == 0:
        return math.nan
    order = np.argsort(s, kind="mergesort")[::-1]
    s, y = s[order], y[order]
    last = np.r_[np.flatnonzero(np.diff(s)), s.size - 1]  # last sample of each distinct score
    tp = np.cumsum(y, dtype=np.float64)[last]
    precision = tp / (last + 1)
    recall = tp / positives
    return float(np.sum(np.diff(recall, prepend=0.0) * precision))


def roc_auc(y_true, y_score) -> float:
    """ROC AUC of one class from the Mann-Whitney rank sum (average ranks for ties), as scikit-learn.
    NaN without both a positive and a negative."""
    from scipy.stats import rankdata

    y = np.asarray(y_true).astype(bool).ravel()
    s = np.asarray(y_score, dtype=np.float64).ravel()
    positives = int(y.sum())
    negatives = y.size - positives
    if positives == 0 or negatives == 0:
        return math.nan
    rank_sum = float(rankdata(s)[y].sum())
    return (rank_sum - positives * (positives + 1) / 2) / (positives * negatives)


def class_metrics(y_true: np.ndarray, y_score: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-class AP and AUC of [clips, classes] labels and scores (NaN where undefined)."""
    y_true = np.asarray(y_true, dtype=bool)
    y_score = np.asarray(y_score, dtype=np.float64)
    if y_true.shape != y_score.shape or y_true.ndim != 2:
        raise ValueError(f"labels {y_true.shape} and scores {y_score.shape} must be the same [clips, classes]")
    ap = np.array([average_precision(y_true[:, c], y_score[:, c]) for c in range(y_true.shape[1])])
    auc = np.array([roc_auc(y_true[:, c], y_score[:, c]) for c in range(y_true.shape[1])])
    return ap, auc


def d_prime(auc: float) -> float:
    """sqrt(2) * Phi^-1(AUC): the d-prime of the PANNs paper (inf at AUC 1, NaN when undefined)."""
    from scipy.stats import norm

    return float(math.sqrt(2.0) * norm.ppf(auc)) if math.isfinite(auc) else math.nan


def summarize(ap: np.ndarray, auc: np.ndarray) -> tuple[float, float, float]:
    """(mAP over classes with a positive, mean AUC over classes with a positive and a negative, d-prime)."""
    m_ap = float(np.mean(ap[np.isfinite(ap)])) if np.isfinite(ap).any() else math.nan
    m_auc = float(np.mean(auc[np.isfinite(auc)])) if np.isfinite(auc).any() else math.nan
    return m_ap, m_auc, d_prime(m_auc)


# --- labels -------------------------------------------------------------------------------------
def read_labels(path: str, audio_dir: str | None = None, table: tuple[Label, ...] | None = None) -> LabelSet:
    """LABELS: AudioSet's segment CSV (YTID, start, end, "MID,MID"), a CSV with header path,labels, or
    a folder of class folders (dataset.py); class names or MIDs of ``table`` (a model's labels,
    default AudioSet's)."""
    table = labels() if table is None else tuple(table)
    if os.path.isdir(path):
        from .dataset import read_dataset

        data = read_dataset(path)
        clips = tuple(Clip(os.path.relpath(e.path, path), frozenset(_classes(e.labels, path, 0, table)), e.path)
                      for e in data.examples)
        return LabelSet(path, "folders", clips, table)
    rows = _csv_rows(_read_text(path, "labels file"))
    first = next(rows, None)
    if first is None:
        raise OptionsError("no labeled clips in the labels file", path)
    header = [cell.strip().lower() for cell in first[1]]
    if "path" in header and "labels" in header:
        base = audio_dir if audio_dir is not None else os.path.dirname(path)
        clips = _path_clips(path, rows, header.index("path"), header.index("labels"), base, table)
        kind = "paths"
    elif header[0] == "ytid" or (len(header) >= 4 and _is_number(header[1]) and _is_number(header[2])):
        clips = _audioset_clips(path, rows if header[0] == "ytid" else itertools.chain([first], rows), table)
        kind = "audioset"
    else:
        raise OptionsError(f"line {first[0]}: not a labels file: expected AudioSet's segment CSV "
                           '(YTID, start_seconds, end_seconds, "MID,...") or a CSV with header path,labels', path)
    if not clips:
        raise OptionsError("no labeled clips in the labels file", path)
    return LabelSet(path, kind, clips, table)


def _read_text(path: str, what: str) -> str:
    try:
        return Path(path).read_bytes().decode("utf-8-sig")
    except FileNotFoundError:
        raise OptionsError(f"no such {what}", path) from None
    except OSError as exc:
        raise OptionsError(f"cannot read the {what} ({exc.strerror or exc})", path) from None
    except UnicodeDecodeError as exc:
        raise OptionsError(f"{what} is not UTF-8 text (byte {exc.start}: {exc.reason})", path) from None


def _csv_rows(text: str) -> Iterator[tuple[int, list[str]]]:
    """(line number, cells) of the non-empty rows; comment lines are blanked, so numbers stay true."""
    lines = ["\n" if line.lstrip().startswith(COMMENT) else line for line in text.splitlines(keepends=True)]
    reader = csv.reader(lines, skipinitialspace=True)
    for row in reader:
        if any(cell.strip() for cell in row):
            yield reader.line_num, row


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def _classes(keys: Iterable[str], path: str, line: int, table: tuple[Label, ...]) -> set[int]:
    try:
        return {lookup(key, table) for key in (k.strip() for k in keys) if key}
    except UnknownClassError as exc:
        raise OptionsError(f"line {line}: {exc.reason}" if line else exc.reason, path) from None


def _audioset_clips(path: str, rows: Iterable[tuple[int, list[str]]], table: tuple[Label, ...]) -> tuple[Clip, ...]:
    merged: dict[str, set[int]] = {}
    for line, row in rows:
        if len(row) < 4 or not row[0].strip():
            raise OptionsError(f'line {line}: expected YTID, start_seconds, end_seconds, "MID,..."', path)
        mids = AUDIOSET_SEPARATOR.join(row[3:]).split(AUDIOSET_SEPARATOR)  # unquoted MIDs spill into more cells
        merged.setdefault(row[0].strip(), set()).update(_classes(mids, path, line, table))
    return tuple(Clip(name, frozenset(pos)) for name, pos in merged.items())


def _path_clips(path: str, rows: Iterable[tuple[int, list[str]]], path_col: int, labels_col: int,
                base: str, table: tuple[Label, ...]) -> tuple[Clip, ...]:
    merged: dict[str, set[int]] = {}
    for line, row in rows:
        name = row[path_col].strip() if len(row) > path_col else ""
        if not name:
            raise OptionsError(f"line {line}: no path", path)
        cell = row[labels_col] if len(row) > labels_col else ""
        merged.setdefault(name, set()).update(_classes(cell.split(LABEL_SEPARATOR), path, line, table))
    return tuple(Clip(name, frozenset(pos), os.path.normpath(os.path.join(base, name))) for name, pos in merged.items())


# --- predictions --------------------------------------------------------------------------------
def read_predictions(path: str) -> list[Prediction]:
    """A Parquet file or dataset folder (every score per row), or JSONL/JSON records of all 527 classes."""
    p = Path(path)
    if not p.exists():
        raise OptionsError("no such predictions file or folder", path)
    if p.is_dir() or p.suffix.lower() in PARQUET_SUFFIXES or _starts_with(p, PARQUET_MAGIC):
        return _read_parquet(path)
    return _read_records(path)


def _starts_with(path: Path, magic: bytes) -> bool:
    try:
        with open(path, "rb") as f:
            return f.read(len(magic)) == magic
    except OSError:
        return False


def _read_parquet(path: str) -> list[Prediction]:
    try:
        import pyarrow as pa
        import pyarrow.compute as pc
        import pyarrow.dataset as ds
    except ImportError:
        raise OptionsError("reading Parquet predictions needs pyarrow: pip install pyarrow", path) from None
    try:
        dataset = ds.dataset(path, format="parquet")
        names = set(dataset.schema.names)
        if not {"path", "clip_scores"} <= names:
            raise OptionsError("not soundtag predictions: no path and clip_scores columns", path)
        table = dataset.to_table(columns=[c for c in PARQUET_COLUMNS if c in names])
        paths = table["path"].to_pylist()
        errors = table["error"].to_pylist() if "error" in names else [None] * table.num_rows
        usable = pc.is_valid(table["clip_scores"])
        if "error" in names:
            usable = pc.and_(usable, pc.is_null(table["error"]))
        kept = table["clip_scores"].filter(usable)
        lengths = pc.list_value_length(kept).to_numpy(zero_copy_only=False)
        flat = pc.list_flatten(kept).to_numpy(zero_copy_only=False)
        usable = usable.to_numpy(zero_copy_only=False)
    except pa.ArrowException as exc:
        raise OptionsError(f"cannot read the Parquet predictions ({' '.join(str(exc).split())})", path) from None
    if np.any(lengths != NUM_CLASSES):
        bad = [p for p, ok in zip(paths, usable) if ok][int(np.argmax(lengths != NUM_CLASSES))]
        raise OptionsError(f"{bad!r} has {lengths[lengths != NUM_CLASSES][0]} clip scores, not {NUM_CLASSES}", path)
    scores = iter(_check_scores(flat.reshape(-1, NUM_CLASSES), path))
    return [Prediction(_need_path(p, path, i + 1), next(scores) if ok else None,
                       None if ok else (err or "no clip scores"))
            for i, (p, err, ok) in enumerate(zip(paths, errors, usable))]


def _need_path(value, path: str, where: int) -> str:
    if not isinstance(value, str) or not value:
        raise OptionsError(f"row {where}: no path", path)
    return value


def _check_scores(scores: np.ndarray, path: str) -> np.ndarray:
    if not np.isfinite(scores).all():
        raise OptionsError("clip scores hold NaN, Inf or nulls", path)
    return scores.astype(np.float32)


def _read_records(path: str) -> list[Prediction]:
    text = _read_text(path, "predictions file")
    stripped = text.lstrip()
    if stripped.startswith("["):  # soundtag tag --format json: one array of records
        try:
            records = json.loads(stripped)
        except json.JSONDecodeError as exc:
            raise OptionsError(f"not JSON ({exc.msg} at line {exc.lineno})", path) from None
        return [_prediction(rec, path, f"record {n}") for n, rec in enumerate(records, 1)]
    out = []
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as exc:
            raise OptionsError(f"line {n}: not a JSON record ({exc.msg}); predictions are the JSONL of "
                               f"'{FULL_TOP_K}' or a Parquet file", path) from None
        out.append(_prediction(rec, path, f"line {n}"))
    return out


def _prediction(rec, path: str, where: str) -> Prediction:
    """A record of `soundtag tag` (jsonl/json): every class's score from clip_scores or its tags."""
    if not isinstance(rec, dict) or not isinstance(rec.get("path"), str):
        raise OptionsError(f"{where}: not a soundtag record (no path)", path)
    if rec.get("error") is not None:
        return Prediction(rec["path"], None, str(rec["error"]))
    try:
        if isinstance(rec.get("clip_scores"), list) and len(rec["clip_scores"]) == NUM_CLASSES:
            scores = np.array(rec["clip_scores"], dtype=np.float64)
        else:
            scores = np.full(NUM_CLASSES, np.nan)
            for tag in rec["tags"]:
                index = tag["index"]
                if not (isinstance(index, int) and 0 <= index < NUM_CLASSES):
                    raise ValueError(index)
                scores[index] = float(tag["score"])
    except (KeyError, TypeError, ValueError, IndexError):
        raise OptionsError(f"{where}: not a soundtag record (tags need index and score)", path) from None
    have = int(np.isfinite(scores).sum())
    if have < NUM_CLASSES:
        raise OptionsError(f"{where}: {rec['path']!r} has scores of {have} of {NUM_CLASSES} classes; eval needs "
                           f"every class: make the predictions with '{FULL_TOP_K}' (no --threshold, --allow or --deny)",
                           path)
    return Prediction(rec["path"], scores.astype(np.float32))


# --- matching clips to scores -------------------------------------------------------------------
def match_predictions(label_set: LabelSet, predictions: list[Prediction], source: str) -> Coverage:
    """Scores of the labeled clips from predictions; the rest missing with the reason."""
    cov = Coverage({}, {}, {})
    find = _ytid_finder(label_set, predictions) if label_set.kind == "audioset" else _path_finder(predictions)
    used: set[int] = set()
    for i, clip in enumerate(label_set.clips):
        hit, reason = find(clip)
        if hit is None:
            cov.missing[i] = reason or f"no prediction in {source}"
            continue
        used.add(id(hit))
        if hit.scores is None:
            cov.missing[i] = f"prediction failed: {hit.error}"
        else:
            cov.scores[i] = hit.scores
            cov.predicted += 1
    cov.unmatched_predictions = sum(1 for p in predictions if id(p) not in used)
    return cov


def _first_usable(table: dict, key, pred: Prediction) -> None:
    """Keep one prediction per key: the first with scores, else the first failed one."""
    old = table.get(key)
    if old is None or (old.scores is None and pred.scores is not None):
        table[key] = pred


def ytid_matches(name: str, ytids: set[str]) -> list[tuple[int, str]]:
    """(rank, YTID) for each labeled YTID that a file name stands for, best rank first: 0 the whole name,
    1 ``YTID.ext``, 2 ``YTID_<start>[_<end>][.ext]`` (segment times). Whole ids only: ``a1`` is not
    ``a10.wav``; a name that is one labeled YTID (rank 0 or 1) stands for no other."""
    stem, ext = os.path.splitext(name)
    exact = [(0, name)] if name in ytids else [(1, stem)] if ext and stem in ytids else []
    if exact:
        return exact
    found = []
    for base in (stem, name):  # the times may hold dots: "YTID_30.000.flac", "YTID_30.000"
        m = SEGMENT_TIMES.search(base)
        while m is not None:  # "a_1_2": YTID "a" (times _1_2) or "a_1" (time _2)
            if base[: m.start()] in ytids and (2, base[: m.start()]) not in found:
                found.append((2, base[: m.start()]))
            m = SEGMENT_TIMES.search(base, m.start() + 1)
    return found


def _best_by_ytid(names: Iterable[tuple[str, object]], ytids: set[str], keep: Callable[[dict, str, object], None]):
    """For each YTID the item of its best-ranked file name; ``keep(table, ytid, item)`` picks within a rank."""
    ranked: list[dict] = [{}, {}, {}]
    for name, item in names:
        for rank, ytid in ytid_matches(name, ytids):
            keep(ranked[rank], ytid, item)
    best: dict = {}
    for table in reversed(ranked):
        best.update(table)
    return best


def _ytid_finder(label_set: LabelSet, predictions: list[Prediction]) -> Callable[[Clip], tuple]:
    """A prediction whose file name is the clip's YTID (see ytid_matches)."""
    ytids = {clip.name for clip in label_set.clips}
    by_ytid = _best_by_ytid(((os.path.basename(p.path), p) for p in predictions), ytids, _first_usable)
    return lambda clip: (by_ytid.get(clip.name), None)


def _path_finder(predictions: list[Prediction]) -> Callable[[Clip], tuple]:
    """A prediction by exact path, then by resolved path, then by file name (when only one has it)."""
    exact: dict[str, Prediction] = {}
    resolved: dict[str, Prediction] = {}
    by_name: dict[str, list[Prediction]] = {}
    for pred in predictions:
        _first_usable(exact, pred.path, pred)
        _first_usable(resolved, os.path.abspath(pred.path), pred)
        by_name.setdefault(os.path.basename(pred.path), []).append(pred)

    def find(clip: Clip) -> tuple[Prediction | None, str | None]:
        hit = exact.get(clip.name) or resolved.get(os.path.abspath(clip.path))
        if hit is not None:
            return hit, None
        named = by_name.get(os.path.basename(clip.name), [])
        if len({os.path.abspath(p.path) for p in named}) > 1:
            return None, f"{len(named)} predictions are named {os.path.basename(clip.name)!r}; give the path in full"
        return (named[0], None) if named else (None, None)

    return find


def find_audio(label_set: LabelSet, audio_dir: str, wanted: Iterable[int]) -> tuple[dict[int, str], dict[int, str]]:
    """Audio files of the wanted clips: D/<YTID>* in an audio format, or the resolved path; else why not."""
    if not os.path.isdir(audio_dir):
        raise OptionsError("--audio-dir: no such folder", audio_dir)
    wanted = list(wanted)
    if label_set.kind in ("paths", "folders"):
        return {i: label_set.clips[i].path for i in wanted}, {}
    files = _files_by_ytid(audio_dir, {label_set.clips[i].name for i in wanted})
    found, missing = {}, {}
    for i in wanted:
        name = label_set.clips[i].name
        if name in files:
            found[i] = files[name]
        else:
            missing[i] = f"no audio file {os.path.join(audio_dir, name)}*"
    return found, missing


def _files_by_ytid(audio_dir: str, ytids: set[str]) -> dict[str, str]:
    """For each YTID the first audio file (by rank, then sorted by name) in audio_dir named for it
    (see ytid_matches)."""
    try:
        entries = sorted((e.name, e.path) for e in os.scandir(audio_dir) if e.is_file())
    except OSError as exc:
        raise OptionsError(f"--audio-dir: cannot list the folder ({exc.strerror or exc})", audio_dir) from None
    audio = ((name, path) for name, path in entries
             if not name.startswith(APPLEDOUBLE_PREFIX) and os.path.splitext(name)[1].lower() in AUDIO_EXTENSIONS)
    return _best_by_ytid(audio, ytids, lambda table, ytid, path: table.setdefault(ytid, path))


def model_labels(options) -> tuple[Label, ...]:
    """The labels of the model the options name (its spec's; AudioSet's for a file without a spec)."""
    from .paths import resolve_model_path
    from .spec import read_spec

    path, _ = resolve_model_path(options.model_path)
    spec = read_spec(path) if path.is_file() else None
    return labels() if spec is None else spec.labels


def tag_clips(options, paths: dict[int, str], on_clip: Callable[[str, str | None], None] | None = None):
    """Tag the clips' files with one Tagger: (scores by clip, reasons by clip, model path)."""
    from .tagger import Tagger

    tagger = Tagger(options)
    scores, reasons = {}, {}
    keys = list(paths)
    for key, (path, result, error) in zip(keys, tagger.tag_files([paths[k] for k in keys])):
        if error is None:
            scores[key] = np.asarray(result.clip_scores, dtype=np.float32)
        else:
            reasons[key] = error_reason(error)
        if on_clip is not None:
            on_clip(path, reasons.get(key))
    return scores, reasons, str(tagger.model.path)


# --- the run ------------------------------------------------------------------------------------
def tagger_options(args, **more):
    """TaggerOptions from the eval flags (validated now: a bad value is a usage error before any work);
    ``more``: further TaggerOptions fields (the strong-label run's post-processing and threshold)."""
    from .tagger import TaggerOptions

    try:
        return TaggerOptions(model_path=args.model, hop_s=args.hop, aggregate=args.aggregate,
                             num_threads=args.threads, max_duration_s=args.max_duration, **more)
    except OptionsError as exc:
        field, _, rest = exc.reason.partition(" ")
        raise OptionsError(f"{OPTION_FLAGS.get(field, field)} {rest}") from None


def collect(args, on_clip: Callable[[str, str | None], None] | None = None) -> tuple[LabelSet, Coverage]:
    """The labels and, per labeled clip, its scores: from --predictions first, then by tagging in --audio-dir."""
    if os.path.isdir(args.labels) and not args.audio_dir and not args.predictions:
        args.audio_dir = args.labels  # a folder of class folders holds its own audio
    if not args.audio_dir and not args.predictions:
        raise OptionsError("eval: give --audio-dir D (tag the clips), --predictions P (scores made before), or both")
    options = tagger_options(args) if args.audio_dir else None
    label_set = read_labels(args.labels, args.audio_dir, model_labels(options) if options else None)
    if args.predictions:
        cov = match_predictions(label_set, read_predictions(args.predictions), args.predictions)
    else:
        cov = Coverage({}, dict.fromkeys(range(len(label_set.clips)), "not tagged"), {})
    if args.audio_dir:
        found, no_audio = find_audio(label_set, args.audio_dir, sorted(cov.missing))
        prior = dict(cov.missing) if args.predictions else {}  # why the predictions did not serve
        cov.missing = {i: _joined(prior.get(i), reason) for i, reason in no_audio.items()}
        cov.audio.update(found)
        if found:
            scores, failed, cov.model = tag_clips(options, found, on_clip)
            cov.scores.update(scores)
            cov.tagged = len(scores)
            cov.missing.update({i: _joined(prior.get(i), reason) for i, reason in failed.items()})
    log.info("%d labeled clips: %d from predictions, %d tagged, %d missing", len(label_set.clips), cov.predicted,
             cov.tagged, len(cov.missing))
    return label_set, cov


def _joined(first: str | None, second: str) -> str:
    return f"{first}; {second}" if first else second


def build_report(label_set: LabelSet, cov: Coverage, args=None) -> dict:
    """The JSON report: summary, coverage, per-class AP/AUC (worst first), missing clips with reasons."""
    order = sorted(cov.scores)
    n = len(label_set.classes)
    y_true = np.zeros((len(order), n), dtype=bool)
    for row, i in enumerate(order):
        y_true[row, sorted(label_set.clips[i].positives)] = True
    y_score = np.stack([cov.scores[i] for i in order]) if order else np.zeros((0, n), np.float32)
    ap, auc = class_metrics(y_true, y_score)
    m_ap, m_auc, dp = summarize(ap, auc)
    positives = y_true.sum(axis=0)
    return {
        "mAP": _number(m_ap),
        "mean_auc": _number(m_auc),
        "d_prime": _number(dp),
        "clips": {"labeled": len(label_set.clips), "evaluated": len(order), "missing": len(cov.missing),
                  "from_predictions": cov.predicted, "tagged": cov.tagged,
                  "unmatched_predictions": cov.unmatched_predictions},
        "classes_with_positives": int(np.isfinite(ap).sum()),
        "classes_with_auc": int(np.isfinite(auc).sum()),
        "classes_without_positives": int((positives == 0).sum()),
        "source": _source(label_set, cov, args),
        "classes": _class_rows(ap, auc, positives, label_set.classes),
        "missing": [{"clip": label_set.clips[i].name, "path": cov.audio.get(i, label_set.clips[i].path),
                     "reason": cov.missing[i]} for i in sorted(cov.missing)],
    }


def _number(value: float) -> float | None:
    """A metric for JSON: null where undefined (or infinite: d-prime at AUC 1)."""
    return float(value) if math.isfinite(value) else None


def _class_rows(ap: np.ndarray, auc: np.ndarray, positives: np.ndarray, table: tuple[Label, ...]) -> list[dict]:
    """Per class, worst AP first; classes without positives last (ap and auc null)."""
    defined = np.isfinite(ap)
    order = sorted(range(len(table)), key=lambda c: (not defined[c], ap[c] if defined[c] else 0.0, c))
    return [{"index": c, "mid": table[c].mid, "label": table[c].name, "ap": _number(ap[c]), "auc": _number(auc[c]),
             "positives": int(positives[c])} for c in order]


def _source(label_set: LabelSet, cov: Coverage, args) -> dict:
    out = {"labels": label_set.path, "labels_format": label_set.kind, "model": cov.model}
    if args is not None:
        out.update(predictions=args.predictions, audio_dir=args.audio_dir)
        if cov.tagged:
            out.update(hop_s=float(args.hop), aggregate=args.aggregate)
    return out


def table_text(report: dict) -> str:
    """Summary, the worst and best classes by AP, and the first missing clips."""
    c = report["clips"]
    lines = [f"mAP {_fmt(report['mAP'])}   mean AUC {_fmt(report['mean_auc'])}   d-prime {_fmt(report['d_prime'], 3)}",
             f"clips: {c['labeled']} labeled, {c['evaluated']} evaluated ({c['from_predictions']} from predictions, "
             f"{c['tagged']} tagged), {c['missing']} missing",
             f"classes: {report['classes_with_positives']} with positives ({report['classes_with_auc']} with an AUC), "
             f"{report['classes_without_positives']} without"]
    ranked = [row for row in report["classes"] if row["ap"] is not None]
    if len(ranked) <= 2 * TABLE_CLASSES:
        lines += ["", "classes, worst AP first:", *_class_lines(ranked)]
    else:
        lines += ["", f"{TABLE_CLASSES} worst classes by AP:", *_class_lines(ranked[:TABLE_CLASSES]),
                  "", f"{TABLE_CLASSES} best classes by AP:", *_class_lines(ranked[::-1][:TABLE_CLASSES])]
    missing = report["missing"]
    if missing:
        lines += ["", f"missing ({len(missing)}):"]
        lines += [f"  {m['clip']}: {m['reason']}" for m in missing[:TABLE_MISSING]]
        if len(missing) > TABLE_MISSING:
            lines.append(f"  ... and {len(missing) - TABLE_MISSING} more (all in the JSON report)")
    return "\n".join(lines) + "\n"


def _class_lines(rows: list[dict]) -> list[str]:
    head = f"  {'AP':>6}  {'AUC':>6}  {'pos':>5}  class"
    return [head] + [f"  {_fmt(r['ap'])}  {_fmt(r['auc'])}  {r['positives']:>5}  {r['label']}  [{r['mid']}]"
                     for r in rows]


def _fmt(value: float | None, digits: int = 4) -> str:
    return f"{value:.{digits}f}" if value is not None else "-".rjust(digits + 2)


def _check_output(path: str | None) -> None:
    """Refuse an --output that cannot be written before any tagging."""
    if path is None:
        return
    if os.path.isdir(path):
        raise OptionsError("--output is a folder; give a file name such as report.json", path)
    parent = os.path.dirname(path) or "."
    if not os.path.isdir(parent):
        raise OptionsError("no such folder for --output", parent)


# --- CLI ----------------------------------------------------------------------------------------
def add_parser(sub) -> None:
    e = sub.add_parser("eval", help="measure mAP / AUC / d-prime on your own labels")
    e.add_argument("labels", metavar="LABELS",
                   help='AudioSet segment CSV (YTID, start, end, "MID,...") or a CSV with header path,labels; or strong '
                        'labels for a sound event detection model: a DCASE tsv (filename onset offset event_label) '
                        "or AudioSet's strong-label tsv (segment_id start_time_seconds end_time_seconds label)")
    e.add_argument("--audio-dir", metavar="D", help="tag the labeled clips found here (D/<YTID>.* or the CSV paths)")
    e.add_argument("--predictions", metavar="P",
                   help=f"scores made before: Parquet file or folder, or JSONL of '{FULL_TOP_K}'")
    e.add_argument("--model", help="CNN14 .tflite (default: $SOUNDTAG_MODEL, then the cache from 'soundtag fetch')")
    e.add_argument("--output", metavar="FILE", help="write the JSON report here (atomically)")
    e.add_argument("--format", choices=REPORT_FORMATS, default="table", help="stdout format (default table)")
    e.add_argument("--hop", type=float, default=WINDOW_S, metavar="SECONDS",
                   help="seconds between 10 s windows (default 10)")
    e.add_argument("--aggregate", choices=AGGREGATES, default="max", help="clip score from windows (default max)")
    e.add_argument("--threads", type=int, help="LiteRT threads (default: one per core, up to 4)")
    e.add_argument("--max-duration", type=float, default=DEFAULT_MAX_DURATION_S, metavar="SECONDS",
                   help="refuse clips longer than this (default 86400 = 24 h)")
    e.add_argument("--threshold", type=float, help="strong labels: the event threshold of every class (default 0.5)")
    from .sed import add_arguments

    add_arguments(e)


def _err(msg: str) -> None:
    print(f"soundtag: {msg}", file=sys.stderr, flush=True)


def main(args) -> int:
    """Run `soundtag eval`: 0 evaluated, 1 nothing could be evaluated (or the run failed), 2 usage error."""
    from tqdm import tqdm

    progress = tqdm(unit="clip", file=sys.stderr, disable=None, leave=False)

    def on_clip(path: str, reason: str | None) -> None:
        progress.update(1)
        if reason is not None:
            progress.clear()
            _err(f"{path}: {reason}")

    from . import evaluate_sed

    strong = evaluate_sed.strong_format(args.labels) if os.path.isfile(args.labels) else None
    try:
        _check_output(args.output)
        if strong:
            from .sed import from_arguments

            options = tagger_options(args, sed=from_arguments(args), threshold=args.threshold)
            report = evaluate_sed.evaluate(args, options, on_clip)
        else:
            label_set, cov = collect(args, on_clip)
            report = build_report(label_set, cov, args)
    except OptionsError as exc:
        _err(str(exc))
        return EXIT_USAGE
    except SoundtagError as exc:  # the model (missing, not CNN14)
        _err(str(exc))
        return EXIT_FAILED
    except KeyboardInterrupt:
        _err("interrupted")
        return EXIT_INTERRUPTED
    except Exception as exc:  # a failure of the run itself (out of memory, a vanished folder): one line
        _err(f"eval failed: {error_reason(exc)}")
        return EXIT_FAILED
    finally:
        progress.close()
    return _emit(report, args)


def _emit(report: dict, args) -> int:
    from .evaluate_sed import table_text as strong_table
    from .writers import json_text

    text = json_text(report, indent=2) + "\n"
    if args.output:
        try:
            atomic_write_bytes(args.output, text.encode("utf-8"))
        except OSError as exc:
            _err(f"{args.output}: cannot write the report ({exc.strerror or exc})")
            return EXIT_FAILED
    strong = "files" in report  # a strong-label report (evaluate_sed)
    sys.stdout.write(text if args.format == "json" else (strong_table if strong else table_text)(report))
    sys.stdout.flush()
    clips = report["files"] if strong else report["clips"]
    what = "files" if strong else "clips"
    if clips["missing"]:
        _err(f"{clips['missing']} of {clips['labeled']} labeled {what} missing (reasons in the report)")
    if strong and not clips["evaluated"]:
        _err("nothing evaluated: no labeled file could be tagged")
        return EXIT_FAILED
    if not strong and report["mAP"] is None:
        what = "no clip" if not clips["evaluated"] else "no class with a positive among the evaluated clips"
        _err(f"nothing evaluated: {what}")
        return EXIT_FAILED
    return EXIT_OK
