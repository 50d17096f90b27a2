"""Decode any audio file to float32 mono 32 kHz, in blocks, so memory does not grow with duration.

libsndfile formats (wav, flac, ogg/vorbis, opus, mp3, ...) go through soundfile; everything else
FFmpeg reads (m4a/aac, wma, video containers) through PyAV. Channels are averaged (as librosa's
to_mono), then resampled with soxr at high quality (librosa.load's default res_type 'soxr_hq').
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import soxr

from .features import SAMPLE_RATE

log = logging.getLogger(__name__)

BLOCK_SECONDS = 2.0  # source audio decoded per block: memory per block, not per file
MAX_CHANNELS = 64  # more than this is treated as a broken or non-audio file
SOXR_QUALITY = "HQ"  # librosa.load's default (res_type='soxr_hq')
AUDIO_EXTENSIONS = frozenset(
    ".wav .wave .flac .ogg .oga .opus .mp3 .aiff .aif .aifc .au .caf .w64 .rf64 .m4a .mp4 .aac .wma .webm "
    ".mkv .mov .avi .3gp .amr .ac3 .mka .m4b".split()
)


class AudioError(ValueError):
    """A file that cannot be decoded into audio samples; the message names the file and the cause."""


@dataclass(frozen=True)
class AudioInfo:
    path: str
    sample_rate: int  # source rate, Hz
    channels: int


class AudioStream:
    """Iterate float32 mono 32 kHz blocks of a file. ``frames`` counts source frames read so far."""

    def __init__(self, path: str | Path, block_s: float = BLOCK_SECONDS) -> None:
        self.path = str(path)
        self.block_s = block_s
        self.frames = 0
        p = Path(path)
        if not p.exists():
            raise AudioError(f"{p}: no such file")
        if p.is_dir():
            raise AudioError(f"{p}: is a directory")
        if p.stat().st_size == 0:
            raise AudioError(f"{p}: empty file (0 bytes)")
        self._source = _open(p)
        self.info = AudioInfo(self.path, self._source.sample_rate, self._source.channels)
        if not 1 <= self.info.channels <= MAX_CHANNELS:
            raise AudioError(f"{p}: unsupported channel count {self.info.channels}")
        if self.info.sample_rate <= 0:
            raise AudioError(f"{p}: invalid sample rate {self.info.sample_rate}")

    @property
    def duration_s(self) -> float:
        """Decoded duration at the source rate (complete once iteration has finished)."""
        return self.frames / self.info.sample_rate

    def __iter__(self) -> Iterator[np.ndarray]:
        sr = self.info.sample_rate
        resampler = None if sr == SAMPLE_RATE else soxr.ResampleStream(sr, SAMPLE_RATE, 1, "float32", SOXR_QUALITY)
        blocksize = max(1, int(self.block_s * sr))
        try:
            for block in self._source.blocks(blocksize):
                if block.size == 0:
                    continue
                if not np.isfinite(block).all():
                    bad = np.flatnonzero(~np.isfinite(block).all(axis=1))[0] + self.frames
                    raise AudioError(f"{self.path}: non-finite sample (NaN or Inf) at {bad / sr:.3f} s")
                self.frames += block.shape[0]
                mono = block.mean(axis=1, dtype=np.float32) if block.shape[1] > 1 else block[:, 0]
                out = mono if resampler is None else resampler.resample_chunk(mono)
                if out.size:
                    yield np.ascontiguousarray(out, dtype=np.float32)
            if resampler is not None:
                tail = resampler.resample_chunk(np.zeros(0, np.float32), last=True)
                if tail.size:
                    yield tail.astype(np.float32, copy=False)
        except AudioError:
            raise
        except Exception as exc:  # decoder errors in the middle of a file (truncated, corrupt)
            raise AudioError(f"{self.path}: decoding failed after {self.frames / sr:.3f} s ({_why(exc)})") from None
        finally:
            self._source.close()
        if self.frames == 0:
            raise AudioError(f"{self.path}: no audio samples (zero-length)")
        self._source.check_complete(self)


def load_audio(path: str | Path) -> tuple[np.ndarray, AudioInfo, float]:
    """Whole file as float32 mono 32 kHz, with its info and source duration in seconds."""
    stream = AudioStream(path)
    blocks = list(stream)
    return np.concatenate(blocks), stream.info, stream.duration_s


def _why(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return text


class _SoundFileSource:
    def __init__(self, f) -> None:
        self._f = f
        self.sample_rate = f.samplerate
        self.channels = f.channels
        self.declared = f.frames
        # libsndfile notes a chunk shorter than its header declares as "data : N (should be M)"
        short = re.search(r"^data\s*:\s*(\d+)\s*\(should be (\d+)\)", f.extra_info or "", re.M)
        if short and int(short.group(2)) < int(short.group(1)):
            f.close()
            raise AudioError(f"{f.name}: truncated: header declares {short.group(1)} bytes of audio data, "
                             f"the file holds {short.group(2)}")

    def blocks(self, n: int) -> Iterator[np.ndarray]:
        while True:
            block = self._f.read(n, dtype="float32", always_2d=True)
            if block.shape[0] == 0:
                return
            yield block

    def close(self) -> None:
        self._f.close()

    def check_complete(self, stream: AudioStream) -> None:
        if self.declared > 0 and stream.frames < self.declared:
            raise AudioError(
                f"{stream.path}: truncated: header declares {self.declared} frames, only {stream.frames} readable"
            )


class _AVSource:
    def __init__(self, container) -> None:
        self._c = container
        self._s = container.streams.audio[0]
        self.sample_rate = int(self._s.codec_context.sample_rate or self._s.rate or 0)
        self.channels = int(self._s.codec_context.channels)

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


def _open(path: Path):
    import soundfile as sf

    try:
        return _SoundFileSource(sf.SoundFile(str(path)))
    except AudioError:
        raise
    except Exception as sf_exc:  # not a libsndfile format: try FFmpeg
        first = _why(sf_exc)
    try:
        import av
    except ImportError:  # pragma: no cover - av is a hard dependency
        raise AudioError(f"{path}: not readable by libsndfile ({first}); install PyAV for other formats") from None
    try:
        container = av.open(str(path))
    except Exception as exc:
        raise AudioError(f"{path}: not an audio file ({_why(exc)})") from None
    if not container.streams.audio:
        container.close()
        raise AudioError(f"{path}: no audio stream")
    return _AVSource(container)
