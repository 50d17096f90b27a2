"""Hostile input (issue "Solid core", part 2): every case ends in correct results or one clear line
naming the file and the cause; never a traceback, a hang, a silent wrong answer, a lost result or a
network connection."""

from __future__ import annotations

import json
import os
import socket
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

from soundtag import Tagger
from soundtag.audio import AudioStream
from soundtag.cli import main
from soundtag.windows import iter_windows, window_starts
from tests.fixtures import SR, scene, write_wav
from tests.test_audio import write_av
from tests.test_features import torchlibrosa_logmel


@pytest.fixture(scope="module")
def int8_model(models) -> Path:
    """The smallest converted model (loads in ~0.1 s): for tests about inputs, not about scores."""
    return models / "cnn14_audioset_int8.tflite"


@pytest.fixture(scope="module")
def tagger(fp32_model):
    return Tagger.from_model_path(fp32_model, top_k=5)


def run(capsys, *argv):
    code = main([str(a) for a in argv])
    out = capsys.readouterr()
    return code, out.out, out.err


def jsonl(out: str) -> list[dict]:
    return [json.loads(line) for line in out.splitlines()]


def body_probs(body, wave: np.ndarray) -> np.ndarray:
    """The PyTorch body on torchlibrosa's float64 log-mel of one 10 s window (the independent reference)."""
    w = np.zeros(320_000, np.float64)
    w[: wave.size] = wave[:320_000]
    lm = torchlibrosa_logmel(w, torch.float64).astype(np.float32)
    with torch.inference_mode():
        return body(torch.from_numpy(lm[None, None])).numpy()[0]


class Listener:
    """A TCP listener on 127.0.0.1 that counts connections: proof that nothing reached the network."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(8)
        self.sock.settimeout(0.05)
        self.port = self.sock.getsockname()[1]
        self.connections = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._accept, daemon=True)
        self._thread.start()

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self.sock.accept()
                self.connections += 1
                conn.close()
            except OSError:
                pass

    def close(self) -> int:
        time.sleep(0.2)
        self._stop.set()
        self._thread.join()
        self.sock.close()
        return self.connections


# --- file names are not URLs -------------------------------------------------------------------
def test_protocol_like_file_names_are_read_as_files(int8_model, tmp_path, capsys):
    listener = Listener()
    d = tmp_path / "names"
    d.mkdir()
    m4a = write_av(tmp_path / "plain.m4a", scene(3, sr=44100, seed=1), 44100, "aac")
    names = [f"http:127.0.0.1:{listener.port}.m4a", f"tcp:127.0.0.1:{listener.port}.m4a",
             "2024-05-01T10:30:00.m4a", "concat:plain.m4a|plain.m4a.m4a", "pipe:0.m4a"]
    for name in names:
        (d / name).write_bytes(m4a.read_bytes())
    t0 = time.monotonic()
    code, out, err = run(capsys, "tag", d, m4a, "--model", int8_model, "--format", "jsonl", "--top-k", "527")
    assert time.monotonic() - t0 < 60  # tcp: would hang on an open connection
    assert listener.close() == 0
    assert code == 0, err
    recs = jsonl(out)
    assert sorted(Path(r["path"]).name for r in recs[:-1]) == sorted(names)
    plain = {t["index"]: t["score"] for t in recs[-1]["tags"]}
    for rec in recs[:-1]:  # the same bytes under a plain name: the same scores
        assert {t["index"]: t["score"] for t in rec["tags"]} == plain


def test_playlists_do_not_reach_the_network(int8_model, tmp_path, capsys):
    listener = Listener()
    url = f"http://127.0.0.1:{listener.port}/seg.ts"
    m3u8 = tmp_path / "list.m3u8"
    m3u8.write_text(f"#EXTM3U\n#EXT-X-TARGETDURATION:10\n#EXTINF:10,\n{url}\n#EXT-X-ENDLIST\n")
    ffconcat = tmp_path / "list.ffconcat"
    ffconcat.write_text(f"ffconcat version 1.0\nfile {url}\n")
    code, out, err = run(capsys, "tag", m3u8, ffconcat, "--model", int8_model, "--format", "jsonl")
    assert listener.close() == 0
    assert code == 1
    recs = jsonl(out)
    assert [r["path"] for r in recs] == [str(m3u8), str(ffconcat)] and all("error" in r for r in recs)
    assert all(line.startswith(f"soundtag: {p}: ") for line, p in zip(err.strip().splitlines()[1:], (m3u8, ffconcat)))


# --- names that are not UTF-8 --------------------------------------------------------------------
@pytest.mark.parametrize("env", [{"LC_ALL": "C"}, {"LC_ALL": "C.UTF-8"}, {"PYTHONIOENCODING": "latin-1"},
                                 {"PYTHONIOENCODING": "ascii"}])
def test_non_utf8_file_names(int8_model, tmp_path, env):
    d = tmp_path / "names"
    d.mkdir()
    raw = os.fsencode(d) + b"/caf\xe9 \xff.wav"
    sf.write(raw, scene(3, seed=2), SR)
    base = [sys.executable, "-m", "soundtag", "tag", str(d), "--model", str(int8_model)]
    full_env = {**os.environ, **env}
    for fmt in ("table", "csv", "jsonl"):
        p = subprocess.run(base + ["--format", fmt], capture_output=True, env=full_env, timeout=120)
        assert p.returncode == 0 and b"Traceback" not in p.stderr, p.stderr
        if fmt == "jsonl":  # recoverable: \udcXX escapes, os.fsencode gives the name's bytes back
            assert os.fsencode(json.loads(p.stdout)["path"]) == raw
        else:  # the original bytes, as ls shows them
            assert raw in p.stdout
    for ext in ("jsonl", "csv", "txt"):
        out = tmp_path / f"out.{ext}"
        for _ in range(2):  # the second run resumes: the name read back is the same path
            p = subprocess.run(base + ["--output", str(out), "--resume", "--threshold", "0"], capture_output=True,
                               env=full_env, timeout=120)
            assert p.returncode == 0 and b"Traceback" not in p.stderr, p.stderr
        assert b"1 skipped" in p.stderr and raw in out.read_bytes().replace(b"\\udce9 \\udcff", b"\xe9 \xff")


# --- decompression bombs, durations, hops ----------------------------------------------------------
def test_decompression_bomb_is_refused_fast(tmp_path, int8_model, capsys):
    bomb = tmp_path / "bomb.flac"
    with sf.SoundFile(str(bomb), "w", samplerate=1, channels=1, format="FLAC", subtype="PCM_16") as f:
        f.write(np.zeros(1_036_800, np.int16))  # 12 days at 1 Hz in ~3.5 kB
    assert bomb.stat().st_size < 10_000
    t0 = time.monotonic()
    code, out, err = run(capsys, "tag", bomb, "--model", int8_model, "--format", "jsonl")
    assert time.monotonic() - t0 < 10
    assert code == 1 and "sample rate 1 Hz is outside 1000-" in jsonl(out)[0]["error"]


def test_max_duration(tmp_path, int8_model, capsys):
    path = write_wav(tmp_path / "a.wav", scene(12, sr=8000), 8000)
    code, out, err = run(capsys, "tag", path, "--model", int8_model, "--format", "jsonl", "--max-duration", "5")
    assert code == 1 and jsonl(out)[0]["error"] == "declares 12 s of audio, more than the maximum 5 s (--max-duration)"
    assert f"{path}: declares" in err
    # a header that lies (or declares nothing) is still stopped while decoding
    stream = AudioStream(path)
    stream.max_duration_s = 5
    with pytest.raises(Exception, match="longer than the maximum 5 s"):
        list(stream)
    code, out, err = run(capsys, "tag", path, "--model", int8_model, "--format", "jsonl", "--max-duration", "13")
    assert code == 0 and jsonl(out)[0]["duration_s"] == pytest.approx(12)


@pytest.mark.parametrize("flag", [["--hop", "1e-9"], ["--hop", "inf"], ["--hop", "nan"], ["--hop", "-5"], ["--hop", "0"],
                                  ["--threshold", "1.5"], ["--threshold", "nan"], ["--threshold", "-0.1"],
                                  ["--max-duration", "inf"], ["--top-k", "0"], ["--threads", "0"], ["--jobs", "0"]])
def test_bad_flags_are_usage_errors(flag, int8_model, tmp_path, capsys):
    path = write_wav(tmp_path / "a.wav", scene(2), SR)
    code, out, err = run(capsys, "tag", path, "--model", int8_model, *flag)
    assert code == 2 and out == "" and err.count("\n") == 1 and "Traceback" not in err, err


def test_thresholds_file_values(int8_model, tmp_path, capsys):
    path = write_wav(tmp_path / "a.wav", scene(2), SR)
    for name, text in (("t.csv", "Dog,2\n"), ("t.json", '{"Dog": NaN}'), ("t2.json", '{"Dog": -1}'),
                       ("l.json", "[1, 2]"), ("b.csv", None)):
        f = tmp_path / name
        if text is None:
            f.write_bytes(b"Caf\xe9,0.3\n")  # latin-1, not UTF-8
        else:
            f.write_text(text)
        code, out, err = run(capsys, "tag", path, "--model", int8_model, "--thresholds", f)
        assert code == 2 and out == "" and "Traceback" not in err, err
        assert "threshold" in err


def test_hops_above_window_no_phantom_windows(tagger, tmp_path):
    path = write_wav(tmp_path / "a.wav", scene(65, seed=3), SR)
    res = Tagger(tagger.options.__class__(model_path=str(tagger.model.path), hop_s=30.0), tagger.model).tag_file(path)
    assert [w.start_s for w in res.windows] == [0.0, 30.0, 55.0]
    assert [w.end_s for w in res.windows] == [10.0, 40.0, 65.0]
    short = write_wav(tmp_path / "s.wav", scene(12, seed=3), SR)  # 12 s, hop 1 h: windows 0 and 2 s only
    res = Tagger(tagger.options.__class__(model_path=str(tagger.model.path), hop_s=3600.0), tagger.model).tag_file(short)
    assert [w.start_s for w in res.windows] == [0.0, 2.0]


def test_window_rule_streaming_equals_closed_form_and_is_bounded():
    rng = np.random.default_rng(0)
    for total, hop in ((1, 7), (100, 100), (101, 100), (350, 30), (1000, 1), (999, 10_000), (250, 101)):
        x = rng.standard_normal(total).astype(np.float32)
        blocks = np.array_split(x, rng.integers(1, 9))
        got = list(iter_windows(blocks, hop, window=100))
        # independent statement of the rule: hop-aligned windows that fit, then one ending at the end
        expect = [0] if total <= 100 else [s for s in range(0, total, hop) if s + 100 <= total]
        if total > 100 and expect[-1] + 100 < total:
            expect.append(total - 100)
        assert [s for s, _, _ in got] == expect == window_starts(total, hop, 100)
        for s, n, w in got:
            assert n == min(100, total - s) and np.array_equal(w[:n], x[s : s + n]) and not w[n:].any()

    def blocks():  # 1 h of 32 kHz in 1 s blocks, hop 10 min: buffer must stay at one window + one block
        for _ in range(3600):
            yield np.zeros(32_000, np.float32)

    import tracemalloc

    tracemalloc.start()
    assert sum(1 for _ in iter_windows(blocks(), hop=600 * 32_000)) == 7
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < 4 * 320_000 * 4  # a few windows' worth (one is 1.28 MB), not an hour (460 MB)


def test_last_window_is_real_audio(tagger, body, tmp_path):
    """20 s + 1 sample: windows at 0, 10 s and 10 s + 1 sample; no window of 1 real sample + zeros."""
    x = scene(20, seed=5)
    x = np.concatenate([x, [0.3]]).astype(np.float32)
    res = tagger.tag_file(write_wav(tmp_path / "a.wav", x, SR, subtype="FLOAT"))
    starts = [round(w.start_s * SR) for w in res.windows]
    assert starts == [0, 320_000, 320_001]
    assert [w.end_s for w in res.windows] == pytest.approx([10.0, 20.0, 20.0 + 1 / SR])
    ref = np.stack([body_probs(body, x[s : s + 320_000]) for s in starts])
    assert np.abs(res.window_scores - ref).max() < 1e-3
    np.testing.assert_allclose(res.clip_scores, res.window_scores.max(axis=0))
    assert all(e.end_s <= res.duration_s + 1e-9 for e in res.events)


# --- values ----------------------------------------------------------------------------------------
def test_float_wav_near_float32_max(tagger, body, tmp_path, capsys):
    """3e38 float samples: the downmix cannot overflow, the log-mel is computed, tags are right."""
    x = scene(10, seed=6, channels=2) / 0.8 * 3.0e38  # both channels near float32 max (3.4e38)
    path = write_wav(tmp_path / "huge.wav", x.astype(np.float32), SR, subtype="FLOAT")
    res = tagger.tag_file(path)
    ref = body_probs(body, x.astype(np.float64).mean(axis=1))
    assert np.isfinite(res.clip_scores).all()
    assert float(np.corrcoef(res.clip_scores, ref)[0, 1]) >= 0.9999
    # the same at 44.1 kHz would overflow soxr's float32 filter: one clear line, not NaN tags
    path44 = write_wav(tmp_path / "huge44.wav", scene(3, sr=44100, channels=2) * 3.0e38, 44100, subtype="FLOAT")
    code, out, err = run(capsys, "tag", path44, "--model", tagger.model.path, "--format", "jsonl")
    assert code == 1 and "would overflow float32 resampling" in jsonl(out)[0]["error"]


def test_non_finite_probabilities_are_an_error(tagger):
    from soundtag.errors import InferenceError

    with pytest.raises(InferenceError, match="non-finite or out-of-range"):
        tagger.model(np.full((1001, 64), np.inf, np.float32))  # what an overflowed front end would hand it


# --- streamed WAV headers --------------------------------------------------------------------------
@pytest.mark.parametrize("size", [0xFFFFFFFF, 0x7FFFFFFF, 0])
def test_streamed_wav_sizes(size, tagger, tmp_path):
    x = scene(12, sr=16000, seed=7)
    good = write_wav(tmp_path / "good.wav", x, 16000, subtype="PCM_16")
    data = bytearray(good.read_bytes())
    assert data[36:40] == b"data"
    data[4:8] = struct.pack("<I", size)  # RIFF size
    data[40:44] = struct.pack("<I", size)  # data size: "unknown, read to the end"
    piped = tmp_path / "piped.wav"
    piped.write_bytes(bytes(data))
    a, b = tagger.tag_file(good), tagger.tag_file(piped)
    assert b.duration_s == pytest.approx(12.0)
    np.testing.assert_allclose(b.window_scores, a.window_scores, atol=1e-6)
