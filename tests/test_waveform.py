"""The waveform models (issue #9): waveform in, the log-mel in the graph, probabilities out; proven by
the converter against the PyTorch body on the host log-mel, and equal at run time to the log-mel models
(whose host front end is tested against torchlibrosa and librosa in test_features.py)."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from soundtag.convert.validate import MAX_TENSOR_BYTES, pearson
from soundtag.model import Cnn14Model, gpu_missing
from soundtag.tagger import Tagger, TaggerOptions
from tests.fixtures import scene, write_wav

needs_gpu = pytest.mark.skipif(gpu_missing() is not None, reason=f"no GPU accelerator: {gpu_missing()}")


def test_report_gates(models):
    report = json.loads((models / "conversion_report.json").read_text())
    assert report["waveform_inputs"] == ["noise", "chirp", "speech", "clipping", "near_silence"]
    for precision, min_corr, max_diff in (("fp32", 0.99999, 1e-4), ("fp16", 0.9999, None)):
        m = report["models"][f"waveform_{precision}"]
        assert m["passed"] and m["file"] == f"cnn14_audioset_waveform_{precision}.tflite"
        assert (models / m["file"]).stat().st_size == m["bytes"]
        par = m["parity_vs_pytorch"]
        assert par["min_corr"] >= min_corr and (max_diff is None or par["max_abs_diff"] <= max_diff)
        assert set(par["per_input"]) == set(report["waveform_inputs"])
        g = m["graph"]
        assert g["subgraphs"] == 1 and g["max_rank"] <= 4 and g["gpu_ok"] and g["largest_tensor_bytes"] <= MAX_TENSOR_BYTES
        assert "CONV_1D" not in g["ops"] and "GATHER_ND" not in g["ops"]  # no DFT-as-conv, no gather padding
        if gpu_missing() is None:
            gpu = m["gpu"]
            assert gpu["passed"] and gpu["fully_accelerated"]
            assert gpu["modes"]["fp32"]["min_corr"] >= 0.99999 and gpu["modes"]["fp32"]["max_abs_diff"] <= 1e-4
            assert gpu["modes"]["fp16"]["gated"] is False  # measured only: see test_waveform_gpu_fp16_refused


@pytest.mark.parametrize("precision, min_corr, max_diff", [("fp32", 0.99999, 1e-4), ("fp16", 0.9999, 5e-3)])
def test_same_tags_as_the_logmel_model(models, precision, min_corr, max_diff):
    """A 25 s scene (three windows, the last aligned to the end) and a 3 s clip (zero-padded window):
    the waveform model vs the log-mel model of the same precision, every window's 527 scores."""
    wave_model = Tagger(TaggerOptions(model_path=str(models / f"cnn14_audioset_waveform_{precision}.tflite")))
    assert wave_model.model.input_kind == "waveform" and wave_model.model.input_shape == (1, 320_000) == wave_model.spec.input_shape
    logmel_model = Tagger(TaggerOptions(model_path=str(models / f"cnn14_audioset_{precision}.tflite")))
    assert logmel_model.model.input_kind == "logmel"
    for x in (scene(25, seed=3), 0.3 * scene(3, seed=4)):
        got, want = wave_model.tag_waveform(x), logmel_model.tag_waveform(x)
        assert got.window_scores.shape == want.window_scores.shape
        for g, w in zip(got.window_scores, want.window_scores):
            assert pearson(w, g) >= min_corr
            assert np.max(np.abs(g - w)) <= max_diff


def test_cli_tags_with_the_waveform_model(models, tmp_path):
    clip = write_wav(tmp_path / "scene.wav", scene(12, seed=5))
    env = {**os.environ}
    r = subprocess.run([sys.executable, "-m", "soundtag.cli", "tag", str(clip), "--format", "jsonl", "--model",
                        str(models / "cnn14_audioset_waveform_fp32.tflite")], capture_output=True, text=True, env=env)
    assert r.returncode == 0, r.stderr
    rec = json.loads(r.stdout)
    want = Tagger(TaggerOptions(model_path=str(models / "cnn14_audioset_fp32.tflite"))).tag_file(clip)
    assert [t["label"] for t in rec["tags"]] == [c.name for c in want.clip]
    np.testing.assert_allclose([t["score"] for t in rec["tags"]], [c.score for c in want.clip], atol=1e-4)


def test_stream_with_the_waveform_model(models):
    """Live blocks through TagStream: the waveform model gets the samples, the same windows as a file."""
    from soundtag.stream import StreamWindow

    tagger = Tagger(TaggerOptions(model_path=str(models / "cnn14_audioset_waveform_fp32.tflite"), hop_s=5.0))
    x = scene(17, seed=6)
    stream, items = tagger.stream(32000), []
    for i in range(0, x.size, 7919):
        items += stream.feed(x[i : i + 7919])
    windows = [w for w in items + stream.close() if isinstance(w, StreamWindow)]
    ref = tagger.tag_waveform(x)
    assert len(windows) == len(ref.windows) == 3
    np.testing.assert_allclose(np.stack([w.scores for w in windows]), ref.window_scores, atol=1e-4)


@needs_gpu
def test_waveform_fp16_model_on_the_gpu(models):
    """The waveform fp16 model runs on the GPU in fp32 arithmetic by default, equal to the CPU."""
    path = models / "cnn14_audioset_waveform_fp16.tflite"
    gpu = Cnn14Model(path, accelerator="gpu")
    assert gpu.accelerator == "gpu" and gpu.gpu.precision == "fp32" and gpu.gpu.fully_accelerated
    x = scene(10, seed=8)
    want, got = Cnn14Model(path)(x), gpu(x)
    assert pearson(want, got) >= 0.99999 and np.max(np.abs(want - got)) <= 1e-4


@needs_gpu
def test_waveform_gpu_fp16_refused(models):
    """In the GPU's fp16 arithmetic the in-graph DFT cannot keep the ~100 dB a band-limited clip spans:
    the probe sees it and refuses, instead of tagging wrongly."""
    from soundtag.errors import ModelError

    with pytest.raises(ModelError, match="differs from the CPU on the probe"):
        Cnn14Model(models / "cnn14_audioset_waveform_fp32.tflite", accelerator="gpu", gpu_precision="fp16")
