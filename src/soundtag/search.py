"""`soundtag index` and `soundtag search` (issue #21): window embeddings of a collection in an on-disk
vector index, searched by example.

    index:  INPUTS --expand--> EmbeddingStore (embeddings.py: Parquet parts, the truth; only new files
            by sha256 run through the model) --> usearch HNSW index (windows.usearch, keys = global row
            numbers of the store's windows), extended by the new rows and saved atomically
    search: QUERY file (its windows, or the one at --at S) or --row N --> vectors --> HNSW (approximate)
            or brute force (--exact, numpy) --> score of an index window: the best over the query windows
            --> table / jsonl / csv; --clips DIR: each hit's segment of its source file as FLAC

Floor 6: the public API below it; usearch and pyarrow (extra [train]) are imported when a command runs.
"""

from __future__ import annotations

import argparse
import io
import json
import logging
import os
import re
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .commands import err, failed as command_failed, finite, positive_int
from .errors import EXIT_FAILED, EXIT_OK, OptionsError, SoundtagError
from .files import FileLock, atomic_write_bytes, create_beside, fsync_dir, remove_stale_temps
from .results import error_reason

log = logging.getLogger(__name__)

INSTALL_HINT = "pip install 'soundtag[train]'"
METRICS = ("cos", "ip")  # cosine similarity, inner product (usearch's names)
METRIC_NAMES = {"cos": "cos", "cosine": "cos", "ip": "ip", "dot": "ip"}  # what --metric takes
HNSW_FILE = "windows.usearch"  # the HNSW index in an index folder
HNSW_META = "index.json"  # its metric, rows and build parameters
LOCK_FILE = ".lock"  # one index run per folder
CONNECTIVITY = 16  # HNSW edges per node (usearch's default M)
EXPANSION_ADD = 128  # HNSW candidate list while building (efConstruction; usearch's default)
EXPANSION_SEARCH = 64  # HNSW candidate list while searching (ef; raised to --top when that is larger)
DEFAULT_TOP = 10  # hits answered
MAX_TOP = 10_000  # hits answered at most
FORMATS = ("table", "jsonl", "csv")
CSV_FIELDS = ("rank", "path", "start_s", "end_s", "score", "row")
SCORE_DIGITS = 6  # decimals of a score in jsonl / csv
TIME_DIGITS = 3  # decimals of a time in a clip's file name and in the table
CLIP_SUBTYPE = "PCM_24"  # FLAC sample format of --clips (a 16-bit source is kept exactly)
CLIP_MAX_CHANNELS = 8  # FLAC's limit; a source with more is downmixed
UNSAFE_NAME = re.compile(r"[^A-Za-z0-9._-]+")  # replaced by "_" in a clip's file name
TINY_NORM = 1e-30  # norm of an all-zero vector in a cosine (its similarity is 0, never NaN)


# --- the HNSW index -------------------------------------------------------------------------
def _usearch():
    try:
        from usearch.index import Index
    except ImportError:
        raise SoundtagError(f"index and search need usearch: {INSTALL_HINT}") from None
    return Index


@dataclass(frozen=True)
class HnswOptions:
    """How the HNSW index is built and searched (usearch's parameters)."""

    metric: str = "cos"  # "cos" or "ip"
    connectivity: int = CONNECTIVITY  # edges per node
    expansion_add: int = EXPANSION_ADD  # candidates while building
    expansion_search: int = EXPANSION_SEARCH  # candidates while searching

    def __post_init__(self) -> None:
        if self.metric not in METRICS:
            raise OptionsError(f"metric must be one of {', '.join(METRICS)}, got {self.metric!r}")
        for name in ("connectivity", "expansion_add", "expansion_search"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 2:
                raise OptionsError(f"{name} must be an integer >= 2, got {value!r}")


def new_hnsw(ndim: int, options: HnswOptions = HnswOptions()):
    Index = _usearch()
    return Index(ndim=ndim, metric=options.metric, dtype="f32", connectivity=options.connectivity,
                 expansion_add=options.expansion_add, expansion_search=options.expansion_search)


def read_hnsw_meta(folder) -> dict | None:
    try:
        meta = json.loads((Path(folder) / HNSW_META).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return meta if isinstance(meta, dict) and meta.get("metric") in METRICS else None


def load_hnsw(folder, ndim: int, metric: str, rows: int):
    """The saved HNSW index of a folder if it is usable for ``metric``: built with it, of ``ndim``, keys
    0..len-1 with len <= rows; else None."""
    meta = read_hnsw_meta(folder)
    path = Path(folder) / HNSW_FILE
    if meta is None or meta["metric"] != metric or not path.is_file():
        return None
    Index = _usearch()
    try:
        index = Index.restore(str(path))
    except Exception as exc:  # a broken file: rebuilt from the parts
        log.warning("%s: unreadable HNSW index (%s); rebuilding it", path, exc)
        return None
    if index is None or index.ndim != ndim or len(index) > rows or (len(index) and not index.contains(len(index) - 1)):
        return None
    return index


def save_hnsw(index, folder, options: HnswOptions) -> None:
    """Save to a temp name beside the target, then rename it over (readers see the old or the new index)."""
    target = Path(folder) / HNSW_FILE
    fd, tmp = create_beside(target)
    try:
        os.close(fd)
        index.save(str(tmp))
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, target)
        fsync_dir(folder)
    finally:
        if tmp.exists():
            tmp.unlink()
    meta = {"metric": options.metric, "rows": len(index), "connectivity": options.connectivity,
            "expansion_add": options.expansion_add, "expansion_search": options.expansion_search}
    atomic_write_bytes(Path(folder) / HNSW_META, (json.dumps(meta, indent=2) + "\n").encode())


def sync_hnsw(store, options: HnswOptions, threads: int = 0) -> tuple[int, int]:
    """Make the folder's HNSW index hold every row of the store: load it, add the rows it lacks (all of
    them when it is missing, of another metric or unusable), save it when anything was added.
    Returns (rows added, rows in the index)."""
    folder = store.directory
    rows = store.rows
    index = load_hnsw(folder, store.embedding_size, options.metric, rows)
    if index is None:
        index = new_hnsw(store.embedding_size, options)
    have = len(index)
    if have < rows or not (folder / HNSW_FILE).is_file():
        if have < rows:
            keys = np.arange(have, rows, dtype=np.uint64)
            index.add(keys, store.matrix()[have:rows], threads=threads)
        save_hnsw(index, folder, options)
    return rows - have, len(index)


# --- scoring --------------------------------------------------------------------------------
def exact_scores(vectors: np.ndarray, queries: np.ndarray, metric: str) -> np.ndarray:
    """Score of every row against each query: cosine similarity or inner product, [queries, rows]."""
    q = np.asarray(queries, dtype=np.float32)
    s = q @ vectors.T
    if metric == "cos":
        vn = np.maximum(np.sqrt(np.einsum("ij,ij->i", vectors, vectors)), TINY_NORM)  # no [rows, dim] temporary
        qn = np.maximum(np.linalg.norm(q, axis=1), TINY_NORM)
        s /= qn[:, None]
        s /= vn[None, :]
        np.clip(s, -1.0, 1.0, out=s)  # a vector against itself is 1 (ties then go by row), not 1 + rounding
    return s


def top_rows(rows: np.ndarray, scores: np.ndarray, top: int) -> list[tuple[int, float]]:
    """The best ``top`` (row, score), best first; ties by row."""
    order = np.lexsort((rows, -scores))[:top]
    return [(int(rows[i]), float(scores[i])) for i in order]


def search_exact(vectors: np.ndarray, queries: np.ndarray, top: int, metric: str) -> list[tuple[int, float]]:
    """Brute force: each row scored by its best query window."""
    if vectors.shape[0] == 0:
        return []
    best = exact_scores(vectors, queries, metric).max(axis=0)
    k = min(top, best.size)
    cand = np.argpartition(-best, k - 1)[:k] if k < best.size else np.arange(best.size)
    return top_rows(cand, best[cand], top)


def search_hnsw(index, queries: np.ndarray, top: int, threads: int = 0) -> list[tuple[int, float]]:
    """Approximate: the top hits of each query window, merged by row with the best score. (The exact
    top ``top`` of that best score are within the union of each window's exact top ``top``.)"""
    if len(index) == 0:
        return []
    index.expansion_search = max(index.expansion_search, top)
    matches = index.search(np.asarray(queries, dtype=np.float32), min(top, len(index)), threads=threads)
    keys = np.atleast_2d(matches.keys)
    dist = np.atleast_2d(matches.distances)
    counts = np.atleast_1d(getattr(matches, "counts", np.full(keys.shape[0], keys.shape[1])))
    best: dict[int, float] = {}
    for q in range(keys.shape[0]):
        for key, d in zip(keys[q, : counts[q]], dist[q, : counts[q]]):
            score = 1.0 - float(d)  # usearch: cos = 1 - cosine, ip = 1 - dot
            if score > best.get(int(key), -np.inf):
                best[int(key)] = score
    rows = np.fromiter(best, dtype=np.int64, count=len(best))
    return top_rows(rows, np.fromiter(best.values(), dtype=np.float64, count=len(best)), top)


# --- output ---------------------------------------------------------------------------------
def hit_records(store, hits: list[tuple[int, float]]) -> list[dict]:
    out = []
    for rank, (row, score) in enumerate(hits, 1):
        fe, w = store.locate(row)
        out.append({"rank": rank, "path": fe.path, "start_s": round(float(fe.starts_s[w]), 6),
                    "end_s": round(float(fe.ends_s[w]), 6), "score": round(score, SCORE_DIGITS), "row": row})
    return out


def format_hits(records: list[dict], fmt: str) -> str:
    from .writers import csv_cell, json_text

    if fmt == "jsonl":
        return "".join(json_text(r) + "\n" for r in records)
    if fmt == "csv":
        import csv

        buf = io.StringIO()
        w = csv.writer(buf, lineterminator="\n")
        w.writerow(CSV_FIELDS)
        for r in records:
            w.writerow([csv_cell(r[f]) for f in CSV_FIELDS])
        return buf.getvalue()
    lines = [f"{'rank':>4}  {'score':>8}  {'start_s':>10}  {'end_s':>10}  path"]
    lines += [f"{r['rank']:>4}  {r['score']:>8.4f}  {r['start_s']:>10.{TIME_DIGITS}f}  {r['end_s']:>10.{TIME_DIGITS}f}  "
              f"{r['path']}" for r in records]
    return "\n".join(lines) + "\n"


def read_segment(path: str, start_s: float, end_s: float) -> tuple[np.ndarray, int]:
    """[frames, channels] float32 of a file between two times, at its own sample rate: libsndfile
    (every channel), else FFmpeg through soundtag.audio (mono)."""
    import soundfile as sf

    from .audio import AudioStream

    try:
        f = sf.SoundFile(os.fsencode(path))
    except Exception:
        f = None
    if f is not None:
        with f:
            sr = f.samplerate
            a = max(0, round(start_s * sr))
            b = min(round(end_s * sr), f.frames) if f.frames > 0 else round(end_s * sr)
            f.seek(a)
            return f.read(max(0, b - a), dtype="float32", always_2d=True), sr
    probe = AudioStream(path)
    sr = probe.info.sample_rate
    probe.close()
    a, b = max(0, round(start_s * sr)), round(end_s * sr)
    blocks, seen = [], 0
    for block in AudioStream(path, sample_rate=sr):
        lo, hi = max(a - seen, 0), min(b - seen, block.size)
        if lo < hi:
            blocks.append(block[lo:hi])
        seen += block.size
        if seen >= b:
            break
    data = np.concatenate(blocks) if blocks else np.zeros(0, np.float32)
    return data[:, None], sr


def clip_name(rank: int, path: str, start_s: float, width: int) -> str:
    stem = UNSAFE_NAME.sub("_", Path(path).stem).strip("._") or "clip"
    return f"{rank:0{width}d}_{stem}_{start_s:.{TIME_DIGITS}f}.flac"


def write_clip(target: Path, path: str, start_s: float, end_s: float) -> Path:
    import soundfile as sf

    data, sr = read_segment(path, start_s, end_s)
    if data.shape[0] == 0:
        raise SoundtagError(f"no audio between {start_s:g} s and {end_s:g} s", path)
    if data.shape[1] > CLIP_MAX_CHANNELS:
        data = data.mean(axis=1, keepdims=True)
    buf = io.BytesIO()
    sf.write(buf, data, sr, format="FLAC", subtype=CLIP_SUBTYPE)
    return atomic_write_bytes(target, buf.getvalue())


# --- CLI ------------------------------------------------------------------------------------
def _metric(text: str) -> str:
    if text.lower() not in METRIC_NAMES:
        raise argparse.ArgumentTypeError(f"choose from cosine, dot (or cos, ip), not {text!r}")
    return METRIC_NAMES[text.lower()]


def add_parsers(sub) -> None:
    from .embeddings import PART_FILES
    from .spec import DEFAULT_WINDOW_S

    i = sub.add_parser("index", help="window embeddings of a collection into an on-disk vector index ([train])")
    i.add_argument("inputs", nargs="+", metavar="INPUT", help="audio files, folders (recursive) or @list.txt")
    i.add_argument("--output", "-o", required=True, metavar="INDEX",
                   help="the index folder: Parquet parts of window embeddings + an HNSW index (created, or extended "
                        "with the files not in it yet)")
    i.add_argument("--hop", type=finite("--hop"), default=DEFAULT_WINDOW_S, metavar="SECONDS",
                   help="seconds between windows (default 10)")
    i.add_argument("--model", help="fp32 or int8 .tflite with an embedding output (default: $SOUNDTAG_MODEL, then "
                   "the cache from 'soundtag fetch')")
    i.add_argument("--threads", type=positive_int("--threads"), help="LiteRT and index threads (default: per core)")
    i.add_argument("--metric", type=_metric, metavar="{cosine,dot}",
                   help="HNSW metric: cosine (default; or the index's) or dot (inner product); also cos / ip")
    i.add_argument("--part-files", type=positive_int("--part-files"), default=PART_FILES, metavar="N",
                   help=f"new files per Parquet part: a killed run loses at most these (default {PART_FILES})")

    s = sub.add_parser("search", help="search an index by example: an audio file, one window of it, or a row ([train])")
    s.add_argument("query", nargs="?", metavar="QUERY", help="audio file: its windows, embedded with the index's "
                   "model and hop (an index window scores its best match over them)")
    s.add_argument("--index", required=True, metavar="INDEX", help="an index folder of 'soundtag index'")
    s.add_argument("--row", type=int, metavar="N", help="query with row N of the index instead of a file")
    s.add_argument("--at", type=finite("--at"), metavar="SECONDS", help="only the query window holding this time")
    s.add_argument("--top", type=int, default=DEFAULT_TOP, metavar="K", help=f"hits (default {DEFAULT_TOP})")
    s.add_argument("--metric", type=_metric, metavar="{cosine,dot}",
                   help="score: the index's metric (default) or the other (brute force); also cos / ip")
    s.add_argument("--exact", action="store_true", help="brute force over every stored vector (no HNSW)")
    s.add_argument("--format", choices=FORMATS, default="table", help="stdout format (default table)")
    s.add_argument("--clips", metavar="DIR", help="write each hit's segment as DIR/NN_<stem>_<start>.flac")
    s.add_argument("--model", help="the index's model at another path (default: where it was when indexed)")
    s.add_argument("--threads", type=positive_int("--threads"), help="LiteRT and search threads")


def main_index(args) -> int:
    """Run `soundtag index`: 0 all inputs indexed, 1 some failed (or the run), 2 usage error."""
    from .batch import expand_inputs
    from .embeddings import EmbeddingStore, model_key
    from .tagger import Tagger, TaggerOptions

    out = Path(args.output)
    try:
        options = TaggerOptions(model_path=args.model, embeddings=True, hop_s=args.hop, num_threads=args.threads)
        if out.exists() and not out.is_dir():
            raise OptionsError("--output exists and is not a folder; give an index folder", str(out))
        previous = read_hnsw_meta(out) if out.is_dir() else None
        hnsw = HnswOptions(metric=args.metric or (previous or {}).get("metric", "cos"))
        _usearch()
        inputs = list(expand_inputs(args.inputs))
    except SoundtagError as exc:
        return command_failed(exc, "index")
    lock = None
    failed = 0
    try:
        tagger = Tagger(options)
        out.mkdir(parents=True, exist_ok=True)
        lock = FileLock(out / LOCK_FILE, str(out))
        store = EmbeddingStore(out, model_key(tagger.model.path, options.hop_s), tagger.spec.embedding_size,
                               hop_s=options.hop_s, model_path=str(tagger.model.path))
        for name in (HNSW_FILE, HNSW_META):  # temp files of a killed run (we hold the lock)
            remove_stale_temps(out / name)
        store.remove_stale_temps()
        before = len(store)
        for path, error in inputs:
            if error is not None:
                err(f"{path}: {error}")
                failed += 1
        paths = [p for p, e in inputs if e is None]
        ok = 0
        for path, fe, exc in store.embed(tagger, paths, progress=True, part_files=args.part_files):
            if exc is not None:
                err(f"{path}: {error_reason(exc)}")
                failed += 1
            else:
                ok += 1
        added, total = sync_hnsw(store, hnsw, threads=args.threads or 0)
    except (Exception, KeyboardInterrupt) as exc:
        return command_failed(exc, "index", "interrupted (finished parts are kept; run the same command again to go on)")
    finally:
        if lock is not None:
            lock.release()
    print(f"{out}: {len(store)} files, {store.rows} windows ({len(store) - before} new files, {added} new windows; "
          f"{ok} inputs ok, {failed} failed)", flush=True)
    return EXIT_FAILED if failed else EXIT_OK


def _query_vectors(args, store) -> np.ndarray:
    """[windows, D] of the query: a row, or the query file's windows (stored ones when its bytes are in
    the index, else embedded with the index's model and hop), or the one holding --at."""
    from .embeddings import DIGEST, model_key
    from .files import file_digest

    if args.row is not None:
        if not 0 <= args.row < store.rows:
            raise OptionsError(f"--row {args.row} is out of range: the index has rows 0 to {store.rows - 1}",
                               str(store.directory))
        fe, w = store.locate(args.row)
        return fe.embeddings[w : w + 1]
    path = args.query
    try:
        digest = file_digest(path, DIGEST)
    except OSError as exc:
        raise SoundtagError(f"cannot read the query ({exc.strerror or exc})", path) from None
    fe = store.get(digest)
    if fe is not None:
        starts, ends, emb, duration = fe.starts_s, fe.ends_s, fe.embeddings, fe.duration_s
    else:
        from .tagger import Tagger, TaggerOptions

        model = args.model or store.model_path
        if model is None or store.hop_s is None:
            raise SoundtagError("the index does not say which model and hop made it; query with --row",
                                str(store.directory))
        if not os.path.isfile(model):
            raise SoundtagError(f"the index's model is gone ({model}); give it with --model", str(store.directory))
        if model_key(model, store.hop_s) != store.key:
            err = OptionsError if args.model else SoundtagError
            raise err(f"{model} is not the model that built the index (its bytes differ)", str(store.directory))
        tagger = Tagger(TaggerOptions(model_path=model, embeddings=True, hop_s=store.hop_s,
                                      num_threads=args.threads))
        result = tagger.tag_file(path)
        starts = np.asarray(result.window_starts_s, dtype=np.float64)
        duration = float(result.duration_s)
        ends = np.minimum(starts + float(tagger.spec.window_s), duration)
        emb = np.asarray(result.window_embeddings, dtype=np.float32)
    if args.at is None:
        return emb
    holding = np.flatnonzero((starts <= args.at) & (args.at < ends))
    if args.at < 0 or holding.size == 0:
        raise OptionsError(f"--at {args.at:g} s is beyond the query (it lasts {duration:.3f} s)", path)
    return emb[holding[-1] : holding[-1] + 1]


def main_search(args) -> int:
    """Run `soundtag search`: 0 answered, 1 the index or query failed (or a clip), 2 usage error."""
    from .embeddings import STORE_FILE, EmbeddingStore

    try:
        if not 1 <= args.top <= MAX_TOP:
            raise OptionsError(f"--top must be between 1 and {MAX_TOP}, got {args.top}")
        if (args.query is None) == (args.row is None):
            raise OptionsError("give a QUERY audio file or --row N (one of them)")
        if args.at is not None and args.query is None:
            raise OptionsError("--at needs a QUERY audio file")
        if not (Path(args.index) / STORE_FILE).is_file():
            raise SoundtagError(f"no such index (no {STORE_FILE}; build one with 'soundtag index')", args.index)
        _usearch()
    except SoundtagError as exc:
        return command_failed(exc, "search")
    try:
        try:
            store = EmbeddingStore.open(args.index)
        except OptionsError as exc:  # a broken index is an input that failed, not a usage error
            raise SoundtagError(exc.reason, exc.path) from None
        queries = _query_vectors(args, store)
        built = read_hnsw_meta(store.directory)
        metric = args.metric or (built or {}).get("metric", "cos")
        index = None
        if not args.exact and built is not None and built["metric"] == metric:
            index = load_hnsw(store.directory, store.embedding_size, metric, store.rows)
            if index is not None and len(index) < store.rows:
                err(f"{args.index}: the HNSW index has {len(index)} of {store.rows} rows; searching exactly "
                     "(run 'soundtag index' again to extend it)")
                index = None
        if index is not None:
            hits = search_hnsw(index, queries, args.top, threads=args.threads or 0)
        else:
            hits = search_exact(store.matrix(), queries, args.top, metric)
        records = hit_records(store, hits)
    except (Exception, KeyboardInterrupt) as exc:
        return command_failed(exc, "search")
    sys.stdout.write(format_hits(records, args.format))
    sys.stdout.flush()
    return _write_clips(args.clips, records) if args.clips else EXIT_OK


def _write_clips(folder: str, records: list[dict]) -> int:
    try:
        os.makedirs(folder, exist_ok=True)
    except OSError as exc:
        err(f"{folder}: cannot create the clips folder ({exc.strerror or exc})")
        return EXIT_FAILED
    width = max(2, len(str(len(records))))
    failed = 0
    for r in records:
        try:
            write_clip(Path(folder) / clip_name(r["rank"], r["path"], r["start_s"], width), r["path"], r["start_s"],
                       r["end_s"])
        except Exception as exc:
            err(f"{r['path']}: cannot write its clip ({error_reason(exc)})")
            failed += 1
    return EXIT_FAILED if failed else EXIT_OK
