"""A synthetic CNN14 checkpoint in the exact upstream format, with realistic statistics.

The real weights (Zenodo 3987831) cannot be downloaded everywhere (CI has no internet), so tests and
benchmarks use this: same keys, shapes and dtypes as ``Cnn14_mAP=0.431.pth`` (``{"model": sd}``
with the front-end keys), bn0 statistics measured on log-mels of real-ish audio (~ -40 dB mean,
variance in the hundreds), every conv BatchNorm calibrated layer by layer in eval mode so
activations stay well scaled, and fc_audioset biased around -3 so that probabilities spread like a
trained model's instead of saturating at 0 or 1.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from .. import features
from .cnn14 import Cnn14Body

LOGIT_BIAS_MEAN = -3.0  # fc_audioset bias centre (sigmoid(-3) ~ 0.05, as for most AudioSet classes)
LOGIT_SPREAD = 1.5  # std of the data-dependent part of the logits


def calibration_waves(seed: int = 0, n_clips: int = 3) -> list[np.ndarray]:
    """Real-ish 10 s clips at 32 kHz across the loudness range: shaped noise bursts with harmonic
    tones and clicks, plus loud white noise, a sweep and near-silence."""
    rng = np.random.default_rng(seed)
    sr, n = features.SAMPLE_RATE, features.CLIP_SAMPLES
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
    sweep = np.sin(2 * np.pi * (100 * t + (8000 - 100) / (2 * t[-1]) * t**2))
    waves += [0.2 * rng.standard_normal(n), 0.3 * sweep, 1e-3 * rng.standard_normal(n)]
    return [w.astype(np.float32) for w in waves]


@torch.inference_mode()
def synthetic_body(seed: int = 0) -> Cnn14Body:
    """A Cnn14Body with random weights and calibrated BatchNorm statistics."""
    torch.manual_seed(seed)
    body = Cnn14Body()
    x = torch.from_numpy(np.stack([features.logmel(w) for w in calibration_waves(seed)])[:, None])
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


def front_end_state() -> dict[str, torch.Tensor]:
    """The front-end tensors upstream checkpoints carry (torchlibrosa STFT kernels and mel matrix)."""
    n = np.arange(features.N_FFT)
    k = np.arange(features.N_FREQS)[:, None]
    window = 0.5 - 0.5 * np.cos(2 * np.pi * n / features.N_FFT)
    angle = 2 * np.pi * k * n / features.N_FFT
    real = (np.cos(angle) * window)[:, None, :].astype(np.float32)
    imag = (-np.sin(angle) * window)[:, None, :].astype(np.float32)
    return {
        "spectrogram_extractor.stft.conv_real.weight": torch.from_numpy(real),
        "spectrogram_extractor.stft.conv_imag.weight": torch.from_numpy(imag),
        "logmel_extractor.melW": torch.from_numpy(np.ascontiguousarray(features.mel_basis().T)),
    }


def write_synthetic_checkpoint(path: str | Path, seed: int = 0) -> Path:
    """Save ``{"model": state_dict}`` exactly as upstream lays it out (front end first)."""
    path = Path(path)
    sd = {**front_end_state(), **synthetic_body(seed).state_dict()}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    torch.save({"model": sd}, tmp)
    tmp.replace(path)
    return path
