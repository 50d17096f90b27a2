"""Where the CNN14 body's time goes in the LiteRT runtime, and which convolution form each block
should take: every conv block converted on its own in each form (direct, Winograd F(2x2,3x3),
Winograd F(4x4,3x3); same folded constants as the real conversion) and timed on the XNNPACK CPU path,
all pieces interleaved round by round, medians.

    python -m bench.profile_blocks [--threads 2] [--runs 15]
    python -m bench.profile_blocks --batch 4   # the shipped fp32 layout, B windows per invoke vs one

The Python LiteRT interpreter exposes no per-op profiler, so the body is cut at block boundaries.
export.WINOGRAD_BLOCKS is chosen from this table (on both machine kinds where we have them).
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
            return F.avg_pool2d(x, 2) if e.pools[self.stage - 1] > 1 and not e.pools_in_tiles(self.stage - 1) else x
        x = x.mean(dim=3)
        x = torch.amax(x, dim=2) + x.mean(dim=2)
        return torch.sigmoid(F.linear(F.relu(F.linear(x, *e.fc1)), *e.fc2))


# how a block's two convolutions are computed: direct, or Winograd F(m x m) with the GEMMs as grouped
# CONV_2Ds (shipped: cacheable weights) or as BATCH_MATMULs; "pool after": the 2x2 average pool as its
# own op after the shuffled-back map, not inside the output tiles (the layout before issue #12's last step)
FORMS = {"direct": None, "F(2x2)": (2, "conv"), "F(4x4)": (4, "conv"), "F(4x4) pool after": (4, "conv", False),
         "F(4x4) bmm": (4, "bmm")}


def pool_after(export, stage: int) -> None:
    """The block's second convolution without its in-tile pooling: avg_pool2d follows it again."""
    if export.pools_in_tiles(stage - 1):
        export.convs[2 * stage - 1].pool = 1  # the bias then goes in after the output transform


def main() -> None:
    from bench.machine import cpu_line
    from soundtag.convert.cnn14 import load_body
    from soundtag.convert.export import LAYOUTS, WINOGRAD_BLOCKS, _ExportBody
    from tests.fixtures import cached_checkpoint

    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--runs", type=int, default=15)
    ap.add_argument("--batch", type=int, help="instead: the shipped fp32 layout per block and whole, B windows per invoke vs 1")
    args = ap.parse_args()
    body = load_body(cached_checkpoint(CACHE))
    if args.batch:
        return batch_table(body, args.batch, args.threads, args.runs)
    group = LAYOUTS["fp32"][2]
    conv_shapes = [c.weight.shape for b in body.blocks() for c in (b.conv1, b.conv2)]
    x = torch.from_numpy(np.random.default_rng(0).normal(-40, 20, (1, 1, 1001, 64)).astype(np.float32))
    models, rows = [], []
    for stage in range(8):  # bn0, blocks 1-6, head; each block in every form, interleaved below
        forms = FORMS if 1 <= stage <= 6 else {"direct": None}
        y = None
        for form, m in forms.items():
            export = _ExportBody(body, {stage: m[0]} if m else {}, False, None, group if m else None,
                                 m[1] if m else "conv").eval()
            if m and len(m) > 2 and not m[2]:
                pool_after(export, stage)
            piece = Piece(export, stage).eval()
            with torch.inference_mode():
                y = piece(x) if y is None else y
                data = to_tflite(piece, x)
            models.append((stage, form, data, x.numpy(), len(data)))
        macs = 0
        if 1 <= stage <= 6:
            h, w = x.shape[2], x.shape[3]
            for shape in conv_shapes[2 * stage - 2 : 2 * stage]:
                macs += h * w * shape[0] * shape[1] * 9  # direct-convolution multiply-adds
        name = {0: "bn0", 7: "head (pool, fc1, fc)"}.get(stage, f"block{stage} {tuple(x.shape[1:])}")
        rows.append((stage, name, macs))
        x = y
    times = interleaved([(data, inp) for _, _, data, inp, _ in models], args.threads, args.runs)
    by = {(stage, form): (t, size) for (stage, form, _, _, size), t in zip(models, times)}
    print(f"Machine: {cpu_line()}; threads={args.threads}, median of {args.runs} interleaved runs per piece; "
          f"shipped fp32 layout: {WINOGRAD_BLOCKS}\n")
    print("| piece | G MACs (direct) | " + " | ".join(f"{f} ms" for f in FORMS) + " | best | weights MB (" + ", ".join(FORMS) + ") |")
    print("|---|---|" + "---|" * len(FORMS) + "---|---|")
    total = {f: 0.0 for f in FORMS}
    for stage, name, macs in rows:
        got = {f: by[(stage, f)] for f in FORMS if (stage, f) in by}
        for f in FORMS:
            total[f] += got.get(f, got["direct"])[0]
        best = min(got, key=lambda f: got[f][0])
        print(f"| {name} | {macs / 1e9:.2f} | " + " | ".join(f"{got[f][0] * 1000:.1f}" if f in got else "–" for f in FORMS)
              + f" | {best} | " + ", ".join(f"{got[f][1] / 1e6:.0f}" for f in got) + " |")
    shipped = sum(by[(s, next(f for f, m in FORMS.items() if (m and m[0]) == WINOGRAD_BLOCKS.get(s)))][0] if 1 <= s <= 6 else by[(s, "direct")][0]
                  for s, _, _ in rows)
    print(f"\nsum of pieces: all direct {total['direct'] * 1000:.0f} ms, as shipped {shipped * 1000:.0f} ms")


def batch_table(body, batch: int, threads: int, runs: int) -> None:
    """ms per window of each block and of the whole fp32 body (export.LAYOUTS) at 1 and ``batch``
    windows per invoke: what a batch-B model would buy (weights read once per invoke, bigger GEMMs)."""
    from bench.machine import cpu_line
    from soundtag.convert.export import LAYOUTS, _ExportBody

    blocks, direct_group, group = LAYOUTS["fp32"]
    export = _ExportBody(body, blocks, False, direct_group, group).eval()
    x = x0 = torch.from_numpy(np.random.default_rng(0).normal(-40, 20, (batch, 1, 1001, 64)).astype(np.float32))
    pieces = [(f"block{s}" if 1 <= s <= 6 else {0: "bn0", 7: "head"}[s], Piece(export, s).eval()) for s in range(8)]
    pieces.append(("whole body", export))
    models = []
    with torch.inference_mode():
        for name, piece in pieces:
            if name == "whole body":
                x = x0
            for b in (1, batch):
                models.append((to_tflite(piece, x[:b].contiguous()), x[:b].numpy()))
            x = piece(x)
    # the whole bodies apart from the pieces: interleaved with them, every piece's weights pass through
    # the caches between two invokes of a whole body (its B 1 read 143 ms per window that way, 115 alone)
    times = interleaved(models[:-2], threads, runs) + interleaved(models[-2:], threads, runs)
    print(f"Machine: {cpu_line()}; threads={threads}, median of {runs} interleaved runs per piece "
          "(the pieces with each other, the two whole bodies with each other)\n")
    print(f"| piece | B 1 ms / window | B {batch} ms / window | B {batch} vs B 1 |\n|---|---|---|---|")
    for k, (name, _) in enumerate(pieces):
        one, many = times[2 * k] * 1000, times[2 * k + 1] * 1000 / batch
        print(f"| {name} | {one:.1f} | {many:.1f} | {one / many:.2f}x |")


def to_tflite(piece: nn.Module, x: torch.Tensor) -> bytes:
    """One piece converted by litert-torch for the sample input x: the flatbuffer bytes."""
    import litert_torch

    edge = litert_torch.convert(piece, (x,))
    return bytes(edge.model_content() if callable(getattr(edge, "model_content", None)) else edge.model_content)


def interleaved(models: list[tuple[bytes, np.ndarray]], threads: int, runs: int) -> list[float]:
    """Median seconds per invoke of each model, one invoke of each in turn per round (noise hits all alike)."""
    from ai_edge_litert.interpreter import Interpreter

    loaded = []
    for data, x in models:
        it = Interpreter(model_content=data, num_threads=threads)
        it.allocate_tensors()
        idx = it.get_input_details()[0]["index"]
        it.set_tensor(idx, x)
        it.invoke()
        loaded.append((it, idx, x))
    samples: list[list[float]] = [[] for _ in loaded]
    for _ in range(runs):
        for k, (it, idx, x) in enumerate(loaded):
            it.set_tensor(idx, x)
            t = time.perf_counter()
            it.invoke()
            samples[k].append(time.perf_counter() - t)
    return [float(np.median(s)) for s in samples]


if __name__ == "__main__":
    main()
