"""`soundtag eval`: mAP, AUC and d-prime of the tagger on a user's labels (being written)."""

from __future__ import annotations


def add_parser(sub) -> None:
    e = sub.add_parser("eval", help="measure mAP / AUC / d-prime on your own labels")
    e.add_argument("labels")


def main(args) -> int:
    raise NotImplementedError("soundtag eval is being written")
