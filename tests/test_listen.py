"""`soundtag listen` in real processes: stdin PCM gives the windows, tags and events of Tagger.tag_file;
s16le; bad streams and flags; no microphone is one line; Ctrl-C and a closed stdout end cleanly; the
live table on a terminal."""

from __future__ import annotations

import json
import os
import pty
import re
import select
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

from soundtag import Tagger, TaggerOptions
from soundtag.stream import StreamWindow
from tests.fixtures import scene, write_wav

TIMEOUT_S = 120  # any one process, model included (a few seconds here)
SUMMARY = re.compile(r"^soundtag: (interrupted; )?\d+ windows?, latency p50 \d+ ms, p95 \d+ ms$")
LITERT_INFO = "INFO: Created TensorFlow Lite XNNPACK delegate"  # LiteRT's C++ log line, not ours


def spawn(*args, env: dict | None = None, **kw) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "soundtag.cli", "listen", *map(str, args)],
                            env=dict(os.environ, PYTHONUNBUFFERED="1", **(env or {})),
                            stdin=subprocess.PIPE, stdout=kw.pop("stdout", subprocess.PIPE), stderr=subprocess.PIPE, **kw)


def feed_in_thread(pipe, data: bytes, seed: int = 0, close: bool = True) -> threading.Thread:
    """Write data in chunks of random sizes (not whole frames) from a thread, then close the pipe."""

    def write() -> None:
        rng = np.random.default_rng(seed)
        try:
            i = 0
            while i < len(data):
                n = int(rng.integers(1, 50_000))
                pipe.write(data[i : i + n])
                pipe.flush()
                i += n
            if close:
                pipe.close()
        except (BrokenPipeError, ValueError):  # the process has gone (a test of that)
            pass

    t = threading.Thread(target=write, daemon=True)
    t.start()
    return t


def run_listen(args, data: bytes, env: dict | None = None) -> tuple[int, str, str]:
    proc = spawn(*args, env=env)
    stdin, proc.stdin = proc.stdin, None  # the thread owns stdin; communicate only reads
    feed_in_thread(stdin, data)
    try:
        out, err = proc.communicate(timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()
        raise
    return proc.returncode, out.decode(), err.decode()


def our_lines(err: str) -> list[str]:
    return [line for line in err.strip().splitlines() if not line.startswith(LITERT_INFO)]


def assert_one_line(err: str, pattern: str) -> None:
    lines = our_lines(err)
    assert "Traceback" not in err and len(lines) == 1, err
    assert lines[0].startswith("soundtag: ") and re.search(pattern, lines[0]), lines


def records(out: str) -> tuple[list[dict], list[dict]]:
    recs = [json.loads(line) for line in out.splitlines()]
    return [r for r in recs if "event" not in r], [r for r in recs if "event" in r]


def f32(x: np.ndarray) -> bytes:
    return np.ascontiguousarray(x, dtype="<f4").tobytes()


def test_stdin_equals_tag_file(fp32_model, tmp_path):
    sr = 44100
    x = scene(25, sr=sr, seed=3, channels=2)
    ref = Tagger(TaggerOptions(model_path=str(fp32_model), hop_s=5.0, threshold=0.3)).tag_file(
        write_wav(tmp_path / "a.wav", x, sr, subtype="FLOAT"))
    code, out, err = run_listen(["-", "--rate", sr, "--channels", 2, "--format", "jsonl", "--hop", 5,
                                 "--threshold", 0.3, "--model", fp32_model], f32(x))
    assert code == 0, err
    windows, events = records(out)
    assert [w["start_s"] for w in windows] == [round(w.start_s, 6) for w in ref.windows]
    assert [w["end_s"] for w in windows] == pytest.approx([w.end_s for w in ref.windows], abs=1 / sr)
    for got, want in zip(windows, ref.windows):
        assert [t["index"] for t in got["tags"]] == [c.index for c in want.categories]
        np.testing.assert_allclose([t["score"] for t in got["tags"]], [c.score for c in want.categories], atol=1e-4)
        assert got["latency_ms"] >= 0
    ended = sorted((e["start_s"], e["mid"], e["end_s"]) for e in events if e["event"] == "end")
    want = sorted((round(e.start_s, 6), e.mid, e.end_s) for e in ref.events)
    assert ref.events and [e[:2] for e in ended] == [e[:2] for e in want]
    assert [e[2] for e in ended] == pytest.approx([e[2] for e in want], abs=1 / sr)
    assert sorted(e["mid"] for e in events if e["event"] == "start") == sorted(e.mid for e in ref.events)
    lines = our_lines(err)
    assert "Traceback" not in err and SUMMARY.match(lines[-1]) and lines[-1].startswith(f"soundtag: {len(windows)} windows")
    print(lines[-1])  # the latency on this machine (pytest -s)


def test_s16le_16k_mono(fp32_model):
    """16-bit PCM at 16 kHz: the f32 path's scores (a -70 dBFS noise floor, as any recording has, keeps
    the quantisation noise out of the otherwise empty mel bins), and exactly those of its decoded samples."""
    sr = 16000
    x = scene(12, sr=sr, seed=5) + np.float32(3e-4) * np.random.default_rng(1).standard_normal(12 * sr, np.float32)
    s16 = np.clip(np.round(x * 32767), -32768, 32767).astype("<i2")
    code, out, err = run_listen(["-", "--rate", sr, "--encoding", "s16le", "--format", "jsonl", "--hop", 5,
                                 "--top-k", 527, "--model", fp32_model], s16.tobytes())
    assert code == 0, err
    windows, _ = records(out)
    assert [w["start_s"] for w in windows] == [0.0, 2.0] and all(len(w["tags"]) == 527 for w in windows)
    got = np.zeros((len(windows), 527))
    for row, w in zip(got, windows):
        row[[t["index"] for t in w["tags"]]] = [t["score"] for t in w["tags"]]
    tagger = Tagger(TaggerOptions(model_path=str(fp32_model), hop_s=5.0))
    for samples, corr, atol in [(x, 0.999, 0.01), (s16 / np.float32(32768), 0.99999, 1e-4)]:
        stream = tagger.stream(sr, 1)
        ref = np.stack([i.scores for i in stream.feed(samples) + stream.close() if isinstance(i, StreamWindow)])
        assert min(float(np.corrcoef(g, r)[0, 1]) for g, r in zip(got, ref)) >= corr
        np.testing.assert_allclose(got, ref, atol=atol)


@pytest.mark.parametrize("make, pattern", [
    (lambda: f32(scene(1, seed=1)) + b"\x00\x01\x02", r"^soundtag: stdin: input ended inside a frame: 128003 bytes"),
    (lambda: f32(np.where(np.arange(64000) == 40000, np.nan, scene(2, seed=1))), r"^soundtag: stdin: non-finite .* 1\.\d+ s"),
    (lambda: b"", r"^soundtag: stdin: no audio"),
], ids=["partial-frame", "nan", "empty"])
def test_bad_streams(fp32_model, make, pattern):
    code, out, err = run_listen(["-", "--format", "jsonl", "--model", fp32_model], make())
    assert code == 1 and out == ""
    assert_one_line(err, pattern)


@pytest.mark.parametrize("flags, pattern", [
    (["-", "--rate", 999], r"--rate must be an integer in 1000-1536000 Hz, got 999"),
    (["-", "--rate", 2_000_000], r"--rate"),
    (["-", "--channels", 0], r"--channels"),
    (["-", "--encoding", "mp3"], r"--encoding must be one of f32le, s16le"),
    (["-", "--device", 0], r"--device"),
    (["song.wav"], r"SOURCE must be '-'"),
    (["-", "--hop", 0.01], r"hop"),
    (["-", "--embeddings"], r"--embeddings"),
], ids=["rate-low", "rate-high", "channels", "encoding", "device-with-stdin", "file-source", "hop", "embeddings"])
def test_bad_flags_are_usage_errors(capsys, flags, pattern):
    """Refused before the model loads or stdin is read (in this process: quick)."""
    from soundtag.cli import main

    assert main(["listen", *map(str, flags)]) == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert_one_line(err, pattern)


def test_bad_rate_process():
    code, out, err = run_listen(["-", "--rate", 10], b"")
    assert code == 2 and out == ""
    assert_one_line(err, r"^soundtag: --rate must be an integer in 1000-1536000 Hz, got 10$")


def _has_input_device() -> bool:
    try:
        import sounddevice as sd

        return any(d["max_input_channels"] > 0 for d in sd.query_devices())
    except (ImportError, OSError):
        return False


@pytest.mark.parametrize("flags", [["--device", 0], [], ["--device", 7]], ids=["device-0", "default", "device-7"])
def test_no_microphone_is_one_line(fp32_model, flags):
    if _has_input_device():
        pytest.skip("this machine has a microphone")
    code, out, err = run_listen([*flags, "--model", fp32_model], b"")
    assert code == 1 and out == ""
    assert_one_line(err, r"no (microphone|input device|such input device)")


@pytest.mark.parametrize("module, pattern", [
    ('raise OSError("PortAudio library not found")', r"^soundtag: no microphone: PortAudio library not found \(apt-get install libportaudio2\)$"),
    ('raise ImportError("No module named sounddevice")', r"^soundtag: no microphone: sounddevice is not installed \(pip install 'soundtag\[mic\]'"),
], ids=["no-portaudio", "no-sounddevice"])
def test_missing_portaudio_or_sounddevice(fp32_model, tmp_path, module, pattern):
    """A sounddevice that fails to import as the real one does without PortAudio (or not installed)."""
    (tmp_path / "sounddevice.py").write_text(module + "\n")
    env = {"PYTHONPATH": os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")])}
    code, out, err = run_listen(["--model", fp32_model], b"", env=env)
    assert code == 1 and out == ""
    assert_one_line(err, pattern)


def _first_line(proc: subprocess.Popen, timeout_s: float = TIMEOUT_S) -> str:
    """The first stdout line, read byte by byte from the pipe (nothing after it is taken from the pipe)."""
    fd, line, deadline = proc.stdout.fileno(), b"", time.monotonic() + timeout_s
    while not line.endswith(b"\n"):
        ready, _, _ = select.select([fd], [], [], max(0.0, deadline - time.monotonic()))
        byte = os.read(fd, 1) if ready else b""
        assert byte, f"no whole line within {timeout_s} s: {line!r}"
        line += byte
    return line.decode()


def test_ctrl_c_closes_the_stream(fp32_model):
    proc = spawn("-", "--format", "jsonl", "--hop", 5, "--model", fp32_model)
    stdin, proc.stdin = proc.stdin, None
    try:
        feed_in_thread(stdin, f32(scene(12, seed=2)), close=False)  # 12 s, and the pipe stays open
        first = json.loads(_first_line(proc))
        assert first["start_s"] == 0.0 and first["end_s"] == 10.0
        time.sleep(0.5)  # let it read the last 2 s, and block on the open pipe
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=TIMEOUT_S)
    finally:
        proc.kill()
        stdin.close()
    err = err.decode()
    assert proc.returncode == 130 and "Traceback" not in err, err
    windows, _ = records(out.decode())
    assert [w["start_s"] for w in windows] == [2.0]  # the close: the last 10 s, aligned to the end of the audio
    assert SUMMARY.match(our_lines(err)[-1]) and "interrupted; 2 windows" in err


def test_closed_stdout_is_141(fp32_model):
    proc = spawn("-", "--format", "jsonl", "--hop", 5, "--model", fp32_model)
    stdin, proc.stdin = proc.stdin, None
    try:
        writer = feed_in_thread(stdin, f32(scene(12, seed=2)), close=False)
        _first_line(proc)
        proc.stdout.close()  # `| head -1`
        writer.join(TIMEOUT_S)
        stdin.close()  # end of input: the close's window meets the closed pipe
        proc.wait(TIMEOUT_S)
        err = proc.stderr.read().decode()
    finally:
        proc.kill()
    assert proc.returncode == 141 and "Traceback" not in err, err


def test_table_view(fp32_model):
    """On a terminal: the rich live table; on a pipe: text blocks."""
    x = f32(scene(10, seed=4))
    code, out, err = run_listen(["-", "--format", "table", "--model", fp32_model], x)
    assert code == 0, err
    assert out.startswith("0.00 - 10.00 s  (latency ") and re.search(r"^  0\.\d{3}  \S", out, re.M)

    master, slave = pty.openpty()
    proc = spawn("-", "--model", fp32_model, stdout=slave, env={"TERM": "xterm", "COLUMNS": "100", "LINES": "30"})
    os.close(slave)
    stdin, proc.stdin = proc.stdin, None
    feed_in_thread(stdin, x)
    screen = b""
    try:
        deadline = time.monotonic() + TIMEOUT_S
        while time.monotonic() < deadline:
            ready, _, _ = select.select([master], [], [], 1.0)
            try:
                chunk = os.read(master, 65536) if ready else b""
            except OSError:  # EIO: the process closed the terminal
                break
            if ready and not chunk:
                break
            screen += chunk
        proc.wait(TIMEOUT_S)
    finally:
        proc.kill()
        os.close(master)
    text = screen.decode(errors="replace")
    assert proc.returncode == 0, proc.stderr.read().decode()
    assert "window 0.00 - 10.00 s" in text and "latency" in text and "open events:" in text
    assert "━" in text or "█" in text  # the score bars
