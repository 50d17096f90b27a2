"""Sound event detection on the CPU: ms per 10 s window of the DecisionLevel models next to the clip
model (LiteRT fp32, one process, interleaved, medians), and what the post-processing of a 1 h file
costs (its framewise timeline and events: sed.timeline + Scorer.frame_events, and the live tracker).

    python -m bench.sed [--threads 2] [--runs 7]

Models: the test cache's conversions of the synthetic checkpoints (tests/fixtures.py). The 1 h
timeline is synthetic segmentwise scores shaped like a trained model's (most classes near 0.05, a few
active for minutes), 360 windows x 31 steps x 527 classes.
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from bench.machine import cpu_line


def _ms(fn, runs: int) -> float:
    times = []
    for _ in range(runs):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return 1000 * float(np.median(times))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--runs", type=int, default=7)
    args = ap.parse_args()

    from soundtag.convert.family import ARCHITECTURES
    from soundtag.model import Model, probe_input
    from soundtag.scoring import Scorer
    from soundtag.sed import EventTracker, FrameTimeline, PostProcessing
    from tests.fixtures import cached_family_models, cached_models

    print(cpu_line())
    print(f"threads {args.threads}, {args.runs} interleaved rounds, medians\n")
    files = {"Cnn14 (clip)": cached_models(precisions=("fp32", "fp16", "int8")) / "cnn14_audioset_fp32.tflite"}
    for arch in ("Cnn14_DecisionLevelMax", "Cnn14_DecisionLevelAtt"):
        out, _ = cached_family_models(arch, ("fp32", "fp16") if arch.endswith("Max") else ("fp32",))
        files[arch] = out / ARCHITECTURES[arch].file("fp32")
    models = {k: Model(v, num_threads=args.threads) for k, v in files.items()}
    x = {k: probe_input(m.spec) for k, m in models.items()}
    for k, m in models.items():
        m.run(x[k])  # warm-up
    times: dict[str, list[float]] = {k: [] for k in models}
    for _ in range(args.runs):
        for k, m in models.items():
            t = time.perf_counter()
            m.run(x[k])
            times[k].append(time.perf_counter() - t)
    base = float(np.median(times["Cnn14 (clip)"]))
    print("| model (fp32) | ms / window | vs the clip model |")
    print("|---|---|---|")
    for k, ts in times.items():
        print(f"| {k} | {1000 * np.median(ts):.1f} | {np.median(ts) / base:.2f}x |")

    rng = np.random.default_rng(0)
    windows, steps, classes = 360, 31, 527
    scorer = Scorer(labels=None)
    post = PostProcessing()
    timed = {}
    for name, centre in (("8 classes active (the rest near 0.002)", -6.0), ("every class crosses 0.5 somewhere", -3.0)):
        logits = rng.normal(centre, 1.0, (windows, steps, classes))
        for c in rng.choice(classes, 8, replace=False):  # a few classes active for minutes at a time
            w0 = int(rng.integers(0, windows - 30))
            logits[w0:w0 + int(rng.integers(3, 30)), :, c] += 8.0
        seg = (1 / (1 + np.exp(-logits))).astype(np.float32)
        tl = FrameTimeline(seg, np.arange(windows) * 320_000, 32, 1001, 320, 32_000, 1 + 3600 * 32_000 // 320)
        active = int((seg.max(axis=(0, 1)) >= 0.5).sum())
        timed[name] = (_ms(lambda: scorer.frame_events(tl, post, 3600.0), max(3, args.runs // 2)), active,
                       len(scorer.frame_events(tl, post, 3600.0)))
    full = _ms(lambda: tl.scores(), max(3, args.runs // 2))

    def live():
        tracker = EventTracker(scorer.event_cutoffs, 0.01, post)
        for w in range(windows):
            tracker.push(tl.scores()[w * 1000:(w + 1) * 1000] if w == 0 else fw_chunks[w])
        tracker.close()

    fw = tl.scores()
    fw_chunks = [fw[w * 1000:(w + 1) * 1000] for w in range(windows)]
    live_ms = _ms(live, 3)
    print(f"\n1 h file ({windows} windows, {tl.total_frames} frames; the model itself: {windows} x the ms / window above):")
    print("| step | ms |")
    print("|---|---|")
    print(f"| the whole framewise timeline [{tl.total_frames}, 527] float32 ({fw.nbytes / 2**20:.0f} MiB) | {full:.0f} |")
    for name, (ms, active, n) in timed.items():
        print(f"| events, {name}: {active} classes reach 0.5, {n} events | {ms:.0f} |")
    print(f"| live tracker fed window by window, every class crossing 0.5 | {live_ms:.0f} |")


if __name__ == "__main__":
    main()
