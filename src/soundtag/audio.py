"""Decode any audio file to float32 mono at a model's rate (32 kHz for CNN14), in blocks, so memory does not grow with duration.

libsndfile formats (wav, flac, ogg/vorbis, opus, mp3, ...) go through soundfile; everything else
FFmpeg reads (m4a/aac, wma, video containers) through PyAV. Channels are averaged (as librosa's
to_mono), then resampled with soxr at high quality (librosa.load's default res_type 'soxr_hq').

A source is a path or a binary file object (an upload). FFmpeg only ever gets an open file object and
an empty protocol whitelist: a file called ``http:host.m4a``, ``tcp:...`` or ``concat:...`` is read as
the file it is, and a playlist or concat script cannot make FFmpeg open anything else.
"""

from __future__ import annotations

import logging
import os
import re
import stat
from collections.abc import Iterator
from dataclasses import dataclass
from typing import BinaryIO

import numpy as np
import soxr

from .errors import AudioError, TooLongError
from .spec import CNN14

log = logging.getLogger(__name__)

BLOCK_SECONDS = 2.0  # source audio decoded per block: memory per block, not per file
BLOCK_MAX_VALUES = 1 << 22  # samples x channels per block at most (16 MB of float32), whatever the rate
MAX_CHANNELS = 64  # more than this is treated as a broken or non-audio file
MIN_SAMPLE_RATE = 1_000  # Hz; below this a header is broken or a decompression bomb (1 Hz x 12 days = 3 kB)
MAX_SAMPLE_RATE = 1_536_000  # Hz; 8x 192 kHz, above any real recording
DEFAULT_MAX_DURATION_S = 24 * 3600.0  # longest input accepted unless told otherwise
RESAMPLE_SAFE_PEAK = 1e37  # |sample| above which soxr's float32 filter could overflow (full scale is 1.0)
SOXR_QUALITY = "HQ"  # librosa.load's default (res_type='soxr_hq')
STREAMED_DATA_SIZES = (0xFFFFFFFF, 0x7FFFFFFF)  # WAV data sizes written by pipes (ffmpeg -f wav -, arecord)
FFMPEG_OPTIONS = {"protocol_whitelist": ""}  # FFmpeg may open no other file or URL than the one we hand it
PLAYLIST_FORMATS = frozenset({"hls", "concat", "dash"})  # demuxers that only point at other files
AUDIO_EXTENSIONS = frozenset(
    ".wav .wave .flac .ogg .oga .opus .mp3 .aiff .aif .aifc .au .caf .w64 .rf64 .m4a .mp4 .aac .wma .webm "
    ".mkv .mov .avi .3gp .amr .ac3 .mka .m4b".split()
)

@dataclass(frozen=True)
class AudioInfo:
    path: str
    sample_rate: int  # source rate, Hz
    channels: int


class AudioStream:
    """Iterate float32 mono blocks of a file at ``sample_rate`` (a model's: ``spec.sample_rate``),
    so memory does not grow with the file's length. ``frames`` counts source frames read so far.

    Args:
        source: A path, or a seekable binary file object (then `name` labels it in errors).
        block_s: Seconds of audio per block.
        max_duration_s: Inputs declaring or decoding to more than this are refused.
        name: The file's name in errors, for a file object.
        limit: The flag that sets `max_duration_s`, named in that error.
        sample_rate: Hz of the blocks it yields.

    Raises:
        AudioError: Missing, empty, truncated, non-audio or hostile input, NaN/Inf samples (when
            the stream is opened or while it is read).
        TooLongError: The input declares or decodes to more than `max_duration_s`.
    """

    def __init__(self, source: str | os.PathLike | BinaryIO, block_s: float = BLOCK_SECONDS,
                 max_duration_s: float = DEFAULT_MAX_DURATION_S,
                 name: str | None = None, limit: str = "--max-duration", sample_rate: int = CNN14.sample_rate) -> None:
        self.block_s = block_s
        self.sample_rate = sample_rate  # Hz, of the blocks it yields
        self.max_duration_s = max_duration_s
        self.limit = limit
        self.frames = 0
        self._owned = isinstance(source, (str, os.PathLike))  # we opened it, we close it
        if self._owned:
            self.path = os.fspath(source)
            self._file = _open_path(self.path)
        else:
            self.path = name or str(getattr(source, "name", "<stream>"))
            self._file = source
        try:
            self._source = _open(self._file, self.path, by_path=self._owned)
        except BaseException:
            if self._owned:
                self._file.close()
            raise
        self.info = AudioInfo(self.path, self._source.sample_rate, self._source.channels)
        try:
            self._check_header()
        except AudioError:
            self.close()
            raise

    def _check_header(self) -> None:
        sr, ch = self.info.sample_rate, self.info.channels
        if not 1 <= ch <= MAX_CHANNELS:
            raise AudioError(f"unsupported channel count {ch}", self.path)
        if not MIN_SAMPLE_RATE <= sr <= MAX_SAMPLE_RATE:
            raise AudioError(f"sample rate {sr} Hz is outside {MIN_SAMPLE_RATE}-{MAX_SAMPLE_RATE} Hz "
                             "(a broken header or not a recording)", self.path)
        declared = self._source.declared_frames
        if declared and declared / sr > self.max_duration_s:
            raise TooLongError(f"declares {_span(declared / sr)} of audio, more than the maximum "
                             f"{_span(self.max_duration_s)} ({self.limit})", self.path)

    @property
    def duration_s(self) -> float:
        """Decoded duration at the source rate (complete once iteration has finished)."""
        return self.frames / self.info.sample_rate

    def close(self) -> None:
        self._source.close()
        if self._owned:
            self._file.close()

    def __iter__(self) -> Iterator[np.ndarray]:
        sr, ch = self.info.sample_rate, self.info.channels
        rate = self.sample_rate
        resampler = None if sr == rate else soxr.ResampleStream(sr, rate, 1, "float32", SOXR_QUALITY)
        blocksize = max(1, min(int(self.block_s * sr), BLOCK_MAX_VALUES // ch))
        max_frames = self.max_duration_s * sr
        try:
            for block in self._source.blocks(blocksize):
                if block.size == 0:
                    continue
                peak = float(np.max(np.abs(block)))  # one pass: NaN or inf if any sample is not finite
                if not np.isfinite(peak):
                    bad = np.flatnonzero(~np.isfinite(block).all(axis=1))[0] + self.frames
                    raise AudioError(f"non-finite sample (NaN or Inf) at {bad / sr:.3f} s", self.path)
                if resampler is not None and peak > RESAMPLE_SAFE_PEAK:
                    raise AudioError(f"sample values up to {peak:.3g} (full scale is 1.0) would overflow "
                                     "float32 resampling: not audio, or wrongly scaled float data", self.path)
                self.frames += block.shape[0]
                if self.frames > max_frames:
                    raise TooLongError(f"longer than the maximum {_span(self.max_duration_s)} ({self.limit})", self.path)
                mono = downmix(block)
                out = mono if resampler is None else resampler.resample_chunk(mono)
                if out.size:
                    yield np.ascontiguousarray(out, dtype=np.float32)
            if resampler is not None:
                tail = resampler.resample_chunk(np.zeros(0, np.float32), last=True)
                if tail.size:
                    yield tail.astype(np.float32, copy=False)
        except AudioError:
            raise
        except MemoryError:
            raise AudioError(f"out of memory decoding after {self.frames / sr:.3f} s", self.path) from None
        except Exception as exc:  # decoder errors in the middle of a file (truncated, corrupt)
            raise AudioError(f"decoding failed after {self.frames / sr:.3f} s ({_why(exc)})", self.path) from None
        finally:
            self.close()
        if self.frames == 0:
            raise AudioError("no audio samples (zero-length)", self.path)
        self._source.check_complete(self)


def downmix(block: np.ndarray) -> np.ndarray:
    """Mean over channels of a [frames, channels] float32 block (files, streams, waveforms), scaled
    before summing (the mean of finite float32 samples cannot overflow), one channel column at a time:
    numpy's reduction over a short last axis (``sum(axis=1)``) ran 20x slower, 6.6 ms of a 10 s stereo
    file's 12 ms decode."""
    if block.shape[1] == 1:
        return block[:, 0]
    k = np.float32(1.0 / block.shape[1])
    mono = block[:, 0] * k
    for c in range(1, block.shape[1]):
        mono += block[:, c] * k
    return mono


def load_audio(source: str | os.PathLike | BinaryIO, max_duration_s: float = DEFAULT_MAX_DURATION_S,
               sample_rate: int = CNN14.sample_rate
               ) -> tuple[np.ndarray, AudioInfo, float]:
    """Decode a whole file into memory (for long files, iterate an `AudioStream` instead).

    Args:
        source: A path, or a seekable binary file object.
        max_duration_s: Refuse inputs that declare or decode to more seconds than this.
        sample_rate: The rate to resample to (a model's `spec.sample_rate`).

    Returns:
        `(samples, info, duration_s)`: float32 mono samples at `sample_rate`, what the container
        declares (`AudioInfo`), and the decoded duration at the source rate in seconds.

    Raises:
        AudioError: Missing, empty, truncated, non-audio or hostile input, or NaN/Inf samples.
        TooLongError: Longer than `max_duration_s`.
    """
    stream = AudioStream(source, max_duration_s=max_duration_s, sample_rate=sample_rate)
    blocks = list(stream)
    return np.concatenate(blocks), stream.info, stream.duration_s


def _span(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.4g} s"
    return f"{seconds / 60:.4g} min" if seconds < 7200 else f"{seconds / 3600:.4g} h"


def _why(exc: BaseException) -> str:
    strerror = getattr(exc, "strerror", None)  # FFmpeg's own words, without errno and file-object repr
    text = " ".join((strerror if isinstance(strerror, str) and strerror else str(exc)).split())
    return text or type(exc).__name__


def _open_path(path: str) -> BinaryIO:
    """Open a regular file for reading; non-blocking first, so a FIFO or a device cannot hang us."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    except FileNotFoundError:
        raise AudioError("no such file", path) from None
    except IsADirectoryError:
        raise AudioError("is a directory", path) from None
    except OSError as exc:
        raise AudioError(f"cannot open ({exc.strerror or _why(exc)})", path) from None
    st = os.fstat(fd)
    if stat.S_ISDIR(st.st_mode) or not stat.S_ISREG(st.st_mode):
        os.close(fd)
        raise AudioError("is a directory" if stat.S_ISDIR(st.st_mode) else "not a regular file (a pipe or a device)", path)
    if st.st_size == 0:
        os.close(fd)
        raise AudioError("empty file (0 bytes)", path)
    os.set_blocking(fd, True)
    return os.fdopen(fd, "rb")


class _SoundFileSource:
    def __init__(self, f, path: str) -> None:
        self._f = f
        self.sample_rate = f.samplerate
        self.channels = f.channels
        self.declared_frames = f.frames
        # libsndfile notes a chunk shorter than its header declares as "data : N (should be M)"; a
        # piped WAV declares 0xFFFFFFFF or 0x7FFFFFFF ("unknown, read to the end"), which is not a truncation
        short = re.search(r"^data\s*:\s*(\d+)\s*\(should be (\d+)\)", f.extra_info or "", re.M)
        if short and int(short.group(2)) < int(short.group(1)) and int(short.group(1)) not in STREAMED_DATA_SIZES:
            f.close()
            raise AudioError(f"truncated: header declares {short.group(1)} bytes of audio data, "
                             f"the file holds {short.group(2)}", path)

    def blocks(self, n: int) -> Iterator[np.ndarray]:
        while True:
            block = self._f.read(n, dtype="float32", always_2d=True)
            if block.shape[0] == 0:
                return
            yield block

    def close(self) -> None:
        self._f.close()

    def check_complete(self, stream: AudioStream) -> None:
        if self.declared_frames > 0 and stream.frames < self.declared_frames:
            raise AudioError(f"truncated: header declares {self.declared_frames} frames, "
                             f"only {stream.frames} readable", stream.path)


class _AVSource:
    def __init__(self, container, path: str) -> None:
        self._c = container
        self._s = container.streams.audio[0]
        self.sample_rate = int(self._s.codec_context.sample_rate or self._s.rate or 0)
        self.channels = int(self._s.codec_context.channels)
        self.declared_frames = 0
        if self._s.duration and self._s.time_base:
            self.declared_frames = int(self._s.duration * self._s.time_base * self.sample_rate)
        elif container.duration:
            self.declared_frames = int(container.duration / 1_000_000 * self.sample_rate)

    def blocks(self, n: int) -> Iterator[np.ndarray]:
        import av

        # Convert to packed float32 without changing rate or channels; downmix/resample happen outside.
        converter = av.AudioResampler(format="flt")
        pending: list[np.ndarray] = []
        count = 0
        for frame in self._c.decode(self._s):
            for out in converter.resample(frame):
                arr = out.to_ndarray().reshape(-1, self.channels)
                pending.append(arr)
                count += arr.shape[0]
            if count >= n:
                yield np.concatenate(pending)
                pending, count = [], 0
        for out in converter.resample(None):
            pending.append(out.to_ndarray().reshape(-1, self.channels))
        if pending:
            yield np.concatenate(pending)

    def close(self) -> None:
        self._c.close()

    def check_complete(self, stream: AudioStream) -> None:
        pass


def _open(f: BinaryIO, path: str, by_path: bool):
    """A block source: libsndfile first (by path when we have one: no Python I/O callbacks), then FFmpeg."""
    import soundfile as sf

    try:
        sfile = sf.SoundFile(os.fsencode(path) if by_path else f)  # bytes: names that are not UTF-8 too
    except Exception as sf_exc:  # not a libsndfile format: try FFmpeg
        first = _why(sf_exc)
    else:
        if sfile.frames > 0 or not _is_streamed_wav_without_size(sfile):
            return _SoundFileSource(sfile, path)
        sfile.close()  # a piped WAV with data size 0: FFmpeg reads such a file to its end
    f.seek(0)
    try:
        import av
    except ImportError:  # pragma: no cover - av is a hard dependency
        raise AudioError(f"not readable by libsndfile ({first}); install PyAV for other formats", path) from None
    try:
        container = av.open(f, mode="r", options=dict(FFMPEG_OPTIONS))  # mode: an upload is a w+b file
    except Exception as exc:
        raise AudioError(f"not an audio file ({_why(exc)})", path) from None
    if container.format.name in PLAYLIST_FORMATS or not container.streams.audio:
        kind = container.format.name
        container.close()
        if kind in PLAYLIST_FORMATS:
            raise AudioError(f"a {kind} playlist, not a media file (soundtag opens no other files or URLs)", path)
        raise AudioError("no audio stream", path)
    return _AVSource(container, path)


def _is_streamed_wav_without_size(sfile) -> bool:
    return (sfile.format in ("WAV", "WAVEX", "RF64") and re.search(r"^data\s*:\s*0\s*$", sfile.extra_info or "", re.M)
            is not None)
