"""Where the CNN14 body's time goes in the LiteRT runtime: each conv block converted on its own and
timed by the XNNPACK CPU path, with its multiply-adds and achieved GFLOP/s.

    python -m bench.profile_blocks [--threads 2] [--runs 7]

The Python LiteRT interpreter exposes no per-op profiler, so the body is cut at block boundaries
(same folded constants as the real conversion) and each piece is timed separately; the sum is checked
against the whole model's time.
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
CACHE = Path(os.environ.get("SOUNDTAG_BENCH_CACHE", ROOT / ".test-cache"))


class Piece(nn.Module):
    def __init__(self, export, stage: int) -> None:
        super().__init__()
        self.e, self.stage = export, stage

    def forward(self, x):
        e = self.e
        if self.stage == 0:
            return x * e.bn0_scale + e.bn0_shift
        if self.stage <= 6:
            for conv in e.convs[2 * self.stage - 2 : 2 * self.stage]:
                x = conv(x)
            return F.avg_pool2d(x, 2) if e.pools[self.stage - 1] > 1 else x
        x = x.mean(dim=3)
        x = torch.amax(x, dim=2) + x.mean(dim=2)
        return torch.sigmoid(F.linear(F.relu(F.linear(x, *e.fc1)), *e.fc2))


def time_tflite(data: bytes, x: np.ndarray, threads: int, runs: int) -> float:
    from ai_edge_litert.interpreter import Interpreter

    it = Interpreter(model_content=data, num_threads=threads)
    it.allocate_tensors()
    idx = it.get_input_details()[0]["index"]
    it.set_tensor(idx, x)
    it.invoke()
    ts = []
    for _ in range(runs):
        it.set_tensor(idx, x)
        t = time.perf_counter()
        it.invoke()
        ts.append(time.perf_counter() - t)
    return float(np.median(ts))


def main() -> None:
    import litert_torch

    from soundtag.convert.cnn14 import load_body
    from soundtag.convert.export import WINOGRAD_BLOCKS, _ExportBody
    from tests.fixtures import cached_checkpoint, cached_models

    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--runs", type=int, default=7)
    ap.add_argument("--winograd", action="store_true", help="blocks 4-6 as Winograd, as the fp32 model ships")
    args = ap.parse_args()
    body = load_body(cached_checkpoint(CACHE))
    export = _ExportBody(body, WINOGRAD_BLOCKS if args.winograd else ()).eval()
    conv_shapes = [c.weight.shape for b in body.blocks() for c in (b.conv1, b.conv2)]
    x = torch.from_numpy(np.random.default_rng(0).normal(-40, 20, (1, 1, 1001, 64)).astype(np.float32))
    rows, total = [], 0.0
    for stage in range(8):
        piece = Piece(export, stage).eval()
        with torch.inference_mode():
            y = piece(x)
            edge = litert_torch.convert(piece, (x,))
        data = edge.model_content() if callable(getattr(edge, "model_content", None)) else edge.model_content
        t = time_tflite(bytes(data), x.numpy(), args.threads, args.runs)
        macs = 0
        if 1 <= stage <= 6:
            h, w = x.shape[2], x.shape[3]
            for shape in conv_shapes[2 * stage - 2 : 2 * stage]:
                macs += h * w * shape[0] * shape[1] * 9  # direct-convolution multiply-adds
        elif stage == 7:
            macs = sum(fc[0].numel() for fc in (export.fc1, export.fc2))
        name = {0: "bn0", 7: "head (pool, fc1, fc)"}.get(stage, f"block{stage} {tuple(x.shape[1:])}")
        rows.append((name, t, macs))
        total += t
        x = y
    whole_file = "cnn14_audioset_fp32.tflite" if args.winograd else "cnn14_audioset_fp16.tflite"  # fp16: direct layout
    whole = time_tflite((cached_models(CACHE) / whole_file).read_bytes(),
                        np.random.default_rng(0).normal(-40, 20, (1, 1, 1001, 64)).astype(np.float32), args.threads, args.runs)
    print(f"threads={args.threads}, winograd={args.winograd}; whole model ({whole_file}) {whole * 1000:.0f} ms, "
          f"sum of pieces {total * 1000:.0f} ms\n")
    print("| piece | ms | share | G MACs | GFLOP/s |")
    print("|---|---|---|---|---|")
    for name, t, macs in rows:
        print(f"| {name} | {t * 1000:.1f} | {100 * t / total:.0f}% | {macs / 1e9:.2f} | {2 * macs / t / 1e9 if macs else 0:.0f} |")


if __name__ == "__main__":
    main()
