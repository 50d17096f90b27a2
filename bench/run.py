"""Speed and memory of soundtag (fp32, fp16, int8) against the PyTorch reference path, in one run.

    python -m bench.run [--clips 20] [--rounds 3] [--long-minutes 10] [--json FILE] [--memory-only]

Reference path (panns_inference style): librosa.load(sr=32000) -> torchlibrosa front end -> CNN14 in
eager PyTorch, same synthetic checkpoint. Variants are interleaved file by file (A B C D A B C D ...)
over several rounds; per-clip medians and spreads are reported. Peak RSS and start-up are measured in
fresh subprocesses. This never fails a build on timing: it prints a table.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from bench.machine import cpu_line
from tests.fixtures import cached_checkpoint, cached_models, scene

# torch's OpenMP workers otherwise spin after each call and steal both cores from the variant that
# runs next in the interleaved loop; the reference's own time is unchanged (504 vs 507 ms here).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
ROOT = Path(__file__).resolve().parents[1]
CACHE = Path(os.environ.get("SOUNDTAG_BENCH_CACHE", ROOT / ".test-cache"))
# XNNPACK's packed weights for the in-process runs (model.py): next to the bench's models, not in ~/.cache
os.environ.setdefault("SOUNDTAG_WEIGHT_CACHE", str(CACHE / "xnnpack"))

GFLOP_PER_CLIP = 40.1  # CNN14 body, 20.05 G multiply-adds per 10 s window (converter's count)
VARIANTS = ("reference", "fp32", "fp16", "int8")


def make_files(d: Path, n_clips: int, long_minutes: float) -> tuple[list[Path], Path]:
    """Real-ish inputs: 44.1 kHz stereo 10 s clips (noise bursts, tones, clicks) and one long file."""
    import soundfile as sf

    clips = []
    for i in range(n_clips):
        p = d / f"clip{i:02d}.wav"
        sf.write(str(p), scene(10, sr=44100, seed=i, channels=2), 44100, subtype="PCM_16")
        clips.append(p)
    long = d / "long.wav"
    with sf.SoundFile(str(long), "w", 44100, 2, subtype="PCM_16") as f:
        for i in range(int(long_minutes * 6)):
            f.write(scene(10, sr=44100, seed=100 + i % 7, channels=2))
    return clips, long


class Reference:
    """The PyTorch reference path, timed by stage."""

    def batch(self, paths: list[Path]) -> None:
        for p in paths:
            self(p)

    def __init__(self, checkpoint: Path, threads: int) -> None:
        import torch
        from torchlibrosa.stft import LogmelFilterBank, Spectrogram

        from soundtag.convert.cnn14 import load_body

        torch.set_num_threads(threads)
        self.torch = torch
        self.body = load_body(checkpoint)
        self.sp = Spectrogram(n_fft=1024, hop_length=320, win_length=1024, window="hann", center=True,
                              pad_mode="reflect", freeze_parameters=True)
        self.lm = LogmelFilterBank(sr=32000, n_fft=1024, n_mels=64, fmin=50, fmax=14000, ref=1.0, amin=1e-10,
                                   top_db=None, freeze_parameters=True)

    def __call__(self, path: Path) -> dict:
        import librosa

        t0 = time.perf_counter()
        x, _ = librosa.load(str(path), sr=32000)
        t1 = time.perf_counter()
        n = 320_000
        times = {"decode": t1 - t0, "logmel": 0.0, "model": 0.0}
        with self.torch.inference_mode():
            for s in range(0, max(x.size, 1), n):  # 10 s windows, hop 10 s, last zero-padded
                w = np.zeros(n, np.float32)
                seg = x[s : s + n]
                w[: seg.size] = seg
                a = time.perf_counter()
                feats = self.lm(self.sp(self.torch.from_numpy(w[None])))
                b = time.perf_counter()
                self.body(feats)
                c = time.perf_counter()
                times["logmel"] += b - a
                times["model"] += c - b
        times["total"] = time.perf_counter() - t0
        return times


class Soundtag:
    """soundtag end to end (Tagger.tag_file), plus a staged pass for the breakdown."""

    def __init__(self, model: Path, threads: int | None) -> None:
        from soundtag import Tagger, TaggerOptions

        self.tagger = Tagger(TaggerOptions(model_path=str(model), num_threads=threads))

    def batch(self, paths: list[Path]) -> None:
        """A folder run: Tagger.tag_files, decoding the next file while the model runs."""
        for _, _, error in self.tagger.tag_files(paths):
            assert error is None, error

    def __call__(self, path: Path) -> dict:
        from soundtag import features
        from soundtag.audio import AudioStream
        from soundtag.tagger import iter_windows

        t0 = time.perf_counter()
        self.tagger.tag_file(path)
        total = time.perf_counter() - t0
        # staged, unpipelined: where the time goes
        times = {"decode": 0.0, "logmel": 0.0, "model": 0.0}
        a = time.perf_counter()
        windows = list(iter_windows(AudioStream(path), self.tagger.hop, self.tagger.spec.window_samples))
        times["decode"] = time.perf_counter() - a
        for _, _, w in windows:
            b = time.perf_counter()
            lm = features.logmel(w)
            c = time.perf_counter()
            self.tagger.model(lm)
            times["logmel"] += c - b
            times["model"] += time.perf_counter() - c
        times["total"] = total
        return times


def bench_clips(runners: dict, clips: list[Path], rounds: int) -> dict:
    samples = {k: [] for k in runners}
    for _ in range(rounds):
        for path in clips:
            for name, run in runners.items():  # interleaved A B C D
                samples[name].append(run(path))
    return samples


def bench_batches(runners: dict, clips: list[Path], rounds: int) -> dict:
    """Seconds per clip when each variant tags the whole list in one call (interleaved by round)."""
    per_clip = {k: [] for k in runners}
    for _ in range(rounds):
        for name, run in runners.items():
            t = time.perf_counter()
            run.batch(clips)
            per_clip[name].append((time.perf_counter() - t) / len(clips))
    return {k: float(np.median(v)) for k, v in per_clip.items()}


def summarize(samples: list[dict]) -> dict:
    out = {}
    for key in ("decode", "logmel", "model", "total"):
        v = np.array([s[key] for s in samples])
        out[key] = (float(np.median(v)), float(np.percentile(v, 10)), float(np.percentile(v, 90)))
    return out


def subprocess_probe(code: str, env: dict | None = None) -> dict:
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=1800,
                         env=None if env is None else {**os.environ, **env})
    if out.returncode != 0:
        raise RuntimeError(out.stderr[-2000:])
    return json.loads(out.stdout.strip().splitlines()[-1])


STARTUP_SOUNDTAG = """
import json, time
t = time.perf_counter()
import soundtag
a = time.perf_counter()
tg = soundtag.Tagger(soundtag.TaggerOptions(model_path={model!r}))
b = time.perf_counter()
{work}
hwm = [l for l in open("/proc/self/status") if l.startswith("VmHWM")][0].split()[1]
print(json.dumps({{"import_s": a - t, "load_s": b - a, "peak_rss_mb": int(hwm) / 1024}}))
"""
STARTUP_REFERENCE = """
import json, time, sys
t = time.perf_counter()
import torch, librosa, torchlibrosa
a = time.perf_counter()
from bench.run import Reference
ref = Reference(__import__("pathlib").Path({ckpt!r}), {threads})
b = time.perf_counter()
{work}
hwm = [l for l in open("/proc/self/status") if l.startswith("VmHWM")][0].split()[1]
print(json.dumps({{"import_s": a - t, "load_s": b - a, "peak_rss_mb": int(hwm) / 1024}}))
"""


def probe_memory(short: Path, long: Path, long_minutes: float, model_files: dict, ckpt: Path, threads: int) -> dict:
    """Peak RSS (VmHWM) of a fresh process tagging a 10 s file and the long file; soundtag in its three
    CPU states: building XNNPACK's weight cache (a first load), mapping the built cache (every later
    load), and packing on the heap ($SOUNDTAG_WEIGHT_CACHE=0, the Interpreter)."""
    mem = {}
    states = {"builds cache": None, "maps cache": None, "heap": {"SOUNDTAG_WEIGHT_CACHE": "0"}}
    for label, path in (("10 s", short), (f"{long_minutes:g} min", long)):
        for p in ("fp32", "int8"):
            work = f"r = tg.tag_file({str(path)!r})"
            with tempfile.TemporaryDirectory() as cache:
                for state, env in states.items():
                    mem[(p, state, label)] = subprocess_probe(STARTUP_SOUNDTAG.format(model=str(model_files[p]), work=work),
                                                              env or {"SOUNDTAG_WEIGHT_CACHE": cache})
        mem[("reference", "", label)] = subprocess_probe(STARTUP_REFERENCE.format(
            ckpt=str(ckpt), threads=threads, work=f"ref(__import__('pathlib').Path({str(path)!r}))"))
    print(f"\nMachine: {cpu_line()}; peak RSS = VmHWM of a fresh process per cell\n")
    print(f"| path | model file MB | import s | model load s | peak RSS 10 s file MB | peak RSS {long_minutes:g} min file MB |")
    print("|---|---|---|---|---|---|")
    for p, state in [("reference", "")] + [(p, s) for p in ("fp32", "int8") for s in states]:
        short_m, long_m = mem[(p, state, "10 s")], mem[(p, state, f"{long_minutes:g} min")]
        size = f"{model_files[p].stat().st_size / 2**20:.0f}" if p in model_files else "–"
        print(f"| {p}{', ' + state if state else ''} | {size} | {short_m['import_s']:.2f} | {short_m['load_s']:.2f} | "
              f"{short_m['peak_rss_mb']:.0f} | {long_m['peak_rss_mb']:.0f} |")
    return mem


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--clips", type=int, default=20)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--long-minutes", type=float, default=10.0)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="threads for both paths")
    ap.add_argument("--json", help="also write the raw numbers here")
    ap.add_argument("--memory-only", action="store_true", help="only peak RSS: 10 s file vs the long file")
    args = ap.parse_args()

    ckpt = cached_checkpoint(CACHE)
    models = cached_models(CACHE)
    model_files = {p: models / f"cnn14_audioset_{p}.tflite" for p in ("fp32", "fp16", "int8")}
    with tempfile.TemporaryDirectory() as tmp:
        clips, long = make_files(Path(tmp), args.clips, args.long_minutes)
        if args.memory_only:
            probe_memory(clips[0], long, args.long_minutes, model_files, ckpt, args.threads)
            return
        runners = {"reference": Reference(ckpt, args.threads)}
        runners.update({p: Soundtag(m, args.threads) for p, m in model_files.items()})
        for run in runners.values():  # warm-up
            run(clips[0])
        samples = bench_clips(runners, clips, args.rounds)
        stats = {k: summarize(v) for k, v in samples.items()}
        batch = bench_batches(runners, clips, args.rounds)
        long_times = {}
        for name, run in runners.items():
            long_times[name] = run(long)["total"]
        mem = probe_memory(clips[0], long, args.long_minutes, model_files, ckpt, args.threads)

    ref_total = stats["reference"]["total"][0]
    print(f"\nMachine: {cpu_line()}, Python {platform.python_version()}; "
          f"{args.clips} clips x {args.rounds} rounds, interleaved; threads={args.threads}\n")
    print("| path | decode ms | log-mel ms | model ms | per file: total ms (p10-p90) | RTF | body GFLOP/s | per file vs reference | folder run ms/clip | folder run vs reference |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for name in VARIANTS:
        s = stats[name]
        med = {k: s[k][0] * 1000 for k in s}
        print(f"| {name} | {med['decode']:.0f} | {med['logmel']:.0f} | {med['model']:.0f} | {med['total']:.0f} "
              f"({s['total'][1] * 1000:.0f}-{s['total'][2] * 1000:.0f}) | {s['total'][0] / 10:.4f} | "
              f"{GFLOP_PER_CLIP / s['model'][0]:.0f} | {ref_total / s['total'][0]:.2f}x | "
              f"{batch[name] * 1000:.0f} | {batch['reference'] / batch[name]:.2f}x |")
    print(f"\nLong file ({args.long_minutes:g} min, 44.1 kHz stereo): " + ", ".join(
        f"{k} {v:.1f} s ({long_times['reference'] / v:.2f}x)" for k, v in long_times.items()))
    if args.json:
        Path(args.json).write_text(json.dumps({"stats": stats, "batch": batch, "long": long_times,
                                               "memory": {"|".join(k): v for k, v in mem.items()}}, indent=2))


if __name__ == "__main__":
    main()
