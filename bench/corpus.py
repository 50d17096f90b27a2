"""Throughput of `soundtag corpus` (Ray Data) against `soundtag tag --jobs N` on the same files.

    python -m bench.corpus [--files 40] [--precision fp32]

Each run is a fresh command in a subprocess, timed end to end (start-up, model loads, Ray start and
shutdown included: what a user waits for), once on all the files and once on the first few; the
difference gives the steady rate (clips/s once running) and the fixed start-up cost. Cluster shapes on this one machine: 1 node with 1 or 2 actors, and 2 Ray nodes
(`ray start --head` + `ray start --address`, one CPU each) with one actor each, which measures what a
second node costs in coordination (both nodes share the same cores here). Prints a table; never fails.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.machine import cpu_line
from tests.fixtures import cached_models, scene

ROOT = Path(__file__).resolve().parents[1]
FEW = 4  # files of the short run that measures start-up


def timed(cmd: list[str], env: dict | None = None) -> float:
    t = time.perf_counter()
    p = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT)
    wall = time.perf_counter() - t
    if p.returncode != 0:
        print(f"failed ({p.returncode}): {' '.join(cmd)}\n{p.stderr[-2000:]}", file=sys.stderr)
    return wall


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--files", type=int, default=40)
    ap.add_argument("--precision", default="fp32", choices=("fp32", "fp16", "int8"))
    args = ap.parse_args()
    import soundfile as sf

    model = cached_models() / f"cnn14_audioset_{args.precision}.tflite"
    soundtag = [sys.executable, "-m", "soundtag"]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        src = tmp / "files"
        src.mkdir()
        for i in range(args.files):
            sf.write(str(src / f"c{i:03d}.wav"), scene(10, sr=44100, seed=i, channels=2), 44100, subtype="PCM_16")
        few = tmp / "few"
        few.mkdir()
        for p in sorted(src.iterdir())[:FEW]:
            shutil.copy(p, few / p.name)
        ray = shutil.which("ray", path=str(Path(sys.executable).parent))
        port = "6390"
        runs = [(f"soundtag tag --jobs {j} --threads {2 // j}", ["tag", "--jobs", str(j), "--threads", str(2 // j)], None)
                for j in (1, 2)]
        runs += [(f"corpus, 1 node, {a} actor(s) x {2 // a} CPU",
                  ["corpus", "--actors", str(a), "--threads-per-actor", str(2 // a)], None) for a in (1, 2)]
        if ray:
            runs.append(("corpus, 2 nodes x 1 CPU, 2 actors", ["corpus", "--actors", "2", "--threads-per-actor", "1",
                                                              "--address", f"127.0.0.1:{port}"], "2 nodes"))
        # two raylets on this machine, on the loopback only, without token auth (a local test cluster)
        env = dict(os.environ, RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0", RAY_AUTH_MODE="disabled")
        for name, cmd, cluster in runs:
            if cluster:
                subprocess.run([ray, "start", "--head", f"--port={port}", "--num-cpus=1", "--include-dashboard=false",
                                "--node-ip-address=127.0.0.1"], capture_output=True, env=env)
                subprocess.run([ray, "start", f"--address=127.0.0.1:{port}", "--num-cpus=1",
                                "--node-ip-address=127.0.0.1"], capture_output=True, env=env)
            try:
                walls = []
                for n, folder in ((args.files, src), (FEW, few)):
                    out = tmp / f"out-{len(rows)}-{n}"
                    target = ["--output", str(out) + (".jsonl" if cmd[0] == "tag" else "")]
                    walls.append(timed(soundtag + [cmd[0], str(folder), "--model", str(model)] + cmd[1:] + target, env))
                rows.append((name, walls[0], walls[1]))
            finally:
                if cluster:
                    subprocess.run([ray, "stop", "--force"], capture_output=True, env=env)
    print(f"\nMachine: {cpu_line()}; {args.files} files of 10 s (44.1 kHz stereo WAV), {args.precision} model\n")
    print(f"| run | wall s, {args.files} files | clips/s overall | steady clips/s | start-up s | steady vs tag --jobs 1 |")
    print("|---|---|---|---|---|---|")
    base = None
    for name, wall, wall_few in rows:
        steady = (args.files - FEW) / max(wall - wall_few, 1e-9)
        startup = wall_few - FEW / steady
        base = base or steady
        print(f"| {name} | {wall:.1f} | {args.files / wall:.2f} | {steady:.2f} | {startup:.1f} | {steady / base:.2f}x |")


if __name__ == "__main__":
    main()
