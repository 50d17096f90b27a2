"""soundtag against what a user would pick instead on the same CPU: the CNN14 body exported to ONNX and
run by ONNX Runtime or OpenVINO, next to eager PyTorch, in one run (issue #22).

    python -m bench.peers [--rounds 9] [--clips 8] [--long-minutes 10] [--batches 1,2,4,8] [--json FILE]

Per window: the body alone on the log-mel of real-ish clips (the shipped speech clip and bench
scenes), each runtime in a process of its own (as a user runs one; in one process ONNX Runtime's and
OpenVINO's thread pools slowed the others' windows by 20-200 % here), the processes run in turn and
the whole sequence repeated ``--passes`` times, medians; corr and top-1 against PyTorch eager on
every clip. End to end: a folder of 10 s clips and one long file, files -> window
probabilities. soundtag runs its own Tagger (decode, resample, log-mel, model, pipelined); a peer
gets the same decoded windows and host log-mel (soundtag's, which matches torchlibrosa) and runs
them in batches of B, and reports its best B. Needs the bench extra: pip install 'soundtag[bench]'.
Nothing here fails a build on timing: it prints tables.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import numpy as np

from bench.machine import cpu_line, peak_rss_mib
from bench.run import make_files
from tests.fixtures import cached_checkpoint, cached_models

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # torch's spinning workers steal the next runtime's cores
ROOT = Path(__file__).resolve().parents[1]
CACHE = Path(os.environ.get("SOUNDTAG_BENCH_CACHE", ROOT / ".test-cache"))
os.environ.setdefault("SOUNDTAG_WEIGHT_CACHE", str(CACHE / "xnnpack"))
THREADS = min(4, os.cpu_count() or 1)  # soundtag's default (model.DEFAULT_THREADS), given to every runtime


def export_onnx(body, path: Path) -> Path:
    """The eval-mode body as ONNX (TorchScript exporter, opset 17), batch dimension dynamic."""
    import torch

    if not path.is_file():
        tmp = path.with_suffix(".tmp")
        with torch.inference_mode():
            torch.onnx.export(body, (torch.zeros(1, 1, 1001, 64),), str(tmp), opset_version=17, dynamo=False,
                              input_names=["logmel"], output_names=["probs"],
                              dynamic_axes={"logmel": {0: "batch"}, "probs": {0: "batch"}})
        os.replace(tmp, path)
    return path


def ort_int8(fp32: Path) -> Path:
    """ONNX Runtime's dynamic int8 quantisation (per-channel weights), its documented CPU recipe."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    out = fp32.with_name(fp32.stem + "_int8.onnx")
    if not out.is_file():
        quantize_dynamic(str(fp32), str(out), per_channel=True, weight_type=QuantType.QInt8)
    return out


class Torch:
    name = "PyTorch eager"

    def __init__(self, body) -> None:
        import torch

        torch.set_num_threads(THREADS)
        self.torch, self.body = torch, body

    def __call__(self, x: np.ndarray) -> np.ndarray:
        with self.torch.inference_mode():
            return self.body(self.torch.from_numpy(x)).numpy()


class Ort:
    def __init__(self, path: Path, name: str) -> None:
        import onnxruntime as ort

        so = ort.SessionOptions()
        so.intra_op_num_threads, so.inter_op_num_threads = THREADS, 1
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        self.name = f"ONNX Runtime {ort.__version__} {name}"
        self.session = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])

    def __call__(self, x: np.ndarray) -> np.ndarray:
        return self.session.run(["probs"], {"logmel": x})[0]


class OpenVino:
    def __init__(self, path: Path, precision: str) -> None:
        import openvino as ov

        core = ov.Core()
        config = {"INFERENCE_NUM_THREADS": THREADS, "PERFORMANCE_HINT": "LATENCY"}
        if precision == "f32":
            config["INFERENCE_PRECISION_HINT"] = "f32"
        self.name = f"OpenVINO {ov.get_version().split('-')[0]} {precision}"
        self.compiled = core.compile_model(core.read_model(str(path)), "CPU", config)
        self.request = self.compiled.create_infer_request()

    def __call__(self, x: np.ndarray) -> np.ndarray:
        return np.array(self.request.infer({0: x})[self.compiled.output(0)])


class Soundtag:
    def __init__(self, path: Path, name: str, **kw) -> None:
        from soundtag.model import Model

        self.model = Model(path, num_threads=THREADS, **kw)
        self.name = f"soundtag {name}"

    def __call__(self, x: np.ndarray) -> np.ndarray:
        return np.stack([self.model(w) for w in x])


class LiteRtOpenVino:
    """A soundtag model file through ai-edge-litert 2.3's Intel OpenVINO dispatch (OpenVINO's CPU plugin)
    instead of XNNPACK. Measured, not shipped: on the fp32 Winograd graph it returns a wrong answer
    (corr -0.09), on fp16 it runs bf16 (corr 0.999), and on int8 real drum hits come out at corr 0.9961
    vs PyTorch against XNNPACK int8's 0.9979 (docs/speed.md)."""

    def __init__(self, path: Path, name: str) -> None:
        import ctypes
        import importlib.util

        from ai_edge_litert.compiled_model import CompiledModel
        from ai_edge_litert.options import HardwareAccelerator, IntelOpenVinoGraphBackend, IntelOpenVinoOptions, Options

        libs = Path(importlib.util.find_spec("openvino").submodule_search_locations[0]) / "libs"
        for soname in ("libopenvino.so.2631", "libopenvino_tensorflow_lite_frontend.so.2631"):  # the dispatch's DT_NEEDED
            ctypes.CDLL(str(libs / soname), mode=ctypes.RTLD_GLOBAL)
        self.model = CompiledModel.from_file(str(path), options=Options(
            hardware_accelerators=HardwareAccelerator.NPU | HardwareAccelerator.CPU,
            intel_openvino_options=IntelOpenVinoOptions(graph_backend=IntelOpenVinoGraphBackend.CPU)))
        assert self.model.is_fully_accelerated(), "the dispatch does not run the whole model"
        self.inputs, self.outputs = self.model.create_input_buffers(0), self.model.create_output_buffers(0)
        self.name = f"soundtag {name}, LiteRT's OpenVINO dispatch"

    def __call__(self, x: np.ndarray) -> np.ndarray:
        rows = []
        for w in x:
            self.inputs[0].write(np.ascontiguousarray(w, np.float32).ravel())
            self.model.run_by_index(0, self.inputs, self.outputs)
            rows.append(self.outputs[0].read(527, np.float32))
        return np.stack(rows)


def window_inputs(clips: list[Path]) -> list[np.ndarray]:
    """The first window's log-mel [1, 1, 1001, 64] of the speech clip and of each clip."""
    from soundtag import features
    from soundtag.audio import load_audio
    from soundtag.model import probe_input

    out = [probe_input()]
    for p in clips:
        wave, _, _ = load_audio(str(p), sample_rate=32000)
        w = np.zeros(320_000, np.float32)
        w[: min(wave.size, w.size)] = wave[: w.size]
        out.append(features.logmel(w).reshape(1, 1, 1001, 64).astype(np.float32))
    return out


RUNTIMES = ("torch", "ort-fp32", "ov-f32", "ov-default", "ort-int8", "st-fp32", "st-fp16", "st-int8", "st-int8-openvino")


def onnx_body() -> Path:
    """The synthetic checkpoint's body as ONNX, exported once (torch imported only when it is missing)."""
    path = cached_checkpoint().with_name("Cnn14_synthetic_body.onnx")
    if not path.is_file():
        from soundtag.convert.cnn14 import load_body

        export_onnx(load_body(cached_checkpoint()), path)
    return path


def prepare(keys: list[str]) -> None:
    """Everything a runtime's process reads, built here before any is timed: the converted models,
    the ONNX export and its int8 variant. A child then imports its own runtime only, so its peak RSS
    is that runtime's (the PyTorch child alone holds torch)."""
    cached_models()
    if any(k.startswith(("ort", "ov")) for k in keys):
        onnx = onnx_body()
        if "ort-int8" in keys:
            ort_int8(onnx)


def make_runtime(key: str):
    """One runtime by key (RUNTIMES), on the cached synthetic checkpoint and its converted models."""
    checkpoint = cached_checkpoint()
    if key == "torch":
        from soundtag.convert.cnn14 import load_body

        return Torch(load_body(checkpoint))
    if key.startswith(("ort", "ov")):
        onnx = onnx_body()  # exported by the parent (prepare): torch never enters this process's RSS
        return {"ort-fp32": lambda: Ort(onnx, "fp32"), "ort-int8": lambda: Ort(ort_int8(onnx), "dynamic int8 (per-channel)"),
                "ov-f32": lambda: OpenVino(onnx, "f32"), "ov-default": lambda: OpenVino(onnx, "default")}[key]()
    precision = key.split("-")[1]
    path = cached_models() / f"cnn14_audioset_{precision}.tflite"
    if key.endswith("openvino"):
        return LiteRtOpenVino(path, precision)
    return Soundtag(path, precision)


def child(key: str, inputs: Path, rounds: int, out: Path) -> None:
    """In its own process: one runtime's outputs and window times on the saved inputs."""
    xs = np.load(inputs)
    r = make_runtime(key)
    outputs = np.stack([r(x[None])[0] for x in xs])  # warm-up, and what the parity columns compare
    times = []
    for _ in range(rounds):
        for x in xs:
            t = time.perf_counter()
            r(x[None])
            times.append(time.perf_counter() - t)
    np.save(out.with_suffix(".npy"), outputs)
    # VmHWM, this process's own high-water mark: getrusage's ru_maxrss survives execve, so a child
    # spawned by a parent that once held 1.8 GiB (the ONNX int8 quantization) reported 1.8 GiB, every one
    peak_mib = peak_rss_mib()
    out.write_text(json.dumps({"name": r.name, "times": times, "peak_rss_mib": peak_mib}))


def _spawn(*args: str) -> dict | None:
    import subprocess
    import sys

    r = subprocess.run([sys.executable, "-m", "bench.peers", *args], capture_output=True, text=True, cwd=ROOT)
    if r.returncode != 0:
        print(f"# {args[1]} not measured: {(r.stderr.strip().splitlines() or ['?'])[-1]}", flush=True)
        return None
    return json.loads(Path(args[-1]).read_text())


def per_window(keys: list[str], inputs: list[np.ndarray], rounds: int, passes: int, work: Path) -> list[dict]:
    np.save(work / "inputs.npy", np.concatenate(inputs))
    times: dict[str, list[float]] = {}
    names: dict[str, str] = {}
    peaks: dict[str, float] = {}
    for p in range(passes):
        for key in keys[p % len(keys):] + keys[: p % len(keys)]:
            got = _spawn("--child", key, str(work / "inputs.npy"), str(rounds), str(work / f"{key}.json"))
            if got is None:
                continue
            names[key] = got["name"]
            times.setdefault(key, []).extend(got["times"])
            peaks[key] = max(peaks.get(key, 0.0), got["peak_rss_mib"])
    outputs = {k: list(np.load(work / f"{k}.npy").astype(np.float64)) for k in times}
    ref = outputs[keys[0]]
    rows = []
    for key in [k for k in keys if k in times]:
        got = outputs[key]
        rows.append({
            "runtime": names[key],
            "ms_per_window": 1000 * float(np.median(times[key])),
            "p10_p90_ms": [1000 * float(np.percentile(times[key], q)) for q in (10, 90)],
            "peak_rss_mib": peaks[key],  # the whole process: the runtime, its model, Python, numpy (+ torch for some)
            "min_corr": min(float(np.corrcoef(a, b)[0, 1]) for a, b in zip(ref, got)),
            "max_abs_diff": max(float(np.abs(a - b).max()) for a, b in zip(ref, got)),
            "top1_agree": sum(int(np.argmax(a) == np.argmax(b)) for a, b in zip(ref, got)),
            "windows": len(inputs),
        })
    base = rows[0]["ms_per_window"]
    for row in rows:
        row["vs_torch"] = base / row["ms_per_window"]
    return rows


def decoded_windows(paths: list[Path]) -> list[np.ndarray]:
    """Every path's 10 s windows (hop 10 s, the last zero-padded) as log-mel, the way soundtag cuts them."""
    from soundtag import features
    from soundtag.audio import AudioStream
    from soundtag.windows import iter_windows

    feats = []
    for p in paths:
        for _, _, w in iter_windows(AudioStream(p), 320_000, 320_000):
            feats.append(features.logmel(w).astype(np.float32))
    return feats


def peer_end_to_end(runtime, paths: list[Path], batch: int) -> float:
    """Seconds for files -> probabilities: decode + resample + log-mel (soundtag's) + the peer in batches."""
    t = time.perf_counter()
    feats = decoded_windows(paths)
    for i in range(0, len(feats), batch):
        runtime(np.stack(feats[i : i + batch])[:, None])
    return time.perf_counter() - t


def e2e_child(key: str, paths: list[Path], batch: int, rounds: int, out: Path) -> None:
    """In its own process: files -> probabilities with one runtime, seconds per round after a warm-up."""
    if key.startswith("st-") and not key.endswith("openvino"):
        from soundtag import Tagger, TaggerOptions

        precision = key.split("-")[1]
        tagger = Tagger(TaggerOptions(model_path=str(cached_models() / f"cnn14_audioset_{precision}.tflite"),
                                      num_threads=THREADS))

        def once() -> float:
            t = time.perf_counter()
            for _, _, error in tagger.tag_files(paths):
                assert error is None, error
            return time.perf_counter() - t

        tagger.tag_file(paths[0])
        name = f"soundtag {precision}"
    else:
        runtime = make_runtime(key)
        runtime(np.zeros((batch, 1, 1001, 64), np.float32))

        def once() -> float:
            return peer_end_to_end(runtime, paths, batch)

        name = runtime.name
    out.write_text(json.dumps({"name": name, "seconds": [once() for _ in range(rounds)]}))


def end_to_end(jobs: dict[str, list[Path]], keys: list[str], batches: list[int], rounds: int, passes: int,
               work: Path) -> list[dict]:
    rows = []
    for job, paths in jobs.items():
        windows = len(decoded_windows(paths))
        listing = work / "paths.txt"
        listing.write_text("\n".join(map(str, paths)))
        secs: dict[tuple[str, int], list[float]] = {}
        names: dict[str, str] = {}
        for p in range(passes):
            for key in keys[p % len(keys):] + keys[: p % len(keys)]:
                for b in ([1] if key.startswith("st-") else batches):  # soundtag's models: one window per invoke
                    got = _spawn("--e2e-child", key, str(listing), str(b), str(rounds), str(work / f"e2e-{key}-{b}.json"))
                    if got is not None:
                        names[key] = got["name"]
                        secs.setdefault((key, b), []).extend(got["seconds"])
        for (key, b), s in secs.items():
            seconds = float(np.median(s))
            rows.append({"job": job, "runtime": names[key], "batch": b, "seconds": seconds, "windows": windows,
                         "windows_per_s": windows / seconds})
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=3, help="rounds over the clips in each runtime's process")
    ap.add_argument("--passes", type=int, default=3, help="times the sequence of processes is repeated")
    ap.add_argument("--clips", type=int, default=8)
    ap.add_argument("--long-minutes", type=float, default=10.0)
    ap.add_argument("--batches", default="1,4,8", help="peer batch sizes tried end to end")
    ap.add_argument("--e2e-rounds", type=int, default=1)
    ap.add_argument("--skip-e2e", action="store_true")
    ap.add_argument("--runtimes", default=",".join(RUNTIMES), help=f"among {', '.join(RUNTIMES)}; the first is the reference")
    ap.add_argument("--json", type=Path)
    ap.add_argument("--child", nargs=4, metavar=("KEY", "INPUTS", "ROUNDS", "OUT"), help=argparse.SUPPRESS)
    ap.add_argument("--e2e-child", nargs=5, metavar=("KEY", "PATHS", "BATCH", "ROUNDS", "OUT"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        key, inputs, rounds, out = args.child
        child(key, Path(inputs), int(rounds), Path(out))
        return 0
    if args.e2e_child:
        key, listing, batch, rounds, out = args.e2e_child
        e2e_child(key, [Path(p) for p in Path(listing).read_text().splitlines()], int(batch), int(rounds), Path(out))
        return 0

    keys = args.runtimes.split(",")
    prepare(keys)  # built once, before any process is timed
    with tempfile.TemporaryDirectory() as d:
        work = Path(d)
        clips, long = make_files(work, args.clips, args.long_minutes)
        print(f"# {cpu_line()}; {THREADS} threads per runtime; each runtime in its own process, "
              f"{args.passes} passes x {args.rounds} rounds, medians", flush=True)
        rows = per_window(keys, window_inputs(clips), args.rounds, args.passes, work)
        print("\n| runtime | ms / window (p10-p90) | vs PyTorch | min corr vs PyTorch | max abs diff | top-1 as PyTorch | peak RSS MiB |")
        print("|---|---|---|---|---|---|---|")
        for r in rows:
            lo, hi = r["p10_p90_ms"]
            print(f"| {r['runtime']} | {r['ms_per_window']:.1f} ({lo:.0f}-{hi:.0f}) | {r['vs_torch']:.2f}x | "
                  f"{r['min_corr']:.6f} | {r['max_abs_diff']:.1e} | {r['top1_agree']}/{r['windows']} | {r['peak_rss_mib']:.0f} |",
                  flush=True)
        e2e = []
        if not args.skip_e2e:
            e2e_keys = [k for k in keys if k in ("ort-fp32", "ov-f32", "ov-default") or k.startswith("st-") and k != "st-fp16"]
            jobs = {f"folder ({len(clips)} x 10 s)": clips, f"{args.long_minutes:g}-min file": [long]}
            e2e = end_to_end(jobs, e2e_keys, [int(b) for b in args.batches.split(",")], args.e2e_rounds,
                             args.passes, work)
            print("\n| job | runtime | batch | seconds | windows / s |")
            print("|---|---|---|---|---|")
            for r in e2e:
                print(f"| {r['job']} | {r['runtime']} | {r['batch']} | {r['seconds']:.2f} | {r['windows_per_s']:.2f} |")
    if args.json:
        args.json.write_text(json.dumps({"cpu": cpu_line(), "per_window": rows, "end_to_end": e2e}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
