"""A labelled collection of the user's own classes (issue #21): what `soundtag train` learns from and
`soundtag eval` measures a trained model on.

Two forms:
- a folder with one subfolder per class, its name the label; files anywhere below it (audio
  extensions, as `soundtag tag` finds them). Folders named as NEGATIVE_FOLDERS hold negatives: files
  that carry no label.
- a CSV with a header row naming ``path`` and ``labels``: each path relative to the CSV's folder (or
  absolute), its labels separated by ``;`` (multi-label; an empty cell: a negative). A path listed
  twice gets the union of its labels.
"""

from __future__ import annotations

import csv
import os
from dataclasses import dataclass
from pathlib import Path

from .batch import expand_inputs
from .errors import OptionsError

NEGATIVE_FOLDERS = ("noise", "background", "other")  # class folders whose files carry no label (case-insensitive)
LABEL_SEPARATOR = ";"  # between labels in a CSV's labels cell


@dataclass(frozen=True)
class Example:
    path: str
    labels: tuple[str, ...]  # () for a negative


@dataclass(frozen=True)
class Dataset:
    source: str  # the folder or CSV
    examples: tuple[Example, ...]
    classes: tuple[str, ...]  # every label, sorted (case-insensitively, then as written)
    problems: tuple[tuple[str, str], ...] = ()  # (path, why) of what could not be listed (unreadable subfolders)

    def files_of(self, label: str) -> int:
        return sum(label in e.labels for e in self.examples)

    @property
    def negatives(self) -> int:
        return sum(not e.labels for e in self.examples)


def read_dataset(source: str | Path) -> Dataset:
    """The examples of a class folder or a path,labels CSV; OptionsError (one line naming ``source``)
    when it is neither, is empty, or a label is not UTF-8 text."""
    source = str(source)
    if os.path.isdir(source):
        return _from_folder(source)
    if os.path.isfile(source):
        return _from_csv(source)
    raise OptionsError("no such folder or CSV", source)


def _from_folder(root: str) -> Dataset:
    try:
        subs = sorted(e.name for e in os.scandir(root) if e.is_dir() and not e.name.startswith("."))
    except OSError as exc:
        raise OptionsError(f"cannot read the folder ({exc.strerror or exc})", root) from None
    if not subs:
        raise OptionsError("no class folders (one subfolder per class, its name the label)", root)
    examples: list[Example] = []
    problems: list[tuple[str, str]] = []
    for name in subs:
        folder = os.path.join(root, name)
        label = _label(name, folder)
        found = 0
        for path, error in expand_inputs([folder]):
            if error is None:
                examples.append(Example(path, () if label.casefold() in NEGATIVE_FOLDERS else (label,)))
                found += 1
            elif path != folder:
                problems.append((path, error))
        if not found:
            raise OptionsError(f"class folder {name!r} has no audio files", folder)
    return _dataset(root, examples, problems)


def _label(text: str, where: str) -> str:
    """A label as UTF-8 text (a folder name of other bytes arrives with surrogate escapes)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raw = os.fsencode(text)
        raise OptionsError(f"label {raw!r} is not UTF-8 text: rename it", where) from None
    label = text.strip()
    if not label or any(ch in label for ch in "\n\r\t"):
        raise OptionsError(f"label {text!r} is empty or holds a tab or line break", where)
    return label


def _from_csv(path: str) -> Dataset:
    try:
        text = Path(path).read_bytes().decode("utf-8-sig")
    except OSError as exc:
        raise OptionsError(f"cannot read the CSV ({exc.strerror or exc})", path) from None
    except UnicodeDecodeError as exc:
        raise OptionsError(f"not UTF-8 text (byte {exc.start}: {exc.reason})", path) from None
    rows = [(n, row) for n, row in enumerate(csv.reader(text.splitlines()), 1) if any(c.strip() for c in row)]
    if not rows:
        raise OptionsError("empty: expected a header path,labels and one row per file", path)
    header = [c.strip().lower() for c in rows[0][1]]
    if "path" not in header or "labels" not in header:
        raise OptionsError("not a dataset: expected a folder of class folders or a CSV with header path,labels", path)
    pi, li = header.index("path"), header.index("labels")
    base = os.path.dirname(path)
    merged: dict[str, set[str]] = {}
    for line, row in rows[1:]:
        name = row[pi].strip() if len(row) > pi else ""
        if not name:
            raise OptionsError(f"line {line}: no path", path)
        cell = row[li] if len(row) > li else ""
        labels = {_label(k, f"{path}:{line}") for k in cell.split(LABEL_SEPARATOR) if k.strip()}
        merged.setdefault(os.path.normpath(os.path.join(base, name)), set()).update(labels)
    if not merged:
        raise OptionsError("no rows below the header", path)
    return _dataset(path, [Example(p, tuple(sorted(labs))) for p, labs in merged.items()], [])


def _dataset(source: str, examples: list[Example], problems: list) -> Dataset:
    classes = sorted({lab for e in examples for lab in e.labels}, key=lambda s: (s.casefold(), s))
    seen: dict[str, str] = {}
    for c in classes:
        if c.casefold() in seen:
            raise OptionsError(f"labels {seen[c.casefold()]!r} and {c!r} differ only in case: use one", source)
        seen[c.casefold()] = c
    return Dataset(source, tuple(examples), tuple(classes), tuple(problems))
