"""`soundtag corpus`: tag an archive on Ray Data and write Parquet (extra ``[ray]``).

    paths --(Ray Data)--> actor pool: each actor loads one Tagger (LiteRT threads = its CPUs) and decodes
    and tags the files itself (no audio goes through the object store) --> write_parquet(DIR)

The rows have the schema of ``soundtag tag --output x.parquet`` (writers.parquet_schema). With
``resume`` the paths already tagged in DIR are skipped, error rows are removed so that their paths are
tried again, and files left unreadable by a killed run are removed (their paths are tagged again): each
input ends up in DIR exactly once. Local by default (``ray.init()`` on this machine); a cluster with
``address`` or $RAY_ADDRESS, where the model file must exist at the same path on every node.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from dataclasses import dataclass
from pathlib import Path

from .errors import OptionsError, OutputError
from .tagger import Tagger, TaggerOptions
from .writers import PathSet, text_path

log = logging.getLogger(__name__)

PATHS_PER_BATCH = 4  # files handed to an actor at a time (it prefetches the next file's audio while tagging)
PATH_COLUMN = "path"  # column of a Parquet or CSV input that lists the files


@dataclass
class CorpusCounts:
    tagged: int = 0
    failed: int = 0
    skipped: int = 0  # already in DIR (resume)
    removed_files: int = 0  # unreadable files of a killed run, removed on resume
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


def existing_rows(out_dir: Path) -> tuple[PathSet, int]:
    """Paths tagged in DIR; removes error rows (rewriting their files) and unreadable files.

    Returns (done paths, files removed)."""
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    done = PathSet()
    removed = 0
    for f in sorted(out_dir.glob("*.parquet")):
        try:
            table = pq.read_table(f)
        except Exception as exc:  # cut by a kill: its rows are tagged again
            log.warning("%s: unreadable (%s); removed, its inputs are tagged again", f, exc)
            f.unlink()
            removed += 1
            continue
        ok = pc.is_null(table["error"])
        if not pc.all(ok).as_py():
            kept = table.filter(ok)
            tmp = f.with_name(f".{f.name}.tmp")
            pq.write_table(kept, tmp)
            os.replace(tmp, f)
            table = kept
        done.update(table[PATH_COLUMN].to_pylist())
    return done, removed


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
    if out_dir.is_dir() and any(out_dir.glob("*.parquet")) and not resume:
        raise OutputError("already holds Parquet files; add --resume to continue that run, or choose an empty "
                          "folder", str(out_dir))
    out_dir.mkdir(parents=True, exist_ok=True)
    counts = CorpusCounts()
    done, counts.removed_files = existing_rows(out_dir) if resume else (PathSet(), 0)
    todo = [p for p in paths if p not in done]
    counts.skipped = len(paths) - len(todo)
    options = dataclasses.replace(options, num_threads=threads_per_actor, prefetch=True)
    init_ray(address)
    if todo:
        import ray.data

        ds = ray.data.from_items([{PATH_COLUMN: p} for p in todo],
                                 override_num_blocks=max(1, min(len(todo), 4 * actors)))
        ds = ds.map_batches(_TagActor, fn_constructor_kwargs={"options": options}, batch_size=PATHS_PER_BATCH,
                            batch_format="pyarrow", concurrency=actors, num_cpus=threads_per_actor)
        ds.write_parquet(str(out_dir))
    counts.failures = failures(out_dir, todo)
    counts.failed = len(counts.failures)
    counts.tagged = len(todo) - counts.failed
    return counts


def failures(out_dir: Path, paths: list[str]) -> list[tuple[str, str]]:
    """(path, error) of the error rows in DIR for these paths."""
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.dataset as pads

    table = pads.dataset(str(out_dir), format="parquet").to_table(columns=[PATH_COLUMN, "error"])
    wanted = pa.array([text_path(p) for p in paths], type=pa.string())
    bad = table.filter(pc.and_(pc.is_in(table[PATH_COLUMN], value_set=wanted), pc.is_valid(table["error"])))
    return list(zip(bad[PATH_COLUMN].to_pylist(), bad["error"].to_pylist()))
