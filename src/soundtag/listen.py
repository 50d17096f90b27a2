"""Live tagging: `soundtag listen`, raw PCM on stdin or the microphone, through one ``TagStream``.

    stdin PCM (f32le/s16le/s32le) or a sounddevice InputStream --blocks--> TagStream.feed
      --> windows and events --> a view: JSON lines, plain text blocks, or a live rich table

Every failure is a SoundtagError with a one-line reason (bad PCM, no microphone); the CLI prints it.
Ctrl-C closes the stream and shows what the close gives (``ListenReport.interrupted``). sounddevice and
rich are imported only when a microphone or a terminal view is used (``pip install 'soundtag[mic]'``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import queue
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import BinaryIO, TextIO

import numpy as np

from .audio import MAX_SAMPLE_RATE, MIN_SAMPLE_RATE
from .errors import AudioError, MicrophoneError, OptionsError, SoundtagError
from .stream import MAX_CHANNELS, PCM_ENCODINGS, StreamEvent, StreamWindow, decode_pcm
from .writers import jsonl_line

log = logging.getLogger(__name__)

STDIN = "-"  # the SOURCE that means raw PCM on stdin
STDIN_NAME = "stdin"  # how errors about stdin name their input
READ_SECONDS = 0.1  # s of frames asked for per stdin read (a read returns what has arrived, up to this)
MIC_BLOCK_SECONDS = 0.1  # s of frames per microphone callback
MIC_QUEUE_SECONDS = 60.0  # s of captured audio held while the model catches up; later blocks are dropped
POLL_SECONDS = 0.25  # s; the main thread wakes this often to notice a microphone that stopped
VIEWS = ("table", "jsonl")
LIVE_REFRESH_S = 0.25  # s between redraws of the live table when no window arrives
BAR_WIDTH = 30  # characters of a score bar in the live table
PORTAUDIO_HINT = "apt-get install libportaudio2"
MIC_EXTRA_HINT = "pip install 'soundtag[mic]'"


@dataclass(frozen=True)
class ListenOptions:
    """Where the audio comes from and how results are shown. Validated on construction."""

    source: str | None = None  # "-": raw interleaved PCM on stdin; None: the microphone
    sample_rate: int | None = None  # Hz; None: the model's rate on stdin (nothing to resample), the device's default for a microphone
    channels: int = 1  # interleaved channels, averaged to mono
    encoding: str = "f32le"  # stdin sample format (a microphone always gives float32)
    device: int | None = None  # sounddevice input device index; None: the default input
    view: str = "jsonl"  # "table" (live on a terminal, text blocks elsewhere) or "jsonl"

    def __post_init__(self) -> None:
        if self.source not in (None, STDIN):
            raise OptionsError(f"SOURCE must be '-' (raw PCM on stdin) or left out (the microphone), got {self.source!r}")
        if self.source == STDIN and self.device is not None:
            raise OptionsError("--device picks a microphone; it cannot go with SOURCE '-' (stdin)")
        rate = self.sample_rate
        if rate is not None and not (_is_int(rate) and MIN_SAMPLE_RATE <= rate <= MAX_SAMPLE_RATE):
            raise OptionsError(f"--rate must be an integer in {MIN_SAMPLE_RATE}-{MAX_SAMPLE_RATE} Hz, got {rate!r}")
        if not (_is_int(self.channels) and 1 <= self.channels <= MAX_CHANNELS):
            raise OptionsError(f"--channels must be an integer in 1-{MAX_CHANNELS}, got {self.channels!r}")
        if self.encoding not in PCM_ENCODINGS:
            raise OptionsError(f"--encoding must be one of {', '.join(PCM_ENCODINGS)}, got {self.encoding!r}")
        if self.device is not None and not (_is_int(self.device) and self.device >= 0):
            raise OptionsError(f"--device must be a device index >= 0, got {self.device!r}")
        if self.view not in VIEWS:
            raise OptionsError(f"--format must be one of {', '.join(VIEWS)}, got {self.view!r}")


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


@dataclass
class ListenReport:
    """What a listening session did: windows, their latencies, audio dropped, whether Ctrl-C ended it."""

    windows: int = 0
    latencies_ms: list[float] = field(default_factory=list)
    dropped_s: float = 0.0  # microphone audio dropped because the model fell behind
    interrupted: bool = False

    def summary(self) -> str:
        """One line: ``N windows, latency p50 X ms, p95 Y ms``."""
        text = f"{self.windows} window{'' if self.windows == 1 else 's'}"
        if self.latencies_ms:
            p50, p95 = np.percentile(self.latencies_ms, [50, 95])
            text += f", latency p50 {p50:.0f} ms, p95 {p95:.0f} ms"
        if self.dropped_s:
            text += f", {self.dropped_s:.1f} s of audio dropped (the model fell behind; try a longer --hop)"
        return f"interrupted; {text}" if self.interrupted else text


# --- sources ------------------------------------------------------------------------------------
class PcmReader:
    """Raw interleaved PCM from a binary file object, in blocks of what has arrived (up to READ_SECONDS);
    a partial frame waits for the next read. Ending inside a frame, or with no bytes, is an AudioError."""

    name = STDIN_NAME

    def __init__(self, file: BinaryIO, sample_rate: int, channels: int, encoding: str) -> None:
        self.file, self.sample_rate, self.channels, self.encoding = file, sample_rate, channels, encoding
        self.frame_bytes = np.dtype(PCM_ENCODINGS[encoding]).itemsize * channels
        self.read_bytes = max(1, round(READ_SECONDS * sample_rate)) * self.frame_bytes
        self.bytes_read = 0
        self.dropped_frames = 0

    def blocks(self) -> Iterator[np.ndarray]:
        read = getattr(self.file, "read1", self.file.read)  # read1: what a pipe holds now, not a full block
        rest = b""
        while data := read(self.read_bytes):
            self.bytes_read += len(data)
            data = rest + data
            whole = len(data) - len(data) % self.frame_bytes
            rest = data[whole:]
            if whole:
                yield decode_pcm(data[:whole], self.encoding, self.channels)
        if rest:
            raise AudioError(f"input ended inside a frame: {self.bytes_read} bytes is not a whole number of "
                             f"{self.channels}-channel {self.encoding} frames ({self.frame_bytes} bytes each)", self.name)
        if not self.bytes_read:
            raise AudioError("no audio (0 bytes)", self.name)


class Microphone:
    """A sounddevice InputStream whose callback puts float32 blocks on a bounded queue; ``blocks()``
    starts it and hands them to the caller's thread, and stops it when the caller stops."""

    def __init__(self, sd, index: int, device_name: str, sample_rate: int, channels: int) -> None:
        self._sd, self.index, self.sample_rate, self.channels = sd, index, sample_rate, channels
        self.name = f"--device {index} ({device_name})"
        self.dropped_frames = 0
        self.overflows = 0

    def blocks(self) -> Iterator[np.ndarray]:
        blocksize = max(1, round(MIC_BLOCK_SECONDS * self.sample_rate))
        q: queue.Queue = queue.Queue(maxsize=max(1, round(MIC_QUEUE_SECONDS / MIC_BLOCK_SECONDS)))

        def callback(indata, frames, time_info, status) -> None:  # PortAudio's thread: no model work here
            if status.input_overflow:
                self.overflows += 1
            try:
                q.put_nowait(indata.copy())
            except queue.Full:
                self.dropped_frames += frames

        stream = self._open(blocksize, callback)
        try:
            while True:
                try:
                    yield q.get(timeout=POLL_SECONDS)
                except queue.Empty:
                    if not stream.active:
                        raise MicrophoneError("the input stream stopped (device unplugged?)", self.name) from None
        finally:
            stream.close()  # also stops it; blocks still queued are discarded
            if self.overflows:
                log.warning("%s: %d input overflow(s): the system dropped audio", self.name, self.overflows)

    def _open(self, blocksize: int, callback):
        sd = self._sd
        try:
            stream = sd.InputStream(device=self.index, channels=self.channels, samplerate=self.sample_rate,
                                    dtype="float32", blocksize=blocksize, callback=callback)
        except (sd.PortAudioError, ValueError) as exc:
            raise MicrophoneError(f"cannot open: {_one_line(exc)}", self.name) from None
        try:
            stream.start()
        except sd.PortAudioError as exc:
            stream.close()
            raise MicrophoneError(f"cannot start: {_one_line(exc)}", self.name) from None
        return stream


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__


@contextlib.contextmanager
def _quiet_stderr():
    """Silence file descriptor 2: PortAudio's ALSA and JACK back ends print diagnostics straight to it
    while PortAudio starts (at ``import sounddevice``). Left alone with ``-v``."""
    try:
        fd = sys.stderr.fileno()
    except (AttributeError, OSError, ValueError):  # stderr is not a real file: nothing to silence
        fd = None
    if fd is None or log.isEnabledFor(logging.INFO):
        yield
        return
    sys.stderr.flush()
    saved, devnull = os.dup(fd), os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, fd)
        yield
    finally:
        os.dup2(saved, fd)
        os.close(saved)
        os.close(devnull)


def _import_sounddevice():
    try:
        with _quiet_stderr():
            import sounddevice
    except ImportError as exc:
        raise MicrophoneError(f"no microphone: sounddevice is not installed ({MIC_EXTRA_HINT}; {exc})") from None
    except OSError as exc:  # sounddevice raises OSError when the PortAudio library is missing
        raise MicrophoneError(f"no microphone: {_one_line(exc)} ({PORTAUDIO_HINT})") from None
    return sounddevice


def _input_device(sd, device: int | None) -> tuple[int, dict]:
    """The index and description of the input device asked for (None: the default input)."""
    try:
        devices = list(sd.query_devices())
    except sd.PortAudioError as exc:
        raise MicrophoneError(f"no input device ({_one_line(exc)})") from None
    inputs = [i for i, d in enumerate(devices) if d["max_input_channels"] > 0]
    if device is None:
        if not inputs:
            raise MicrophoneError("no input device (sounddevice found none)")
        default = sd.default.device[0]
        index = default if default in inputs else inputs[0]
        return index, devices[index]
    if device not in inputs:
        found = ", ".join(f"{i} {devices[i]['name']!r}" for i in inputs)
        raise MicrophoneError(f"--device {device}: no such input device "
                              f"({'input devices: ' + found if found else 'sounddevice found none'})")
    return device, devices[device]


def open_microphone(device: int | None, sample_rate: int | None, channels: int) -> Microphone:
    """Check that the input device exists and takes these settings; the stream starts in ``blocks()``."""
    sd = _import_sounddevice()
    index, info = _input_device(sd, device)
    rate = sample_rate or int(round(info["default_samplerate"]))
    mic = Microphone(sd, index, info["name"], rate, channels)
    if not MIN_SAMPLE_RATE <= rate <= MAX_SAMPLE_RATE:
        raise MicrophoneError(f"default rate {rate} Hz is outside {MIN_SAMPLE_RATE}-{MAX_SAMPLE_RATE} Hz; give --rate",
                              mic.name)
    try:
        sd.check_input_settings(device=index, channels=channels, samplerate=rate, dtype="float32")
    except (sd.PortAudioError, ValueError) as exc:
        raise MicrophoneError(f"cannot record {channels} channel(s) at {rate} Hz: {_one_line(exc)}", mic.name) from None
    return mic


def open_source(options: ListenOptions, stdin: BinaryIO | None = None) -> PcmReader | Microphone:
    """The input the options name: stdin PCM, or a microphone checked now (before any model loads)."""
    if options.source == STDIN:
        if options.sample_rate is None:
            raise OptionsError("stdin PCM needs its sample rate (run() gives the model's)")
        return PcmReader(stdin if stdin is not None else sys.stdin.buffer, options.sample_rate,
                         options.channels, options.encoding)
    return open_microphone(options.device, options.sample_rate, options.channels)


# --- views --------------------------------------------------------------------------------------
def item_record(item: StreamWindow | StreamEvent) -> dict:
    """The JSON object of a window (with ``latency_ms``) or an event line."""
    rec = item.to_record()
    if isinstance(item, StreamWindow):
        rec["latency_ms"] = round(item.latency_s * 1000.0, 3)
    return rec


class JsonlView:
    """One JSON object per window and per event, flushed line by line."""

    def __init__(self, out: TextIO) -> None:
        self.out = out

    def show(self, items: list, heard_s: float) -> None:
        for item in items:
            self.out.write(jsonl_line(item_record(item)))
            self.out.flush()

    def close(self) -> None:
        self.out.flush()


class TextView:
    """Plain text blocks, one per window (what ``--format table`` prints when stdout is not a terminal)."""

    def __init__(self, out: TextIO) -> None:
        self.out = out

    def show(self, items: list, heard_s: float) -> None:
        for item in items:
            self.out.write(_window_text(item) if isinstance(item, StreamWindow) else _event_text(item))
        if items:
            self.out.flush()

    def close(self) -> None:
        self.out.flush()


def _window_text(w: StreamWindow) -> str:
    lines = [f"{w.start_s:.2f} - {w.end_s:.2f} s  (latency {w.latency_s * 1000:.0f} ms)"]
    lines += [f"  {c.score:.3f}  {c.name}  [{c.mid}]" for c in w.categories] or ["  (no tags)"]
    return "\n".join(lines) + "\n"


def _event_text(item: StreamEvent) -> str:
    e = item.event
    return f"  event {item.kind}: {e.name}  {e.start_s:.2f} - {e.end_s:.2f} s  {e.score:.3f}\n"


class LiveView:
    """A rich Live table on the terminal: the current window's tags with bars, its time span, the open
    events and the latency, redrawn every window (and the audio heard so far in between)."""

    def __init__(self, out: TextIO) -> None:
        from rich.console import Console
        from rich.live import Live

        self._window: StreamWindow | None = None
        self._open: dict[int, object] = {}  # class index -> Event so far
        self._windows, self._heard_s, self._drawn = 0, 0.0, 0.0
        self._live = Live(self._render(), console=Console(file=out), auto_refresh=False)
        self._live.start(refresh=True)

    def show(self, items: list, heard_s: float) -> None:
        for item in items:
            if isinstance(item, StreamWindow):
                self._window, self._windows = item, self._windows + 1
            elif item.kind == "start":
                self._open[item.event.index] = item.event
            else:
                self._open.pop(item.event.index, None)
        self._heard_s = heard_s
        now = time.monotonic()
        if items or now - self._drawn >= LIVE_REFRESH_S:
            self._drawn = now
            self._live.update(self._render(), refresh=True)

    def close(self) -> None:
        self._live.update(self._render(), refresh=True)
        self._live.stop()

    def _render(self):
        from rich.bar import Bar
        from rich.console import Group
        from rich.table import Table
        from rich.text import Text

        w = self._window
        if w is None:
            head = f"listening: {self._heard_s:.1f} s heard; the first window needs 10 s"
        else:
            head = (f"window {w.start_s:.2f} - {w.end_s:.2f} s   latency {w.latency_s * 1000:.0f} ms   "
                    f"{self._windows} window(s), {self._heard_s:.1f} s heard")
        table = Table(show_header=False, box=None, padding=(0, 1))
        for c in w.categories if w is not None else ():
            table.add_row(f"{c.score:.3f}", Bar(1.0, 0.0, c.score, width=BAR_WIDTH), Text(c.name))
        if w is not None and not w.categories:
            table.add_row("", "", Text("(no tags above the threshold)"))
        events = ", ".join(f"{e.name} since {e.start_s:.1f} s ({e.score:.2f})" for e in self._open.values())
        return Group(Text(head, style="bold"), table, Text(f"open events: {events or 'none'}"))


def default_view(out: TextIO) -> str:
    """``table`` on a terminal, ``jsonl`` otherwise."""
    return "table" if _is_terminal(out) else "jsonl"


def make_view(view: str, out: TextIO) -> JsonlView | TextView | LiveView:
    if view == "jsonl":
        return JsonlView(out)
    return LiveView(out) if _is_terminal(out) else TextView(out)


def _is_terminal(out: TextIO) -> bool:
    try:
        return out.isatty()
    except (AttributeError, ValueError):
        return False


# --- the loop -----------------------------------------------------------------------------------
def listen(tagger, source: PcmReader | Microphone, view) -> ListenReport:
    """Feed the source's blocks to one TagStream and show what each gives, until the source ends or
    Ctrl-C; then close the stream and show the last window and the events it closes."""
    report = ListenReport()
    stream = tagger.stream(source.sample_rate, source.channels)
    try:
        blocks = source.blocks()
        try:
            for block in blocks:
                _show(view, stream.feed(block), stream.duration_s, report)
        except KeyboardInterrupt:
            report.interrupted = True
        finally:
            blocks.close()  # stops a microphone
        _show(view, stream.close(), stream.duration_s, report)
    except SoundtagError as exc:
        if exc.path is None:
            exc.path = source.name  # e.g. a NaN sample found by the stream
        raise
    finally:
        view.close()
    report.dropped_s = source.dropped_frames / source.sample_rate
    return report


def _show(view, items: list, heard_s: float, report: ListenReport) -> None:
    for item in items:
        if isinstance(item, StreamWindow):
            report.windows += 1
            report.latencies_ms.append(item.latency_s * 1000.0)
    view.show(items, heard_s)


def run(tagger_options, options: ListenOptions, out: TextIO | None = None, stdin: BinaryIO | None = None) -> ListenReport:
    """`soundtag listen`: open the source (a missing microphone fails here, before the model loads), load
    the model, listen until the end of the input or Ctrl-C."""
    from .tagger import Tagger

    out = out if out is not None else sys.stdout
    if options.source == STDIN and options.sample_rate is None:  # PCM at the model's own rate
        tagger = Tagger(tagger_options)
        source = open_source(dataclasses.replace(options, sample_rate=tagger.spec.sample_rate), stdin)
    else:
        source = open_source(options, stdin)
        tagger = Tagger(tagger_options)
    return listen(tagger, source, make_view(options.view, out))
