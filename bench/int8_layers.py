"""Which CNN14 layers int8 should keep in float: fidelity and speed per layer choice (issue #12).

    python -m bench.int8_layers [--threads 2] [--runs 7]

From the direct fp32 layout (the int8 model's), quantizes ONE layer at a time (the rest float32) and
measures how far that alone moves the probabilities from the PyTorch body on the converter's
validation inputs (1 - min corr: the layer's sensitivity). Then keeps the most sensitive layers in
float, one more at a time, and measures the mixed model: min corr and max |dp| vs PyTorch, top-1
agreement, file size and ms per window (interleaved with the all-int8 and the fp32 models, medians).
Prints the machine line with every table: int8's speed depends on VNNI, its fidelity does not.
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
CACHE = Path(os.environ.get("SOUNDTAG_BENCH_CACHE", ROOT / ".test-cache"))


def fidelity(data: bytes, inputs: dict, reference) -> dict:
    from soundtag.convert.validate import compare, run_tflite

    out = run_tflite(data, inputs)
    parity = compare("int8", reference.probs, out.probs, {"min_corr": 0.0, "max_abs_diff": None})
    top1 = sum(p["top1_agree"] for p in parity.per_input.values())
    return {"corr": parity.min_corr, "max_dp": parity.max_abs_diff, "top1": f"{top1}/{len(inputs)}", "bytes": len(data)}


def scene_inputs(n: int = 20) -> dict:
    """The bench's real-ish scenes (noise bursts, harmonic tones, clicks; bench.run's clips) as host
    log-mels: the fidelity a user sees on recordings, besides the converter's four validation inputs."""
    from soundtag import features
    from soundtag.spec import CNN14
    from tests.fixtures import scene

    return {f"scene{i}": features.logmel(scene(10, sr=CNN14.sample_rate, seed=i)).reshape(CNN14.input_shape)
            for i in range(n)}


def scene_fidelity(data: bytes, inputs: dict, reference) -> str:
    """mean / min corr vs PyTorch over the scenes, and top-1 agreement."""
    from soundtag.convert.validate import compare, run_tflite

    out = run_tflite(data, inputs)
    parity = compare("int8", reference.probs, out.probs, {"min_corr": 0.0, "max_abs_diff": None})
    corrs = [p["corr"] for p in parity.per_input.values()]
    top1 = sum(p["top1_agree"] for p in parity.per_input.values())
    return f"{np.mean(corrs):.5f} / {min(corrs):.5f} | {top1}/{len(inputs)}"


def interleaved_ms(models: list[bytes], threads: int, runs: int) -> list[float]:
    from ai_edge_litert.interpreter import Interpreter

    x = np.random.default_rng(0).normal(-40, 20, (1, 1, 1001, 64)).astype(np.float32)
    its = []
    for data in models:
        it = Interpreter(model_content=data, num_threads=threads)
        it.allocate_tensors()
        its.append((it, it.get_input_details()[0]["index"]))
    samples: list[list[float]] = [[] for _ in its]
    for r in range(runs + 1):
        for k, (it, idx) in enumerate(its):
            it.set_tensor(idx, x)
            t = time.perf_counter()
            it.invoke()
            if r:  # the first round warms up
                samples[k].append(time.perf_counter() - t)
    return [1000 * float(np.median(s)) for s in samples]


def main() -> None:
    from bench.machine import cpu_line
    from soundtag.convert.cnn14 import load_body
    from soundtag.convert.export import INT8_LAYERS, LAYOUTS, reference_outputs, to_fp32_tflite, to_int8_tflite, \
        validation_inputs
    from tests.fixtures import cached_checkpoint

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--runs", type=int, default=7)
    ap.add_argument("--greedy", type=int, default=6, help="keep up to this many of the most sensitive layers in float")
    args = ap.parse_args()
    body = load_body(cached_checkpoint(CACHE))
    inputs = validation_inputs()
    reference = reference_outputs(body, inputs)
    scenes = scene_inputs()
    scene_reference = reference_outputs(body, scenes)
    fp32 = to_fp32_tflite(body, LAYOUTS["int8"], embedding=True)
    print(f"Machine: {cpu_line()}; threads={args.threads}; synthetic CNN14, {len(inputs)} validation inputs\n")
    sensitivity = {}
    for layer in INT8_LAYERS:
        only = to_int8_tflite(fp32, tuple(k for k in INT8_LAYERS if k != layer))
        sensitivity[layer] = 1.0 - fidelity(only, inputs, reference)["corr"]
    ranked = sorted(INT8_LAYERS, key=sensitivity.get, reverse=True)
    print("| layer quantized alone | 1 - min corr vs PyTorch |")
    print("|---|---|")
    for layer in ranked:
        print(f"| {layer} | {sensitivity[layer]:.2e} |")
    choices = [()] + [tuple(ranked[:k]) for k in range(1, args.greedy + 1)]
    models = [to_int8_tflite(fp32, keep) for keep in choices]
    rows = [fidelity(m, inputs, reference) for m in models]
    on_scenes = [scene_fidelity(m, scenes, scene_reference) for m in models]
    times = interleaved_ms(models + [fp32], args.threads, args.runs)
    print(f"\nfp32 (direct) {times[-1]:.0f} ms per window in the same run\n")
    print("| float32 layers | min corr vs PyTorch | max \\|dp\\| | top-1 | scenes: mean / min corr | scenes: top-1 | MB | ms / window | vs fp32 direct |")
    print("|---|---|---|---|---|---|---|---|---|")
    for keep, row, scene_row, ms in zip(choices, rows, on_scenes, times):
        print(f"| {', '.join(keep) or 'none (all int8)'} | {row['corr']:.6f} | {row['max_dp']:.1e} | {row['top1']} | "
              f"{scene_row} | {row['bytes'] / 1e6:.0f} | {ms:.0f} | {times[-1] / ms:.2f}x |")


if __name__ == "__main__":
    main()
