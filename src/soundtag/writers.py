"""Output formats built from records (results.py): table, JSON, JSONL, CSV, Raven selection table,
DCASE event table (tsv: filename, onset, offset, event_label, as sed_eval and sed_scores_eval read it);
and ResultFile, the one durable combined result file (lock, .part, atomic move, resume).

Text is UTF-8. A path that is not valid UTF-8 (a surrogate-escaped str, see results.py) is written as
its original bytes in CSV, Raven and table files, and as ``\\udcXX`` escapes in JSON, so that
``--resume`` and ``os.fsencode`` give the very same path back.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import os
from pathlib import Path

from .errors import OutputError
from .files import FileLock, create_beside, fsync_dir, remove_stale_temps
from .results import is_record

log = logging.getLogger(__name__)

FORMATS = ("table", "json", "jsonl", "csv", "dcase")
OUTPUT_KINDS = {".jsonl": "jsonl", ".csv": "csv", ".txt": "raven", ".tsv": "dcase", ".parquet": "parquet"}  # --output FILE by extension
DCASE_FIELDS = ("filename", "onset", "offset", "event_label")  # DCASE's strong-label / detection table
PARQUET_ROW_GROUP = 256  # records per Parquet row group when the journal is turned into the file
CSV_FIELDS = ("path", "duration_s", "rank", "index", "mid", "label", "score", "error")
RAVEN_FIELDS = ("Selection", "View", "Channel", "Begin Time (s)", "End Time (s)", "Low Freq (Hz)",
                "High Freq (Hz)", "Begin Path", "Label", "MID", "Score")
RAVEN_HIGH_HZ = 16_000  # Nyquist of the 32 kHz model input
CSV_FORMULA_START = ("=", "+", "-", "@", "\t", "\r", "'")  # a spreadsheet runs a cell starting so; "'" escapes
RAVEN_ESCAPES = {"\\": "\\\\", "\t": "\\t", "\n": "\\n", "\r": "\\r"}  # a TSV cell holds none of these
TEXT_ERRORS = "surrogateescape"  # undecodable file-name bytes go out (and come back) unchanged


def json_text(obj, indent: int | None = None) -> str:
    """JSON with UTF-8 text; strings holding surrogate escapes are written as \\u escapes."""
    text = json.dumps(obj, ensure_ascii=False, indent=indent)
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        text = json.dumps(obj, ensure_ascii=True, indent=indent)
    return text


def jsonl_line(rec: dict) -> str:
    return json_text(rec) + "\n"


def table_text(rec: dict) -> str:
    """Human-readable block for one record."""
    if "error" in rec:
        return f"{rec['path']}: ERROR {rec['error']}\n"
    lines = [f"{rec['path']}  ({rec['duration_s']:.2f} s, {len(rec['windows'])} window(s))"]
    lines += [f"  {t['score']:.3f}  {t['label']}  [{t['mid']}]" for t in rec["tags"]]
    if len(rec["windows"]) > 1 and rec["events"]:
        lines.append("  events:")
        lines += [f"    {e['start_s']:8.2f} - {e['end_s']:8.2f} s  {e['score']:.3f}  {e['label']}" for e in rec["events"]]
    return "\n".join(lines) + "\n"


def csv_header() -> str:
    return _csv_row(CSV_FIELDS)


def csv_rows(rec: dict) -> str:
    """One row per clip tag (rank 1..k); an input with no tag above threshold or an error gets one row."""
    if "error" in rec:
        return _csv_row([rec["path"], "", "", "", "", "", "", rec["error"]])
    if not rec["tags"]:
        return _csv_row([rec["path"], rec["duration_s"], "", "", "", "", "", ""])
    return "".join(
        _csv_row([rec["path"], rec["duration_s"], r, t["index"], t["mid"], t["label"], t["score"], ""])
        for r, t in enumerate(rec["tags"], 1)
    )


def csv_cell(value):
    """A text cell a spreadsheet shows as text: one starting with = + - @ tab CR (or ') gets a leading '."""
    if isinstance(value, str) and value.startswith(CSV_FORMULA_START):
        return "'" + value
    return value


def csv_uncell(text: str) -> str:
    """The value written by csv_cell."""
    return text[1:] if text.startswith("'") else text


def _csv_row(values) -> str:
    buf = io.StringIO()
    csv.writer(buf, lineterminator="\n").writerow([csv_cell(v) for v in values])
    return buf.getvalue()


def raven_header() -> str:
    return "\t".join(RAVEN_FIELDS) + "\n"


def raven_rows(rec: dict, first_selection: int) -> str:
    """Raven Pro selection-table rows for the events of one record (none for errors)."""
    rows = []
    for n, e in enumerate(rec.get("events", ()), first_selection):
        rows.append("\t".join(map(str, (n, "Spectrogram 1", 1, e["start_s"], e["end_s"], 0, RAVEN_HIGH_HZ,
                                         raven_cell(rec["path"]), e["label"], e["mid"], e["score"]))))
    return "".join(r + "\n" for r in rows)


def dcase_header() -> str:
    return "\t".join(DCASE_FIELDS) + "\n"


def dcase_rows(rec: dict) -> str:
    """DCASE detection rows (filename, onset, offset, event_label) for the events of one record (none for
    errors); the filename is the input's path as given, cells escaped as Raven's."""
    return "".join("\t".join((raven_cell(rec["path"]), f"{e['start_s']:.3f}", f"{e['end_s']:.3f}", raven_cell(e["label"])))
                   + "\n" for e in rec.get("events", ()))


def raven_cell(text: str) -> str:
    return "".join(RAVEN_ESCAPES.get(c, c) for c in text)


def raven_uncell(text: str) -> str:
    out, i = [], 0
    back = {v[1]: k for k, v in RAVEN_ESCAPES.items()}
    while i < len(text):
        if text[i] == "\\" and i + 1 < len(text) and text[i + 1] in back:
            out.append(back[text[i + 1]])
            i += 2
        else:
            out.append(text[i])
            i += 1
    return "".join(out)


RECORD_TEXT = {"table": table_text, "jsonl": jsonl_line, "csv": csv_rows, "dcase": dcase_rows}  # streamed record by record
HEADERS = {"csv": csv_header, "dcase": dcase_header}


def format_records(records: list[dict], fmt: str) -> str:
    """All records in one stdout format."""
    if fmt == "json":
        return json_text(records, indent=2) + "\n"
    if fmt not in RECORD_TEXT:
        raise ValueError(f"unknown format {fmt!r}; choose from {', '.join(FORMATS)}")
    return (HEADERS[fmt]() if fmt in HEADERS else "") + "".join(RECORD_TEXT[fmt](r) for r in records)


def parquet_schema():
    """One row per input: every score, for querying without soundtag (pandas, polars, DuckDB)."""
    import pyarrow as pa

    f32 = pa.list_(pa.float32())
    tag = pa.struct([("index", pa.int32()), ("mid", pa.string()), ("label", pa.string()), ("score", pa.float32())])
    # SED models: each window's segmentwise scores [steps][classes], step k at start_s + k * segment_s
    window = pa.struct([("start_s", pa.float64()), ("end_s", pa.float64()), ("scores", f32),
                        ("segmentwise", pa.list_(f32))])
    event = pa.struct([("start_s", pa.float64()), ("end_s", pa.float64()), ("label", pa.string()),
                       ("mid", pa.string()), ("score", pa.float32())])
    return pa.schema([
        ("path", pa.string()), ("duration_s", pa.float64()), ("clip_scores", f32), ("tags", pa.list_(tag)),
        ("windows", pa.list_(window)), ("events", pa.list_(event)), ("embedding", f32), ("error", pa.string()),
        ("segment_s", pa.float64()),
    ])


def parquet_table(records: list[dict]):
    """Records (made with ``to_record(scores=True)``, or error records) as a table in parquet_schema()."""
    import pyarrow as pa

    rows = []
    for rec in records:
        if "error" in rec:
            rows.append({"path": rec["path"], "error": rec["error"]})
            continue
        rows.append({
            "path": rec["path"], "duration_s": rec["duration_s"], "clip_scores": rec["clip_scores"],
            "tags": rec["tags"], "events": rec["events"], "embedding": rec.get("embedding"),
            "windows": [{"start_s": w["start_s"], "end_s": w["end_s"], "scores": w["scores"],
                         "segmentwise": w.get("segmentwise")} for w in rec["windows"]],
            "segment_s": rec.get("segment_s"),
        })
    for row in rows:  # Arrow strings are UTF-8: a file name that is not keeps its bytes as surrogate escapes
        row["path"] = text_path(row["path"])
    return pa.Table.from_pylist(rows, schema=parquet_schema())


class PathSet(set):
    """Paths already recorded, compared as the UTF-8 text every format can store (see text_path)."""

    def __contains__(self, path) -> bool:
        return set.__contains__(self, text_path(str(path)))

    def add(self, path) -> None:
        set.add(self, text_path(str(path)))

    def update(self, paths) -> None:
        for p in paths:
            self.add(p)


def text_path(path: str) -> str:
    """A path as valid UTF-8 text (Arrow strings must be): undecodable bytes (surrogate escapes) become
    backslash escapes, e.g. ``caf\\xe9.wav``."""
    try:
        path.encode("utf-8")
        return path
    except UnicodeEncodeError:
        return path.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


class StreamSink:
    """Records to a text stream (stdout) in one format: streamed record by record, JSON at close."""

    def __init__(self, stream, fmt: str) -> None:
        if fmt not in FORMATS:
            raise ValueError(f"unknown format {fmt!r}; choose from {', '.join(FORMATS)}")
        self.stream, self.fmt = stream, fmt
        self._records: list[dict] = []
        if fmt in HEADERS:
            self.stream.write(HEADERS[fmt]())

    def write(self, rec: dict) -> None:
        if self.fmt == "json":
            self._records.append(rec)
            return
        self.stream.write(RECORD_TEXT[self.fmt](rec))
        self.stream.flush()

    def close(self) -> None:
        if self.fmt == "json":
            self.stream.write(format_records(self._records, "json"))
        self.stream.flush()


class ResultFile:
    """One combined result file (jsonl, csv or Raven .txt), written record by record.

    - Records go to ``FILE.part`` (flushed per record); ``close()`` moves it onto FILE atomically, so
      FILE is never half-written; ``abandon()`` (any failure) keeps the ``.part`` for ``--resume``.
    - ``FILE.lock`` is held (flock) for the whole run: a second run on the same FILE is refused.
    - Nothing is rewritten in place: a new ``.part`` (with what resume keeps) and the Parquet file are
      written as new temp files beside them (O_EXCL | O_NOFOLLOW, files.create_beside), synced and renamed
      over; a kill or a full disk meanwhile leaves the old ``.part`` and FILE whole for the next run.
    - With ``resume=True`` the inputs already recorded in FILE (and in a ``.part`` left by a killed run)
      are kept and listed in ``done``, so each input ends up in the file exactly once. Error records are
      dropped (an error is not a result: they are tried again), so is any line that is not a complete
      record (a cut UTF-8 character, foreign JSON), and the last record of a CSV or Raven ``.part``
      (it may be cut between rows).
    - Parquet cannot grow record by record and survive a kill, so for ``.parquet`` the ``.part`` is a
      journal of full records (JSONL, every score); ``close()`` streams the rows kept from FILE and the
      journal into a new Parquet file and moves it into place.
    """

    def __init__(self, path: str | Path, resume: bool = False) -> None:
        self.path = Path(path)
        self.kind = OUTPUT_KINDS.get(self.path.suffix.lower())
        if self.kind is None:
            raise OutputError(f"output must end in {', '.join(OUTPUT_KINDS)} (jsonl, csv, Raven table, DCASE table, "
                              "Parquet)", str(self.path))
        if self.path.is_dir():
            raise OutputError("is a directory; --output names a file", str(self.path))
        self.part = self.path.with_name(self.path.name + ".part")
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise OutputError(f"cannot create its folder ({exc.strerror})", str(self.path)) from None
        self._lock = FileLock(self.path.with_name(self.path.name + ".lock"), str(self.path))
        self.done = PathSet()
        self.wants_scores = self.kind == "parquet"  # records must carry every score (to_record(scores=True))
        self._parquet_kept: Path | None = None  # FILE.parquet whose rows the new file keeps (resume)
        self._selection = 1
        self._fd = -1
        for target in (self.path, self.part):  # a killed run's half-written temp files (we hold the lock)
            remove_stale_temps(target)
        try:
            kept = self._recover() if resume else []
            self._start_part(kept)
        except OutputError:
            self._lock.release()
            raise
        except OSError as exc:
            self._lock.release()
            kept_note = "; the results so far are kept in it" if resume and self.part.is_file() else ""
            raise OutputError(f"cannot write {self.part.name} ({exc.strerror or exc}){kept_note}",
                              str(self.path)) from None

    def _start_part(self, kept: list[dict]) -> None:
        """The new ``.part`` (header and the records kept by resume) is written beside the old one and
        renamed onto it: a kill or a full disk meanwhile leaves the old one (maybe the only copy) whole."""
        self._fd, tmp = create_beside(self.part)
        try:
            self._put({"csv": csv_header(), "raven": raven_header(), "dcase": dcase_header()}.get(self.kind, ""))
            for rec in kept:
                self._put(self._text(rec))
            os.fsync(self._fd)
            os.replace(tmp, self.part)
            fsync_dir(self.part.parent)
        except BaseException:
            os.close(self._fd)
            self._fd = -1
            tmp.unlink(missing_ok=True)
            raise

    # --- resume ---------------------------------------------------------------------------
    def _recover(self) -> list[dict]:
        """Complete result records from FILE and FILE.part, deduplicated by path, in file order."""
        kept: list[dict] = []
        for src, may_be_cut in ((self.path, False), (self.part, True)):
            if not src.is_file():
                continue
            if self.kind == "parquet" and src == self.path:
                self._recover_parquet()
                continue
            groups = self._read_records(src.read_bytes(), may_be_cut)
            for key, recs in groups.items():
                if key not in self.done:
                    self.done.add(key)
                    kept.extend(recs)
        return kept

    def _read_records(self, data: bytes, may_be_cut: bool) -> dict[str, list[dict]]:
        """path -> its rows as record-like dicts (jsonl: one record; csv/raven: one dict per row)."""
        if not data.endswith(b"\n"):
            data = data[: data.rfind(b"\n") + 1]  # killed mid-line (possibly mid-character)
        text = data.decode("utf-8", errors=TEXT_ERRORS)
        groups: dict[str, list[dict]] = {}
        if self.kind in ("jsonl", "parquet"):
            for line in text.splitlines():
                try:
                    rec = json.loads(line)
                except ValueError:
                    rec = None
                if not is_record(rec) or "error" in rec:
                    continue  # foreign line, or an error to try again
                groups.setdefault(rec["path"], []).append(rec)
            return groups
        rows = {"csv": self._csv_rows, "raven": self._raven_rows, "dcase": self._dcase_rows}[self.kind](text)
        for row in rows:
            if row is not None:
                groups.setdefault(row["path"], []).append(row)
        if may_be_cut and groups:
            groups.pop(next(reversed(groups)))  # the last input's rows may be incomplete
        return groups

    def _recover_parquet(self) -> None:
        import pyarrow.compute as pc
        import pyarrow.parquet as pq

        try:
            table = pq.read_table(self.path, columns=["path", "error"])
        except Exception as exc:  # not Parquet, or cut: do not overwrite what we cannot read
            raise OutputError(f"cannot read it to resume ({' '.join(str(exc).split())}); move it away or "
                              "run without --resume", str(self.path)) from None
        ok = table.filter(pc.is_null(table["error"]))
        self.done.update(ok["path"].to_pylist())
        self._parquet_kept = self.path

    @staticmethod
    def _csv_rows(text: str):
        reader = csv.reader(io.StringIO(text, newline=""))
        try:
            header = next(reader, None)
            if header is None or tuple(header) != CSV_FIELDS:
                return
            for row in reader:
                if len(row) != len(CSV_FIELDS):
                    yield None
                    continue
                rec = dict(zip(CSV_FIELDS, row))
                if rec["error"]:
                    yield None  # an error is tried again
                    continue
                yield {**rec, "path": csv_uncell(rec["path"]), "_row": row}
        except csv.Error:
            return  # a quoted cell cut by a kill: the rest is dropped

    @staticmethod
    def _tsv_rows(text: str, header: str, fields: tuple, path_cell: int):
        """(cells, path) per row of a tab-separated table under ``header`` (None for a cut or foreign row)."""
        lines = text.split("\n")
        if not lines or lines[0] != header.rstrip("\n"):
            return
        for line in lines[1:]:
            cells = line.split("\t")
            yield (cells, raven_uncell(cells[path_cell])) if len(cells) == len(fields) else None

    @classmethod
    def _raven_rows(cls, text: str):
        for row in cls._tsv_rows(text, raven_header(), RAVEN_FIELDS, 7):
            yield None if row is None else {"path": row[1], "_cells": row[0]}

    @classmethod
    def _dcase_rows(cls, text: str):
        for row in cls._tsv_rows(text, dcase_header(), DCASE_FIELDS, 0):
            yield None if row is None else {"path": row[1], "_line": "\t".join(row[0]) + "\n"}

    # --- writing --------------------------------------------------------------------------
    def _text(self, rec: dict) -> str:
        if "_row" in rec:  # a CSV row kept from an earlier run
            return _csv_row([csv_uncell(v) for v in rec["_row"]])
        if "_line" in rec:  # a DCASE row kept from an earlier run
            return rec["_line"]
        if "_cells" in rec:  # a Raven row kept from an earlier run, renumbered
            self._selection += 1
            return "\t".join([str(self._selection - 1)] + rec["_cells"][1:]) + "\n"
        if self.kind in ("jsonl", "parquet"):
            return jsonl_line(rec)
        if self.kind == "csv":
            return csv_rows(rec)
        if self.kind == "dcase":
            return dcase_rows(rec)
        text = raven_rows(rec, self._selection)
        self._selection += len(rec.get("events", ()))
        return text

    def _put(self, text: str) -> None:
        """Unbuffered: a record is on disk (in the page cache) when write() returns; nothing is held back
        to fail later, so a failed write loses at most the record being written."""
        data = memoryview(text.encode("utf-8", errors=TEXT_ERRORS))
        while data:
            data = data[os.write(self._fd, data):]

    def write(self, rec: dict) -> None:
        self._put(self._text(rec))
        if "error" not in rec:
            self.done.add(str(rec["path"]))

    def _finish_part(self) -> bool:
        if self._fd < 0:
            return False
        try:
            os.fsync(self._fd)
        finally:
            os.close(self._fd)
            self._fd = -1
        return True

    def close(self) -> None:
        """Flush to disk and move the finished file into place."""
        try:
            if self._finish_part():
                if self.kind == "parquet":
                    self._write_parquet()
                else:
                    os.replace(self.part, self.path)
        finally:
            self._lock.release()

    def _write_parquet(self) -> None:
        """Rows kept from FILE (resume), then the journal, streamed into FILE atomically."""
        import pyarrow.compute as pc
        import pyarrow.parquet as pq

        fd, tmp = create_beside(self.path)
        try:
            with os.fdopen(fd, "wb") as sink, pq.ParquetWriter(sink, parquet_schema()) as writer:
                if self._parquet_kept is not None:
                    old = pq.ParquetFile(self._parquet_kept)
                    for batch in old.iter_batches(batch_size=PARQUET_ROW_GROUP):
                        batch = batch.filter(pc.is_null(batch["error"]))
                        if batch.num_rows:
                            writer.write_batch(batch.cast(parquet_schema()) if batch.schema != parquet_schema() else batch)
                pending: list[dict] = []
                with open(self.part, encoding="utf-8", errors=TEXT_ERRORS) as journal:
                    for line in journal:
                        pending.append(json.loads(line))
                        if len(pending) == PARQUET_ROW_GROUP:
                            writer.write_table(parquet_table(pending))
                            pending = []
                if pending:
                    writer.write_table(parquet_table(pending))
                writer.close()
                sink.flush()
                os.fsync(sink.fileno())
            os.replace(tmp, self.path)
            fsync_dir(self.path.parent)
            self.part.unlink()
        finally:
            if tmp.exists():
                tmp.unlink()

    def abandon(self) -> Path:
        """After a failure: keep ``FILE.part`` for ``--resume`` (each complete line in it is a record);
        returns its path."""
        try:
            self._finish_part()
        except OSError:
            pass
        self._lock.release()
        return self.part
