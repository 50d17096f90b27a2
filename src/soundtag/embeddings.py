"""Window embeddings of audio files, kept on disk by content: a folder of Parquet parts keyed by the sha256
of each file's bytes, so a file already embedded (under any name) never runs through the model again.

    files --sha256--> known? the stored rows : Tagger(embeddings=True).tag_files --> rows
      --every part_files new files--> part-00000.parquet, part-00001.parquet, ... (each written atomically)

One row per window: digest, path, duration_s, start_s, end_s, window, embedding (fixed_size_list<float32>[D]);
``store.json`` holds what the vectors depend on (model_key: the model file's bytes and the hop), the
embedding size and, for the record, the hop and the model path. A killed run keeps every finished part;
a rerun embeds only the files not in them. The global row number of a window (parts in order, rows in
order) is stable: new files only ever add rows at the end (``soundtag index`` keys its HNSW index so).

Floor 5: used by search.py and train.py; pyarrow is imported when a store is opened.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import re
import sys
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from .errors import OptionsError, SoundtagError
from .files import atomic_write_bytes, file_digest

log = logging.getLogger(__name__)

STORE_FILE = "store.json"  # the store's key, embedding size, hop, model
STORE_FORMAT = 1  # version of the folder's layout
PART_NAME = "part-{:05d}.parquet"  # the n-th part
PART_PATTERN = re.compile(r"part-(\d{5,})\.parquet")
PART_FILES = 64  # new files per part: what a killed run can lose at most
DIGEST = "sha256"  # of a file's bytes: its identity in the store
INSTALL_HINT = "pip install 'soundtag[train]'"
COLUMNS = ("digest", "path", "duration_s", "start_s", "end_s", "window", "embedding")


class StoreError(OptionsError):
    """A folder that is not an embedding store of this model and hop (another key, another size, a broken
    store.json): a usage error, refused before any work."""


@dataclass(frozen=True)
class FileEmbeddings:
    """The window embeddings of one file."""

    path: str  # as given
    digest: str  # sha256 hex of the file's bytes
    duration_s: float  # decoded duration at the source rate
    starts_s: np.ndarray  # [windows] float64
    ends_s: np.ndarray  # [windows] float64: min(start + window_s, duration)
    embeddings: np.ndarray  # [windows, D] float32: Tagger.tag_file(...).window_embeddings

    @property
    def windows(self) -> int:
        return int(self.starts_s.size)


def model_key(model_path, hop_s) -> str:
    """What the vectors depend on, as one sha256 hex: the model file's bytes and the hop (s)."""
    h = hashlib.sha256()
    h.update(file_digest(model_path, DIGEST).encode("ascii"))
    h.update(f"\nhop_s={float(hop_s)!r}".encode("ascii"))
    return h.hexdigest()


def _pyarrow():
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:  # pragma: no cover - a core dependency of [train]
        raise SoundtagError(f"the embedding store needs pyarrow: {INSTALL_HINT}") from None
    return pa, pq


def read_meta(directory) -> dict:
    """store.json of a store folder; StoreError (one line naming the file) when it is missing or broken."""
    path = Path(directory) / STORE_FILE
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise StoreError(f"not an embedding store (no {STORE_FILE})", str(directory)) from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise StoreError(f"unreadable store file ({getattr(exc, 'strerror', None) or exc})", str(path)) from None
    if not (isinstance(meta, dict) and isinstance(meta.get("key"), str) and isinstance(meta.get("embedding_size"), int)):
        raise StoreError("not a soundtag store file (no key and embedding_size)", str(path))
    return meta


class EmbeddingStore:
    """A folder of Parquet parts (part-00000.parquet, ...), one row per window: digest, path, duration_s,
    start_s, end_s, window (int), embedding (fixed_size_list<float32>[D]); plus store.json with the model
    key, embedding size, hop. Written part by part atomically, so a killed run keeps every finished part.

    ``hop_s`` and ``model_path`` are recorded in a new store.json (how to embed a query like the rows);
    a folder whose store.json has another key or embedding size is refused (StoreError)."""

    def __init__(self, directory, key: str, embedding_size: int, hop_s: float | None = None,
                 model_path: str | None = None) -> None:
        if isinstance(embedding_size, bool) or not isinstance(embedding_size, int) or embedding_size < 1:
            raise OptionsError(f"embedding_size must be a positive integer, got {embedding_size!r}")
        self.directory = Path(directory)
        self.key = str(key)
        self.embedding_size = embedding_size
        if self.directory.exists() and not self.directory.is_dir():
            raise StoreError("exists and is not a folder", str(self.directory))
        if (self.directory / STORE_FILE).exists():
            self.meta = read_meta(self.directory)
            if self.meta["key"] != self.key:
                raise StoreError(f"made with another model or hop (hop {self.meta.get('hop_s')} s, model "
                                 f"{self.meta.get('model_path')}); choose another folder", str(self.directory))
            if self.meta["embedding_size"] != embedding_size:
                raise StoreError(f"holds {self.meta['embedding_size']}-d embeddings, not {embedding_size}-d",
                                 str(self.directory))
        else:
            self.meta = {"format": STORE_FORMAT, "key": self.key, "embedding_size": embedding_size,
                         "hop_s": None if hop_s is None else float(hop_s),
                         "model_path": None if model_path is None else os.path.abspath(model_path)}
            try:
                self.directory.mkdir(parents=True, exist_ok=True)
                atomic_write_bytes(self.directory / STORE_FILE, (json.dumps(self.meta, indent=2) + "\n").encode())
            except OSError as exc:
                raise StoreError(f"cannot create the store ({exc.strerror or exc})", str(self.directory)) from None
        self._files: dict[str, FileEmbeddings] = {}  # by digest, in the order added
        self._offsets: dict[str, int] = {}  # digest -> global row of its first window
        self._rows = 0
        self._pending: list[FileEmbeddings] = []  # added, not yet in a part
        self._parts = 0  # number of the next part
        self._matrix: np.ndarray | None = None
        self._load()

    @classmethod
    def open(cls, directory) -> EmbeddingStore:
        """An existing store, whatever its key (a search: the store says which model and hop made it)."""
        meta = read_meta(directory)
        return cls(directory, meta["key"], meta["embedding_size"])

    # --- reading ---------------------------------------------------------------------------
    def _part_paths(self) -> list[tuple[int, Path]]:
        found = []
        for entry in os.scandir(self.directory):
            m = PART_PATTERN.fullmatch(entry.name)
            if m and entry.is_file():
                found.append((int(m.group(1)), Path(entry.path)))
        return sorted(found)

    def _load(self) -> None:
        parts = self._part_paths()
        if not parts:
            return
        pa, pq = _pyarrow()
        for number, path in parts:
            try:
                table = pq.read_table(path, columns=list(COLUMNS))
            except Exception as exc:
                raise StoreError(f"unreadable part ({exc}); remove it to embed its files again", str(path)) from None
            emb = table.column("embedding").combine_chunks()
            if emb.type.list_size != self.embedding_size:
                raise StoreError(f"holds {emb.type.list_size}-d embeddings, not {self.embedding_size}-d", str(path))
            vectors = emb.values.to_numpy(zero_copy_only=False).astype(np.float32, copy=False)
            vectors = vectors.reshape(-1, self.embedding_size)
            cols = {c: table.column(c).to_numpy(zero_copy_only=False) for c in COLUMNS if c != "embedding"}
            digests = cols["digest"]
            bounds = np.flatnonzero(digests[1:] != digests[:-1]) + 1 if digests.size else np.zeros(0, int)
            for lo, hi in zip(np.r_[0, bounds], np.r_[bounds, digests.size]):
                lo, hi = int(lo), int(hi)
                fe = FileEmbeddings(path=str(cols["path"][lo]), digest=str(digests[lo]),
                                    duration_s=float(cols["duration_s"][lo]),
                                    starts_s=cols["start_s"][lo:hi].astype(np.float64),
                                    ends_s=cols["end_s"][lo:hi].astype(np.float64),
                                    embeddings=vectors[lo:hi])
                self._remember(fe)
            self._parts = number + 1

    def _remember(self, fe: FileEmbeddings) -> None:
        self._files[fe.digest] = fe
        self._offsets[fe.digest] = self._rows
        self._rows += fe.windows
        self._matrix = None

    def __contains__(self, digest) -> bool:
        return digest in self._files

    def __len__(self) -> int:
        """Files in the store (written or pending)."""
        return len(self._files)

    def get(self, digest) -> FileEmbeddings | None:
        return self._files.get(digest)

    def files(self) -> list[FileEmbeddings]:
        """Every stored file, in the order added."""
        return list(self._files.values())

    @property
    def rows(self) -> int:
        """Windows in the store (written or pending): global row numbers are 0..rows-1."""
        return self._rows

    @property
    def written_rows(self) -> int:
        """Windows in the parts on disk (the pending ones not counted)."""
        return self._rows - sum(fe.windows for fe in self._pending)

    @property
    def hop_s(self) -> float | None:
        return self.meta.get("hop_s")

    @property
    def model_path(self) -> str | None:
        return self.meta.get("model_path")

    def offset(self, digest: str) -> int:
        """The global row of the first window of a stored file."""
        return self._offsets[digest]

    def matrix(self) -> np.ndarray:
        """All window embeddings, [rows, D] float32, in global row order (built once per change)."""
        if self._matrix is None:
            parts = [fe.embeddings for fe in self._files.values()]
            self._matrix = (np.concatenate(parts) if parts else np.zeros((0, self.embedding_size), np.float32))
        return self._matrix

    def locate(self, row: int) -> tuple[FileEmbeddings, int]:
        """(file, window) of a global row number."""
        if not 0 <= row < self._rows:
            raise IndexError(row)
        starts = np.fromiter(self._offsets.values(), dtype=np.int64, count=len(self._offsets))
        i = int(np.searchsorted(starts, row, side="right")) - 1
        digest = list(self._offsets)[i]
        return self._files[digest], row - int(starts[i])

    # --- writing ---------------------------------------------------------------------------
    def remove_stale_temps(self) -> int:
        """Remove the temp files of a killed run's part and store.json (only while holding the folder's
        lock: no live run writes one then). Returns how many."""
        from .files import remove_stale_temps

        return (remove_stale_temps(self.directory / PART_NAME.format(self._parts))
                + remove_stale_temps(self.directory / STORE_FILE))

    def add(self, fe: FileEmbeddings) -> None:
        """Keep a file's embeddings (written with the next part); a digest already there is ignored."""
        if fe.digest in self._files:
            return
        if fe.embeddings.ndim != 2 or fe.embeddings.shape[1] != self.embedding_size:
            raise StoreError(f"embeddings of shape {fe.embeddings.shape}, the store holds "
                             f"{self.embedding_size}-d ones", fe.path)
        self._remember(fe)
        self._pending.append(fe)

    def flush(self) -> Path | None:
        """Write the pending files as the next part (atomically); its path, or None when none was pending."""
        if not self._pending:
            return None
        pa, pq = _pyarrow()
        pending = self._pending
        n = [fe.windows for fe in pending]
        vectors = np.concatenate([fe.embeddings for fe in pending]).astype(np.float32, copy=False)
        table = pa.table({
            "digest": pa.array(np.repeat([fe.digest for fe in pending], n).tolist(), pa.string()),
            "path": pa.array(np.repeat([fe.path for fe in pending], n).tolist(), pa.string()),
            "duration_s": pa.array(np.repeat([fe.duration_s for fe in pending], n), pa.float64()),
            "start_s": pa.array(np.concatenate([fe.starts_s for fe in pending]), pa.float64()),
            "end_s": pa.array(np.concatenate([fe.ends_s for fe in pending]), pa.float64()),
            "window": pa.array(np.concatenate([np.arange(k) for k in n]), pa.int32()),
            "embedding": pa.FixedSizeListArray.from_arrays(pa.array(vectors.ravel(), pa.float32()), self.embedding_size),
        })
        buf = io.BytesIO()
        pq.write_table(table, buf)
        path = self.directory / PART_NAME.format(self._parts)
        atomic_write_bytes(path, buf.getvalue())
        self._parts += 1
        self._pending = []
        log.info("%s: %d files, %d windows", path, len(pending), sum(n))
        return path

    def embed(self, tagger, paths: Iterable, progress: bool = False, part_files: int = PART_FILES
              ) -> Iterator[tuple[str, FileEmbeddings | None, Exception | None]]:
        """For each path: the stored embeddings if its digest is in the store (no model run), else tag it
        with tagger (TaggerOptions(embeddings=True, ...)), keep it, and yield it; an unreadable file yields
        (path, None, exc) and the run goes on. Every ``part_files`` new files (and at the end, also when
        the generator is closed early or on KeyboardInterrupt) a new part is written atomically. tqdm
        progress (stderr) when progress.

        A stored file is yielded with the path given now (its rows keep the path it was first stored with)."""
        if isinstance(part_files, bool) or not isinstance(part_files, int) or part_files < 1:
            raise OptionsError(f"part_files must be an integer >= 1, got {part_files!r}")
        if not tagger.options.embeddings:
            raise OptionsError("the tagger must be built with TaggerOptions(embeddings=True)")
        paths = [os.fspath(p) for p in paths]
        from tqdm import tqdm

        bar = tqdm(total=len(paths), unit="file", file=sys.stderr, disable=not progress or None, leave=False)
        digests: dict[str, str | Exception] = {}
        try:
            for path in paths:
                if path not in digests:
                    try:
                        digests[path] = file_digest(path, DIGEST)
                    except OSError as exc:
                        digests[path] = SoundtagError(f"cannot read ({exc.strerror or exc})", path)
            new, seen = [], set()
            for path in paths:
                d = digests[path]
                if isinstance(d, str) and d not in self._files and d not in seen:
                    new.append(path)
                    seen.add(d)
            tagged = tagger.tag_files(new)
            untagged = set(new)  # paths whose result is still to come from ``tagged``
            added = 0
            window_s = float(tagger.spec.window_s)
            for path in paths:
                d = digests[path]
                if isinstance(d, Exception):
                    bar.update(1)
                    yield path, None, d
                    continue
                stored = self._files.get(d)
                if stored is None and path in untagged:
                    untagged.discard(path)
                    owner, result, error = next(tagged)
                    assert owner == path
                    if error is None:
                        stored = self._keep(path, d, result, window_s)
                        added += 1
                        if added % part_files == 0:
                            self.flush()
                    else:
                        bar.update(1)
                        yield path, None, error
                        continue
                elif stored is None:  # same bytes as a file that failed earlier in this run
                    bar.update(1)
                    yield path, None, SoundtagError("failed (same bytes as a file before it)", path)
                    continue
                bar.update(1)
                yield path, (stored if stored.path == path else replace(stored, path=path)), None
        finally:
            bar.close()
            self.flush()

    def _keep(self, path: str, digest: str, result, window_s: float) -> FileEmbeddings:
        emb = result.window_embeddings
        if emb is None:
            raise OptionsError("the tagger gave no window embeddings (TaggerOptions(embeddings=True))")
        starts = np.asarray(result.window_starts_s, dtype=np.float64)
        fe = FileEmbeddings(path=path, digest=digest, duration_s=float(result.duration_s), starts_s=starts,
                            ends_s=np.minimum(starts + window_s, float(result.duration_s)),
                            embeddings=np.asarray(emb, dtype=np.float32).reshape(starts.size, -1))
        self.add(fe)
        return fe
