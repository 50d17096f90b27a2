"""Calibrated int8 weights for the CNN14 body: GPTQ rounding and bias correction (issue #22).

LiteRT runs the int8 model with XNNPACK's dynamic-range kernels: each weight int8 per output channel
(symmetric, scale max|w| / 127, as ai-edge-quantizer's dynamic recipe writes it), each activation
tensor quantized at run time with one asymmetric int8 scale, int32 sums, float32 out. Rounding every
weight to its nearest step (what the quantizer does alone) is what costs int8 most of its fidelity
(bench/int8_error.py, on the mix that shipped before: weights 1.1e-3 of correlation, activations
6.3e-4), most of it in blocks 1-2, which is why the int8 model used to keep block 1 and block2.conv1
in float32.

Two corrections, computed here on the folded weights before conversion, so that the quantizer's own
rounding of what it gets is exact (each weight already a multiple of its channel's scale, the
channel's largest one exactly 127 steps) and no kernel changes:

- **GPTQ** (Frantar et al. 2022, "GPTQ: Accurate Post-Training Quantization for Generative
  Pre-trained Transformers", after Optimal Brain Surgeon): the weights of an output channel rounded
  one input column at a time, each rounding's error on the layer's output compensated on the columns
  not yet rounded, by the inverse of the inputs' second moments H = E[x x^T] (x: the 3x3 patches the
  convolution sees, from calibration audio through the already-quantized layers before it). The log-mel's
  neighbouring bins and frames are strongly correlated, so much of one rounding is cancelled by the
  next.
- **Bias correction** (Nagel et al. 2019, "Data-Free Quantization Through Weight Equalization and Bias
  Correction", its empirical form): each channel's bias shifted by the mean difference between the
  quantized layer's output (int8 weights, int8 activations as XNNPACK quantizes them) and the float
  network's at that layer, on the calibration audio: the part of the error that global pooling would
  otherwise keep.

The calibration audio is synthetic (noise bursts, harmonic tones, chirps, clicks, silence at random
levels) and never the validation inputs the converter proves the model on.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from .. import features
from ..spec import CNN14, ModelSpec

CALIBRATION_WINDOWS = 8
CALIBRATION_SEED = 20261208
DAMPING = 0.01  # of H's mean diagonal, added to its diagonal (GPTQ's dampening)
BLOCK_COLUMNS = 128  # GPTQ's lazy batch of columns
ACT_ORDER = False  # GPTQ's "act order": columns in decreasing order of their inputs' energy


def quantize_weight(w: torch.Tensor) -> torch.Tensor:
    """Round to nearest: symmetric int8 per output channel, scale max|w| / 127 (ai-edge-quantizer's
    dynamic recipe), returned as float (the values XNNPACK multiplies by)."""
    scale = weight_scale(w).reshape(-1, *([1] * (w.dim() - 1)))
    return torch.round(w / scale) * scale


def weight_scale(w: torch.Tensor) -> torch.Tensor:
    """Per output channel: max|w| / 127 (1 where a channel is all zeros)."""
    s = w.reshape(w.shape[0], -1).abs().amax(dim=1) / 127
    return torch.where(s > 0, s, torch.ones_like(s))


def quantize_activation(x: torch.Tensor, chunk: int | None = None) -> torch.Tensor:
    """x through XNNPACK's dynamic int8 (qd8): one asymmetric scale whose range holds 0; ``chunk``: one
    per ``chunk`` rows of the time axis (dim 2) instead."""
    if chunk and x.dim() == 4:
        return torch.cat([quantize_activation(x[:, :, i : i + chunk]) for i in range(0, x.shape[2], chunk)], 2)
    lo, hi = min(float(x.min()), 0.0), max(float(x.max()), 0.0)
    scale = (hi - lo) / 255 or 1.0
    zero = round(-128 - lo / scale)
    return (torch.clamp(torch.round(x / scale) + zero, -128, 127) - zero) * scale


def calibration_waves(spec: ModelSpec = CNN14, n: int = CALIBRATION_WINDOWS, seed: int = CALIBRATION_SEED) -> list[np.ndarray]:
    """``n`` windows of synthetic audio at the front end's rate, each a sequence of 0.25-2 s events:
    white or brown noise bursts, harmonic tones with vibrato, exponential chirps, click trains and
    silence, at levels from -50 to -6 dBFS."""
    rng = np.random.default_rng(seed)
    sr, size = spec.front_end.sample_rate, spec.window_samples
    out = []
    for _ in range(n):
        wave = np.zeros(size)
        pos = 0
        while pos < size:
            k = min(size - pos, int(rng.uniform(0.25, 2.0) * sr))
            t = np.arange(k) / sr
            kind = rng.integers(5)
            if kind == 0:
                seg = rng.standard_normal(k)
            elif kind == 1:
                seg = np.cumsum(rng.standard_normal(k))
                seg -= np.linspace(seg[0], seg[-1], k)
            elif kind == 2:
                f0 = rng.uniform(80, min(2000, sr / 8))
                vib = rng.uniform(0, 3) * np.sin(2 * np.pi * rng.uniform(2, 7) * t)
                seg = sum(np.sin(2 * np.pi * f0 * h * t + vib * h) / h for h in range(1, 6) if f0 * h < sr / 2)
            elif kind == 3:
                f0, f1 = rng.uniform(50, 500), rng.uniform(1000, sr / 2.2)
                dur = max(t[-1], 1 / sr)
                seg = np.sin(2 * np.pi * f0 * dur / np.log(f1 / f0) * ((f1 / f0) ** (t / dur) - 1))
            else:
                seg = np.zeros(k)
                seg[rng.integers(0, k, rng.integers(1, 40))] = 1.0
            peak = np.abs(seg).max()
            gain = 10 ** (rng.uniform(-50, -6) / 20)
            wave[pos : pos + k] = seg / peak * gain if peak > 0 else 0.0
            pos += k
        out.append(wave.astype(np.float32))
    return out


def calibration_inputs(spec: ModelSpec = CNN14, n: int = CALIBRATION_WINDOWS, seed: int = CALIBRATION_SEED) -> list[np.ndarray]:
    """The calibration windows as host log-mels [1, 1, frames, mels] (features.logmel)."""
    return [np.ascontiguousarray(features.logmel(w, spec.front_end), np.float32).reshape(spec.input_shape)
            for w in calibration_waves(spec, n, seed)]


def gptq(weight: torch.Tensor, hessian: torch.Tensor, damping: float = DAMPING, columns: int = BLOCK_COLUMNS,
         act_order: bool = ACT_ORDER) -> torch.Tensor:
    """GPTQ rounding of a convolution's (or dense layer's) weight [O, ...] to int8 per output channel,
    given H = E[x x^T] of its flattened inputs (x in weight[o].flatten() order). Returns float64 weights
    on the grid of quantize_weight's scales: each channel's scale stays max|w| / 127 of the original,
    and its largest weight keeps exactly 127 steps, so the quantizer recomputes the same scale and
    rounds every value to itself."""
    shape = weight.shape
    w = weight.reshape(shape[0], -1).double().clone()
    d = w.shape[1]
    scale = weight_scale(w).reshape(-1, 1).double()
    h = hessian.double().clone()
    dead = torch.diag(h) == 0  # inputs never nonzero in calibration: their weights cannot matter there
    h[dead, dead] = 1.0
    order = torch.argsort(torch.diag(h), descending=True) if act_order else torch.arange(d)
    w, h = w[:, order], h[order][:, order]  # act_order: the inputs with the most energy rounded first
    h += damping * torch.mean(torch.diag(h)) * torch.eye(d, dtype=h.dtype)
    hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)
    q = torch.zeros_like(w)
    for i1 in range(0, d, columns):
        i2 = min(i1 + columns, d)
        block, errors, hb = w[:, i1:i2].clone(), torch.zeros(w.shape[0], i2 - i1, dtype=w.dtype), hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            col = block[:, i : i + 1]
            rounded = torch.clamp(torch.round(col / scale), -127, 127) * scale
            q[:, i1 + i] = rounded[:, 0]
            err = (col - rounded) / hb[i, i]
            block[:, i:] -= err * hb[i : i + 1, i:]
            errors[:, i] = err[:, 0]
        w[:, i2:] -= errors @ hinv[i1:i2, i2:]
    q = q[:, torch.argsort(order)]
    # A channel whose largest original weight drifted below 127 steps would get a smaller scale from
    # the quantizer (every value rounded again): put that weight back on +-127 steps.
    steps = torch.round(q / scale)
    short = steps.abs().amax(dim=1) < 127
    if short.any():
        top = weight.reshape(shape[0], -1).double().abs().argmax(dim=1)
        for o in torch.nonzero(short)[:, 0].tolist():
            steps[o, top[o]] = 127 * torch.sign(weight.reshape(shape[0], -1)[o, top[o]].double())
        q = steps * scale
    return q.reshape(shape)


def calibrate(bn0: tuple[torch.Tensor, torch.Tensor], convs: list[tuple[torch.Tensor, torch.Tensor]], pools: tuple[int, ...],
              inputs: list[np.ndarray], float_layers: set[int], gptq_layers: set[int],
              correct_bias: bool = True, act_order: bool = ACT_ORDER) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The folded CNN14 convolutions (weight [O, C, 3, 3], bias [O], float64; two per block, pools
    after each block) with int8-calibrated weights and biases: layers in ``gptq_layers`` rounded by
    GPTQ, the others to nearest, every int8 layer's bias corrected (unless not ``correct_bias``: the
    bench's ablation); ``float_layers`` (indices) as they are. Calibration runs layer by layer on
    ``inputs`` (log-mels), the quantized network's activations quantized as XNNPACK quantizes them."""
    scale, shift = (t.double() for t in bn0)
    xq = [torch.from_numpy(np.asarray(v)).double() * scale + shift for v in inputs]
    xf = [x.clone() for x in xq]
    out = []
    with torch.inference_mode():
        for block, pool in enumerate(pools):
            for j in (2 * block, 2 * block + 1):
                w, b = (t.double() for t in convs[j])
                if j in float_layers:
                    out.append((w, b))
                    xq = [F.relu(F.conv2d(x, w, b, padding=1)) for x in xq]
                    xf = [F.relu(F.conv2d(x, w, b, padding=1)) for x in xf]
                    continue
                if j in gptq_layers:
                    h = torch.zeros(w[0].numel(), w[0].numel(), dtype=torch.float64)
                    n = 0
                    for x in xq:
                        patches = F.unfold(x, 3, padding=1)[0]
                        h += patches @ patches.T
                        n += patches.shape[1]
                    wq = gptq(w, h / n, act_order=act_order)
                else:
                    wq = quantize_weight(w)
                yq = [F.conv2d(quantize_activation(x), wq, b, padding=1) for x in xq]
                yf = [F.conv2d(x, w, b, padding=1) for x in xf]
                bq = b - torch.stack([(a - r).mean(dim=(0, 2, 3)) for a, r in zip(yq, yf)]).mean(dim=0) if correct_bias else b
                out.append((wq, bq))
                xq = [F.relu(y + (bq - b).reshape(1, -1, 1, 1)) for y in yq]
                xf = [F.relu(y) for y in yf]
            if pool > 1:
                xq = [F.avg_pool2d(x, pool) for x in xq]
                xf = [F.avg_pool2d(x, pool) for x in xf]
    return out
