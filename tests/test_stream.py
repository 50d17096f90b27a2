"""Tagger.stream: fed a file's samples in blocks of any size, the same windows, scores and events as
Tagger.tag_file; bounded memory; PCM decoding; bad streams."""

from __future__ import annotations

import numpy as np
import pytest
import soundfile as sf

from soundtag import AudioError, OptionsError, Tagger, TaggerOptions
from soundtag.stream import StreamEvent, StreamWindow, decode_pcm
from tests.fixtures import scene, write_wav


@pytest.fixture(scope="module")
def tagger(fp32_model):
    return Tagger(TaggerOptions(model_path=str(fp32_model), hop_s=5.0, threshold=0.3, top_k=5))


def feed_file(stream, path, rng):
    data, _ = sf.read(str(path), dtype="float32", always_2d=True)
    out, i = [], 0
    while i < data.shape[0]:
        n = int(rng.integers(1, 40_000))  # from one frame to about a second
        out += stream.feed(data[i : i + n])
        i += n
    return out + stream.close()


@pytest.mark.parametrize("sr, channels, seconds", [(44100, 2, 27.3), (32000, 1, 7.0), (16000, 1, 20.0)])
def test_stream_equals_tag_file(tagger, tmp_path, sr, channels, seconds):
    path = write_wav(tmp_path / "a.wav", scene(seconds, sr=sr, seed=3, channels=channels), sr, subtype="FLOAT")
    ref = tagger.tag_file(path)
    items = feed_file(tagger.stream(sr, channels), path, np.random.default_rng(0))
    windows = [i for i in items if isinstance(i, StreamWindow)]
    assert [w.start_s for w in windows] == pytest.approx([w.start_s for w in ref.windows], abs=1e-9)
    assert [w.end_s for w in windows] == pytest.approx([w.end_s for w in ref.windows], abs=1 / sr)
    got = np.stack([w.scores for w in windows])
    for g, r in zip(got, ref.window_scores):
        assert float(np.corrcoef(g, r)[0, 1]) >= 0.99999
    np.testing.assert_allclose(got, ref.window_scores, atol=1e-4)
    assert [[c.index for c in w.categories] for w in windows] == [[c.index for c in w.categories] for w in ref.windows]
    # events: opened and closed as windows arrive, ending as the file's event table
    ended = [i.event for i in items if isinstance(i, StreamEvent) and i.kind == "end"]
    key = lambda e: (e.start_s, e.index)  # noqa: E731
    rounded = lambda events: [(round(e.start_s, 4), round(e.end_s, 4), e.index) for e in sorted(events, key=key)]  # noqa: E731
    assert rounded(ended) == rounded(ref.events)
    started = [i.event.index for i in items if isinstance(i, StreamEvent) and i.kind == "start"]
    assert sorted(started) == sorted(e.index for e in ended)
    assert all(w.latency_s >= 0 for w in windows)


def test_stream_memory_is_bounded(tagger):
    """10 minutes of silence in 0.5 s blocks: the stream holds one window and one block, not the minutes."""
    import tracemalloc

    stream = tagger.stream(48000, 2)
    block = np.zeros((24000, 2), np.float32)
    tracemalloc.start()
    n = 0
    for _ in range(2 * 600):  # 10 minutes: enough to see growth, quick on the model (hop 5 s: 119 windows)
        n += sum(isinstance(i, StreamWindow) for i in stream.feed(block))
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    n += sum(isinstance(i, StreamWindow) for i in stream.close())  # the resampler's last samples
    assert n == 119 and peak < 20e6  # the 10 minutes themselves are 230 MB


def test_decode_pcm_and_bad_streams(tagger):
    x = np.array([[0.5, -0.5], [0.25, 1.0]], np.float32)
    assert np.array_equal(decode_pcm(x.astype("<f4").tobytes(), "f32le", 2), x)
    s16 = (x * 32767).astype("<i2")
    np.testing.assert_allclose(decode_pcm(s16.tobytes(), "s16le", 2), x, atol=1 / 32768 + 1e-6)
    with pytest.raises(AudioError, match="whole number"):
        decode_pcm(b"\x00\x01\x02", "s16le", 1)
    with pytest.raises(OptionsError, match="encoding"):
        decode_pcm(b"", "mp3", 1)
    with pytest.raises(OptionsError, match="sample_rate"):
        tagger.stream(1, 1)
    with pytest.raises(OptionsError, match="channels"):
        tagger.stream(32000, 0)
    s = tagger.stream(32000, 1)
    with pytest.raises(AudioError, match="non-finite"):
        s.feed(np.array([0.0, np.nan], np.float32))
    with pytest.raises(AudioError, match=r"shaped \[frames, 1\]"):
        s.feed(np.zeros((10, 2), np.float32))
    assert s.close() == [] and s.close() == []  # nothing fed: no window
