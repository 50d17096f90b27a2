"""Result writers: table / JSON / JSONL / CSV / Raven selection table, and atomic file writes.

A record is the JSON-able dict of one input: ``{"path", "duration_s", "tags", "windows", "events"}``
or ``{"path", "error"}``. Every format is produced from records, so the CLI, the batch runner and
the server share one definition of the output.
"""

from __future__ import annotations

import csv
import io
import json
import os
from collections.abc import Iterable
from pathlib import Path

from .tagger import Category, TagResult

FORMATS = ("table", "json", "jsonl", "csv")
OUTPUT_KINDS = {".jsonl": "jsonl", ".csv": "csv", ".txt": "raven"}  # --output FILE by extension
CSV_FIELDS = ("path", "duration_s", "rank", "index", "mid", "label", "score", "error")
RAVEN_FIELDS = ("Selection", "View", "Channel", "Begin Time (s)", "End Time (s)", "Low Freq (Hz)",
                "High Freq (Hz)", "Begin Path", "Label", "MID", "Score")
RAVEN_HIGH_HZ = 16_000  # Nyquist of the 32 kHz model input


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    """Write a file so that readers see either the old content or the whole new one."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


def _tags(categories: Iterable[Category]) -> list[dict]:
    return [{"index": c.index, "mid": c.mid, "label": c.name, "score": round(c.score, 6)} for c in categories]


def record(result: TagResult) -> dict:
    """The JSON object of one tagged input."""
    return {
        "path": result.path,
        "duration_s": round(result.duration_s, 6),
        "tags": _tags(result.clip),
        "windows": [{"start_s": w.start_s, "end_s": w.end_s, "tags": _tags(w.categories)} for w in result.windows],
        "events": [
            {"start_s": e.start_s, "end_s": e.end_s, "label": e.name, "mid": e.mid, "score": round(e.score, 6)}
            for e in result.events
        ],
    }


def error_record(path: str, message: str) -> dict:
    return {"path": str(path), "error": message}


def jsonl_line(rec: dict) -> str:
    return json.dumps(rec, ensure_ascii=False) + "\n"


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


def raven_header() -> str:
    return "\t".join(RAVEN_FIELDS) + "\n"


def raven_rows(rec: dict, first_selection: int) -> str:
    """Raven Pro selection-table rows for the events of one record (none for errors)."""
    rows = []
    for n, e in enumerate(rec.get("events", ()), first_selection):
        rows.append("\t".join(map(str, (n, "Spectrogram 1", 1, e["start_s"], e["end_s"], 0, RAVEN_HIGH_HZ,
                                         rec["path"], e["label"], e["mid"], e["score"]))))
    return "".join(r + "\n" for r in rows)


def _csv_row(values) -> str:
    buf = io.StringIO()
    csv.writer(buf, lineterminator="\n").writerow(values)
    return buf.getvalue()


RECORD_TEXT = {"table": table_text, "jsonl": jsonl_line, "csv": csv_rows}  # formats streamed record by record


def format_records(records: list[dict], fmt: str) -> str:
    """All records in one stdout format."""
    if fmt == "json":
        return json.dumps(records, indent=2, ensure_ascii=False) + "\n"
    if fmt not in RECORD_TEXT:
        raise ValueError(f"unknown format {fmt!r}; choose from {', '.join(FORMATS)}")
    return (csv_header() if fmt == "csv" else "") + "".join(RECORD_TEXT[fmt](r) for r in records)


class ResultFile:
    """One combined result file (jsonl, csv or Raven .txt), written record by record.

    Records go to ``FILE.part`` (flushed per record); ``close()`` renames it onto FILE atomically,
    so FILE is never half-written. With ``resume=True`` the inputs already recorded in FILE (and in
    a ``.part`` left by a killed run) are kept and reported by ``done``, so each input ends up in
    the file exactly once.
    """

    def __init__(self, path: str | Path, resume: bool = False) -> None:
        self.path = Path(path)
        self.kind = OUTPUT_KINDS.get(self.path.suffix.lower())
        if self.kind is None:
            raise ValueError(f"{self.path}: output must end in {', '.join(OUTPUT_KINDS)} (jsonl, csv, Raven table)")
        self.part = self.path.with_name(self.path.name + ".part")
        self.done: set[str] = set()
        self._selection = 1
        kept = self._recover() if resume else ""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._f = open(self.part, "w", encoding="utf-8")
        header = {"csv": csv_header(), "raven": raven_header()}.get(self.kind, "")
        self._f.write(header + kept)
        self._f.flush()

    def _recover(self) -> str:
        """Complete records from FILE and FILE.part (partial last lines dropped), deduplicated."""
        kept: list[str] = []
        for src in (self.path, self.part):
            if not src.is_file():
                continue
            text = src.read_text(encoding="utf-8")
            lines = text.splitlines(keepends=True)
            if lines and not lines[-1].endswith("\n"):
                lines.pop()  # killed mid-write
            if self.kind in ("csv", "raven") and lines:
                lines = lines[1:]  # header
            by_path: dict[str, list[str]] = {}
            for line in lines:
                key = self._line_path(line)
                if key is not None and key not in self.done:
                    by_path.setdefault(key, []).append(line)
            for key, group in by_path.items():
                self.done.add(key)
                kept.extend(group)
        if self.kind == "raven":
            kept = [self._renumber(line) for line in kept]
        return "".join(kept)

    def _line_path(self, line: str) -> str | None:
        try:
            if self.kind == "jsonl":
                return json.loads(line)["path"]
            if self.kind == "csv":
                return next(csv.reader([line]))[0]
            return line.rstrip("\n").split("\t")[7]
        except (ValueError, KeyError, IndexError, StopIteration):
            return None

    def _renumber(self, line: str) -> str:
        cells = line.split("\t")
        cells[0] = str(self._selection)
        self._selection += 1
        return "\t".join(cells)

    def write(self, rec: dict) -> None:
        if self.kind == "jsonl":
            text = jsonl_line(rec)
        elif self.kind == "csv":
            text = csv_rows(rec)
        else:
            text = raven_rows(rec, self._selection)
            self._selection += len(rec.get("events", ()))
        self._f.write(text)
        self._f.flush()
        self.done.add(str(rec["path"]))

    def close(self) -> None:
        """Flush to disk and move the finished file into place."""
        if self._f.closed:
            return
        self._f.flush()
        os.fsync(self._f.fileno())
        self._f.close()
        os.replace(self.part, self.path)
