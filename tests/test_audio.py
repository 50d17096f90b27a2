"""Decoding: formats, rates, channels, streaming, and clear errors for bad files."""

from fractions import Fraction

import av
import librosa
import numpy as np
import pytest
import soundfile as sf

from soundtag.audio import MAX_CHANNELS, AudioError, AudioStream, load_audio
from tests.fixtures import scene, write_wav


def write_av(path, data: np.ndarray, sr: int, codec: str, layout: str = "mono"):
    """Encode with PyAV (FFmpeg): m4a/aac, mp3 and Ogg-FLAC fixtures."""
    with av.open(str(path), "w") as out:
        stream = out.add_stream(codec, rate=sr, layout=layout)
        x = data if data.ndim == 2 else data[:, None]
        if codec == "flac":  # FFmpeg's FLAC encoder takes packed 16-bit integers
            pcm = np.clip(np.round(x * 32768), -32768, 32767).astype(np.int16).reshape(1, -1)
            frame = av.AudioFrame.from_ndarray(pcm, format="s16", layout=layout)
        else:
            frame = av.AudioFrame.from_ndarray(np.ascontiguousarray(x.T.astype(np.float32)), format="fltp", layout=layout)
        frame.sample_rate = sr
        frame.pts = 0
        frame.time_base = Fraction(1, sr)
        for packet in stream.encode(frame):
            out.mux(packet)
        for packet in stream.encode(None):
            out.mux(packet)
    return path


def test_resampling_matches_librosa_load(tmp_path):
    """Same samples as librosa.load(sr=32000) (soxr_hq after averaging channels)."""
    for sr, ch in ((8000, 1), (48000, 2), (44100, 2), (32000, 1)):
        x = scene(4, sr=sr, seed=sr, channels=ch)
        path = write_wav(tmp_path / f"a{sr}.wav", x, sr, subtype="FLOAT")
        got, info, duration = load_audio(path)
        ref, _ = librosa.load(str(path), sr=32000)
        assert info.sample_rate == sr and info.channels == ch
        assert duration == pytest.approx(4.0)
        assert got.dtype == np.float32 and abs(got.size - ref.size) <= 1
        n = min(got.size, ref.size)
        np.testing.assert_allclose(got[:n], ref[:n], atol=2e-4)


def test_blocks_are_bounded(tmp_path):
    """A long file streams in blocks of about 2 s; memory does not grow with duration."""
    path = write_wav(tmp_path / "long.wav", np.zeros(8000 * 600, np.int16), 8000)  # 10 minutes
    stream = AudioStream(path)
    sizes = [b.size for b in stream]
    assert max(sizes) <= 32000 * 2 + 4096
    assert sum(sizes) == pytest.approx(32000 * 600, abs=64)
    assert stream.duration_s == pytest.approx(600.0)


def test_pyav_formats(tmp_path):
    x = scene(3, sr=44100, channels=2)
    for name, codec in (("a.m4a", "aac"), ("a.mp3", "libmp3lame")):
        try:
            path = write_av(tmp_path / name, x, 44100, codec, "stereo")
        except Exception as exc:  # pragma: no cover - depends on the FFmpeg build
            pytest.skip(f"{codec} encoder unavailable: {exc}")
        got, info, duration = load_audio(path)
        assert info.channels == 2 and info.sample_rate == 44100
        assert duration == pytest.approx(3.0, abs=0.1)
        assert got.size == pytest.approx(32000 * duration, abs=64)
        assert 0.01 < np.abs(got).max() <= 1.5
        # same samples as librosa.load's audioread/FFmpeg path, up to its 16-bit output
        ref, _ = librosa.load(str(path), sr=32000)
        n = min(ref.size, got.size)
        assert abs(ref.size - got.size) <= 2 and np.abs(ref[:n] - got[:n]).max() < 1e-4


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda p: p, "no such file"),
        (lambda p: (p.write_bytes(b""), p)[1], "empty file"),
        (lambda p: (p.write_text("hello, I am not audio\n" * 50), p)[1], "not an audio file"),
        (lambda p: (p.mkdir(), p)[1], "is a directory"),
    ],
    ids=["missing", "empty", "text", "directory"],
)
def test_bad_files(tmp_path, make, message):
    path = make(tmp_path / "bad.wav")
    with pytest.raises(AudioError, match=message) as exc:
        list(AudioStream(path))
    assert str(path) in str(exc.value) and "\n" not in str(exc.value)


def test_truncated_wav(tmp_path):
    path = write_wav(tmp_path / "t.wav", scene(2), 32000)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(AudioError, match="truncated"):
        list(AudioStream(path))
    header_only = tmp_path / "h.wav"
    header_only.write_bytes(data[:30])
    with pytest.raises(AudioError):
        list(AudioStream(header_only))


def test_zero_length_and_nan(tmp_path):
    empty = write_wav(tmp_path / "zero.wav", np.zeros(0, np.float32), 32000)
    with pytest.raises(AudioError, match="no audio samples"):
        list(AudioStream(empty))
    x = scene(2)
    x[40000] = np.nan
    nan = write_wav(tmp_path / "nan.wav", x, 32000, subtype="FLOAT")
    with pytest.raises(AudioError, match=r"non-finite sample .* at 1\.250 s"):
        list(AudioStream(nan))
    x[40000] = np.inf
    inf = write_wav(tmp_path / "inf.wav", x, 32000, subtype="FLOAT")
    with pytest.raises(AudioError, match="non-finite"):
        list(AudioStream(inf))


def test_absurd_channel_count(tmp_path):
    path = tmp_path / "many.wav"
    sf.write(str(path), np.zeros((100, MAX_CHANNELS + 1), np.int16), 8000)
    with pytest.raises(AudioError, match=f"unsupported channel count {MAX_CHANNELS + 1}"):
        AudioStream(path)
