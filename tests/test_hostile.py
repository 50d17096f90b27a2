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


def test_fifo_and_device_do_not_hang(int8_model, tmp_path, capsys):
    fifo = tmp_path / "pipe.wav"
    os.mkfifo(fifo)  # open() would block until a writer comes
    code, out, err = run(capsys, "tag", fifo, "/dev/zero", "--model", int8_model, "--format", "jsonl")
    assert code == 1 and [r["error"] for r in jsonl(out)] == ["not a regular file (a pipe or a device)"] * 2


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
    assert sum(1 for _ in iter_windows(blocks(), hop=600 * 32_000, window=320_000)) == 7
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < 4 * 320_000 * 4  # a few windows' worth (one is 1.28 MB), not an hour (460 MB)


def test_window_cutter_cuts_one_window_at_a_time_and_tiny_blocks_cost_their_size():
    """Issue #18: one big block at a tiny hop is many windows, cut as they are taken (it was one list of
    copies: 556 x 1.28 MB for one WebSocket message); a tiny block costs its own size, not a copy of the
    window buffer (it was one np.concatenate of up to 1.28 MB per block)."""
    import tracemalloc

    from soundtag.windows import WindowCutter

    x = np.arange(200_000, dtype=np.float32)
    cutter = WindowCutter(hop=10, window=10_000)
    tracemalloc.start()
    n = 0
    for start, real, w in cutter.push(x):  # 19 001 windows of 40 kB: 760 MB if held at once
        assert real == 10_000 and w[0] == start and w[-1] == start + 9_999
        n += 1
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert n == (200_000 - 10_000) // 10 + 1 and peak < 5 * 10_000 * 4, peak

    cutter = WindowCutter(hop=3200, window=320_000)
    list(cutter.push(np.zeros(400_000, np.float32)))  # the buffer is there and full
    tracemalloc.start()
    base = tracemalloc.get_traced_memory()[0]
    for _ in range(200):
        list(cutter.push(np.ones(10, np.float32)))
    grown = tracemalloc.get_traced_memory()[1] - base
    tracemalloc.stop()
    assert grown < 64 * 1024, grown  # not one 1.28 MB concatenation per block


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


# --- output durability ------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def clips(tmp_path_factory) -> list[Path]:
    d = tmp_path_factory.mktemp("hclips")
    return [write_wav(d / f"c{i}.wav", scene(3, seed=20 + i), SR) for i in range(4)]


def test_second_run_on_same_output_is_refused(int8_model, clips, tmp_path, capsys):
    from soundtag.writers import ResultFile

    out = tmp_path / "o.jsonl"
    first = ResultFile(out)  # a run in progress (the lock is a real flock)
    try:
        code, stdout, err = run(capsys, "tag", *clips, "--model", int8_model, "--output", out)
        assert code == 2 and "in use by another soundtag run" in err and f"{out}:" in err
    finally:
        first.close()
    code, _, err = run(capsys, "tag", *clips, "--model", int8_model, "--output", out)
    assert code == 0 and len(out.read_text().splitlines()) == len(clips)
    assert not out.with_name("o.jsonl.lock").exists()


def test_output_that_cannot_be_written_fails_before_tagging(int8_model, clips, tmp_path, capsys):
    (tmp_path / "adir.jsonl").mkdir()
    (tmp_path / "afile").write_text("x")
    for bad, why in ((tmp_path / "adir.jsonl", "is a directory"), (tmp_path / "afile" / "o.jsonl", "cannot"),
                     (Path("/proc/o.jsonl"), "cannot")):
        code, out, err = run(capsys, "tag", *clips, "--model", int8_model, "--output", bad)
        assert code == 2 and out == "" and why in err and "model " not in err, err  # before the batch started
        assert err.count("\n") == 1


def test_any_failure_leaves_a_resumable_part(int8_model, clips, tmp_path):
    """A run that dies of something other than Ctrl-C (here: the file-size limit, like a full disk)
    says where its .part is; --resume then completes it with every input exactly once."""
    import resource

    out = tmp_path / "f.jsonl"
    limit = 2500  # bytes: room for about one record

    def small_files():
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    p = subprocess.run([sys.executable, "-m", "soundtag", "tag", *map(str, clips), "--model", str(int8_model),
                        "--output", str(out), "--top-k", "3"], capture_output=True, text=True, preexec_fn=small_files,
                       timeout=120)
    assert p.returncode == 1 and "Traceback" not in p.stderr, p.stderr
    part = out.with_name("f.jsonl.part")
    assert f"saved in {part} (rerun with --resume)" in p.stderr
    assert part.is_file() and not out.exists()
    p = subprocess.run([sys.executable, "-m", "soundtag", "tag", *map(str, clips), "--model", str(int8_model),
                        "--output", str(out), "--top-k", "3", "--resume"], capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    paths = [json.loads(line)["path"] for line in out.read_text().splitlines()]
    assert sorted(paths) == sorted(map(str, clips))


@pytest.mark.parametrize("fmt", ["jsonl", "json", "csv", "table"])
def test_broken_pipe_ends_cleanly(int8_model, clips, fmt):
    p = subprocess.Popen([sys.executable, "-m", "soundtag", "tag", *map(str, clips * 3), "--model", str(int8_model),
                          "--format", fmt], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    p.stdout.read(10)  # `| head -c 10`
    p.stdout.close()
    err = p.stderr.read().decode()
    assert p.wait(timeout=120) in (0, 141) and "Traceback" not in err and "Exception" not in err, err


def test_csv_formula_cells_are_neutralised(int8_model, tmp_path, capsys, monkeypatch):
    d = tmp_path / "f"
    d.mkdir()
    names = ["=HYPERLINK(1).wav", "+1.wav", "-2.wav", "'q.wav", "ok.wav"]
    for i, name in enumerate(names):
        write_wav(d / name, scene(2, seed=i), SR)
    listing = tmp_path / "l.txt"
    listing.write_text("".join(f"{name}\n" for name in names) + "@missing.txt\n")  # an error row: "@..."
    monkeypatch.chdir(d)  # undone when the test ends, before its tmp_path is deleted
    out = tmp_path / "o.csv"
    code, _, err = run(capsys, "tag", f"@{listing}", "--model", int8_model, "--output", out, "--top-k", "1")
    assert code == 1, err
    import csv

    rows = list(csv.DictReader(out.read_text().splitlines()))
    assert [r["path"] for r in rows] == ["'@missing.txt"] + ["'" + n for n in names[:4]] + ["ok.wav"]
    code, _, err = run(capsys, "tag", f"@{listing}", "--model", int8_model, "--output", out, "--top-k", "1",
                       "--resume")
    assert code == 1 and "5 skipped" in err  # read back as the same paths
    assert len(out.read_text().splitlines()) == 7


# --- resume ---------------------------------------------------------------------------------------------
def test_resume_survives_cut_and_foreign_lines_and_retries_errors(int8_model, clips, tmp_path, capsys):
    out = tmp_path / "r.jsonl"
    code, _, _ = run(capsys, "tag", clips[0], "--model", int8_model, "--output", out)
    good = out.read_text()
    assert code == 0
    out.unlink()
    cut = json.dumps({"path": str(clips[2]), "duration_s": 3.0, "tags": [{"label": "Café"}]}, ensure_ascii=False)
    cut_bytes = cut.encode()[: cut.encode().index("é".encode()) + 1]  # ends inside the 2-byte é
    part = out.with_name("r.jsonl.part")
    part.write_bytes(good.encode() + b'[1, 2]\n"text"\n{"path": 3}\n{"no": "path"}\n'
                     + json.dumps({"path": str(clips[1]), "error": "decoding failed"}).encode() + b"\n" + cut_bytes)
    code, _, err = run(capsys, "tag", *clips, "--model", int8_model, "--output", out, "--resume")
    assert code == 0, err
    recs = jsonl(out.read_text())
    assert sorted(r["path"] for r in recs) == sorted(map(str, clips))  # exactly once each
    assert all("tags" in r for r in recs)  # the error row was tried again, and is now a result
    assert "1 skipped" in err


@pytest.mark.parametrize("ext", ["jsonl", "csv", "txt"])
def test_path_with_newline_round_trips(int8_model, tmp_path, capsys, ext):
    weird = write_wav(tmp_path / "a\nb\tc\\d.wav", scene(12, seed=9), SR)
    out = tmp_path / f"o.{ext}"
    for attempt in range(2):
        code, _, err = run(capsys, "tag", weird, "--model", int8_model, "--output", out, "--threshold", "0", "--resume")
        assert code == 0, err
    assert "1 skipped" in err
    if ext == "jsonl":
        assert [r["path"] for r in jsonl(out.read_text())] == [str(weird)]
    elif ext == "csv":
        import csv

        rows = list(csv.DictReader(out.read_text().splitlines(keepends=True)))
        assert {r["path"] for r in rows} == {str(weird)}
    else:
        lines = out.read_text().splitlines()[1:]
        assert lines and all(line.split("\t")[7] == str(weird).replace("\\", "\\\\").replace("\n", "\\n")
                             .replace("\t", "\\t") for line in lines)


# --- batch ------------------------------------------------------------------------------------------------
def test_lists_that_include_themselves(int8_model, clips, tmp_path, capsys):
    a, b, c = tmp_path / "a.txt", tmp_path / "b.txt", tmp_path / "c.txt"
    a.write_text(f"{clips[0]}\n@{b}\n")
    b.write_text(f"@{a}\n{clips[1]}\n")
    c.write_text(f"@{c}\n")
    latin = tmp_path / "latin.txt"
    latin.write_bytes(b"caf\xe9.wav\n")
    code, out, err = run(capsys, "tag", f"@{a}", f"@{c}", f"@{latin}", "--model", int8_model, "--format", "jsonl")
    recs = jsonl(out)
    assert code == 1
    assert [r["path"] for r in recs] == [f"@{a}", f"@{c}", f"@{latin}", str(clips[0]), str(clips[1])]
    assert recs[0]["error"] == f"list includes itself ({a} -> {b} -> {a})"
    assert "list includes itself" in recs[1]["error"] and "not UTF-8" in recs[2]["error"]


def test_jobs_and_threads_are_capped(int8_model, clips, capsys):
    code, out, err = run(capsys, "tag", *clips, "--model", int8_model, "--format", "jsonl", "--jobs", "500",
                         "--threads", "100000")
    assert code == 0 and len(jsonl(out)) == len(clips)
    assert f"--jobs 500 capped to {os.cpu_count()}" in err or "--jobs 500 capped to" in err


def test_dead_worker_costs_only_its_file(int8_model, tmp_path):
    """A worker killed mid-file (as the OOM killer would) becomes an error row for that file; a new
    worker takes over; every input ends up exactly once."""
    import psutil

    files = [write_wav(tmp_path / f"w{i}.wav", scene(40, seed=i), SR) for i in range(6)]
    p = subprocess.Popen([sys.executable, "-m", "soundtag", "tag", *map(str, files), "--model", str(int8_model),
                          "--jobs", "2", "--format", "jsonl", "--hop", "1"], stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True)
    first = p.stdout.readline()  # workers are up and tagging
    workers = [c for c in psutil.Process(p.pid).children() if "spawn_main" in " ".join(c.cmdline())]
    assert workers, "no worker processes found"
    workers[0].kill()
    # read on through the same buffered pipe: communicate() reads the raw descriptor and would drop what
    # readline() has already buffered past the first line (the records then start mid-line)
    rest = p.stdout.read()
    err = p.stderr.read()
    p.wait(timeout=300)
    recs = jsonl(first + rest)
    assert sorted(r["path"] for r in recs) == sorted(map(str, files))
    died = [r for r in recs if "error" in r]
    assert p.returncode == 1 and len(died) == 1, err
    assert died[0]["error"] == "worker process died while tagging this file (killed by SIGKILL, e.g. out of memory)"
    assert "Traceback" not in err


# --- folders ------------------------------------------------------------------------------------------------
def test_folder_reports_unreadable_subfolders_and_skips_appledouble(tmp_path):
    import shutil
    import tempfile

    root = Path(tempfile.mkdtemp(prefix="soundtag-perm-"))  # world-readable, outside pytest's 0700 tmp
    try:
        os.chmod(root, 0o755)
        write_wav(root / "a.wav", scene(1), SR)
        (root / "._a.wav").write_bytes(b"\x00\x05\x16\x07AppleDouble")  # macOS metadata, not audio
        locked = root / "locked"
        locked.mkdir()
        write_wav(locked / "b.wav", scene(1), SR)
        os.chmod(locked, 0)
        code = ("import json, sys; from soundtag.batch import expand_inputs; "
                "print(json.dumps(list(expand_inputs([sys.argv[1]]))))")
        p = subprocess.run([sys.executable, "-c", code, str(root)], capture_output=True, text=True,
                           preexec_fn=_without_root_file_powers, timeout=60)
        assert p.returncode == 0, p.stderr
        got = json.loads(p.stdout)
        assert got == [[str(locked), "cannot read folder (Permission denied)"], [str(root / "a.wav"), None]]
    finally:
        os.chmod(root / "locked", 0o755)
        shutil.rmtree(root)


def _without_root_file_powers() -> None:
    """In the child: root reads every folder (CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH); drop both from the
    capability bounding set so that after exec the permission bits apply to it as to anyone."""
    if os.geteuid() != 0:
        return
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    pr_capbset_drop, cap_dac_override, cap_dac_read_search = 24, 1, 2
    for cap in (cap_dac_override, cap_dac_read_search):
        if libc.prctl(pr_capbset_drop, cap, 0, 0, 0) != 0:
            raise OSError(ctypes.get_errno(), "prctl(PR_CAPBSET_DROP)")


def test_options_are_checked_without_a_model():
    """TaggerOptions refuses bad values when built: a server or a Ray actor needs no model to say so."""
    from soundtag import OptionsError, TaggerOptions, UnknownClassError

    missing = "/nonexistent/model.tflite"
    for bad in (dict(top_k=0), dict(top_k=True), dict(hop_s=float("inf")), dict(threshold=float("nan")),
                dict(thresholds={"Dog": 1.5}), dict(aggregate="median"), dict(num_threads=0), dict(allow="Dog"),
                dict(max_duration_s=-1)):
        with pytest.raises(OptionsError):
            TaggerOptions(model_path=missing, **bad)
    with pytest.raises(UnknownClassError, match="did you mean 'Dog'") as info:
        TaggerOptions(model_path=missing, deny=["Dogg"])
    assert isinstance(info.value, KeyError) and info.value.reason.startswith("unknown AudioSet class")
