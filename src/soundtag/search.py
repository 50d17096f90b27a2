"""`soundtag index` and `soundtag search` (issue #21): window embeddings of a collection in an on-disk
vector index, searched by example. (Being written.)"""

from __future__ import annotations


def add_parsers(sub) -> None:
    sub.add_parser("index", help="window embeddings of a collection into an on-disk vector index ([train])")
    sub.add_parser("search", help="search an index by example: an audio file, one window of it, or a row ([train])")


def main_index(args) -> int:
    raise NotImplementedError


def main_search(args) -> int:
    raise NotImplementedError
