"""`soundtag train` (issue #21): your own classes as a head on a model's embeddings, converted with
the body into one LiteRT model that `tag`, `listen`, `serve`, `corpus` and `eval` run as any other.

    DATA (dataset.py: class folders or a path,labels CSV)
      --the model's window embeddings, as `soundtag tag --embeddings` computes them (embeddings.py;
        cached in DIR/embeddings/ by file digest: a second run embeds only new files)
      --split by file, stratified per class--> train / validation windows
      --convert/head.py: logistic regression or one hidden layer, weighted BCE, early stopping--> head
      --convert/export.py convert_with_head: the checkpoint's body + the head, proven like every model
      --the written model run by the runtime on validation files vs the head on their stored
        embeddings (the embedding it sees is the one it was trained on)--> DIR/NAME.tflite (atomic)
      + DIR/report.json: per class positives, validation AP, AUC, and F1 / precision / recall at the
        F1-best threshold, which the model's spec keeps as that class's default threshold.

Weighing: every window of a file is an example with the file's labels, weighted 1 / (the file's
windows), so each file counts once however long it is; within a class, positives are weighted up to
balance its negatives (convert/head.py). Needs the checkpoint the model was converted from (its md5 is
in the model's spec) and pip install 'soundtag[train]'.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .dataset import Dataset, read_dataset
from .commands import err, failed
from .errors import EXIT_FAILED, EXIT_OK, OptionsError, SoundtagError
from .files import atomic_write_bytes, file_digest
from .labels import Label, labels as audioset_labels
from .results import error_reason

log = logging.getLogger(__name__)

DEFAULT_NAME = "custom"  # DIR/custom.tflite
DEFAULT_VAL_SPLIT = 0.2  # of each class's files held out for validation
MIN_FILES_PER_CLASS = 2  # one to train on, one to validate
CUSTOM_MID_PREFIX = "custom:"  # a trained class's MID: custom:<label> (AudioSet's are /m/... or /t/...)
CHECK_FILES = 8  # validation files the written model is run on by the runtime before it is kept
CHECK_MIN_CORR = 0.99999  # runtime probabilities vs the trained head on the stored embeddings (fp32)
CHECK_MAX_ABS_DIFF = 1e-4
EMBEDDING_MAX_ABS_DIFF = 1e-4  # runtime embedding vs the stored (training) one, same file and model
REPORT_FILE = "report.json"
EMBEDDINGS_DIR = "embeddings"  # DIR/embeddings/: the embedding cache (Parquet parts)


def add_parser(sub) -> None:
    t = sub.add_parser("train", help="train your own classes on a model's embeddings into one LiteRT model ([train])")
    t.add_argument("data", metavar="DATA", help="a folder of class folders (noise/background/other: negatives) "
                                                "or a CSV with header path,labels (';' between labels)")
    t.add_argument("--output", required=True, metavar="DIR", help="writes DIR/NAME.tflite, DIR/report.json, "
                                                                  "and caches embeddings in DIR/embeddings/")
    t.add_argument("--model", help="the soundtag .tflite whose embeddings to train on (default: $SOUNDTAG_MODEL, "
                                   "then the cache of 'soundtag fetch'); an fp32 or int8 clip model")
    t.add_argument("--checkpoint", help="the upstream checkpoint that model was converted from (default: the one "
                                        "'soundtag fetch' keeps in the cache, found by the model's md5)")
    t.add_argument("--name", default=DEFAULT_NAME, help=f"model name: DIR/NAME.tflite (default {DEFAULT_NAME})")
    t.add_argument("--hidden", type=int, metavar="N", help="one hidden layer of N units (default: logistic regression)")
    t.add_argument("--val-split", type=float, default=DEFAULT_VAL_SPLIT, metavar="F",
                   help=f"fraction of each class's files held out for validation (default {DEFAULT_VAL_SPLIT})")
    t.add_argument("--append", action="store_true", help="keep the model's AudioSet outputs; add the new classes after them")
    t.add_argument("--hop", type=float, default=None, metavar="SECONDS",
                   help="seconds between windows of a file (default: the model's window, 10 s)")
    t.add_argument("--seed", type=int, default=0, help="split and fit seed (same seed, same data: same model)")
    t.add_argument("--threads", type=int, help="LiteRT threads (default: one per core, up to 4)")
    t.add_argument("--gpu-check", choices=("auto", "require", "off"), default="auto",
                   help="run the model on LiteRT's GPU against the CPU before writing it (as convert; default auto)")


@dataclass(frozen=True)
class Windows:
    """Every embedded window: embedding, labels [n, classes] (0/1), weight, its file's number."""

    x: np.ndarray
    y: np.ndarray
    w: np.ndarray
    file: np.ndarray


def main(args) -> int:
    try:
        return train(args)
    except (Exception, KeyboardInterrupt) as exc:
        return failed(exc, "train", "interrupted (embeddings computed so far are kept in the cache; no model written)")


def train(args) -> int:
    """The whole run; returns the exit code (1 when some files could not be read, the model written)."""
    t0 = time.perf_counter()
    _check_flags(args)
    data = read_dataset(args.data)
    check_classes(data, args.append)
    try:
        from .convert.export import convert_with_head
        from .convert.head import fit_head
        from .embeddings import EmbeddingStore, model_key
    except ImportError as exc:
        raise SoundtagError(f"train needs the training tools: pip install 'soundtag[train]' ({exc})") from None
    from .tagger import Tagger, TaggerOptions

    out = Path(args.output)
    if out.exists() and not out.is_dir():
        raise OptionsError("--output must be a folder", str(out))
    tagger = Tagger(TaggerOptions(model_path=args.model, embeddings=True, num_threads=args.threads,
                                  **({} if args.hop is None else {"hop_s": args.hop})))
    spec = tagger.spec
    base_path = str(tagger.model.path)
    if spec.training:
        raise OptionsError("is itself a trained model: train on the model it was trained from", base_path)
    checkpoint = find_checkpoint(args.checkpoint, spec, base_path)
    out.mkdir(parents=True, exist_ok=True)
    hop_s = float(tagger.options.hop_s)
    store = EmbeddingStore(out / EMBEDDINGS_DIR, model_key(base_path, hop_s), spec.embedding_size)
    embedded, errors = [], []
    for path, fe, exc in store.embed(tagger, [e.path for e in data.examples], progress=True):
        if fe is None:
            errors.append({"path": path, "error": error_reason(exc)})
            err(f"{path}: {errors[-1]['error']}")
        else:
            embedded.append((path, fe))  # the path as listed (a cached digest may have been stored under another)
    for path, why in data.problems:
        errors.append({"path": path, "error": why})
        err(f"{path}: {why}")
    by_path = {e.path: e for e in data.examples}
    examples = [(fe, by_path[path].labels) for path, fe in embedded]
    check_classes(Dataset(data.source, tuple(by_path[path] for path, _ in embedded), data.classes), args.append,
                  after="the files that could be read")
    classes = list(data.classes)
    win = windows(examples, classes)
    train_files, val_files = split_files([labs for _, labs in examples], classes, args.val_split, args.seed)
    tr, va = np.isin(win.file, train_files), np.isin(win.file, val_files)
    fit = fit_head(win.x[tr], win.y[tr], win.w[tr], win.x[va], win.y[va], win.w[va], args.hidden, args.seed)
    rows = class_metrics(classes, win.y[va], fit.head.numpy(win.x[va]), win.w[va],
                         [sum(c in examples[i][1] for i in train_files) for c in classes],
                         [sum(c in examples[i][1] for i in val_files) for c in classes])
    first = len(spec.labels) if args.append else 0
    labels = (spec.labels if args.append else ()) + tuple(
        Label(first + i, CUSTOM_MID_PREFIX + c, c) for i, c in enumerate(classes))
    thresholds = (((None,) * first) if args.append else ()) + tuple(r["threshold"] for r in rows)
    facts = {
        "classes": classes, "first_class": first, "append": bool(args.append),
        "head": f"one hidden layer of {args.hidden}" if args.hidden else "logistic regression",
        "data": data.source, "files": {"train": len(train_files), "validation": len(val_files), "failed": len(errors)},
        "windows": {"train": int(tr.sum()), "validation": int(va.sum())}, "hop_s": hop_s, "seed": args.seed,
        "val_split": args.val_split, "best_epoch": fit.best_epoch, "epochs": fit.epochs,
        "val_loss": round(fit.val_loss, 6), "base_model": {"file": os.path.basename(base_path),
                                                           "sha256": file_digest(base_path, "sha256")},
        "weighting": "each window 1 / its file's windows; positives balanced to negatives per class",
    }
    data_bytes, entry = convert_with_head(checkpoint, fit.head, arch=spec.architecture, append=args.append,
                                          gpu_check=args.gpu_check, labels=labels, thresholds=thresholds, training=facts)
    model_file = out / f"{args.name}.tflite"
    check = _write_checked(model_file, data_bytes, tagger, [embedded[i] for i in val_files[:CHECK_FILES]], fit.head, first)
    report = {"model": str(model_file), "classes": rows, "training": facts, "conversion": entry,
              "runtime_check": check, "errors": errors, "seconds": round(time.perf_counter() - t0, 1),
              "split": {"train": [embedded[i][0] for i in train_files], "validation": [embedded[i][0] for i in val_files]}}
    atomic_write_bytes(out / REPORT_FILE, (json.dumps(report, indent=2) + "\n").encode())
    sys.stdout.write(table_text(report))
    sys.stdout.flush()
    if errors:
        err(f"{len(errors)} file(s) could not be read (listed in {out / REPORT_FILE}); the model is trained on the rest")
    return EXIT_FAILED if errors else EXIT_OK


def _check_flags(args) -> None:
    if not 0.0 < args.val_split < 1.0:
        raise OptionsError(f"--val-split must be a fraction between 0 and 1, got {args.val_split!r}")
    if args.hidden is not None and args.hidden < 1:
        raise OptionsError(f"--hidden must be a positive number of units, got {args.hidden!r}")
    name = args.name
    if not name or name in (".", "..") or os.sep in name or (os.altsep and os.altsep in name) or name.startswith("."):
        raise OptionsError(f"--name must be a plain file name, got {name!r}")
    if args.hop is not None and not (args.hop > 0):
        raise OptionsError(f"--hop must be a positive number of seconds, got {args.hop!r}")


def check_classes(data: Dataset, append: bool, after: str = "") -> None:
    """OptionsError unless every class has MIN_FILES_PER_CLASS files, there is something to tell the
    classes from (two classes, or negatives), and (``append``) no label is an AudioSet class's name or MID."""
    where = f" (among {after})" if after else ""
    if not data.examples:
        raise OptionsError(f"no files to train on{where}", data.source)
    for c in data.classes:
        n = data.files_of(c)
        if n < MIN_FILES_PER_CLASS:
            raise OptionsError(f"class {c!r} has {n} file{'s' if n != 1 else ''}{where}: it needs at least "
                               f"{MIN_FILES_PER_CLASS} (one to train on, one to validate)", data.source)
    if not data.classes:
        raise OptionsError("no labelled files: only negatives", data.source)
    if len(data.classes) == 1 and not data.negatives:
        raise OptionsError(f"one class ({data.classes[0]!r}) and no negatives: add a second class or a noise/ "
                           "background/other folder of files without it", data.source)
    if append:
        taken = {lab.name.casefold(): lab for lab in audioset_labels()} | {lab.mid.casefold(): lab for lab in audioset_labels()}
        for c in data.classes:
            if c.casefold() in taken:
                lab = taken[c.casefold()]
                raise OptionsError(f"--append: label {c!r} is AudioSet's class {lab.name!r} ({lab.mid}); rename it "
                                   "or train without --append", data.source)


def find_checkpoint(explicit: str | None, spec, model_path: str) -> Path:
    """The checkpoint the model was converted from: ``explicit`` (its md5 must be the model's), else
    the one `soundtag fetch` keeps in the cache with that md5."""
    want = spec.checkpoint_md5
    if explicit:
        path = Path(explicit)
        if not path.is_file():
            raise OptionsError("no such checkpoint file", str(path))
        if want and file_digest(path, "md5") != want:
            raise OptionsError(f"is not the checkpoint {os.path.basename(model_path)} was converted from (md5 {want})",
                               str(path))
        return path
    if not want:
        raise OptionsError("the model does not say which checkpoint it came from: pass --checkpoint", model_path)
    from .fetch import CHECKPOINTS
    from .paths import cache_dir

    for c in CHECKPOINTS.values():
        if c.md5 == want and (cache_dir() / c.file).is_file():
            return cache_dir() / c.file
    raise OptionsError(f"needs the checkpoint it was converted from (md5 {want}): pass --checkpoint FILE "
                       "or run 'soundtag fetch'", model_path)


def windows(examples: list, classes: list[str]) -> Windows:
    """Stack every file's windows: x [n, dim], y [n, classes], weight 1 / the file's windows, file number."""
    col = {c: i for i, c in enumerate(classes)}
    xs, ys, ws, fs = [], [], [], []
    for i, (fe, labs) in enumerate(examples):
        n = len(fe.embeddings)
        y = np.zeros((n, len(classes)), np.float32)
        y[:, [col[c] for c in labs]] = 1.0
        xs.append(np.asarray(fe.embeddings, np.float32))
        ys.append(y)
        ws.append(np.full(n, 1.0 / n))
        fs.append(np.full(n, i))
    return Windows(np.concatenate(xs), np.concatenate(ys), np.concatenate(ws), np.concatenate(fs))


def split_files(file_labels: list[tuple[str, ...]], classes: list[str], val_split: float, seed: int
                ) -> tuple[list[int], list[int]]:
    """(train, validation) file numbers: per class, rarest first, round(val_split * its files) (at least
    one, and never all) of its files go to validation; negatives likewise. Deterministic for a seed."""
    rng = np.random.default_rng(seed)
    n = len(file_labels)
    side = np.full(n, -1)  # -1 unassigned, 0 train, 1 validation
    counts = {c: sum(c in labs for labs in file_labels) for c in classes}
    for c in sorted(classes, key=lambda c: (counts[c], c)):
        members = [i for i in range(n) if c in file_labels[i]]
        want = min(max(1, round(val_split * len(members))), len(members) - 1)
        have_val = sum(side[i] == 1 for i in members)
        free = [members[k] for k in rng.permutation(len(members)) if side[members[k]] == -1]
        for i in free:
            if have_val < want:
                side[i], have_val = 1, have_val + 1
            else:
                side[i] = 0
    negatives = [i for i in range(n) if not file_labels[i]]
    k = round(val_split * len(negatives))
    for j, idx in enumerate(rng.permutation(len(negatives))):
        side[negatives[idx]] = 1 if j < k else 0
    return [int(i) for i in np.flatnonzero(side == 0)], [int(i) for i in np.flatnonzero(side == 1)]


def class_metrics(classes: list[str], y: np.ndarray, p: np.ndarray, w: np.ndarray, train_pos: list[int],
                  val_pos: list[int]) -> list[dict]:
    """Per class on the validation windows (weighted as in training): AP, ROC AUC, and the F1-best
    threshold with its F1, precision and recall (scikit-learn)."""
    from sklearn.metrics import average_precision_score, precision_recall_curve, roc_auc_score

    rows = []
    for c, name in enumerate(classes):
        yt = y[:, c] > 0.5
        row = {"class": name, "train_files": int(train_pos[c]), "validation_files": int(val_pos[c])}
        if yt.all() or not yt.any():  # no positive or no negative among the validation windows
            row.update(ap=None, auc=None, f1=None, precision=None, recall=None, threshold=None)
            rows.append(row)
            continue
        prec, rec, thr = precision_recall_curve(yt, p[:, c], sample_weight=w)
        f1 = np.where(prec + rec > 0, 2 * prec * rec / np.maximum(prec + rec, 1e-12), 0.0)[:-1]
        best = int(np.argmax(f1))
        row.update(ap=float(average_precision_score(yt, p[:, c], sample_weight=w)),
                   auc=float(roc_auc_score(yt, p[:, c], sample_weight=w)), f1=float(f1[best]),
                   precision=float(prec[best]), recall=float(rec[best]), threshold=float(np.clip(thr[best], 0.0, 1.0)))
        rows.append(row)
    return rows


def _write_checked(model_file: Path, data: bytes, tagger, check_files: list, head, first: int) -> dict:
    """Write the model atomically, keeping it only if the runtime, run on validation files, gives the
    trained head's probabilities on their stored embeddings and computes the embedding it was trained on."""
    from .model import Model
    from .tagger import Tagger

    check: dict = {"files": len(check_files)}

    def verify(tmp: Path) -> None:
        runner = Tagger(tagger.options, Model(tmp, num_threads=tagger.options.threads))
        got, want, emb_diff = [], [], 0.0
        for path, fe in check_files:
            result = runner.tag_file(path)
            got.append(result.window_scores[:, first:])
            want.append(head.numpy(fe.embeddings))
            emb_diff = max(emb_diff, float(np.max(np.abs(result.window_embeddings - fe.embeddings))))
        check["embedding_max_abs_diff"] = emb_diff
        if not check_files:
            return
        g, h = np.concatenate(got).ravel().astype(np.float64), np.concatenate(want).ravel()
        corr = float(np.corrcoef(g, h)[0, 1]) if g.std() > 0 and h.std() > 0 else float(np.allclose(g, h, atol=1e-6))
        check.update(min_corr=corr, max_abs_diff=float(np.max(np.abs(g - h))))
        if corr < CHECK_MIN_CORR or check["max_abs_diff"] > CHECK_MAX_ABS_DIFF or emb_diff > EMBEDDING_MAX_ABS_DIFF:
            raise SoundtagError(f"the written model disagrees with the trained head on validation files (corr "
                                f"{corr:.6f}, max|dp| {check['max_abs_diff']:.2e}, embedding max|d| {emb_diff:.2e}); "
                                "not kept", str(model_file))

    atomic_write_bytes(model_file, data, verify)
    return check


def table_text(report: dict) -> str:
    """The per-class table of a run: files, validation AP, AUC, and F1 / precision / recall at the threshold."""
    def f(v, d=3):
        return "-" if v is None else f"{v:.{d}f}"

    lines = [f"{'class':<24} {'train':>5} {'val':>4} {'AP':>6} {'AUC':>6} {'F1':>6} {'prec':>6} {'recall':>6} {'thresh':>6}"]
    for r in report["classes"]:
        lines.append(f"{r['class'][:24]:<24} {r['train_files']:>5} {r['validation_files']:>4} {f(r['ap']):>6} "
                     f"{f(r['auc']):>6} {f(r['f1']):>6} {f(r['precision']):>6} {f(r['recall']):>6} {f(r['threshold']):>6}")
    t = report["training"]
    lines.append(f"{t['head']}, best epoch {t['best_epoch']} of {t['epochs']}; {t['files']['train']} + "
                 f"{t['files']['validation']} files; wrote {report['model']}")
    return "\n".join(lines) + "\n"
