"""Every error soundtag raises on purpose: one base class, fields instead of text to parse back.

``str(err)`` is the one line a user sees: ``"<path>: <reason>"``, or just the reason when no file is
involved. Batch records carry ``err.reason`` (the path is already in the record).
"""

from __future__ import annotations

# Process exit codes of the command line (cli.py, and `soundtag eval`, which cli.py imports).
EXIT_OK = 0  # every input done
EXIT_FAILED = 1  # some inputs failed, or the run itself
EXIT_USAGE = 2  # a bad flag or value, refused before any work
EXIT_INTERRUPTED = 130  # Ctrl-C
EXIT_BROKEN_PIPE = 141  # stdout closed by its reader (`| head`)


class SoundtagError(Exception):
    """Base of soundtag's errors. ``reason``: the cause in one line; ``path``: the file, if any."""

    def __init__(self, reason: str, path: str | None = None) -> None:
        super().__init__(reason, path)  # args kept so errors pickle across worker processes
        self.reason = str(reason)
        self.path = None if path is None else str(path)

    def __str__(self) -> str:
        return f"{self.path}: {self.reason}" if self.path else self.reason


class AudioError(SoundtagError, ValueError):
    """An input that cannot be decoded into finite audio samples."""


class TooLongError(AudioError):
    """An input that declares or decodes to more than the allowed duration (--max-duration)."""


class CancelledError(SoundtagError, RuntimeError):
    """Work stopped between two windows because its caller said so (a server's client has gone)."""


class MicrophoneError(SoundtagError, RuntimeError):
    """No microphone: sounddevice or PortAudio missing, no input device, or one that cannot open."""


class ModelError(SoundtagError, ValueError):
    """A file that is not a CNN14 LiteRT model with the expected signature, or that fails to load."""


class NoGpuError(ModelError):
    """This machine has no GPU that LiteRT's accelerator can use: a part is missing (the WebGPU library,
    the Vulkan loader, a driver file), or Dawn finds no adapter it accepts (a driver file for absent
    hardware, Debian 12's Mesa 22 lavapipe). Not a fault of the model: the converter then skips its GPU
    check, and ``--accelerator auto`` takes the CPU."""


class ModelNotFoundError(ModelError):
    """No model given and none in the cache."""


class InferenceError(SoundtagError, RuntimeError):
    """The model produced non-finite or out-of-range output for an input: never a silent result."""


class OptionsError(SoundtagError, ValueError):
    """An option value outside its domain (raised when the options are built, before any model)."""


class UnknownClassError(OptionsError, KeyError):
    """A class name or MID that is not one of the 527 AudioSet classes."""


class FetchError(SoundtagError, RuntimeError):
    """A download that failed or is not the expected file; nothing wrong is left cached."""


class OutputError(SoundtagError, OSError):
    """A result file that cannot be written (a directory, unwritable, in use by another run)."""

    def __init__(self, reason: str, path: str | None = None) -> None:
        SoundtagError.__init__(self, reason, path)


class ValidationError(SoundtagError, RuntimeError):
    """A converted model failed a gate; it must not be written."""
