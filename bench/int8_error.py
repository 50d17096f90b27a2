"""Where int8's error comes from: its weights or its activations (issue #12, item 3), and what the
calibrated weights (convert/int8.py: GPTQ rounding, bias correction; issue #22) take off it.

    python -m bench.int8_error [--scenes 6] [--drums 12] [--chunk 32]

LiteRT runs the int8 model with XNNPACK's dynamic-range kernels: weights int8 per output channel
(symmetric, scale max|w| / 127), each activation tensor quantized at run time to int8 with one
asymmetric scale per batch element, int32 accumulation, float32 out. This replays that arithmetic in
float64 PyTorch on the folded CNN14 body, quantizing weights and activations separately, so each error
source can be switched off alone; the LiteRT rows run the real int8 models beside their replays, to
show the replay is faithful. Fidelity is corr of the 527 probabilities vs the float64 body (min and
mean over the converter's validation inputs, the bench's scenes and real drum hits), as
bench/int8_layers.py reports, and top-1 agreement.

Rows: the real LiteRT models and their replays (nearest rounding with the float32 layers used before
issue #22 and with the shipped ones; the shipped calibrated model), the calibration's ablations (no
bias correction, no GPTQ, GPTQ in blocks 1-2 only), and, on the pre-#22 mix, weights only / activations only
quantized, the dense layers in float, activations with one scale per ``--chunk`` frames (what batching
the time axis would give XNNPACK's per-batch scales), and cross-layer equalization (Nagel et al. 2019:
each channel rescaled between consecutive convolutions, exact through ReLU and average pooling).
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from soundtag.convert.int8 import quantize_activation, quantize_weight

ROOT = Path(__file__).resolve().parents[1]
# what the int8 model kept in float32 before its weights were calibrated (nearest rounding)
PREVIOUS_FLOAT_LAYERS = ("block1.conv1", "block1.conv2", "block2.conv1")
CACHE = Path(os.environ.get("SOUNDTAG_BENCH_CACHE", ROOT / ".test-cache"))


class Replay:
    """The folded body (direct layout) in float64 with switchable quantization per layer."""

    def __init__(self, export_body) -> None:
        e = export_body
        self.bn0 = (e.bn0_scale.double(), e.bn0_shift.double())
        self.convs = [(c.weights[0].double(), c.bias.double()) for c in e.convs]
        self.fcs = [(w.double(), b.double()) for w, b in (e.fc1, e.fc2)]
        self.pools = e.pools

    def equalized(self, rounds: int = 4) -> Replay:
        """A copy with cross-layer equalization: per channel c between conv i and conv i + 1, W_i[c] and
        b_i[c] divided by s_c, W_{i+1}[:, c] multiplied by it, s_c = sqrt(r1 / r2) of their ranges."""
        out = object.__new__(Replay)
        out.__dict__.update(self.__dict__)
        convs = [[w.clone(), b.clone()] for w, b in self.convs]
        for _ in range(rounds):
            for i in range(len(convs) - 1):
                (w1, b1), (w2, _) = convs[i], convs[i + 1]
                r1, r2 = w1.abs().amax(dim=(1, 2, 3)), w2.abs().amax(dim=(0, 2, 3))
                s = torch.sqrt(r1 / r2).clamp(1e-3, 1e3)
                convs[i] = [w1 / s.reshape(-1, 1, 1, 1), b1 / s]
                convs[i + 1][0] = w2 * s.reshape(1, -1, 1, 1)
        out.convs = [tuple(c) for c in convs]
        return out

    def __call__(self, logmel: np.ndarray, weights: bool = True, activations: bool = True,
                 float_layers: tuple[str, ...] = (), chunk: int | None = None) -> np.ndarray:
        from soundtag.convert.export import INT8_LAYERS

        def layer(name, x, w):
            q = name not in float_layers
            return (quantize_activation(x, chunk) if q and activations else x), (quantize_weight(w) if q and weights else w)

        names = iter(INT8_LAYERS)
        x = torch.from_numpy(logmel).double() * self.bn0[0] + self.bn0[1]
        for i, pool in enumerate(self.pools):
            for w, b in self.convs[2 * i : 2 * i + 2]:
                xq, wq = layer(next(names), x, w)
                x = F.relu(F.conv2d(xq, wq, b, padding=1))
            if pool > 1:
                x = F.avg_pool2d(x, pool)
        x = x.mean(dim=3)
        x = torch.amax(x, dim=2) + x.mean(dim=2)
        (w1, b1), (w2, b2) = self.fcs
        xq, wq = layer(next(names), x, w1)
        x = F.relu(F.linear(xq, wq, b1))
        xq, wq = layer(next(names), x, w2)
        return torch.sigmoid(F.linear(xq, wq, b2))[0].numpy()


def corrs(outputs: dict, reference: dict) -> tuple[float, float, int]:
    """min and mean corr of the probabilities vs the reference over the inputs, and on how many inputs
    the top-1 class is the reference's."""
    c = [float(np.corrcoef(outputs[k], reference[k])[0, 1]) for k in reference]
    top1 = sum(int(np.argmax(outputs[k]) == np.argmax(reference[k])) for k in reference)
    return min(c), float(np.mean(c)), top1


def main() -> None:
    from bench.int8_layers import scene_inputs
    from bench.machine import cpu_line
    from soundtag.convert.cnn14 import load_body
    from soundtag.convert.export import (INT8_FLOAT_LAYERS, INT8_GPTQ_LAYERS, INT8_LAYERS, LAYOUTS, _ExportBody,
                                         to_fp32_tflite, to_int8_tflite, validation_inputs)
    from soundtag.convert.int8 import calibrate, calibration_inputs
    from soundtag.convert.validate import run_tflite
    from tests.fixtures import cached_checkpoint, drum_logmels

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--scenes", type=int, default=6, help="bench scenes besides the four validation inputs")
    ap.add_argument("--drums", type=int, default=12, help="real drum hits (hydrogen-drumkits) among the inputs")
    ap.add_argument("--chunk", type=int, default=32, help="frames per activation scale in the chunked variant")
    args = ap.parse_args()
    torch.set_num_threads(os.cpu_count() or 1)
    body = load_body(cached_checkpoint(CACHE))
    inputs = {**validation_inputs(), **scene_inputs(args.scenes), **drum_logmels(args.drums)}
    replay = Replay(_ExportBody(body))  # direct, unsplit: the int8 layout
    index = {name: i for i, name in enumerate(INT8_LAYERS)}
    calib = calibration_inputs()

    def calibrated(gptq_layers=INT8_GPTQ_LAYERS, correct_bias=True, act_order=False) -> Replay:
        out = object.__new__(Replay)
        out.__dict__.update(replay.__dict__)
        out.convs = calibrate(replay.bn0, replay.convs, replay.pools, calib, {index[k] for k in INT8_FLOAT_LAYERS},
                              {index[k] for k in gptq_layers}, correct_bias, act_order)
        return out

    def replayed(r: Replay, keep, **kw) -> tuple[float, float]:
        return corrs({k: r(v, float_layers=keep, **kw) for k, v in inputs.items()}, reference)

    def litert(data: bytes) -> tuple[float, float]:
        return corrs({k: v.astype(np.float64) for k, v in run_tflite(data, inputs).probs.items()}, reference)

    with torch.inference_mode():
        reference = {k: replay(v, weights=False, activations=False) for k, v in inputs.items()}
        fp32 = to_fp32_tflite(body, LAYOUTS["int8"], embedding=False)
        before, ship = PREVIOUS_FLOAT_LAYERS, INT8_FLOAT_LAYERS
        rows = []
        for label, keep in (("all int8, nearest", ()), (f"{', '.join(before)} float32, nearest (before #22)", before),
                            (f"{', '.join(ship)} float32, nearest", ship)):
            rows.append((label + ": LiteRT", litert(to_int8_tflite(fp32, keep))))
            rows.append((label + ": replay", replayed(replay, keep)))
        shipped = calibrated()
        folded = [(w.float(), b.float()) for w, b in shipped.convs]
        rows.append((f"shipped: {ship[0]} float32, GPTQ blocks 1-4, bias corrected: LiteRT",
                     litert(to_int8_tflite(to_fp32_tflite(body, LAYOUTS["int8"], embedding=False, folded=folded), ship))))
        rows.append(("shipped: replay", replayed(shipped, ship)))
        rows.append(("shipped, weights only int8 (activations float)", replayed(shipped, ship, activations=False)))
        rows.append(("shipped without bias correction (GPTQ only)", replayed(calibrated(correct_bias=False), ship)))
        rows.append(("shipped without GPTQ (bias correction only)", replayed(calibrated(()), ship)))
        rows.append(("shipped with GPTQ in blocks 1-2 only", replayed(calibrated(INT8_GPTQ_LAYERS[:3]), ship)))
        rows.append(("shipped with GPTQ's act order", replayed(calibrated(act_order=True), ship)))
        variants = {
            "before #22, weights only int8 (activations float)": dict(activations=False),
            "before #22, activations only int8 (weights float)": dict(weights=False),
            "before #22, fc1 and fc_audioset float too": dict(extra=("fc1", "fc_audioset")),
            f"before #22, one activation scale per {args.chunk} frames": dict(chunk=args.chunk),
        }
        for label, kw in variants.items():
            keep = before + kw.pop("extra", ())
            rows.append((label, replayed(replay, keep, **kw)))
        rows.append(("before #22, cross-layer equalized", replayed(replay.equalized(), before)))
    print(f"Machine: {cpu_line()} (fidelity does not depend on it); synthetic CNN14, {len(inputs)} inputs\n")
    print("| int8 arithmetic | min corr vs PyTorch | mean corr | 1 - min corr | top-1 as PyTorch |")
    print("|---|---|---|---|---|")
    for label, (lo, mean, top1) in rows:
        print(f"| {label} | {lo:.5f} | {mean:.5f} | {1 - lo:.1e} | {top1}/{len(inputs)} |")


if __name__ == "__main__":
    main()
