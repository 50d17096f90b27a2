"""`--accelerator openvino` (issue #22): a model on the CPU through LiteRT's Intel OpenVINO dispatch.

Where it accepts a model, that model's probabilities on real recordings (drum hits, scenes, speech)
equal XNNPACK's on the same file within the model's gate, window by window; where its probe fails
(here the Winograd fp32 model: corr -0.09, a silent wrong answer of the dispatch), `tag` refuses with
one line naming the file; without OpenVINO's runtime, one line naming the package. The OpenVINO runs
are subprocesses: the dispatch, once loaded, stays in its process.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import soundfile as sf

from soundtag.model import OPENVINO_GATES, openvino_missing
from tests.fixtures import DRUMKITS, scene, speech_wave

pytestmark = pytest.mark.slow
MISSING = openvino_missing()
needs_openvino = pytest.mark.skipif(MISSING is not None, reason=str(MISSING))

COMPARE = r"""
import json, sys
import numpy as np
from soundtag.audio import load_audio
from soundtag.errors import ModelError
from soundtag.model import Model

path, clips = sys.argv[1], sys.argv[2:]
try:
    ov = Model(path, accelerator="openvino")
except ModelError as exc:
    print(json.dumps({"refused": str(exc)}))
    raise SystemExit(0)
cpu = Model(path)
rows = []
for clip in clips:
    wave, _, _ = load_audio(clip, sample_rate=32000)
    w = np.zeros(320000, np.float32)
    w[: min(w.size, wave.size)] = wave[:320000]
    x = cpu.features(w)
    want, got = cpu(x).astype(np.float64), ov(x).astype(np.float64)
    rows.append({"clip": clip, "corr": float(np.corrcoef(want, got)[0, 1]), "max_abs_diff": float(np.abs(want - got).max()),
                 "top1": [int(np.argmax(want)), int(np.argmax(got))]})
print(json.dumps({"probe": ov.openvino, "accelerator": ov.accelerator, "rows": rows}))
"""


def _run(*args, env=None, timeout=300):
    return subprocess.run([sys.executable, *map(str, args)], capture_output=True, text=True,
                          env={**os.environ, **(env or {})}, timeout=timeout)


@pytest.fixture(scope="module")
def real_clips(tmp_path_factory) -> list[Path]:
    d = tmp_path_factory.mktemp("ov")
    clips = []
    for i, seconds in enumerate((10, 4)):
        p = d / f"scene{i}.wav"
        sf.write(p, scene(seconds, seed=i), 32000)
        clips.append(p)
    p = d / "speech.wav"
    wave, sr = speech_wave()
    sf.write(p, wave, sr)
    clips.append(p)
    if DRUMKITS.is_dir():  # Debian hydrogen-drumkits (tools/os-deps.sh): real recorded hits
        kit = sorted(DRUMKITS.iterdir())[0]
        clips += sorted(q for q in kit.iterdir() if q.suffix.lower() in (".wav", ".flac"))[:4]
    return clips


@needs_openvino
@pytest.mark.parametrize("precision", ["int8", "fp32"])
def test_openvino_equals_xnnpack_where_it_runs(models, real_clips, precision):
    path = models / f"cnn14_audioset_{precision}.tflite"
    r = _run("-c", COMPARE, path, *real_clips)
    assert r.returncode == 0, r.stderr[-2000:]
    out = json.loads(r.stdout.strip().splitlines()[-1])
    gate = OPENVINO_GATES[precision]
    if "refused" in out:  # the probe said no: the reason names the file and the numbers, the CPU runs it instead
        assert str(path) in out["refused"] and "OpenVINO differs from XNNPACK on the probe" in out["refused"], out
        assert "--accelerator cpu" in out["refused"]
        return
    assert out["accelerator"] == "openvino" and out["probe"]["corr"] >= gate["min_corr"]
    assert len(out["rows"]) == len(real_clips)
    for row in out["rows"]:  # beyond the probe: every real recording within the same gate
        assert row["corr"] >= gate["min_corr"], row
        if gate["max_abs_diff"] is not None:
            assert row["max_abs_diff"] <= gate["max_abs_diff"], row


@needs_openvino
def test_openvino_on_the_command_line(models, real_clips):
    """`tag --accelerator openvino`: the int8 model's tags as XNNPACK's where it runs; the fp32 model
    refused with one line and exit 1 where its probe fails; selftest says which backend ran."""
    int8 = models / "cnn14_audioset_int8.tflite"
    clip = real_clips[0]
    cpu = _run("-m", "soundtag.cli", "tag", clip, "--model", int8, "--format", "jsonl", "--top-k", "3")
    ov = _run("-m", "soundtag.cli", "tag", clip, "--model", int8, "--format", "jsonl", "--top-k", "3",
              "--accelerator", "openvino")
    assert cpu.returncode == 0, cpu.stderr
    if ov.returncode == 0:
        assert [t["name"] for t in json.loads(ov.stdout)["tags"]][:1] == [t["name"] for t in json.loads(cpu.stdout)["tags"]][:1]
        st = _run("-m", "soundtag.cli", "selftest", "--model", int8, "--accelerator", "openvino", "--format", "json",
                  "--runs", "1")
        report = json.loads(st.stdout)
        assert st.returncode == 0 and report["accelerator"] == "openvino", st.stdout
        assert report["backend"].startswith("OpenVINO") and report["parity_vs_cpu"]["corr"] >= OPENVINO_GATES["int8"]["min_corr"]
    fp32 = models / "cnn14_audioset_fp32.tflite"
    r = _run("-m", "soundtag.cli", "tag", clip, "--model", fp32, "--accelerator", "openvino")
    if r.returncode != 0:
        lines = [x for x in r.stderr.splitlines() if x.strip() and not x.startswith("INFO: ")]  # LiteRT's own
        assert r.returncode == 1 and r.stdout == "" and len(lines) == 1, r.stderr
        assert str(fp32) in lines[0] and "OpenVINO differs from XNNPACK on the probe" in lines[0]


def test_without_openvino_is_one_line(models, real_clips, tmp_path):
    """An `openvino` package without the runtime LiteRT's dispatch links: one line naming what to install."""
    fake = tmp_path / "site" / "openvino"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text("")
    model = models / "cnn14_audioset_int8.tflite"
    r = _run("-m", "soundtag.cli", "tag", real_clips[0], "--model", model, "--accelerator", "openvino",
             env={"PYTHONPATH": os.pathsep.join([str(tmp_path / "site"), os.environ.get("PYTHONPATH", "")])})
    lines = [x for x in r.stderr.splitlines() if x.strip() and not x.startswith("INFO: ")]
    assert r.returncode == 1 and r.stdout == "" and len(lines) == 1, r.stderr
    assert str(model) in lines[0] and "pip install 'soundtag[openvino]'" in lines[0]
