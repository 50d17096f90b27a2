"""The PANNs family bodies (convert/cnns.py, mobilenet.py, resnet.py, wavegram.py) against upstream.

(a) state_dict keys and shapes equal upstream's (tests/data/upstream_keys.json, written by
tools/upstream_keys.py) minus the front end's; (b) a random state_dict loads strictly and the outputs have
the right shapes and ranges; (c) parity with upstream's own forward, run only when SOUNDTAG_UPSTREAM_MODELS
names upstream's pytorch/models.py (torchlibrosa needed).
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import os
import re
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")

ROOT = Path(__file__).resolve().parent.parent
UPSTREAM_KEYS = ROOT / "tests" / "data" / "upstream_keys.json"
UPSTREAM_ENV = "SOUNDTAG_UPSTREAM_MODELS"
FRONT_END_PREFIXES = ("spectrogram_extractor.", "logmel_extractor.")
AUDIOSET_ARGS = dict(
    sample_rate=32000, window_size=1024, hop_size=320, mel_bins=64, fmin=50, fmax=14000, classes_num=527
)
SR = 32000
CLIP_SAMPLES = 320000  # 10 s at 32 kHz
FRAMES = 1001  # 1 + CLIP_SAMPLES // 320
MELS = 64
NUM_CLASSES = 527
ARCH_MODULES = {  # architecture -> module of soundtag.convert holding its BODIES entry
    "Cnn6": "cnns",
    "Cnn10": "cnns",
    "MobileNetV1": "mobilenet",
    "MobileNetV2": "mobilenet",
    "ResNet38": "resnet",
    "Wavegram_Logmel_Cnn14": "wavegram",
}
ARCHS = list(ARCH_MODULES)
# ResNet38's basic block bn2 and MobileNetV2's expanded inverted residual's last BN
RESIDUAL_LAST_BN = re.compile(r"resnet\.layer\d\.\d+\.bn2\.weight|features\.\d+\.conv\.8\.weight")


def body_class(arch: str):
    return importlib.import_module(f"soundtag.convert.{ARCH_MODULES[arch]}").BODIES[arch]


def random_state_dict(template: dict, seed: int = 0) -> dict:
    """Random values for every body tensor of ``template``, scaled so activations stay O(1) and outputs
    are not saturated; BN running stats far from (0, 1) so that a wrong BN axis or a skipped BN fails.
    Front-end tensors and num_batches_tracked are kept as they are."""
    g = torch.Generator().manual_seed(seed)

    def uniform(shape, lo, hi):
        return lo + (hi - lo) * torch.rand(shape, generator=g)

    def normal(shape, std):
        return std * torch.randn(shape, generator=g)

    out = {}
    for key, value in template.items():
        shape = value.shape
        if key.startswith(FRONT_END_PREFIXES) or key.endswith("num_batches_tracked"):
            out[key] = value.clone()
        elif key == "bn0.running_mean":  # log-mel in dB
            out[key] = -40.0 + normal(shape, 5.0)
        elif key == "bn0.running_var":
            out[key] = uniform(shape, 200.0, 600.0)
        elif key.endswith("running_mean"):
            out[key] = normal(shape, 0.3)
        elif key.endswith("running_var"):
            out[key] = uniform(shape, 0.3, 3.0)
        elif RESIDUAL_LAST_BN.fullmatch(key):  # a residual branch's last BN gamma: small (upstream zero-inits
            out[key] = uniform(shape, 0.05, 0.25)  # ResNet's), else the sums grow and the outputs saturate
        elif value.ndim == 1 and key.endswith("weight"):  # BN gamma
            out[key] = uniform(shape, 0.5, 1.5)
        elif key.startswith("fc_audioset.") and key.endswith("bias"):
            out[key] = -2.0 + normal(shape, 0.5)
        elif key.endswith("bias"):
            out[key] = normal(shape, 0.1)
        else:  # conv / linear weight: He scale over the fan-in
            fan_in = value[0].numel()
            out[key] = normal(shape, (2.0 / fan_in) ** 0.5)
    return out


def example_inputs(arch: str, seed: int = 0) -> dict[str, "torch.Tensor"]:
    rng = np.random.default_rng(seed)
    t = np.arange(CLIP_SAMPLES) / SR
    wave = 0.1 * np.sin(2 * np.pi * 440.0 * t) + 0.05 * rng.standard_normal(CLIP_SAMPLES)
    logmel = -40.0 + 15.0 * rng.standard_normal((1, 1, FRAMES, MELS))
    return {
        "waveform": torch.from_numpy(wave[None].astype(np.float32)),
        "logmel": torch.from_numpy(logmel.astype(np.float32)),
    }


@pytest.fixture(scope="module")
def upstream_keys() -> dict:
    return json.loads(UPSTREAM_KEYS.read_text())


@pytest.mark.parametrize("arch", ARCHS)
def test_keys_and_shapes_equal_upstream(arch, upstream_keys):
    with torch.device("meta"):  # as convert/family.py builds its signatures: no memory, no time
        body = body_class(arch)()
    ours = {k: list(v.shape) for k, v in body.state_dict().items()}
    theirs = {k: v for k, v in upstream_keys[arch].items() if not k.startswith(FRONT_END_PREFIXES)}
    assert sorted(set(theirs) - set(ours)) == [], "missing keys"
    assert sorted(set(ours) - set(theirs)) == [], "unexpected keys"
    assert ours == theirs
    assert all(v.is_contiguous() for v in body.state_dict().values())


@pytest.mark.parametrize("arch", ARCHS)
def test_random_state_dict_loads_and_runs(arch):
    cls = body_class(arch)
    body = cls()
    assert not body.training
    body.load_state_dict(random_state_dict(body.state_dict()), strict=True)
    inputs = example_inputs(arch)
    assert set(cls.INPUTS) <= set(inputs)
    args = [inputs[name] for name in cls.INPUTS]
    with torch.no_grad():
        emb = body.embed(*args)
        probs = body.classify(emb)
    assert emb.shape == (1, cls.EMBEDDING_DIM)
    assert probs.shape == (1, NUM_CLASSES)
    assert torch.isfinite(emb).all() and (emb >= 0).all()
    assert ((probs >= 0) & (probs <= 1)).all()
    assert ((probs > 0.01) & (probs < 0.99)).float().mean() > 0.5  # not saturated: the numbers carry information
    if cls.EMBEDDING_DIM <= 1024:  # one more forward only for the small bodies (keeps each test fast)
        with torch.no_grad():
            torch.testing.assert_close(body(*args), probs, rtol=0, atol=0)


def test_wavegram_and_logmel_time_axes_must_meet():
    """Upstream aligns the two branches by sizes alone: N / 640 wavegram frames, floor(T / 2) log-mel ones."""
    body = body_class("Wavegram_Logmel_Cnn14")()
    seconds = 2
    wave = torch.randn(1, seconds * SR)
    with torch.no_grad():
        emb = body.embed(wave, torch.randn(1, 1, seconds * 100 + 1, MELS))
        assert emb.shape == (1, 2048)
        with pytest.raises(ValueError, match="do not meet"):
            body.embed(wave, torch.randn(1, 1, seconds * 100 + 11, MELS))


@pytest.fixture(scope="module")
def upstream_module():
    path = os.environ.get(UPSTREAM_ENV)
    if not path:
        pytest.skip(f"set {UPSTREAM_ENV} to upstream's pytorch/models.py for the parity test")
    pytest.importorskip("torchlibrosa")
    spec = importlib.util.spec_from_file_location("upstream_keys_tool", ROOT / "tools" / "upstream_keys.py")
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    return tool.load_upstream(path)


@pytest.mark.parametrize("arch", ARCHS)
def test_parity_with_upstream(arch, upstream_module):
    upstream = getattr(upstream_module, arch)(**AUDIOSET_ARGS).eval()
    sd = random_state_dict(upstream.state_dict(), seed=1)
    upstream.load_state_dict(sd, strict=True)
    cls = body_class(arch)
    body = cls()
    body.load_state_dict({k: v for k, v in sd.items() if not k.startswith(FRONT_END_PREFIXES)}, strict=True)
    wave = example_inputs(arch, seed=1)["waveform"]
    with torch.no_grad():
        logmel = upstream.logmel_extractor(upstream.spectrogram_extractor(wave))
        assert logmel.shape == (1, 1, FRAMES, MELS)
        inputs = {"waveform": wave, "logmel": logmel}
        expected = upstream(wave)
        emb = body.embed(*[inputs[name] for name in cls.INPUTS])
        probs = body.classify(emb)
    np.testing.assert_allclose(emb.numpy(), expected["embedding"].numpy(), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(probs.numpy(), expected["clipwise_output"].numpy(), rtol=1e-4, atol=1e-5)
    print(
        f"{arch}: max |d emb| {np.abs(emb.numpy() - expected['embedding'].numpy()).max():.3g}, "
        f"max |d probs| {np.abs(probs.numpy() - expected['clipwise_output'].numpy()).max():.3g}, "
        f"probs mean {probs.mean():.3f}"
    )
