"""A bounded load test of `soundtag serve` on 127.0.0.1: N concurrent clients x M uploads each.

    python -m bench.serve [--clients 4] [--requests 5] [--workers 2] [--queue 8] [--precision fp32]

Reports throughput (clips/s) against `soundtag tag` on the same files in the same run, p50/p95 latency,
the server's peak RSS, 429s (retried after Retry-After, counted) and lost requests (must be 0).
Loopback only, every loop bounded in count and time. Prints a table; never fails a build.
"""

from __future__ import annotations

import argparse
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

from bench.machine import cpu_line
from tests.fixtures import cached_models, scene

ROOT = Path(__file__).resolve().parents[1]
DEADLINE_S = 600  # the whole load test stops by then, whatever happens


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> None:
    import httpx
    import psutil
    import soundfile as sf

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--clients", type=int, default=4)
    ap.add_argument("--requests", type=int, default=5, help="uploads per client")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--queue", type=int, default=8)
    ap.add_argument("--precision", default="fp32", choices=("fp32", "fp16", "int8"))
    args = ap.parse_args()
    model = cached_models() / f"cnn14_audioset_{args.precision}.tflite"
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        files = []
        for i in range(args.clients * args.requests):
            p = tmp / f"c{i:03d}.wav"
            sf.write(str(p), scene(10, sr=44100, seed=i, channels=2), 44100, subtype="PCM_16")
            files.append(p)
        t = time.perf_counter()
        subprocess.run([sys.executable, "-m", "soundtag", "tag", *map(str, files), "--model", str(model),
                        "--format", "jsonl"], capture_output=True, cwd=ROOT)
        cli_s = time.perf_counter() - t
        port = free_port()
        server = subprocess.Popen([sys.executable, "-m", "soundtag", "serve", "--model", str(model), "--port", str(port),
                                   "--workers", str(args.workers), "--queue", str(args.queue),
                                   "--threads", str(max(1, 2 // args.workers))],
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=ROOT)
        url = f"http://127.0.0.1:{port}"
        end = time.time() + 120
        while time.time() < end:
            try:
                if httpx.get(url + "/ready", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        proc = psutil.Process(server.pid)
        peak = {"rss": 0}
        stop = threading.Event()

        def sample_rss():
            while not stop.is_set():
                try:
                    peak["rss"] = max(peak["rss"], proc.memory_info().rss)
                except psutil.Error:
                    return
                time.sleep(0.05)

        latencies, too_busy, lost = [], [0], [0]  # lost: failed transfers or wrong answers (also n - answered)
        lock = threading.Lock()
        deadline = time.time() + DEADLINE_S

        def client(k: int):
            with httpx.Client(timeout=300) as c:
                for j in range(args.requests):
                    p = files[k * args.requests + j]
                    while time.time() < deadline:
                        t0 = time.perf_counter()
                        try:
                            r = c.post(url + "/v1/tags", files={"file": (p.name, p.read_bytes())})
                        except httpx.HTTPError:
                            with lock:
                                lost[0] += 1
                            break
                        if r.status_code == 429:
                            with lock:
                                too_busy[0] += 1
                            time.sleep(float(r.headers.get("retry-after", "1")))
                            continue
                        with lock:
                            if r.status_code == 200 and r.json()["path"] == p.name:
                                latencies.append(time.perf_counter() - t0)
                            else:
                                lost[0] += 1
                        break

        watcher = threading.Thread(target=sample_rss, daemon=True)
        watcher.start()
        t = time.perf_counter()
        threads = [threading.Thread(target=client, args=(k,)) for k in range(args.clients)]
        for th in threads:
            th.start()
        for th in threads:
            th.join()
        served_s = time.perf_counter() - t
        stop.set()
        server.terminate()
        server.wait(timeout=30)
    n = len(files)
    lat = np.array(latencies) * 1000
    print(f"\nMachine: {cpu_line()}; {n} clips of 10 s (44.1 kHz stereo WAV), {args.precision} model; "
          f"server --workers {args.workers} --queue {args.queue}, {args.clients} clients x {args.requests} uploads\n")
    print("| path | clips/s | vs CLI | p50 ms | p95 ms | 429s (retried) | lost | server peak RSS MB |")
    print("|---|---|---|---|---|---|---|---|")
    print(f"| soundtag tag (one process, all files) | {n / cli_s:.2f} | 1.00x | - | - | - | - | - |")
    print(f"| soundtag serve | {len(latencies) / served_s:.2f} | {(len(latencies) / served_s) / (n / cli_s):.2f}x | "
          f"{np.percentile(lat, 50):.0f} | {np.percentile(lat, 95):.0f} | {too_busy[0]} | {n - len(latencies)} | "
          f"{peak['rss'] / 2**20:.0f} |")


if __name__ == "__main__":
    main()
