"""The PANNs family (issue #19): a model file that says what it is, every architecture converted and
proven against its own PyTorch module, the runtime reading each model's numbers from its spec.

References: the PyTorch bodies (convert/cnns.py etc., keys and forward equal to upstream's:
tests/test_family_bodies.py) on torchlibrosa's front end built with each model's numbers, and
librosa's mel filterbank for the mel bases (tests/test_features.py)."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys

import numpy as np
import pytest

from soundtag import Tagger, TaggerOptions
from soundtag.errors import ModelError
from soundtag.model import Model
from soundtag.spec import CNN14, SPEC_METADATA_NAME, ModelSpec, embed_spec, read_spec
from tests.fixtures import cached_family_models, speech_wave

torch = pytest.importorskip("torch")
from soundtag.convert import family  # noqa: E402
from soundtag.convert.synthetic import write_synthetic_checkpoint  # noqa: E402

FP32_CORR, FP32_DP = 0.99999, 1e-4  # the converter's fp32 gates
TAG_TOL = 1e-4  # a tagged file's clip scores vs the PyTorch body on torchlibrosa's log-mel of the same audio
# small enough to convert every precision in CI; ResNet38 and Wavegram (300 MB, ~3 GB to convert): fp32
# (MobileNetV1/V2 fp16 and int8 miss their gates on the synthetic weights, fp16 corr 0.99959, int8 0.976:
# open in the issue note, so only their fp32 is proven here)
SMALL = {"Cnn6": ("fp32", "fp16", "int8"), "Cnn10": ("fp32", "int8"), "MobileNetV1": ("fp32",),
         "MobileNetV2": ("fp32",)}
BIG = {"Cnn14_16k": ("fp32", "fp16"), "Cnn14_8k": ("fp32",), "ResNet38": ("fp32",), "Wavegram_Logmel_Cnn14": ("fp32",)}


def torchlibrosa_logmel(x: np.ndarray, fe) -> np.ndarray:
    from torchlibrosa.stft import LogmelFilterBank, Spectrogram

    sp = Spectrogram(n_fft=fe.n_fft, hop_length=fe.hop, win_length=fe.n_fft, window="hann", center=True,
                     pad_mode="reflect", freeze_parameters=True).double()
    lm = LogmelFilterBank(sr=fe.sample_rate, n_fft=fe.n_fft, n_mels=fe.n_mels, fmin=fe.fmin, fmax=fe.fmax, ref=1.0,
                          amin=1e-10, top_db=None, freeze_parameters=True).double()
    with torch.no_grad():
        return lm(sp(torch.tensor(x[None], dtype=torch.float64)))[0, 0].numpy()


@pytest.mark.parametrize("arch", list(SMALL) + list(BIG))
def test_family_model_is_proven_and_tags_like_pytorch(arch, tmp_path):
    """Each architecture: converted with every gate passed, its spec inside the file, and `Tagger` on a
    real recording (resampled by soundtag to the model's rate) equal to the PyTorch module on
    torchlibrosa's log-mel of the same samples."""
    out, checkpoint = cached_family_models(arch, (SMALL | BIG)[arch])
    a = family.ARCHITECTURES[arch]
    report = json.loads((out / f"{arch.lower()}_conversion_report.json").read_text())
    assert report["passed"] and report["architecture"] == arch
    fp32 = report["models"]["fp32"]
    assert fp32["parity_vs_pytorch"]["min_corr"] >= FP32_CORR and fp32["parity_vs_pytorch"]["max_abs_diff"] <= FP32_DP
    assert fp32["graph"]["passed"] and fp32["graph"]["subgraphs"] == 1 and fp32["graph"]["max_rank"] <= 4
    assert fp32["graph"]["largest_tensor_bytes"] <= 128 * 2**20  # WebGPU's binding limit, as fp32
    for precision in (SMALL | BIG)[arch]:
        spec = read_spec(out / a.file(precision))
        assert spec is not None and spec.architecture == arch and spec.precision == precision
        assert spec.front_end == a.front_end and spec.num_classes == 527
        assert spec.checkpoint_md5 == report["checkpoint"]["md5"]
    model_path = out / a.file("fp32")
    tagger = Tagger(TaggerOptions(model_path=str(model_path), embeddings=True))
    assert tagger.spec.sample_rate == a.front_end.sample_rate
    assert tagger.spec.embedding_size == a.embedding_size
    speech, sr = speech_wave()
    import soxr

    x = soxr.resample(speech, sr, a.front_end.sample_rate, quality="HQ").astype(np.float32)
    x = np.pad(x, (0, max(0, tagger.spec.window_samples - x.size)))[: tagger.spec.window_samples]
    result = tagger.tag_waveform(x)  # at the model's own rate
    assert result.window_embeddings.shape == (1, a.embedding_size)
    body = family.load(checkpoint)[1]
    lm = torch.from_numpy(torchlibrosa_logmel(x.astype(np.float64), a.front_end).astype(np.float32))[None, None]
    with torch.inference_mode():
        inputs = (torch.from_numpy(x)[None], lm) if a.inputs == ("waveform", "logmel") else (lm,)
        want = body(*inputs).double().numpy()[0]
    np.testing.assert_allclose(result.clip_scores, want, rtol=0, atol=TAG_TOL)


def test_architecture_from_front_end_tensors_not_the_name(tmp_path):
    """Cnn14, Cnn14_16k and Cnn14_8k share their body's keys: the STFT size and mel matrix in the
    checkpoint tell them apart whatever the file is called; a DecisionLevel-style clash needs --arch."""
    for arch in ("Cnn14_16k", "Cnn14_8k"):
        path = write_synthetic_checkpoint(tmp_path / f"weights_{arch}.pth", arch=arch)
        sd = family.read_checkpoint(path)
        assert family.detect(sd, path).name == arch
        assert family.detect(sd, tmp_path / "Cnn14_mAP=0.431.pth").name == arch  # the tensors win over a wrong name
    sd = family.read_checkpoint(path)
    without_front = family.body_state(sd)  # a bare body: Cnn14, 16k, 8k fit
    with pytest.raises(family.CheckpointError, match=r"fit Cnn14, Cnn14_16k, Cnn14_8k.*give --arch"):
        family.detect(without_front, tmp_path / "mystery.pth")
    assert family.detect(without_front, tmp_path / "Cnn14_16k_mAP=0.438.pth").name == "Cnn14_16k"
    assert family.detect(without_front, tmp_path / "x.pth", arch="cnn14_8k").name == "Cnn14_8k"
    with pytest.raises(family.CheckpointError, match=r"unknown architecture 'Cnn99'; choose from Cnn14, "):
        family.detect(without_front, tmp_path / "x.pth", arch="Cnn99")
    with pytest.raises(family.CheckpointError, match=r"not a Cnn6 checkpoint; missing keys"):
        family.detect(without_front, tmp_path / "x.pth", arch="Cnn6")


def test_unknown_weights_name_the_closest_architecture(tmp_path):
    path = write_synthetic_checkpoint(tmp_path / "Cnn6_mAP=0.343.pth", arch="Cnn6")
    sd = family.read_checkpoint(path)
    assert family.detect(sd, path).name == "Cnn6"
    sd["extra.weight"] = torch.zeros(3)
    del sd["fc1.weight"]
    with pytest.raises(family.CheckpointError, match=r"not a Cnn6 checkpoint; missing keys \[fc1.weight\], "
                                                     r"unexpected keys \[extra.weight\]"):
        family.detect(sd, path)


def test_16k_checkpoint_with_sampler_state_loads_weights_only(tmp_path):
    """The real 16 kHz file also holds its training sampler's numpy state: read with weights_only=True
    and a numpy allow-list, never weights_only=False; an arbitrary object is still refused."""
    path = write_synthetic_checkpoint(tmp_path / "a.pth", arch="Cnn14_16k")
    ck = torch.load(path, weights_only=True)
    ck["sampler"] = {"indexes": np.arange(10), "random_state": np.random.RandomState(3).get_state(), "iteration": 5}
    ck["iteration"] = 10_000
    torch.save(ck, tmp_path / "Cnn14_16k_mAP=0.438.pth")
    sd = family.read_checkpoint(tmp_path / "Cnn14_16k_mAP=0.438.pth")
    assert family.detect(sd, tmp_path / "b.pth").name == "Cnn14_16k"
    torch.save({"model": ck["model"], "evil": subprocess.Popen}, tmp_path / "evil.pth")
    with pytest.raises(family.CheckpointError, match="not a PyTorch checkpoint"):
        family.read_checkpoint(tmp_path / "evil.pth")


def test_spec_round_trip_and_refusals(fp32_model, tmp_path):
    """The CNN14 model carries its spec; a file without one (the model card's) is CNN14 by its
    signature; a spec that disagrees with the tensors, or one from a newer soundtag, is one line."""
    spec = read_spec(fp32_model)
    assert spec == dataclasses.replace(CNN14, precision="fp32", checkpoint_md5=spec.checkpoint_md5)
    assert Model(fp32_model).spec.source == "metadata"
    data = fp32_model.read_bytes()
    from ai_edge_litert import schema_py_generated as schema

    m = schema.ModelT.InitFromPackedBuf(bytearray(data), 0)
    m.metadata = [e for e in m.metadata if e.name.decode() != SPEC_METADATA_NAME]
    import flatbuffers

    b = flatbuffers.Builder(len(data) + (1 << 20))
    b.Finish(m.Pack(b), file_identifier=b"TFL3")
    bare = tmp_path / "card.tflite"
    bare.write_bytes(bytes(b.Output()))
    assert read_spec(bare) is None
    plain = Model(bare)
    assert plain.spec.source == "signature" and plain.spec.architecture == "Cnn14" and plain.spec.sample_rate == 32_000
    wrong = tmp_path / "wrong.tflite"  # says 16 kHz with 500 frames: its input is [1, 1, 1001, 64]
    wrong.write_bytes(embed_spec(data, dataclasses.replace(CNN14, window_samples=80_000, precision="fp32",
                                                           front_end=family.FRONT_END_16K)))
    with pytest.raises(ModelError, match=r"wrong.tflite: input is \[1, 1, 1001, 64\], but its spec \(Cnn14, log-mel "
                                         r"16000 Hz.*\) says \[1, 1, 501, 64\]"):
        Model(wrong)
    emb = tmp_path / "emb.tflite"
    emb.write_bytes(embed_spec(data, dataclasses.replace(CNN14, embedding_size=512, precision="fp32")))
    with pytest.raises(ModelError, match=r"outputs are .*but its spec .* says \[1, 527\] and optionally \[1, 512\]"):
        Model(emb)
    newer = tmp_path / "newer.tflite"
    newer.write_bytes(embed_spec(data, CNN14))
    text = newer.read_bytes().replace(b'"version":1,', b'"version":9,')
    newer.write_bytes(text)
    with pytest.raises(ModelError, match=r"newer.tflite: its model spec cannot be read \(spec version 9 is newer"):
        Model(newer)
    r = subprocess.run([sys.executable, "-m", "soundtag", "tag", "--model", str(wrong), str(bare)],
                       capture_output=True, text=True)
    assert r.returncode != 0 and len(r.stderr.strip().splitlines()) == 1 and "but its spec" in r.stderr


def test_spec_json_round_trip():
    spec = dataclasses.replace(CNN14, architecture="Cnn14_8k", front_end=family.FRONT_END_8K, window_samples=80_000,
                               precision="int8", checkpoint_md5="0" * 32)
    back = ModelSpec.from_json(spec.to_json())
    assert back == spec and back.frames == 1001 and back.input_shape == (1, 1, 1001, 64) and back.window_s == 10
    assert back.labels is CNN14.labels  # the shared AudioSet table


def test_16k_model_through_tag_and_listen(tmp_path):
    """The 16 kHz model from the command line: `tag` on a file of another rate, and `listen -` on raw
    PCM without --rate (the model's own 16 kHz), equal to Tagger.tag_file and Tagger.tag_waveform."""
    from tests.fixtures import scene, write_wav

    out, _ = cached_family_models("Cnn14_16k", BIG["Cnn14_16k"])
    model = out / "cnn14_16k_audioset_fp32.tflite"
    x = scene(14, sr=44_100, seed=2)
    path = write_wav(tmp_path / "scene.wav", x, 44_100, subtype="FLOAT")
    tagger = Tagger(TaggerOptions(model_path=str(model), top_k=527))
    want = tagger.tag_file(path)
    r = subprocess.run([sys.executable, "-m", "soundtag", "tag", str(path), "--model", str(model), "--top-k", "527",
                        "--format", "jsonl"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    got = {t["index"]: t["score"] for t in json.loads(r.stdout)["tags"]}
    np.testing.assert_allclose([got[i] for i in range(527)], want.clip_scores, rtol=0, atol=1e-6)
    import soxr

    pcm16k = soxr.resample(x, 44_100, 16_000, quality="HQ").astype("<f4")
    r = subprocess.run([sys.executable, "-m", "soundtag", "listen", "-", "--model", str(model), "--format", "jsonl",
                        "--top-k", "3"], input=pcm16k.tobytes(), capture_output=True, timeout=300)
    assert r.returncode == 0, r.stderr.decode()
    windows = [rec for rec in map(json.loads, r.stdout.decode().splitlines()) if "event" not in rec]
    ref = tagger.tag_waveform(pcm16k)  # at the model's rate: nothing resampled, the same windows
    assert [round(w["start_s"], 3) for w in windows] == [round(w.start_s, 3) for w in ref.windows]
    assert [t["index"] for t in windows[0]["tags"]] == [c.index for c in ref.windows[0].categories[:3]]
