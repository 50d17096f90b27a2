"""The CPU runtime's XNNPACK weight cache (model.py, issue #12): packed weights in a mapped file, once
per model and CPU, instead of a private heap copy beside the model's own pages."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

from soundtag.model import Cnn14Model, probe_input, weight_cache_file


@pytest.fixture()
def cache_dir(tmp_path, monkeypatch):
    d = tmp_path / "xnnpack"
    monkeypatch.setenv("SOUNDTAG_WEIGHT_CACHE", str(d))
    return d


def test_packs_once_and_matches_pytorch(fp32_model, body, cache_dir):
    x = probe_input()
    with torch.inference_mode():
        ref = body(torch.from_numpy(x)).double().numpy()[0]
    first = Cnn14Model(fp32_model, num_threads=2)
    assert first.weight_cache == weight_cache_file(fp32_model, cache_dir) and first.weight_cache.is_file()
    # the Winograd GEMMs are grouped CONV_2Ds, so nearly all weights are in the cache, not on the heap
    assert first.weight_cache.stat().st_size > 0.9 * fp32_model.stat().st_size
    name = first.weight_cache.name
    assert sorted(p.name for p in cache_dir.iterdir()) == [name, name + ".crc32"]  # no temporary left
    built = first.weight_cache.stat().st_mtime_ns
    p1, e1 = first.run(x)
    second = Cnn14Model(fp32_model, num_threads=2)  # loads the finished file, packs nothing
    p2, e2 = second.run(x)
    assert second.weight_cache.stat().st_mtime_ns == built
    heap = Cnn14Model.from_bytes(fp32_model.read_bytes(), num_threads=2)  # the Interpreter, packing on the heap
    assert heap.weight_cache is None
    p3, e3 = heap.run(x)
    np.testing.assert_allclose(p1, ref, atol=1e-4, rtol=0)  # the fp32 gate, vs the PyTorch body
    np.testing.assert_allclose(p2, p1, atol=1e-6, rtol=0)
    np.testing.assert_allclose(p3, p1, atol=1e-6, rtol=0)
    assert e1 is not None and np.abs(e2 - e1).max() <= 1e-5


def test_key_follows_model_file_and_cpu_runs_without(models, cache_dir, tmp_path, monkeypatch):
    src = models / "cnn14_audioset_int8.tflite"
    a, b = tmp_path / "a.tflite", tmp_path / "b.tflite"
    shutil.copy(src, a)
    shutil.copy(src, b)
    ma, mb = Cnn14Model(a), Cnn14Model(b)
    assert ma.weight_cache != mb.weight_cache and ma.weight_cache.is_file() and mb.weight_cache.is_file()
    os.utime(a, ns=(0, a.stat().st_mtime_ns + 10**9))  # the model changed: a new key, never a stale packing
    assert weight_cache_file(a, cache_dir) != ma.weight_cache
    x = probe_input()
    monkeypatch.setenv("SOUNDTAG_WEIGHT_CACHE", "0")
    plain = Cnn14Model(src)
    assert plain.weight_cache is None
    np.testing.assert_allclose(ma(x), plain(x), atol=1e-6, rtol=0)


def test_damaged_cache_is_rebuilt_not_run(models, cache_dir, caplog):
    """Garbage in the packed weights (XNNPACK checks only its header): the checksum catches it, the
    file is rebuilt, and the outputs are the undamaged ones."""
    path = models / "cnn14_audioset_int8.tflite"
    x = probe_input()
    first = Cnn14Model(path)
    want = first(x)
    cache = first.weight_cache
    del first
    with open(cache, "r+b") as f:
        f.seek(cache.stat().st_size // 2)
        f.write(np.random.default_rng(0).bytes(4096))
    with caplog.at_level("WARNING", logger="soundtag.model"):
        again = Cnn14Model(path)
    assert any("does not match its checksum" in r.getMessage() for r in caplog.records)
    assert again.weight_cache == cache
    np.testing.assert_allclose(again(x), want, atol=1e-6, rtol=0)
    caplog.clear()
    with caplog.at_level("WARNING", logger="soundtag.model"):
        third = Cnn14Model(path)  # maps the rebuilt file
    assert third.weight_cache == cache and not caplog.records
    np.testing.assert_allclose(third(x), want, atol=1e-6, rtol=0)


def test_unwritable_cache_falls_back_to_the_heap(fp32_model, tmp_path, monkeypatch, caplog):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    monkeypatch.setenv("SOUNDTAG_WEIGHT_CACHE", str(blocker / "xnnpack"))
    with caplog.at_level("WARNING", logger="soundtag.model"):
        m = Cnn14Model(fp32_model, num_threads=2)
    assert m.weight_cache is None
    assert any("weight cache not used" in r.getMessage() and str(fp32_model) in r.getMessage() for r in caplog.records)
    x = probe_input()
    np.testing.assert_allclose(m(x), Cnn14Model.from_bytes(fp32_model.read_bytes())(x), atol=1e-6, rtol=0)


PEAK = """
import json, sys
from soundtag.model import Cnn14Model, probe_input
m = Cnn14Model(sys.argv[1], num_threads=2)
m(probe_input())
hwm = [l for l in open("/proc/self/status") if l.startswith("VmHWM")][0].split()[1]
print(json.dumps({"peak_mb": int(hwm) / 1024, "cache": str(m.weight_cache)}))
"""


@pytest.mark.parametrize("name", ["cnn14_audioset_fp32.tflite", "cnn14_audioset_int8.tflite"])
def test_process_is_no_bigger_than_its_model(models, cache_dir, name):
    """Issue #12's memory bound, peak RSS <= model file + 300 MB, in a fresh process: when it builds the
    cache (first load) and when it maps the built one. A memory bound, not a timing."""
    path = models / name
    env = dict(os.environ, SOUNDTAG_WEIGHT_CACHE=str(cache_dir))
    for load in ("builds", "maps"):
        out = subprocess.run([sys.executable, "-c", PEAK, str(path)], capture_output=True, text=True, env=env, timeout=600)
        assert out.returncode == 0, out.stderr[-2000:]
        got = json.loads(out.stdout.strip().splitlines()[-1])
        assert got["cache"] != "None"
        assert got["peak_mb"] <= path.stat().st_size / 2**20 + 300, (load, got)
