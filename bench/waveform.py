"""The waveform model's in-graph front end vs the host log-mel: CPU ms per 10 s window, and its share.

    python -m bench.waveform [--threads 2] [--runs 15]

Times, interleaved in one process (medians): the host log-mel (features.logmel, numpy + scipy.fft),
the log-mel model's invoke, the waveform model's invoke (front end + body in one graph), and the front
end converted alone (convert/frontend.py, the same graph piece). Models from tests/fixtures.py.
"""

from __future__ import annotations

import argparse
import os
import time

import numpy as np
from pathlib import Path

from bench.machine import cpu_line


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--runs", type=int, default=15)
    args = ap.parse_args()

    import litert_torch
    import torch

    from soundtag import features  # noqa: F401
    from soundtag.spec import CNN14
    from soundtag.convert.frontend import LogmelFrontEnd
    from soundtag.model import Model
    from tests.fixtures import cached_models, scene

    models = Path(os.environ["SOUNDTAG_BENCH_MODELS"]) if "SOUNDTAG_BENCH_MODELS" in os.environ else cached_models()
    with torch.inference_mode():
        edge = litert_torch.convert(LogmelFrontEnd().eval(), (torch.zeros(1, CNN14.window_samples),))
    front = edge.model_content() if callable(getattr(edge, "model_content", None)) else edge.model_content
    from ai_edge_litert.interpreter import Interpreter

    fe = Interpreter(model_content=bytes(front), num_threads=args.threads)
    fe.allocate_tensors()
    x = scene(10, seed=1)
    loaded = {p: (Model(models / f"cnn14_audioset_{p}.tflite", args.threads),
                  Model(models / f"cnn14_audioset_waveform_{p}.tflite", args.threads)) for p in ("fp32", "fp16")}

    def front_end() -> None:
        fe.set_tensor(fe.get_input_details()[0]["index"], x.reshape(1, -1))
        fe.invoke()

    lm = features.logmel(x)
    steps = {"host log-mel (numpy)": lambda: features.logmel(x), "front end alone (LiteRT graph)": front_end}
    for p, (logmel_model, wave_model) in loaded.items():
        steps[f"{p} log-mel model invoke"] = lambda m=logmel_model: m.run(lm)
        steps[f"{p} waveform model invoke"] = lambda m=wave_model: m.run(x)
    times: dict[str, list[float]] = {k: [] for k in steps}
    for _ in range(args.runs + 1):  # the first round warms up
        for name, step in steps.items():
            t = time.perf_counter()
            step()
            times[name].append(time.perf_counter() - t)
    ms = {k: 1000 * float(np.median(v[1:])) for k, v in times.items()}
    print(f"| step ({args.threads} threads, median of {args.runs}) | ms per 10 s window |")
    print("|---|---|")
    for k, v in ms.items():
        print(f"| {k} | {v:.1f} |")
    for p in loaded:
        host = ms["host log-mel (numpy)"] + ms[f"{p} log-mel model invoke"]
        wave = ms[f"{p} waveform model invoke"]
        print(f"\n{p}: host log-mel + log-mel model {host:.1f} ms, waveform model {wave:.1f} ms "
              f"(front end ~{ms['front end alone (LiteRT graph)']:.1f} ms = "
              f"{100 * ms['front end alone (LiteRT graph)'] / wave:.0f} % of the waveform model)")
    print(f"\nMachine: {cpu_line()}")


if __name__ == "__main__":
    main()
