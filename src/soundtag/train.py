"""`soundtag train` (issue #21): a classifier head on a model's embeddings, converted with the body
into one LiteRT model. (Being written.)"""

from __future__ import annotations


def add_parser(sub) -> None:
    sub.add_parser("train", help="train your own classes on the embeddings into one LiteRT model ([train])")


def main(args) -> int:
    raise NotImplementedError
