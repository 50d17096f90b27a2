"""`soundtag serve` under hostile clients (issue #18), against a REAL uvicorn server on 127.0.0.1: one
WebSocket message or one tiny upload cannot buy unbounded work or memory, a client that leaves stops its
work, slow headers and bodies are cut off, a full house refuses before parsing, streams are counted and
timed, other web pages cannot drive it, unknown paths add no metrics series, and none of the inputs
that used to give a 500 does. Every loop here is bounded in count and time; traffic goes to 127.0.0.1 only.
"""

from __future__ import annotations

import asyncio
import json
import re
import socket
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
import soundfile as sf

from soundtag.cli import main
from tests.fixtures import scene, write_wav
from tests.test_serve import Server

pytest.importorskip("fastapi", reason="soundtag[serve] not installed")
websockets = pytest.importorskip("websockets")

READ_TIMEOUT_S = 2  # --read-timeout-s and --stream-idle-s of the server under test


@pytest.fixture(scope="module")
def tight(models):
    s = Server(models / "cnn14_audioset_int8.tflite", "--workers", "1", "--queue", "1", "--max-windows", "50",
               "--read-timeout-s", str(READ_TIMEOUT_S), "--stream-idle-s", str(READ_TIMEOUT_S), "--max-streams", "1",
               "--max-connections", "12", "--max-duration-s", "600")
    s.wait_ready()
    yield s
    s.stop()


def peak_rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmHWM")


def windows_run(server) -> float:
    m = re.search(r"^soundtag_windows_total (\S+)$", httpx.get(server.url + "/metrics").text, re.M)
    return float(m.group(1))


async def _stream(port: int, config, messages=(), headers=None, read=True) -> list:
    """Open a stream, send the config (text or bytes) and messages; the server's messages until it closes,
    then ("closed", code)."""
    got = []
    async with websockets.connect(f"ws://127.0.0.1:{port}/v1/stream", max_size=None, additional_headers=headers,
                                  open_timeout=10) as ws:
        try:
            await ws.send(config)
            for m in messages:
                await ws.send(m)
        except websockets.ConnectionClosed:
            pass  # refused part-way: what it said is still there to read
        try:
            while read:
                got.append(json.loads(await asyncio.wait_for(ws.recv(), 60)))
        except websockets.ConnectionClosed as exc:
            got.append(("closed", exc.rcvd.code if exc.rcvd else None))
    return got


def test_one_websocket_message_is_bounded(tight):
    """At 8 kHz and hop 0.1 s, one 1 MiB message is 65 s of audio, 556 windows of 1.28 MB each at 32 kHz
    (it was one list of them): the stream's window cap refuses it before any window, the server's peak
    memory stays put; a message over the 1 MiB frame limit closes the stream (1009)."""
    before = peak_rss_mb(tight.proc.pid)
    config = json.dumps({"sample_rate": 8000, "encoding": "s16le", "hop_s": 0.1})
    one_mib = np.zeros(1 << 19, "<i2").tobytes()
    t0 = time.monotonic()
    got = asyncio.run(_stream(tight.port, config, [one_mib]))
    assert time.monotonic() - t0 < 20
    assert got[0]["type"] == "error" and "--max-windows 50 at a hop of 0.1 s" in got[0]["error"], got
    assert got[-1] == ("closed", 1008)
    assert peak_rss_mb(tight.proc.pid) - before < 100
    got = asyncio.run(_stream(tight.port, config, [one_mib + b"\0\0"]))
    assert got == [("closed", 1009)]


def test_a_tiny_upload_cannot_hold_a_worker(tight, tmp_path):
    """5 min of silence at 8 kHz is a 30 kB FLAC and, at hop 0.1 s, 2901 windows: refused up front (413,
    naming --max-windows). Within the cap, a client that leaves stops its work at the next window."""
    quiet = tmp_path / "quiet.flac"
    sf.write(quiet, np.zeros(300 * 8000, np.int16), 8000, subtype="PCM_16")
    assert quiet.stat().st_size < 100_000
    t0 = time.monotonic()
    r = httpx.post(tight.url + "/v1/tags", files={"file": ("quiet.flac", quiet.read_bytes())}, data={"hop_s": "0.1"},
                   timeout=60)
    assert r.status_code == 413 and "--max-windows 50 at a hop of 0.1 s" in r.json()["error"], r.text
    assert time.monotonic() - t0 < 10

    clip = write_wav(tmp_path / "long.wav", scene(45, sr=8000, seed=4), 8000).read_bytes()  # 45 windows at hop 0.8 (44 + one at the end)
    start = windows_run(tight)
    with pytest.raises(httpx.TimeoutException):
        httpx.post(tight.url + "/v1/tags", files={"file": ("long.wav", clip)}, data={"hop_s": "0.8"}, timeout=1.0)
    time.sleep(1.5)  # the server notices the closed connection and the work stops at its next window
    ran = windows_run(tight) - start
    time.sleep(1.5)
    assert windows_run(tight) - start == ran < 45, ran  # nothing more ran, and not the whole file
    r = httpx.post(tight.url + "/v1/tags", files={"file": ("long.wav", clip)}, data={"hop_s": "0.8"}, timeout=60)
    assert r.status_code == 200 and len(r.json()["windows"]) == 45  # the same upload, waited for: all of it


def _raw(port: int) -> socket.socket:
    s = socket.create_connection(("127.0.0.1", port), timeout=10)
    s.settimeout(10)
    return s


def _until_closed(s: socket.socket, trickle: bytes = b"", every_s: float = 0.5, limit_s: float = 10) -> tuple[float, bytes]:
    """Send ``trickle`` every ``every_s`` until the server closes the connection: (seconds, what it said)."""
    t0, said = time.monotonic(), b""
    s.settimeout(every_s)
    while time.monotonic() - t0 < limit_s:
        try:
            chunk = s.recv(4096)
            if not chunk:
                break
            said += chunk
        except socket.timeout:
            try:
                if trickle:
                    s.sendall(trickle)
            except OSError:
                break
        except OSError:
            break
    return time.monotonic() - t0, said


def test_slow_headers_and_bodies_are_cut_off(tight):
    with _raw(tight.port) as s:  # connects and says nothing
        took, _ = _until_closed(s)
        assert took < READ_TIMEOUT_S + 3
    with _raw(tight.port) as s:  # headers one line every half second, for ever
        s.sendall(b"POST /v1/tags HTTP/1.1\r\nHost: 127.0.0.1\r\n")
        took, said = _until_closed(s, b"X-Slow: 1\r\n")
        assert took < READ_TIMEOUT_S + 3 and said.startswith(b"HTTP/1.1 408")
    with _raw(tight.port) as s:  # a body that stops after 100 bytes
        s.sendall(b"POST /v1/tags HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: multipart/form-data; boundary=x\r\n"
                  b"Content-Length: 100000\r\n\r\n" + b"--x\r\n" + b"a" * 95)
        took, said = _until_closed(s)
        assert took < READ_TIMEOUT_S + 3 and said.startswith(b"HTTP/1.1 408"), said
        assert b"--read-timeout-s" in said
    assert httpx.get(tight.url + "/health").status_code == 200


def test_full_house_refuses_before_reading_the_body(tight, tmp_path):
    """--workers 1 --queue 1: two uploads whose bodies trickle hold both places; a third is 429 on its
    headers alone, without sending a byte of its 50 MB body."""
    holders = [_raw(tight.port) for _ in range(2)]
    try:
        for s in holders:
            s.sendall(b"POST /v1/tags HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: multipart/form-data; boundary=x\r\n"
                      b"Content-Length: 1000000\r\n\r\n--x\r\n")
        time.sleep(0.3)
        with _raw(tight.port) as s:
            s.sendall(b"POST /v1/tags HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: multipart/form-data; boundary=x\r\n"
                      b"Content-Length: 50000000\r\n\r\n")
            said = s.recv(4096)
        assert said.startswith(b"HTTP/1.1 429") and b"retry-after: 2" in said.lower(), said
    finally:
        for s in holders:
            s.close()
    time.sleep(0.5)
    wav = write_wav(tmp_path / "a.wav", scene(3, seed=1)).read_bytes()
    fields = {f"f{i}": "x" for i in range(20)}
    r = httpx.post(tight.url + "/v1/tags", files={"file": ("a.wav", wav)}, data=fields, timeout=30)
    assert r.status_code == 422 and set(r.json()) == {"error"} and "Too many fields" in r.json()["error"], r.text
    r = httpx.post(tight.url + "/v1/tags", files={"file": ("a.wav", wav)}, data={"allow": "Dog," * 50_000}, timeout=30)
    assert r.status_code == 413 and "maximum size" in r.json()["error"], r.text


def test_connection_limit_and_slots_come_back(tight):
    """--max-connections 12: twelve idle sockets fill it (uvicorn answers 503), the header deadline frees them."""
    idle = [_raw(tight.port) for _ in range(12)]
    try:
        time.sleep(0.2)
        with _raw(tight.port) as s:
            s.sendall(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
            assert s.recv(4096).startswith(b"HTTP/1.1 503")
        time.sleep(READ_TIMEOUT_S + 1)
        assert httpx.get(tight.url + "/health", timeout=5).status_code == 200
    finally:
        for s in idle:
            s.close()


def test_streams_are_counted_and_timed(tight):
    config = json.dumps({"sample_rate": 16000})

    async def two():
        async with websockets.connect(f"ws://127.0.0.1:{tight.port}/v1/stream") as first:
            await first.send(config)
            await first.send(np.zeros(1600, "<f4").tobytes())
            second = await _stream(tight.port, config, [np.zeros(1600, "<f4").tobytes()])
            t0 = time.monotonic()
            said = json.loads(await asyncio.wait_for(first.recv(), 10))  # nothing more sent: idle
            with pytest.raises(websockets.ConnectionClosed) as closed:
                await asyncio.wait_for(first.recv(), 10)
            return second, said, time.monotonic() - t0, closed.value.rcvd.code

    second, said, took, code = asyncio.run(two())
    assert second[0]["type"] == "error" and "--max-streams" in second[0]["error"] and second[-1] == ("closed", 1013)
    assert said["type"] == "error" and "--stream-idle-s" in said["error"] and code == 1008 and took < READ_TIMEOUT_S + 3
    got = asyncio.run(_stream(tight.port, config, [np.zeros(16000 * 11, "<f4").tobytes()[i:i + 640_000]
                                                   for i in range(0, 16000 * 11 * 4, 640_000)] + [b""]))
    assert [m["type"] for m in got if isinstance(m, dict)][-1] == "done"  # the slot came back
    # 40 x 20 s at hop 20 s: over --max-duration-s 600 (its 30 windows are within --max-windows 50)
    got = asyncio.run(_stream(tight.port, json.dumps({"sample_rate": 16000, "hop_s": 20, "encoding": "s16le"}),
                              [np.zeros(16000 * 20, "<i2").tobytes()] * 40))
    assert any(isinstance(m, dict) and m["type"] == "error" and "600 s (--max-duration)" in m["error"] for m in got), got


def test_other_web_pages_cannot_use_it(tight, tmp_path):
    r = httpx.get(tight.url + "/info", headers={"Host": "rebound.example:8000"})
    assert r.status_code == 421 and "--allowed-host" in r.json()["error"]
    for host in (f"127.0.0.1:{tight.port}", f"localhost:{tight.port}", f"[::1]:{tight.port}"):
        assert httpx.get(tight.url + "/info", headers={"Host": host}).status_code == 200
    with pytest.raises(websockets.InvalidStatus) as refused:
        asyncio.run(_stream(tight.port, json.dumps({"sample_rate": 16000}), headers={"Origin": "https://evil.example"}))
    assert refused.value.response.status_code == 403
    own = asyncio.run(_stream(tight.port, json.dumps({"sample_rate": 16000}), [b""],
                              headers={"Origin": f"http://127.0.0.1:{tight.port}"}))
    assert own[-2] == {"type": "done"}
    wav = write_wav(tmp_path / "a.wav", scene(2, seed=1)).read_bytes()
    r = httpx.post(tight.url + "/v1/tags", files={"file": ("a.wav", wav)}, headers={"Origin": "https://evil.example"})
    assert r.status_code == 403 and "--allowed-origin" in r.json()["error"]


def test_unknown_paths_add_no_metrics_series(tight):
    for i in range(30):
        httpx.get(f"{tight.url}/v1/nope-{i}")
        httpx.get(f"{tight.url}/static/x{i}.js")
    text = httpx.get(tight.url + "/metrics").text
    assert "nope-" not in text and "x3.js" not in text
    assert 'endpoint="unmatched",status="404"' in text and 'endpoint="/static/{name}",status="404"' in text


def test_inputs_that_gave_500s(tight, tmp_path):
    wav = write_wav(tmp_path / "a.wav", scene(3, seed=2)).read_bytes()
    r = httpx.post(tight.url + "/v1/tags", files={"file": ("a.wav", wav)}, data={"hop_s": "1e308"})
    assert r.status_code == 422 and "hop_s must be at most" in r.json()["error"]
    for config, says in ((b"\x00\x01binary", "not binary"), (json.dumps({"sample_rate": 16000, "allow": [1]}), "allow"),
                         ("[" * 100_000 + "]" * 100_000, "over"), ("[" * 5000 + "]" * 5000, "nested too deeply")):
        got = asyncio.run(_stream(tight.port, config))
        assert got[0]["type"] == "error" and says in got[0]["error"] and got[-1] == ("closed", 1008), (config[:20], got)
    # a file name whose bytes are a lone surrogate (U+DC80) in UTF-8: tagged, and answered as valid text
    body = (b"--x\r\nContent-Disposition: form-data; name=\"file\"; filename=\"a\xed\xb2\x80.wav\"\r\n"
            b"Content-Type: audio/wav\r\n\r\n" + wav + b"\r\n--x--\r\n")
    r = httpx.post(tight.url + "/v1/tags", content=body, headers={"Content-Type": "multipart/form-data; boundary=x"})
    assert r.status_code == 200, r.text
    assert r.json()["path"].startswith("a") and r.json()["path"].endswith(".wav")
    from soundtag.serve import _printable

    assert _printable("a\udc80.wav") == "a?.wav"  # whatever decoder hands the server such a name
    for method, path, status in (("GET", "/nowhere", 404), ("GET", "/v1/tags", 405), ("PUT", "/info", 405)):
        r = httpx.request(method, tight.url + path)
        assert r.status_code == status and set(r.json()) == {"error"}, (path, r.text)
    r = httpx.post(tight.url + "/v1/tags", content=b"--x\r\nnot a form", headers={"Content-Type": "multipart/form-data; boundary=x"})
    assert r.status_code == 422 and set(r.json()) == {"error"}


def test_api_key_sources_and_scheme(models, tmp_path, capsys):
    int8 = models / "cnn14_audioset_int8.tflite"
    assert main(["serve", "--model", str(int8), "--api-key", ""]) == 2
    assert "--api-key is empty" in capsys.readouterr().err
    (tmp_path / "empty").write_text("\n")
    assert main(["serve", "--model", str(int8), "--api-key-file", str(tmp_path / "empty")]) == 2
    assert main(["serve", "--model", str(models / "cnn14_audioset_fp16.tflite"), "--embeddings"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and "has no embedding output" in err[-1]  # refused at start-up, before the port opens
    from soundtag.serve import read_api_key

    (tmp_path / "key").write_text("s3cret-from-file\nignored\n")
    assert read_api_key(None, str(tmp_path / "key")) == "s3cret-from-file"
    s = Server(int8, env={"SOUNDTAG_API_KEY": "s3cret"})
    try:
        s.wait_ready({"Authorization": "Bearer s3cret"})
        assert httpx.get(s.url + "/info").status_code == 401
        for scheme in ("bearer", "BEARER", "Bearer"):
            assert httpx.get(s.url + "/info", headers={"Authorization": f"{scheme} s3cret"}).status_code == 200
        assert "s3cret" not in " ".join(s.proc.args)  # not on the command line, so not in ps
    finally:
        s.stop()


def test_wildcard_bind_accepts_any_host_name():
    from soundtag.serve import ServeConfig
    from soundtag.tagger import TaggerOptions

    assert ServeConfig(TaggerOptions(), host="0.0.0.0").host_names() == ("*",)
    assert set(ServeConfig(TaggerOptions()).host_names()) == {"127.0.0.1", "localhost", "::1"}
    assert ServeConfig(TaggerOptions(), host="10.1.2.3", allowed_hosts=("Box.Local",)).host_names() == ("10.1.2.3", "box.local")
