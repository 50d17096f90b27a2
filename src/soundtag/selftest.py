"""`soundtag selftest`: load a model on the CPU or the GPU, run the probe, report what ran where.

The probe is the shipped speech clip (model.probe_input). On the GPU, loading already compares the
GPU's probabilities with the CPU's (model.PROBE_GATES); this adds the top tag and the time per window.
"""

from __future__ import annotations

import time

import numpy as np

import contextlib
import json
import logging
from pathlib import Path

from .cpu import cpu_info
from .errors import SoundtagError
from .files import atomic_write_bytes
from .model import Model, probe_input
from .paths import models_dir, resolve_model_path

log = logging.getLogger(__name__)

MEASURED_FILE = "measured.json"  # in the models cache: ms per window of each cached model, by selftest


def selftest(model_path: str | None = None, accelerator: str = "cpu", gpu_precision: str | None = None,
             runs: int = 3, num_threads: int | None = None) -> dict:
    """A JSON-able report; ``passed`` is False (with ``error``) when the model cannot run as asked."""
    report: dict = {"model": model_path, "accelerator_requested": accelerator, "passed": False}
    try:
        path, _ = resolve_model_path(model_path)
        report["model"] = str(path)
        model = Model(path, num_threads=num_threads, accelerator=accelerator, gpu_precision=gpu_precision)
    except SoundtagError as exc:
        report["error"] = str(exc)
        return report
    report.update(accelerator=model.accelerator, precision=model.precision, input=model.input_kind,
                  spec=model.spec.summary(), cpu=cpu_facts())
    if model.fallback_reason:
        report["fallback_reason"] = model.fallback_reason
    if model.gpu is not None:
        g = model.gpu
        report.update(gpu_precision=g.precision, backend=g.backend, adapter=g.adapter, adapter_type=g.adapter_type,
                      fully_accelerated=g.fully_accelerated,
                      parity_vs_cpu={k: g.probe[k] for k in ("corr", "max_abs_diff", "gate")})
    else:
        report.update(backend="XNNPACK (CPU)", fully_accelerated=None, parity_vs_cpu=None)
    x = probe_input(model.spec)
    try:
        probs, _ = model.run(x)  # warm-up (the GPU's first run also compiles its shaders)
        times = []
        for _ in range(runs):
            t = time.perf_counter()
            probs, _ = model.run(x)
            times.append(time.perf_counter() - t)
    except SoundtagError as exc:
        report["error"] = str(exc)
        return report
    top = int(np.argmax(probs))
    report.update(probe=f"speech_espeak.flac (first {model.spec.window_s:g} s at {model.spec.sample_rate} Hz)",
                  top_tag={"name": model.spec.labels[top].name, "score": float(probs[top])},
                  ms_per_window=round(1000 * float(np.median(times)), 1), runs=runs, passed=True)
    record_measurement(path, report)
    return report


def cpu_facts() -> dict:
    """The CPU's features that choose XNNPACK's kernels (its fp32 path uses none of AMX; issue #22)."""
    return {"features": cpu_info().features}


def record_measurement(path: Path, report: dict) -> None:
    """Keep a cached model's ms per window (and where it ran) in the cache's MEASURED_FILE, which
    `soundtag models` shows; models outside the cache are not recorded. Never fails the selftest."""
    cache = models_dir()
    with contextlib.suppress(OSError, ValueError):
        if Path(path).resolve().parent != cache.resolve():
            return
        table_file = cache / MEASURED_FILE
        table = json.loads(table_file.read_text()) if table_file.is_file() else {}
        cpu = cpu_info().name
        table[Path(path).name] = {"ms_per_window": report["ms_per_window"], "accelerator": report["accelerator"],
                                  "cpu": cpu, "adapter": report.get("adapter")}
        atomic_write_bytes(table_file, (json.dumps(table, indent=1) + "\n").encode())


def measured() -> dict:
    """{model file name: what selftest measured} for the cached models ({} when nothing was measured)."""
    try:
        return json.loads((models_dir() / MEASURED_FILE).read_text())
    except (OSError, ValueError):
        return {}


def format_table(report: dict) -> str:
    """The report as aligned 'key  value' lines."""
    rows = [("model", report.get("model"))]
    if "spec" in report:
        s = report["spec"]
        fe = s["front_end"]
        rows.append(("architecture", f"{s['architecture']} ({s['input']} in, {fe['sample_rate']} Hz, "
                                     f"{s['window_s']:g} s windows, {s['classes']} classes; spec from {s['spec_from']})"))
    if "cpu" in report:
        rows.append(("CPU features", " ".join(report["cpu"]["features"]) or "-"))
    rows += [("accelerator", report.get("accelerator", "-")),
            ("model precision", report.get("precision", "-"))]
    if report.get("fallback_reason"):
        rows.append(("GPU not used", report["fallback_reason"]))
    if report.get("accelerator") == "gpu":
        par = report["parity_vs_cpu"]
        rows += [("GPU precision", report["gpu_precision"]), ("backend", report["backend"]),
                 ("adapter", f"{report['adapter']} ({report['adapter_type']})"),
                 ("fully accelerated", "yes" if report["fully_accelerated"] else "no"),
                 ("parity vs CPU", f"corr {par['corr']:.7f}, max|dp| {par['max_abs_diff']:.2e} "
                                   f"(gate corr >= {par['gate']['min_corr']}, max|dp| <= {par['gate']['max_abs_diff']})")]
    elif "backend" in report:
        rows.append(("backend", report["backend"]))
    if "top_tag" in report:
        rows += [("probe top tag", f"{report['top_tag']['name']} ({report['top_tag']['score']:.3f})"),
                 ("ms per window", f"{report['ms_per_window']} (median of {report['runs']})")]
    if "error" in report:
        rows.append(("error", report["error"]))
    rows.append(("result", "PASS" if report["passed"] else "FAIL"))
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k.ljust(width)}  {v}" for k, v in rows)
