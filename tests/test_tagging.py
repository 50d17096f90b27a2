"""Tagging vs the PyTorch reference path, windows, events, options, and the torch-free runtime."""

import subprocess
import sys

import librosa
import numpy as np
import pytest
import soundfile as sf
import torch

from soundtag import Tagger, TaggerOptions
from soundtag.features import logmel
from soundtag.model import Cnn14Model, ModelError
from tests.fixtures import SR, scene, speech_wave, write_wav
from tests.test_audio import write_av
from tests.test_features import torchlibrosa_logmel


@pytest.fixture(scope="module")
def tagger(fp32_model):
    return Tagger.from_model_path(fp32_model, top_k=10)


def reference_clip_probs(body, path, hop_s=10.0) -> np.ndarray:
    """The PANNs reference path: librosa.load(sr=32000) -> torchlibrosa (float32) -> PyTorch body,
    10 s windows every hop_s while they fit, then one aligned to the end (a clip under 10 s: one
    zero-padded window), max over windows."""
    x, _ = librosa.load(str(path), sr=SR)
    n, hop = 320_000, int(hop_s * SR)
    starts = [0] if x.size <= n else list(range(0, x.size - n + 1, hop))
    if starts[-1] + n < x.size:
        starts.append(x.size - n)
    probs = []
    for s in starts:
        w = np.zeros(n, np.float32)
        seg = x[s : s + n]
        w[: seg.size] = seg
        lm = torchlibrosa_logmel(w, torch.float32)
        with torch.inference_mode():
            probs.append(body(torch.from_numpy(lm[None, None])).numpy()[0])
    return np.max(probs, axis=0)


def corr(a, b) -> float:
    return float(np.corrcoef(a, b)[0, 1])


def test_model_matches_pytorch_body_on_same_logmel(tagger, body, tmp_path):
    x = scene(10, seed=3)
    lm = logmel(x)
    got = tagger.model(lm)
    with torch.inference_mode():
        ref = body(torch.from_numpy(lm[None, None])).numpy()[0]
    np.testing.assert_allclose(got, ref, atol=1e-4, rtol=0)
    res = tagger.tag_file(write_wav(tmp_path / "a.wav", x, SR, subtype="FLOAT"))
    np.testing.assert_allclose(res.clip_scores, ref, atol=1e-4, rtol=0)
    assert [c.index for c in res.clip] == list(np.argsort(-ref)[:10])


@pytest.mark.parametrize("kind", ["8k_mono", "48k_stereo", "44k_stereo_flac", "speech_16k", "mp3"])
def test_matches_reference_path(kind, tagger, body, tmp_path):
    if kind == "8k_mono":
        path = write_wav(tmp_path / "a.wav", scene(7, sr=8000, seed=1), 8000)
    elif kind == "48k_stereo":
        path = write_wav(tmp_path / "a.wav", scene(9, sr=48000, seed=2, channels=2), 48000)
    elif kind == "44k_stereo_flac":
        path = write_wav(tmp_path / "a.flac", scene(25, sr=44100, seed=4, channels=2), 44100)
    elif kind == "speech_16k":
        data, sr = speech_wave()
        path = write_wav(tmp_path / "speech.wav", data, sr)
    else:
        try:
            path = write_av(tmp_path / "a.mp3", scene(6, sr=44100, seed=5, channels=2), 44100, "libmp3lame", "stereo")
        except Exception as exc:  # pragma: no cover
            pytest.skip(f"{codec} encoder unavailable: {exc}")
        try:
            librosa.load(str(path), sr=SR)
        except Exception as exc:  # pragma: no cover - librosa's own decoder may not read it
            pytest.skip(f"reference path cannot decode {kind}: {exc}")
    ref = reference_clip_probs(body, path)
    got = tagger.tag_file(path)
    assert got.duration_s == pytest.approx(sf.info(str(path)).duration, abs=0.06)
    assert corr(got.clip_scores, ref) >= 0.9999


def test_same_audio_in_wav_flac_ogg(tagger, tmp_path):
    """The same 16-bit audio as WAV, FLAC (libsndfile) and Ogg-FLAC (PyAV fallback): identical tags.
    Lossy Ogg/Vorbis at its best quality is close, not identical (stated, looser bound)."""
    x = np.round(scene(8, sr=44100, seed=6) * 32768) / 32768  # exactly representable in 16 bits
    probs = {}
    for name in ("a.wav", "a.flac"):
        sf.write(str(tmp_path / name), x, 44100, subtype="PCM_16")
        probs[name] = tagger.tag_file(tmp_path / name).clip_scores
    probs["a.ogg"] = tagger.tag_file(write_av(tmp_path / "a.ogg", x, 44100, "flac")).clip_scores
    sf.write(str(tmp_path / "v.ogg"), x, 44100, format="OGG", subtype="VORBIS", compression_level=0.0)
    vorbis = tagger.tag_file(tmp_path / "v.ogg").clip_scores
    assert corr(probs["a.wav"], probs["a.flac"]) >= 0.99999
    assert corr(probs["a.wav"], probs["a.ogg"]) >= 0.99999
    assert corr(probs["a.wav"], vorbis) >= 0.95  # lossy codec: close, not identical


def test_first_window_equals_clip_alone(tagger, tmp_path):
    x = scene(27, seed=7)
    long = tagger.tag_file(write_wav(tmp_path / "long.wav", x, SR, subtype="FLOAT"))
    alone = tagger.tag_file(write_wav(tmp_path / "first.wav", x[: 10 * SR], SR, subtype="FLOAT"))
    np.testing.assert_allclose(long.window_scores[0], alone.window_scores[0], atol=1e-6)
    assert corr(long.window_scores[0], alone.clip_scores) >= 0.99999


@pytest.mark.parametrize("hop, starts, ends", [
    (10.0, [0, 10, 15], [10, 20, 25]),
    (5.0, [0, 5, 10, 15], [10, 15, 20, 25]),
])
def test_window_times(fp32_model, tmp_path, hop, starts, ends):
    tagger = Tagger.from_model_path(fp32_model, hop_s=hop)
    res = tagger.tag_file(write_wav(tmp_path / "a.wav", scene(25, seed=8), SR))
    assert [w.start_s for w in res.windows] == starts
    assert [w.end_s for w in res.windows] == pytest.approx(ends)
    assert res.duration_s == pytest.approx(25.0)
    np.testing.assert_allclose(res.clip_scores, res.window_scores.max(axis=0))


def test_short_file_one_padded_window(tagger, body, tmp_path):
    x = scene(3.5, seed=9)
    res = tagger.tag_file(write_wav(tmp_path / "s.wav", x, SR, subtype="FLOAT"))
    assert len(res.windows) == 1 and res.windows[0].end_s == pytest.approx(3.5)
    padded = np.zeros(320_000, np.float32)
    padded[: x.size] = x
    with torch.inference_mode():
        ref = body(torch.from_numpy(torchlibrosa_logmel(padded, torch.float32)[None, None])).numpy()[0]
    assert corr(res.clip_scores, ref) >= 0.99999


def test_mean_aggregate(fp32_model, tmp_path):
    res = Tagger.from_model_path(fp32_model, aggregate="mean").tag_file(write_wav(tmp_path / "a.wav", scene(21), SR))
    np.testing.assert_allclose(res.clip_scores, res.window_scores.mean(axis=0), rtol=1e-6)


def test_selection_options(fp32_model):
    t = Tagger.from_model_path(fp32_model, top_k=3, threshold=0.2, allow=["Speech", "/m/0bt9lr", "Music", "Cat"],
                               deny=["music"], thresholds={"Dog": 0.9})
    scores = np.zeros(527, np.float32)
    scores[[0, 137, 81, 0 + 74]] = [0.5, 0.9, 0.1, 0.95]  # Speech, Music, Cat, Dog
    got = t.select(scores)
    assert [c.name for c in got] == ["Dog", "Speech"]  # Music denied, Cat below 0.2, Dog (by MID) above 0.9
    t2 = Tagger.from_model_path(fp32_model, top_k=2, thresholds={"Dog": 0.99})
    assert [c.name for c in t2.select(scores)] == ["Music", "Speech"]


def test_events_merge_consecutive_windows(fp32_model):
    t = Tagger.from_model_path(fp32_model, threshold=0.5)
    probs = np.zeros((5, 527), np.float32)
    probs[[0, 1, 3], 0] = [0.6, 0.8, 0.7]  # Speech: windows 0-1, then 3
    probs[4, 74] = 0.55  # Dog: last window
    starts = np.array([0.0, 10, 20, 30, 40])
    ends = np.array([10.0, 20, 30, 40, 45])
    ev = t.events(starts, ends, probs)
    assert [(e.start_s, e.end_s, e.name, round(e.score, 2)) for e in ev] == [
        (0.0, 20.0, "Speech", 0.8), (30.0, 40.0, "Speech", 0.7), (40.0, 45.0, "Dog", 0.55)]


def test_unknown_class_suggests(fp32_model):
    with pytest.raises(KeyError, match="did you mean 'Dog'"):
        Tagger.from_model_path(fp32_model, allow=["Dogg"])


def test_tag_waveform_any_rate(tagger, tmp_path):
    x = scene(5, sr=22050, seed=10, channels=2)
    a = tagger.tag_waveform(x, 22050)
    b = tagger.tag_file(write_wav(tmp_path / "a.wav", x, 22050, subtype="FLOAT"))
    assert corr(a.clip_scores, b.clip_scores) >= 0.99999
    with pytest.raises(ValueError, match="non-finite"):
        tagger.tag_waveform(np.array([0.0, np.nan] * 1000), 16000)
    with pytest.raises(ValueError, match="non-empty"):  # [frames, 0 channels]: no audio, not silence
        tagger.tag_waveform(np.zeros((32000, 0), np.float32))


def test_wrong_model_signature(tmp_path, fp32_model):
    import litert_torch

    class Small(torch.nn.Module):
        def forward(self, x):
            return torch.sigmoid(x.mean(dim=(2, 3)))

    edge = litert_torch.convert(Small().eval(), (torch.zeros(1, 1, 100, 64),))
    path = tmp_path / "other.tflite"
    edge.export(str(path))
    with pytest.raises(ModelError, match=r"other.tflite: has no soundtag model spec, and its signature \(input "
                                         r"\[1, 1, 100, 64\], outputs \[1, 1\]\) is not CNN14's \(input \[1, 1, 1001, 64\]"):
        Cnn14Model(path)
    junk = tmp_path / "junk.tflite"
    junk.write_bytes(b"\x00" * 1000)
    with pytest.raises(ModelError, match="not a LiteRT model"):
        Cnn14Model(junk)
    with pytest.raises(ModelError, match="not found"):
        Cnn14Model(tmp_path / "missing.tflite")


def test_tagging_path_never_imports_torch(fp32_model, tmp_path):
    wav = write_wav(tmp_path / "a.wav", scene(12), SR)
    code = (
        "import sys, soundtag\n"
        f"t = soundtag.Tagger(soundtag.TaggerOptions(model_path={str(fp32_model)!r}))\n"
        f"r = t.tag_file({str(wav)!r})\n"
        "assert len(r.windows) == 2 and r.clip\n"
        "import soundtag.cli, soundtag.writers, soundtag.batch\n"
        "bad = [m for m in sys.modules if m == 'torch' or m.startswith(('torch.', 'litert_torch'))]\n"
        "assert not bad, bad\n"
        "print('ok')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and "ok" in out.stdout, out.stderr


def test_prefetch_order_errors_and_early_stop():
    import threading

    from soundtag.windows import prefetch

    assert list(prefetch(iter(range(100)))) == list(range(100))

    def boom():
        yield 1
        raise ValueError("decoder broke")

    with pytest.raises(ValueError, match="decoder broke"):
        list(prefetch(boom()))
    g = prefetch(iter(range(10**6)))
    assert next(g) == 0
    g.close()
    assert not any(t.name == "soundtag-prefetch" and t.is_alive() for t in threading.enumerate())
