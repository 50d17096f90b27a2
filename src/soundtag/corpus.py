"""`soundtag corpus`: tag an archive on Ray Data and write Parquet (extra ``[ray]``).

    paths --(Ray Data)--> actor pool: each actor loads one Tagger (LiteRT threads = its CPUs) and decodes
    and tags the files itself (no audio goes through the object store) --> write_parquet(DIR)

The rows have the schema of ``soundtag tag --output x.parquet`` (writers.parquet_schema). DIR is soundtag's:

- ``DIR/_soundtag_corpus.lock`` is held (flock) for the whole run: a second run on DIR is refused.
- ``DIR/_soundtag_corpus.json``, the manifest, holds the model's sha256, the options that shape the rows
  and the id of every run that wrote into DIR; each run's files are named ``<run id>_*.parquet``. Only
  those files are ever read, rewritten or moved; a folder with Parquet files but no manifest, a Parquet
  file no run wrote, or a manifest of another model or other options is refused with one line.
- With ``resume`` the paths already tagged in DIR are skipped; error rows are removed (the file is
  written anew beside itself and renamed over it) so that their paths are tried again; a file a killed
  run left unreadable is moved to ``DIR/_unreadable/`` (never deleted) and its paths are tagged again;
  a file that cannot be read for another cause (permissions, an I/O error) stops the run, changing
  nothing. Each input ends up in DIR exactly once.

Names starting with ``_`` are skipped by the readers of a Parquet folder (pyarrow, pandas, Ray, Spark).
Local by default (``ray.init()`` on this machine); a cluster with ``address`` or $RAY_ADDRESS, where the
model file must exist at the same path on every node (and on this one: its sha256 goes in the manifest).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import secrets
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from . import __version__
from .errors import OptionsError, OutputError
from .files import FileLock, atomic_write_bytes, create_beside, file_digest, fsync_dir, remove_stale_temps
from .paths import resolve_model_path
from .tagger import Tagger, TaggerOptions
from .writers import PathSet, text_path

log = logging.getLogger(__name__)

PATHS_PER_BATCH = 4  # files handed to an actor at a time (it prefetches the next file's audio while tagging)
PATH_COLUMN = "path"  # column of a Parquet or CSV input that lists the files
MANIFEST_FILE = "_soundtag_corpus.json"  # DIR's manifest: model sha256, options, the runs that wrote DIR
LOCK_FILE = "_soundtag_corpus.lock"  # held (flock) by the run writing DIR
ASIDE_DIR = "_unreadable"  # where resume moves the files a killed run left unreadable
MANIFEST_FORMAT = 1  # version of the manifest's layout
RUN_PREFIX = "soundtag-"  # a run id: this and RUN_ID_BYTES random bytes in hex; its files: "<run id>_*.parquet"
RUN_ID_BYTES = 8
RESULT_OPTIONS = ("top_k", "threshold", "thresholds", "hop_s", "aggregate", "allow", "deny", "embeddings")  # shape
# the rows: a resume must use the same. How the model runs (threads, accelerator) and --max-duration do not.


@dataclass
class CorpusCounts:
    tagged: int = 0
    failed: int = 0
    skipped: int = 0  # already in DIR (resume)
    moved_aside: int = 0  # files a killed run left unreadable, moved to DIR/_unreadable (resume)
    failures: list = dataclasses.field(default_factory=list)  # (path, error)


def read_path_table(path: str) -> list[str]:
    """The `path` column of a Parquet or CSV file."""
    if path.lower().endswith(".parquet"):
        import pyarrow.parquet as pq

        table = pq.read_table(path)
        if PATH_COLUMN not in table.column_names:
            raise OptionsError(f"no {PATH_COLUMN!r} column (columns: {', '.join(table.column_names)})", path)
        return [str(p) for p in table[PATH_COLUMN].to_pylist() if p]
    import csv

    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        if PATH_COLUMN not in (reader.fieldnames or []):
            raise OptionsError(f"no {PATH_COLUMN!r} column in the CSV header", path)
        return [row[PATH_COLUMN] for row in reader if row[PATH_COLUMN]]


class _TagActor:
    """A Ray Data actor: one Tagger (one model load) per actor, for every batch it gets."""

    def __init__(self, options: TaggerOptions, scores: bool = True) -> None:
        self.tagger = Tagger(options)
        self.scores = scores

    def __call__(self, batch):
        from .results import error_record
        from .writers import parquet_table

        paths = [str(p) for p in batch[PATH_COLUMN].to_pylist()]
        records = [error_record(path, error) if error is not None else result.to_record(scores=True)
                   for path, result, error in self.tagger.tag_files(paths)]
        return parquet_table(records)


# --- the output folder ---------------------------------------------------------------------------
def folder_identity(options: TaggerOptions) -> dict:
    """What makes two runs' rows the same kind of rows: the model file's sha256 and the result options."""
    model, _ = resolve_model_path(options.model_path)
    try:
        sha256 = file_digest(model, "sha256")
    except OSError as exc:
        raise OptionsError(f"cannot read the model ({exc.strerror or exc})", str(model)) from None
    chosen = {name: getattr(options, name) for name in RESULT_OPTIONS}
    chosen = json.loads(json.dumps(chosen, default=lambda v: dict(v) if isinstance(v, Mapping) else list(v)))
    return {"model_sha256": sha256, "model_file": model.name, "options": chosen}  # as the manifest holds them


def read_manifest(out_dir: Path) -> dict | None:
    """DIR's manifest, or None where it has none."""
    path = out_dir / MANIFEST_FILE
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError) as exc:
        raise OutputError(f"cannot read it ({getattr(exc, 'strerror', None) or exc})", str(path)) from None
    try:
        manifest = json.loads(text)
    except ValueError:
        manifest = None
    if not (isinstance(manifest, dict) and manifest.get("format") == MANIFEST_FORMAT
            and isinstance(manifest.get("runs"), list) and isinstance(manifest.get("model_sha256"), str)):
        raise OutputError("is not a soundtag corpus manifest (or is damaged); move the folder away or choose "
                          "another --output", str(path))
    return manifest


def write_manifest(out_dir: Path, manifest: dict) -> None:
    atomic_write_bytes(out_dir / MANIFEST_FILE, (json.dumps(manifest, indent=2) + "\n").encode())


def run_of(name: str) -> str | None:
    """The run id a Parquet file's name carries (None: not a name a run gives)."""
    run, sep, _ = name.partition("_")
    return run if sep and run.startswith(RUN_PREFIX) and name.endswith(".parquet") else None


def check_folder(out_dir: Path, identity: dict, resume: bool) -> tuple[dict, list[Path]]:
    """(manifest to continue, DIR's Parquet files written by its runs), or OutputError (one line) for a
    folder that is not soundtag corpus's, was made by another model or other options, or holds files of
    an earlier run without ``resume``."""
    parquets = sorted(p for p in out_dir.glob("*.parquet") if not p.name.startswith((".", "_")))
    manifest = read_manifest(out_dir)
    if manifest is None:
        if parquets:
            raise OutputError(f"holds Parquet files that soundtag corpus did not write ({parquets[0].name}; no "
                              f"{MANIFEST_FILE}); choose another folder", str(out_dir))
        return {"format": MANIFEST_FORMAT, "soundtag": __version__, **identity, "runs": []}, []
    if parquets and not resume:
        raise OutputError("already holds Parquet files; add --resume to continue that run, or choose an empty "
                          "folder", str(out_dir))
    if not parquets:  # nothing kept: a fresh start under the options of now
        return {"format": MANIFEST_FORMAT, "soundtag": __version__, **identity, "runs": manifest["runs"]}, []
    foreign = [p for p in parquets if run_of(p.name) not in manifest["runs"]]
    if foreign:
        raise OutputError(f"was not written by soundtag corpus into this folder (no run in {MANIFEST_FILE} "
                          "made it); move it away to resume", str(foreign[0]))
    if manifest["model_sha256"] != identity["model_sha256"]:
        raise OutputError(f"was tagged with another model ({manifest.get('model_file')}, sha256 "
                          f"{manifest['model_sha256'][:12]}; now {identity['model_file']}, sha256 "
                          f"{identity['model_sha256'][:12]}); resume with that model or choose another folder",
                          str(out_dir))
    then = manifest.get("options", {})
    changed = [f"{k} {then.get(k)!r} (now {v!r})" for k, v in identity["options"].items() if then.get(k) != v]
    if changed:
        raise OutputError(f"was tagged with other options: {', '.join(changed)}; resume with those or choose "
                          "another folder", str(out_dir))
    return manifest, parquets


def existing_rows(out_dir: Path, files: list[Path]) -> tuple[PathSet, int]:
    """Paths tagged in DIR's files of its own runs, after removing their error rows (each such file is
    written anew beside itself and renamed over it) and moving the unreadable ones to DIR/_unreadable.

    Every file is read before any is changed: one that cannot be read for a cause other than its content
    (permissions, an I/O error) is an OutputError, and nothing has changed. Returns (done paths, moved)."""
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    readable, unreadable = [], []
    for f in files:
        try:
            with open(f, "rb") as fh:  # OS errors keep their errno through a Python file; pyarrow's have none
                table = pq.read_table(fh, columns=[PATH_COLUMN, "error"])
        except OSError as exc:
            if exc.errno is None:  # pyarrow: its content does not parse
                unreadable.append((f, exc))
                continue
            raise OutputError(f"cannot read it ({exc.strerror or exc}); fix that and rerun with --resume "
                              "(nothing was changed)", str(f)) from None
        except Exception as exc:  # noqa: BLE001 - pyarrow's ArrowInvalid and kin: cut by a kill, or not Parquet
            unreadable.append((f, exc))
            continue
        readable.append((f, table))
    for f, exc in unreadable:
        try:
            where = move_aside(f, out_dir / ASIDE_DIR)
        except OSError as err:
            raise OutputError(f"unreadable ({' '.join(str(exc).split())[:200]}) and cannot be moved to {ASIDE_DIR}/ "
                              f"({err.strerror or err}); move it away and rerun with --resume", str(f)) from None
        log.warning("%s: unreadable (%s); moved to %s, its inputs are tagged again", f,
                    " ".join(str(exc).split())[:200], where)
    done = PathSet()
    for f, table in readable:
        ok = pc.is_null(table["error"])
        if not pc.all(ok).as_py():
            try:
                _drop_error_rows(f)
            except OSError as err:
                raise OutputError(f"cannot write it anew without its error rows ({err.strerror or err}); it is "
                                  "unchanged, rerun with --resume", str(f)) from None
            table = table.filter(ok)
        done.update(table[PATH_COLUMN].to_pylist())
    return done, len(unreadable)


def move_aside(path: Path, aside: Path) -> Path:
    """Move a file into the folder ``aside`` (same file system) under a name nothing there has."""
    aside.mkdir(exist_ok=True)
    target, n = aside / path.name, 1
    while target.exists() or target.is_symlink():
        target, n = aside / f"{path.name}.{n}", n + 1
    os.rename(path, target)
    fsync_dir(aside)
    fsync_dir(path.parent)
    return target


def _drop_error_rows(path: Path) -> None:
    """Rewrite a Parquet file without its error rows: a new file beside it, synced, renamed over it."""
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    with open(path, "rb") as fh:
        table = pq.read_table(fh)
    fd, tmp = create_beside(path)
    try:
        with os.fdopen(fd, "wb") as sink:
            pq.write_table(table.filter(pc.is_null(table["error"])), sink)
            sink.flush()
            os.fsync(sink.fileno())
        os.replace(tmp, path)
        fsync_dir(path.parent)
    finally:
        tmp.unlink(missing_ok=True)


LOOPBACK_ENV = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"  # "0": a local Ray keeps all its traffic on 127.0.0.1


def init_ray(address: str | None = None, num_cpus: int | None = None) -> None:
    """Connect to the cluster at address ($RAY_ADDRESS), or start a local Ray on this machine.

    A local Ray would otherwise register this machine's network address and talk to itself through it;
    Ray's own switch for single-machine use keeps it on the loopback (ray-project/ray#18730); Ray reads
    it when it is first imported, so this runs before any import of ray in this process."""
    address = _local_on_loopback(address)
    import ray

    logging.getLogger("ray.data").setLevel(logging.WARNING)  # progress bars stay; per-operator INFO lines go
    if ray.is_initialized():
        return
    if address:
        _check_reachable(address)
    try:
        ray.init(address=address, include_dashboard=False, logging_level=logging.WARNING,
                 **({} if address else {"num_cpus": num_cpus or os.cpu_count()}))
    except Exception as exc:  # no cluster there, wrong token, version mismatch
        raise OptionsError(f"cannot {'connect to Ray at ' + address if address else 'start a local Ray'} "
                           f"({type(exc).__name__}: {' '.join(str(exc).split())[:300]})") from None


def _local_on_loopback(address: str | None) -> str | None:
    """The cluster address to use (argument, else $RAY_ADDRESS); for a local Ray, the loopback switch."""
    address = address or os.environ.get("RAY_ADDRESS")
    if not address:
        os.environ.setdefault(LOOPBACK_ENV, "0")
    return address


def _check_reachable(address: str, timeout_s: float = 5.0) -> None:
    """Fail fast on a host:port nobody listens on (ray.init would retry for minutes)."""
    import socket

    host, _, port = address.removeprefix("ray://").rpartition(":")
    if not host or not port.isdigit() or address == "auto":
        return  # "auto" and other forms: left to Ray
    try:
        socket.create_connection((host, int(port)), timeout=timeout_s).close()
    except OSError as exc:
        raise OptionsError(f"cannot connect to Ray at {address} ({exc.strerror or exc})") from None


def run_corpus(
    paths: list[str],
    out_dir: str | Path,
    options: TaggerOptions,
    actors: int = 1,
    threads_per_actor: int = 1,
    address: str | None = None,
    resume: bool = False,
) -> CorpusCounts:
    """Tag paths on a Ray cluster (local by default) into Parquet files under out_dir."""
    _local_on_loopback(address)  # before the first import of ray
    try:
        import ray
        import ray.data  # noqa: F401
    except ImportError as exc:
        raise OptionsError(f"corpus needs Ray Data: pip install 'soundtag[ray]' ({exc})") from None
    if actors < 1 or threads_per_actor < 1:
        raise OptionsError(f"--actors and --threads-per-actor must be >= 1, got {actors} and {threads_per_actor}")
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise OutputError("is not a folder; corpus --output names a folder of Parquet files", str(out_dir))
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OutputError(f"cannot create the folder ({exc.strerror or exc})", str(out_dir)) from None
    identity = folder_identity(options)
    lock = FileLock(out_dir / LOCK_FILE, str(out_dir))
    try:
        return _run_locked(paths, out_dir, identity, options, actors, threads_per_actor, address, resume)
    finally:
        lock.release()


def _run_locked(paths, out_dir: Path, identity: dict, options: TaggerOptions, actors: int, threads_per_actor: int,
                address: str | None, resume: bool) -> CorpusCounts:
    manifest, kept = check_folder(out_dir, identity, resume)
    for target in (out_dir / MANIFEST_FILE, *kept):  # temp files of a killed run (we hold the lock)
        remove_stale_temps(target)
    counts = CorpusCounts()
    done, counts.moved_aside = existing_rows(out_dir, kept) if kept else (PathSet(), 0)
    todo = [p for p in paths if p not in done]
    counts.skipped = len(paths) - len(todo)
    options = dataclasses.replace(options, num_threads=threads_per_actor, prefetch=True)
    run_id = f"{RUN_PREFIX}{secrets.token_hex(RUN_ID_BYTES)}"
    manifest["runs"] = [*manifest["runs"], run_id]
    write_manifest(out_dir, manifest)  # before any file of this run exists: a kill leaves only files it names
    init_ray(address)
    if todo:
        import ray.data
        from ray.data.datasource import FilenameProvider

        ds = ray.data.from_items([{PATH_COLUMN: p} for p in todo],
                                 override_num_blocks=max(1, min(len(todo), 4 * actors)))
        ds = ds.map_batches(_TagActor, fn_constructor_kwargs={"options": options}, batch_size=PATHS_PER_BATCH,
                            batch_format="pyarrow", concurrency=actors, num_cpus=threads_per_actor)
        ds.write_parquet(str(out_dir), filename_provider=FilenameProvider(dataset_uuid=run_id, file_format="parquet"))
    counts.failures = failures([p for p in out_dir.glob(f"{run_id}_*.parquet")], todo)
    counts.failed = len(counts.failures)
    counts.tagged = len(todo) - counts.failed
    return counts


def failures(files: list[Path], paths: list[str]) -> list[tuple[str, str]]:
    """(path, error) of the error rows in these Parquet files for these paths."""
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.dataset as pads

    if not files:
        return []
    table = pads.dataset([str(f) for f in files], format="parquet").to_table(columns=[PATH_COLUMN, "error"])
    wanted = pa.array([text_path(p) for p in paths], type=pa.string())
    bad = table.filter(pc.and_(pc.is_in(table[PATH_COLUMN], value_set=wanted), pc.is_valid(table["error"])))
    return list(zip(bad[PATH_COLUMN].to_pylist(), bad["error"].to_pylist()))
