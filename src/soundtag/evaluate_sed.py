"""`soundtag eval` on strong labels (issue #20): sound event detection measured as DCASE measures it.

    LABELS (DCASE tsv: filename onset offset event_label, or AudioSet's strong-label tsv: segment_id
    start_time_seconds end_time_seconds label) + a SED model tagging the files in --audio-dir
    --> event-based F1 (collars), segment-based F1 (1 s) of soundtag's events, and PSDS 1 and 2 of its
    framewise scores, per class and overall --> report: JSON (--output, --format json) or a table

The metrics are sed_scores_eval's (fgnt/sed_scores_eval; tests hold them equal to sed_eval's and
psds_eval's on the same inputs):
- event-based F1: soundtag's post-processed events (sed.detect) against the labels, an onset collar
  of EVENT_COLLAR_S and an offset collar of max(EVENT_COLLAR_S, OFFSET_COLLAR_RATE x the event's length);
- segment-based F1: the same events on SEGMENT_S segments;
- PSDS (threshold-independent, from the framewise scores): DCASE 2021+ scenarios PSDS_SCENARIOS.
Only the classes the labels name are evaluated (by name or MID among the model's labels).

Floor 6: imports the public API below it; evaluate.py (`soundtag eval`) runs it.
"""

from __future__ import annotations

import csv
import io
import logging
import math
import os
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from .audio import AUDIO_EXTENSIONS
from .errors import OptionsError, UnknownClassError
from .labels import lookup
from .results import TagResult, error_reason

log = logging.getLogger(__name__)

DCASE_COLUMNS = ("filename", "onset", "offset", "event_label")
AUDIOSET_COLUMNS = ("segment_id", "start_time_seconds", "end_time_seconds", "label")
EVENT_COLLAR_S = 0.2  # s; onset collar, and the least offset collar (DCASE's event-based metrics)
OFFSET_COLLAR_RATE = 0.2  # offset collar as a fraction of the reference event's length
SEGMENT_S = 1.0  # s; segment-based metrics' segment length
PSDS_SCENARIOS = {  # DCASE 2021-2023 task 4
    "psds1": dict(dtc_threshold=0.7, gtc_threshold=0.7, cttc_threshold=None, alpha_ct=0.0, alpha_st=1.0, max_efpr=100.0),
    "psds2": dict(dtc_threshold=0.1, gtc_threshold=0.1, cttc_threshold=0.3, alpha_ct=0.5, alpha_st=1.0, max_efpr=100.0),
}
SCORE_DECIMALS = 6  # sed_scores_eval's time_decimals


@dataclass
class StrongLabels:
    """Reference events per file id (the file's name without its extension)."""

    events: dict[str, list[tuple[float, float, str]]]  # id -> (onset_s, offset_s, class name as the model's)
    classes: list[str]  # evaluated classes (model label names), in model order
    source: str
    format: str  # "dcase" or "audioset"


@dataclass
class Detections:
    """What the model made of each file found."""

    results: dict[str, TagResult] = field(default_factory=dict)  # id -> result
    missing: dict[str, str] = field(default_factory=dict)  # id -> why it was not evaluated
    audio: dict[str, str] = field(default_factory=dict)  # id -> file
    model: str | None = None


def strong_format(path: str) -> str | None:
    """"dcase" or "audioset" when the file's header names a strong-label table, else None."""
    try:
        with open(path, "rb") as f:
            head = f.read(4096).decode("utf-8", errors="replace")
    except OSError:
        return None
    first = head.lstrip("\ufeff").splitlines()[0] if head.strip() else ""
    cells = tuple(c.strip() for c in first.split("\t"))
    if cells[:4] == DCASE_COLUMNS:
        return "dcase"
    if cells[:4] == AUDIOSET_COLUMNS:
        return "audioset"
    return None


def read_strong(path: str, table) -> StrongLabels:
    """A strong-label tsv (strong_format) with its classes found among ``table`` (the model's labels,
    by name or MID); OptionsError (one line, with the line number) for a malformed row."""
    fmt = strong_format(path)
    if fmt is None:
        raise OptionsError(f"not a strong-label table (header {' '.join(DCASE_COLUMNS)} or {' '.join(AUDIOSET_COLUMNS)})", path)
    with open(path, encoding="utf-8-sig", errors="strict", newline="") as f:
        try:
            text = f.read()
        except UnicodeDecodeError:
            raise OptionsError("labels are not UTF-8 text", path) from None
    events: dict[str, list[tuple[float, float, str]]] = {}
    used: set[int] = set()
    rows = csv.reader(io.StringIO(text), delimiter="\t")
    next(rows)
    for line, row in enumerate(rows, 2):
        if not row or not "".join(row).strip():
            continue
        if len(row) < 4:
            if len(row) == 1 or (len(row) >= 1 and not "".join(row[1:]).strip()):  # a file without events
                events.setdefault(_file_id(row[0], fmt), [])
                continue
            raise OptionsError(f"line {line}: expected 4 tab-separated cells, found {len(row)}", path)
        name, onset, offset, label = row[:4]
        file_id = _file_id(name, fmt)
        if not label.strip():
            events.setdefault(file_id, [])
            continue
        try:
            on, off = float(onset), float(offset)
        except ValueError:
            raise OptionsError(f"line {line}: onset and offset must be numbers, got {onset!r}, {offset!r}", path) from None
        if not (math.isfinite(on) and math.isfinite(off) and 0 <= on < off):
            raise OptionsError(f"line {line}: need 0 <= onset < offset, got {onset}, {offset}", path)
        try:
            index = lookup(label.strip(), table)
        except UnknownClassError:
            raise OptionsError(f"line {line}: {label.strip()!r} is not a class of the model", path) from None
        used.add(index)
        events.setdefault(file_id, []).append((on, off, table[index].name))
    if not events:
        raise OptionsError("no labeled files", path)
    return StrongLabels(events, [table[i].name for i in sorted(used)], path, fmt)


def _file_id(name: str, fmt: str) -> str:
    base = os.path.basename(name.strip())
    if fmt == "dcase":
        stem, ext = os.path.splitext(base)
        return stem if ext else base
    return base  # AudioSet: the segment id, e.g. YxlGt805lTA_30000


def find_files(labels: StrongLabels, audio_dir: str) -> tuple[dict[str, str], dict[str, str]]:
    """(id -> audio file, id -> why none) for the labeled files, by stem under ``audio_dir`` (recursive)."""
    if not os.path.isdir(audio_dir):
        raise OptionsError("--audio-dir is not a folder", audio_dir)
    by_stem: dict[str, str] = {}
    for root, dirs, files in os.walk(audio_dir):
        dirs.sort()
        for f in sorted(files):
            stem, ext = os.path.splitext(f)
            if ext.lower() in AUDIO_EXTENSIONS:
                by_stem.setdefault(stem, os.path.join(root, f))
    found = {i: by_stem[i] for i in labels.events if i in by_stem}
    return found, {i: f"no audio file {i}.* under {audio_dir}" for i in labels.events if i not in found}


def sed_tagger(options):
    """The Tagger of a sound event detection model; ModelError (one line) for a clip model."""
    from .errors import ModelError
    from .tagger import Tagger

    tagger = Tagger(options)
    if not tagger.spec.framewise:
        raise ModelError(f"is a clip model ({tagger.spec.architecture}); strong labels need a sound event detection "
                         "model (Cnn14_DecisionLevelMax or _Att: soundtag fetch sed)", str(tagger.model.path))
    return tagger


def detect_files(tagger, files: dict[str, str], on_file: Callable[[str, str | None], None] | None = None) -> Detections:
    """Tag each file; failures are recorded, not raised (the run goes on)."""
    det = Detections(audio=dict(files), model=str(tagger.model.path))
    ids = list(files)
    for file_id, (path, result, error) in zip(ids, tagger.tag_files([files[i] for i in ids])):
        if error is None:
            det.results[file_id] = result
        else:
            det.missing[file_id] = error_reason(error)
        if on_file is not None:
            on_file(path, det.missing.get(file_id))
    return det


# --- scores as sed_scores_eval takes them ---------------------------------------------------------
def score_frame(result: TagResult, classes: list[str], labels) -> tuple[np.ndarray, np.ndarray]:
    """(timestamps [n + 1], scores [n, classes]) of a result's framewise scores for ``classes``, runs of
    equal rows merged (a DecisionLevel model's scores change every 32 frames), the last frame cut at the
    file's end."""
    cols = np.array([lookup(c, labels) for c in classes], np.int64)
    tl = result.timeline
    scores = tl.scores(cols).astype(np.float64)
    hop = tl.frame_hop_s
    keep = np.concatenate([[True], np.any(scores[1:] != scores[:-1], axis=1)])
    starts = np.flatnonzero(keep)
    end = min(scores.shape[0] * hop, result.duration_s) if result.duration_s > 0 else scores.shape[0] * hop
    stamps = np.append(starts * hop, end)
    good = np.diff(stamps) > 0  # a start at or past the end (the last frame's centre is the end)
    return stamps[np.append(good, True)], scores[starts][good]


def event_frame(result: TagResult, classes: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """(timestamps, 0/1 scores) that are 1 exactly inside each of a result's events: detections as
    sed_scores_eval scores, so that a 0.5 threshold gives soundtag's events back."""
    want = {c: k for k, c in enumerate(classes)}
    events = [(e.start_s, e.end_s, want[e.name]) for e in result.events if e.name in want]
    end = max([result.duration_s] + [e[1] for e in events])
    stamps = np.unique(np.round([0.0, end] + [t for e in events for t in e[:2]], SCORE_DECIMALS))
    scores = np.zeros((len(stamps) - 1, len(classes)))
    mids = (stamps[:-1] + stamps[1:]) / 2
    for on, off, k in events:
        scores[(mids > on) & (mids < off), k] = 1.0
    return stamps, scores


def _frames(det: Detections, classes: list[str], make) -> dict:
    from sed_scores_eval.base_modules.io import create_score_dataframe

    out = {}
    for file_id, result in det.results.items():
        stamps, scores = make(result)
        out[file_id] = create_score_dataframe(scores, stamps, classes)
    return out


# --- the metrics ----------------------------------------------------------------------------------
def metrics(labels: StrongLabels, det: Detections, model_labels) -> dict:
    """Event-based and segment-based F1 of the events, PSDS 1 and 2 of the framewise scores, over the
    files that were tagged; per class and overall (micro and macro averages, as sed_eval reports)."""
    try:
        from sed_scores_eval import collar_based, intersection_based, segment_based
    except ImportError as exc:  # pragma: no cover - depends on the install
        raise ImportError("strong-label evaluation needs sed_scores_eval: pip install 'soundtag[sed]'") from exc
    ids = sorted(det.results)
    present = {e[2] for i in ids for e in labels.events[i]}
    classes = [c for c in labels.classes if c in present]  # a class without a reference event has no recall
    truth = {i: [list(e) for e in labels.events[i]] for i in ids}
    durations = {i: max([det.results[i].duration_s] + [e[1] for e in labels.events[i]]) for i in ids}
    events = _frames(det, classes, lambda r: event_frame(r, classes))
    scores = _frames(det, classes, lambda r: score_frame(r, classes, model_labels))
    f, p, r, _ = collar_based.fscore(events, truth, 0.5, onset_collar=EVENT_COLLAR_S, offset_collar=EVENT_COLLAR_S,
                                     offset_collar_rate=OFFSET_COLLAR_RATE, time_decimals=SCORE_DECIMALS)
    sf, sp, sr, _ = segment_based.fscore(events, truth, durations, 0.5, segment_length=SEGMENT_S,
                                         time_decimals=SCORE_DECIMALS)
    psds = {}
    for name, params in PSDS_SCENARIOS.items():
        value, per_class, *_ = intersection_based.psds(scores, truth, durations, time_decimals=SCORE_DECIMALS, **params)
        psds[name] = (float(value), {c: float(v) for c, v in per_class.items()})
    counts = {c: sum(1 for i in ids for e in labels.events[i] if e[2] == c) for c in classes}
    per_class = [{
        "label": c, "reference_events": counts[c],
        "event_f1": _num(f.get(c)), "event_precision": _num(p.get(c)), "event_recall": _num(r.get(c)),
        "segment_f1": _num(sf.get(c)), "segment_precision": _num(sp.get(c)), "segment_recall": _num(sr.get(c)),
        "psds1": _num(psds["psds1"][1].get(c)), "psds2": _num(psds["psds2"][1].get(c)),
    } for c in classes]
    return {
        "event_based": {"collar_s": EVENT_COLLAR_S, "offset_collar_rate": OFFSET_COLLAR_RATE,
                        "f1_micro": _num(f.get("micro_average")), "f1_macro": _num(f.get("macro_average")),
                        "precision_micro": _num(p.get("micro_average")), "recall_micro": _num(r.get("micro_average"))},
        "segment_based": {"segment_s": SEGMENT_S,
                          "f1_micro": _num(sf.get("micro_average")), "f1_macro": _num(sf.get("macro_average")),
                          "precision_micro": _num(sp.get("micro_average")), "recall_micro": _num(sr.get("micro_average"))},
        "psds1": psds["psds1"][0], "psds2": psds["psds2"][0],
        "psds_scenarios": {k: {a: b for a, b in v.items()} for k, v in PSDS_SCENARIOS.items()},
        "classes": per_class,
    }


def _num(value) -> float | None:
    if value is None:
        return None
    v = float(value)
    return round(v, 6) if math.isfinite(v) else None


def build_report(labels: StrongLabels, det: Detections, model_labels, post) -> dict:
    """The JSON report of a strong-label evaluation: summary, coverage, per-class rows, missing files."""
    report = {
        "task": "sound event detection (strong labels)",
        "labels": labels.source, "labels_format": labels.format, "model": det.model,
        "files": {"labeled": len(labels.events), "evaluated": len(det.results), "missing": len(det.missing)},
        "post_processing": {"off_ratio": post.off_ratio, "median_s": post.median_s,
                            "min_duration_s": post.min_duration_s, "max_gap_s": post.max_gap_s},
        "missing": [{"file": i, "reason": why} for i, why in sorted(det.missing.items())],
    }
    if det.results:
        report.update(metrics(labels, det, model_labels))
    return report


def table_text(report: dict) -> str:
    """The report as a short table: overall numbers, then one row per class."""
    files = report["files"]
    lines = [f"strong labels {report['labels']}: {files['evaluated']} of {files['labeled']} files evaluated",
             f"model {report['model']}"]
    if "classes" not in report:
        return "\n".join(lines + ["nothing evaluated"]) + "\n"
    ev, seg = report["event_based"], report["segment_based"]
    lines += [f"event-based F1 (collar {ev['collar_s']:g} s): micro {_f(ev['f1_micro'])}  macro {_f(ev['f1_macro'])}",
              f"segment-based F1 ({seg['segment_s']:g} s): micro {_f(seg['f1_micro'])}  macro {_f(seg['f1_macro'])}",
              f"PSDS1 {_f(report['psds1'])}  PSDS2 {_f(report['psds2'])}", "",
              f"{'class':<32} {'events':>6} {'event F1':>9} {'seg F1':>7} {'PSDS1':>7} {'PSDS2':>7}"]
    for row in report["classes"]:
        lines.append(f"{row['label'][:32]:<32} {row['reference_events']:>6} {_f(row['event_f1']):>9} "
                     f"{_f(row['segment_f1']):>7} {_f(row['psds1']):>7} {_f(row['psds2']):>7}")
    return "\n".join(lines) + "\n"


def _f(v) -> str:
    return "-" if v is None else f"{v:.4f}"


def evaluate(args, options, on_file: Callable[[str, str | None], None] | None = None) -> dict:
    """The whole strong-label run of `soundtag eval` (evaluate.main hands it the parsed flags and their
    TaggerOptions, post-processing included)."""
    if not args.audio_dir:
        raise OptionsError("eval: strong labels are evaluated by tagging the files; give --audio-dir D")
    if args.predictions:
        raise OptionsError("eval: --predictions holds clip scores; strong labels need --audio-dir (framewise scores)")
    tagger = sed_tagger(options)
    labels = read_strong(args.labels, tagger.spec.labels)
    found, missing = find_files(labels, args.audio_dir)
    det = detect_files(tagger, found, on_file)
    det.missing.update(missing)
    return build_report(labels, det, tagger.spec.labels, options.sed)
