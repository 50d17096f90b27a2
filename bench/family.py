"""The PANNs family on the CPU: ms per 10 s window of each architecture's LiteRT models vs its PyTorch
module, in one process, interleaved, medians; with file sizes and the fp32 parity of the conversion.

    python -m bench.family [--threads 2] [--runs 7] [--arch Cnn6 Cnn10 ...]

Synthetic checkpoints: the speed of a model does not depend on its weights' values. Models: the newest
passed conversion of each architecture found under --search folders (default: the test cache), else
converted now (tests/fixtures.py). Input: the shipped speech clip at each model's rate (model.probe_input).
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np

from bench.machine import cpu_line

ARCHS = {"Cnn14": ("fp32", "fp16", "int8"), "Cnn14_16k": ("fp32",), "Cnn10": ("fp32", "int8"),
         "Cnn6": ("fp32", "fp16", "int8"), "MobileNetV1": ("fp32",), "MobileNetV2": ("fp32",),
         "ResNet38": ("fp32",), "Wavegram_Logmel_Cnn14": ("fp32",),
         "Cnn14_DecisionLevelMax": ("fp32", "fp16"), "Cnn14_DecisionLevelAtt": ("fp32",)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--runs", type=int, default=7)
    ap.add_argument("--arch", nargs="+", default=list(ARCHS))
    ap.add_argument("--search", nargs="+", default=None, help="folders to look for converted models in")
    args = ap.parse_args()

    import torch

    from soundtag.convert import family
    from soundtag.convert.export import report_file
    from soundtag.model import Model, probe_input
    from tests.fixtures import cached_family_models, cached_models

    torch.set_num_threads(args.threads)
    print(cpu_line())
    print(f"threads {args.threads}, {args.runs} interleaved rounds, medians\n")
    print("| architecture | published mAP | PyTorch ms | model | MB | ms / window | vs PyTorch | fp32 corr (conversion) |")
    print("|---|---|---|---|---|---|---|---|")
    for name in args.arch:
        a = family.ARCHITECTURES[name]
        found = _find(a, report_file(a), args.search)
        if found is not None:
            out, checkpoint = found
        elif name == "Cnn14":
            from tests.fixtures import cached_checkpoint

            out, checkpoint = cached_models(), cached_checkpoint()
        else:
            out, checkpoint = cached_family_models(name, ARCHS[name])
        report = json.loads((out / report_file(a)).read_text())
        body = family.load(checkpoint, name)[1]
        models = {p: Model(out / a.file(p), num_threads=args.threads, weight_cache=False) for p in ARCHS[name]}
        spec = models["fp32"].spec
        x = probe_input(spec)
        if a.inputs == ("waveform", "logmel"):
            from soundtag import features

            lm = features.logmel(x.reshape(-1), spec.front_end).reshape(1, 1, spec.frames, -1)
            torch_in = (torch.from_numpy(x), torch.from_numpy(lm))
        else:
            torch_in = (torch.from_numpy(x),)
        times: dict[str, list[float]] = {"torch": [], **{p: [] for p in models}}
        with torch.inference_mode():
            body(*torch_in)
            for m in models.values():
                m.run(x)
            for _ in range(args.runs):
                t = time.perf_counter()
                body(*torch_in)
                times["torch"].append(time.perf_counter() - t)
                for p, m in models.items():
                    t = time.perf_counter()
                    m.run(x)
                    times[p].append(time.perf_counter() - t)
        ref = 1000 * float(np.median(times["torch"]))
        corr = report["models"]["fp32"]["parity_vs_pytorch"]["min_corr"]
        for i, p in enumerate(models):
            ms = 1000 * float(np.median(times[p]))
            mb = (out / a.file(p)).stat().st_size / 1e6
            print(f"| {name if i == 0 else ''} | {a.published_map:.3f} | {ref:.1f} | {p} | {mb:.0f} | {ms:.1f} | "
                  f"{ref / ms:.2f}x | {corr:.7f} |" if i == 0 else
                  f"| | | | {p} | {mb:.0f} | {ms:.1f} | {ref / ms:.2f}x | |", flush=True)


def _find(arch, report_name: str, roots: list[str] | None):
    """(models folder, checkpoint) of the newest passed conversion of ``arch`` with all of ARCHS' files."""
    from pathlib import Path

    from tests.fixtures import CACHE

    reports = [p for root in (roots or [str(CACHE)]) for p in Path(root).rglob(report_name)]
    for p in sorted(reports, key=lambda p: p.stat().st_mtime, reverse=True):
        r = json.loads(p.read_text())
        if r.get("passed") and Path(r["checkpoint"]["path"]).is_file() and \
                all((p.parent / arch.file(q)).is_file() for q in ARCHS[arch.name]):
            return p.parent, Path(r["checkpoint"]["path"])
    return None


if __name__ == "__main__":
    main()
