"""Synthetic checkpoints of the PANNs family in the exact upstream format, with realistic statistics.

The real weights (Zenodo 3987831) cannot be downloaded everywhere (CI has no internet), so tests and
benchmarks use this: same keys, shapes and dtypes as ``Cnn14_mAP=0.431.pth`` (``{"model": sd}``
with the front-end keys), bn0 statistics measured on log-mels of real-ish audio (~ -40 dB mean,
variance in the hundreds), every conv BatchNorm calibrated layer by layer in eval mode so
activations stay well scaled, and fc_audioset biased around -3 so that probabilities spread like a
trained model's instead of saturating at 0 or 1. Every other architecture (family.py) gets the same
treatment generically: random weights, every BatchNorm calibrated in order on its own input
(``calibrate_batchnorms``), the head scaled so its logits spread the same way.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from .. import features
from ..files import create_beside
from ..spec import CNN14, FrontEnd
from .cnn14 import Cnn14Body
from .family import ARCHITECTURES, Architecture

LOGIT_BIAS_MEAN = -3.0  # fc_audioset bias centre (sigmoid(-3) ~ 0.05, as for most AudioSet classes)
LOGIT_SPREAD = 1.5  # std of the data-dependent part of the logits


def calibration_waves(seed: int = 0, n_clips: int = 3, fe: FrontEnd = CNN14.front_end) -> list[np.ndarray]:
    """Real-ish 10 s clips at the front end's rate across the loudness range: shaped noise bursts with
    harmonic tones and clicks, plus loud white noise, a sweep (100 Hz to a quarter of the rate) and
    near-silence."""
    rng = np.random.default_rng(seed)
    sr = fe.sample_rate
    n = CNN14.window_s * sr
    n = int(n)
    t = np.arange(n) / sr
    waves = []
    for k in range(n_clips):
        pink = np.cumsum(rng.standard_normal(n)) * 1e-3
        pink -= np.convolve(pink, np.ones(256) / 256, mode="same")
        env = (np.sin(2 * np.pi * rng.uniform(0.2, 2.0) * t) > 0).astype(float) * 0.8 + 0.2
        f0 = rng.uniform(100, 800)
        tones = sum(np.sin(2 * np.pi * f0 * h * t + 3 * np.sin(2 * np.pi * 5 * t)) / h for h in range(1, 6))
        clicks = np.zeros(n)
        clicks[rng.integers(0, n, 40)] = rng.uniform(0.3, 0.9, 40)
        w = 0.3 * pink * env + 0.05 * (k + 1) * tones * (1 - env) + clicks
        waves.append(w / np.max(np.abs(w)) * rng.uniform(0.1, 0.9))
    top = sr / 4  # 8 kHz at 32 kHz, as before the family
    sweep = np.sin(2 * np.pi * (100 * t + (top - 100) / (2 * t[-1]) * t**2))
    waves += [0.2 * rng.standard_normal(n), 0.3 * sweep, 1e-3 * rng.standard_normal(n)]
    return [w.astype(np.float32) for w in waves]


@torch.inference_mode()
def synthetic_body(seed: int = 0, fe: FrontEnd = CNN14.front_end) -> Cnn14Body:
    """A Cnn14Body with random weights and BatchNorm statistics calibrated on log-mels of ``fe``."""
    torch.manual_seed(seed)
    body = Cnn14Body()
    x = torch.from_numpy(np.stack([features.logmel(w, fe) for w in calibration_waves(seed, fe=fe)])[:, None])
    body.bn0.running_mean.copy_(x.mean(dim=(0, 1, 2)))
    body.bn0.running_var.copy_(x.var(dim=(0, 1, 2)))
    body.bn0.weight.copy_(1 + 0.1 * torch.randn(64))
    body.bn0.bias.copy_(0.1 * torch.randn(64))
    x = body.bn0(x.transpose(1, 3)).transpose(1, 3)
    for block, pool in zip(body.blocks(), Cnn14Body.POOLS):
        for conv, bn in ((block.conv1, block.bn1), (block.conv2, block.bn2)):
            torch.nn.init.xavier_uniform_(conv.weight)
            y = conv(x)
            bn.running_mean.copy_(y.mean(dim=(0, 2, 3)))
            bn.running_var.copy_(y.var(dim=(0, 2, 3)) + 1e-3)
            bn.weight.copy_(1 + 0.2 * torch.randn_like(bn.weight))
            bn.bias.copy_(0.2 * torch.randn_like(bn.bias))
            bn.num_batches_tracked.fill_(100_000)
            x = F.relu(bn(y))
        if pool > 1:
            x = F.avg_pool2d(x, pool)
    body.bn0.num_batches_tracked.fill_(100_000)
    torch.nn.init.xavier_uniform_(body.fc1.weight)
    body.fc1.bias.zero_()
    x = x.mean(dim=3)
    emb = F.relu(body.fc1(x.amax(dim=2) + x.mean(dim=2)))
    w = torch.randn_like(body.fc_audioset.weight)
    body.fc_audioset.weight.copy_(w * (LOGIT_SPREAD / (emb @ w.T).std().clamp_min(1e-6)))
    bias = LOGIT_BIAS_MEAN + torch.randn(body.fc_audioset.bias.shape)
    bias -= emb.mean(dim=0) @ body.fc_audioset.weight.T  # centre the data term on the calibration clips
    body.fc_audioset.bias.copy_(bias)
    return body.eval()


BN_WEIGHT_SPREAD = 0.2  # std of a calibrated BatchNorm's gamma around 1 (and of its beta around 0)
CALIBRATED_BATCHES = 100_000  # num_batches_tracked of a calibrated BatchNorm (as a trained model's)


@torch.inference_mode()
def calibrate_batchnorms(body: torch.nn.Module, *inputs: torch.Tensor) -> torch.Tensor:
    """Set every BatchNorm's running statistics to those of its own input in one eval-mode pass (the
    hooks fire in forward order, so each sees the output of the BatchNorms already calibrated before
    it), gamma and beta near 1 and 0. Returns the body's embedding of the inputs."""

    def hook(bn, args):
        x = args[0]
        dims = [d for d in range(x.dim()) if d != 1]
        bn.running_mean.copy_(x.mean(dim=dims))
        bn.running_var.copy_(x.var(dim=dims) + 1e-3)
        if bn.affine:
            bn.weight.copy_(1 + BN_WEIGHT_SPREAD * torch.randn_like(bn.weight))
            bn.bias.copy_(BN_WEIGHT_SPREAD * torch.randn_like(bn.bias))
        bn.num_batches_tracked.fill_(CALIBRATED_BATCHES)

    bns = [m for m in body.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    handles = [bn.register_forward_pre_hook(hook) for bn in bns]
    try:
        emb = body.embed(*inputs)
    finally:
        for h in handles:
            h.remove()
    return emb


@torch.inference_mode()
def synthetic_family_body(arch: Architecture, seed: int = 0) -> torch.nn.Module:
    """A body of any architecture with random weights (Xavier for convolutions and dense layers),
    calibrated BatchNorms, and fc_audioset scaled as synthetic_body's (logits spread LOGIT_SPREAD
    around LOGIT_BIAS_MEAN on the calibration clips)."""
    if arch.body == "cnn14:Cnn14Body":
        return synthetic_body(seed, arch.front_end)
    if arch.frames_per_segment is not None:
        return _synthetic_decision_body(arch, seed)
    torch.manual_seed(seed)
    body = arch.body_class()()
    for m in body.modules():
        if isinstance(m, (torch.nn.Conv1d, torch.nn.Conv2d, torch.nn.Linear)) and m is not body.fc_audioset:
            torch.nn.init.xavier_uniform_(m.weight)
            if m.bias is not None:
                m.bias.zero_()
    fe = arch.front_end
    waves = calibration_waves(seed, fe=fe)
    logmels = torch.from_numpy(np.stack([features.logmel(w, fe) for w in waves])[:, None])
    inputs = (torch.from_numpy(np.stack(waves)), logmels) if arch.inputs == ("waveform", "logmel") else (logmels,)
    emb = calibrate_batchnorms(body, *inputs)
    w = torch.randn_like(body.fc_audioset.weight)
    body.fc_audioset.weight.copy_(w * (LOGIT_SPREAD / (emb @ w.T).std().clamp_min(1e-6)))
    bias = LOGIT_BIAS_MEAN + torch.randn(body.fc_audioset.bias.shape)
    body.fc_audioset.bias.copy_(bias - emb.mean(dim=0) @ body.fc_audioset.weight.T)
    return body.eval()


def _scaled_head(weight: torch.Tensor, bias: torch.Tensor, h: torch.Tensor) -> None:
    """Set a linear head (weight [classes, dim(, 1)], bias [classes]) so that its logits on the rows of
    ``h`` [n, dim] spread LOGIT_SPREAD around LOGIT_BIAS_MEAN, as synthetic_body's fc_audioset."""
    w = torch.randn(weight.shape[0], weight.shape[1])
    w = w * (LOGIT_SPREAD / (h @ w.T).std().clamp_min(1e-6))
    weight.copy_(w.reshape(weight.shape))
    bias.copy_(LOGIT_BIAS_MEAN + torch.randn(bias.shape) - h.mean(dim=0) @ w.T)


@torch.inference_mode()
def _synthetic_decision_body(arch: Architecture, seed: int) -> torch.nn.Module:
    """A DecisionLevel (SED) body: synthetic_body's conv blocks and fc1, its head scaled on the per-step
    features of the calibration clips (Att: the classifier so, the attention logits ~N(0, 1))."""
    base = synthetic_body(seed, arch.front_end)
    body = arch.body_class()()
    keep = body.state_dict()
    body.load_state_dict({**keep, **{k: v for k, v in base.state_dict().items() if k in keep}})
    fe = arch.front_end
    x = torch.from_numpy(np.stack([features.logmel(w, fe) for w in calibration_waves(seed, fe=fe)])[:, None])
    x = body.features(x).mean(dim=3)
    x = F.max_pool1d(x, 3, 1, 1) + F.avg_pool1d(x, 3, 1, 1)
    h = F.relu(body.fc1(x.transpose(1, 2))).reshape(-1, body.fc1.out_features)  # [clips x steps, 2048]
    head = body.head()
    if isinstance(head, torch.nn.Linear):
        _scaled_head(head.weight, head.bias, h)
    else:  # AttBlock
        _scaled_head(head.cla.weight, head.cla.bias, h)
        w = torch.randn(head.att.weight.shape[:2])
        head.att.weight.copy_((w / (h @ w.T).std().clamp_min(1e-6)).reshape(head.att.weight.shape))
        head.att.bias.zero_()
        head.bn_att.num_batches_tracked.fill_(CALIBRATED_BATCHES)
    return body.eval()


def front_end_state(fe: FrontEnd = CNN14.front_end) -> dict[str, torch.Tensor]:
    """The front-end tensors upstream checkpoints carry (torchlibrosa STFT kernels and mel matrix)."""
    n = np.arange(fe.n_fft)
    k = np.arange(fe.n_freqs)[:, None]
    window = 0.5 - 0.5 * np.cos(2 * np.pi * n / fe.n_fft)
    angle = 2 * np.pi * k * n / fe.n_fft
    real = (np.cos(angle) * window)[:, None, :].astype(np.float32)
    imag = (-np.sin(angle) * window)[:, None, :].astype(np.float32)
    return {
        "spectrogram_extractor.stft.conv_real.weight": torch.from_numpy(real),
        "spectrogram_extractor.stft.conv_imag.weight": torch.from_numpy(imag),
        "logmel_extractor.melW": torch.from_numpy(np.ascontiguousarray(features.mel_basis(fe).T)),
    }


def write_synthetic_checkpoint(path: str | Path, seed: int = 0, arch: str = "Cnn14") -> Path:
    """Save ``{"model": state_dict}`` exactly as upstream lays it out (front end first), for any
    architecture of family.ARCHITECTURES; written beside itself under an unpredictable name and
    renamed into place."""
    path = Path(path)
    a = ARCHITECTURES[arch]
    sd = {**front_end_state(a.front_end), **synthetic_family_body(a, seed).state_dict()}
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = create_beside(path)
    try:
        with open(fd, "wb") as f:
            torch.save({"model": sd}, f)
        tmp.replace(path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path
