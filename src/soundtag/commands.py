"""What the command-line front ends share (floor 6; cli.py on floor 7 too): one-line errors on
stderr, the exit code of the exception that ended a command, and flag parsers."""

from __future__ import annotations

import argparse
import math
import sys

from .errors import EXIT_FAILED, EXIT_INTERRUPTED, EXIT_USAGE, OptionsError, SoundtagError
from .results import error_reason


def err(msg: str) -> None:
    """One line on stderr: ``soundtag: msg``."""
    print(f"soundtag: {msg}", file=sys.stderr, flush=True)


def failed(exc: BaseException, what: str, interrupted: str = "interrupted") -> int:
    """Say in one line what ended a command and return its exit code: an OptionsError is a usage
    error (2), another SoundtagError a failed input or model (1), Ctrl-C 130 (``interrupted`` says
    what is kept), anything else a failure of the run itself (1: "WHAT failed: cause")."""
    if isinstance(exc, KeyboardInterrupt):
        err(interrupted)
        return EXIT_INTERRUPTED
    if isinstance(exc, (OptionsError, SoundtagError)):
        err(str(exc))
        return EXIT_USAGE if isinstance(exc, OptionsError) else EXIT_FAILED
    err(f"{what} failed: {error_reason(exc)}")  # out of memory, disk full, a vanished folder
    return EXIT_FAILED


def finite(flag: str):
    """argparse type: a finite number."""
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
        if not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"{flag} must be finite, got {text!r}")
        return value

    return parse


def positive_int(flag: str):
    """argparse type: an integer >= 1."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
        if value < 1:
            raise argparse.ArgumentTypeError(f"{flag} must be >= 1, got {value}")
        return value

    return parse
