"""`soundtag serve` against a REAL uvicorn server on 127.0.0.1 (subprocess): every endpoint, every error
status, uploads of each format equal to `soundtag tag`, the WebSocket stream, the API key."""

from __future__ import annotations

import asyncio
import json
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
import soundfile as sf

from soundtag.cli import main
from tests.fixtures import SR, scene, write_wav
from tests.test_audio import write_av

pytest.importorskip("fastapi", reason="soundtag[serve] not installed")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, model: Path, *flags: str, env: dict | None = None) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc = subprocess.Popen([sys.executable, "-m", "soundtag", "serve", "--model", str(model), "--port",
                                      str(self.port), *flags], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                     env={**os.environ, **(env or {})})
        end = time.time() + 90
        while time.time() < end:
            try:
                if httpx.get(self.url + "/health", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.2)
        else:
            self.stop()
            raise AssertionError("server did not start")

    def wait_ready(self, headers=None) -> None:
        end = time.time() + 90
        while time.time() < end:
            if httpx.get(self.url + "/ready", headers=headers, timeout=2).status_code == 200:
                return
            time.sleep(0.2)
        raise AssertionError("server never ready")

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.proc.kill()


@pytest.fixture(scope="module")
def int8(models) -> Path:
    return models / "cnn14_audioset_int8.tflite"


@pytest.fixture(scope="module")
def server(int8):
    s = Server(int8, "--queue", "1", "--workers", "1", "--max-upload-mb", "8")
    s.wait_ready()
    yield s
    s.stop()


@pytest.fixture(scope="module")
def keyed(int8):
    s = Server(int8, "--api-key", "sekrit", "--max-duration-s", "5")
    s.wait_ready({"Authorization": "Bearer sekrit"})
    yield s
    s.stop()


@pytest.fixture(scope="module")
def uploads(tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("uploads")
    x = scene(12, sr=44100, seed=5, channels=2)
    files = {"wav": write_wav(d / "a.wav", x, 44100), "flac": write_wav(d / "a.flac", x, 44100)}
    for ext, codec in (("mp3", "libmp3lame"), ("m4a", "aac")):
        files[ext] = write_av(d / f"a.{ext}", x, 44100, codec, "stereo")
    return files


def cli_record(capsys, path: Path, model: Path, *flags) -> dict:
    assert main(["tag", str(path), "--model", str(model), "--format", "jsonl", *flags]) == 0
    return json.loads(capsys.readouterr().out)


def test_plain_endpoints(server):
    assert httpx.get(server.url + "/health").json() == {"status": "alive"}
    assert httpx.get(server.url + "/ready").json() == {"status": "ready"}
    info = httpx.get(server.url + "/info").json()
    assert info["precision"] == "int8" and len(info["sha256"]) == 64 and info["accelerator"] == "cpu"
    spec = info["spec"]  # what the model file says it is (issue #19)
    assert (spec["architecture"], spec["sample_rate"], spec["window_samples"], spec["frames"], spec["classes"],
            spec["embedding_size"], spec["spec_from"]) == ("Cnn14", 32_000, 320_000, 1001, 527, 2048, "metadata")
    labs = httpx.get(server.url + "/v1/labels").json()
    assert len(labs) == 527 and labs[0] == {"index": 0, "mid": "/m/09x0r", "label": "Speech"}
    text = httpx.get(server.url + "/metrics").text
    assert "soundtag_requests_total" in text and "soundtag_queue_depth" in text and "soundtag_windows_total" in text
    page = httpx.get(server.url + "/")
    assert page.status_code == 200 and "<html" in page.text.lower()


@pytest.mark.parametrize("fmt", ["wav", "flac", "mp3", "m4a"])
def test_upload_equals_cli(server, uploads, int8, capsys, fmt):
    path = uploads[fmt]
    r = httpx.post(server.url + "/v1/tags", files={"file": (path.name, path.read_bytes())},
                   data={"top_k": "7", "hop_s": "4", "threshold": "0.1"}, timeout=60)
    assert r.status_code == 200, r.text
    ref = cli_record(capsys, path, int8, "--top-k", "7", "--hop", "4", "--threshold", "0.1")
    assert r.json() == {**ref, "path": path.name}
    csv_text = httpx.post(server.url + "/v1/tags?format=csv", files={"file": (path.name, path.read_bytes())},
                          timeout=60).text
    assert main(["tag", str(path), "--model", str(int8), "--format", "csv"]) == 0
    assert csv_text == capsys.readouterr().out.replace(str(path), path.name)


def test_scores_and_allow_deny(server, uploads):
    path = uploads["wav"]
    r = httpx.post(server.url + "/v1/tags?scores=1", files={"file": ("x.wav", path.read_bytes())},
                   data={"allow": "Speech,Music,Dog", "deny": "Music"}, timeout=60).json()
    assert len(r["clip_scores"]) == 527 and all(len(w["scores"]) == 527 for w in r["windows"])
    assert {t["label"] for t in r["tags"]} <= {"Speech", "Dog"}


def test_errors_are_answers(server, uploads, tmp_path):
    wav = uploads["wav"].read_bytes()
    post = lambda data=None, files=None, url="/v1/tags": httpx.post(server.url + url, data=data, files=files, timeout=60)  # noqa: E731
    for bad in ({"top_k": "0"}, {"threshold": "2"}, {"hop_s": "1e-9"}, {"allow": "Dogg"}, {"aggregate": "median"}):
        r = post(bad, {"file": ("a.wav", wav)})
        assert r.status_code == 422 and r.json()["error"], (bad, r.text)
    assert "did you mean 'Dog'" in post({"allow": "Dogg"}, {"file": ("a.wav", wav)}).json()["error"]
    r = post(files={"file": ("notes.wav", b"this is not audio at all")})
    assert r.status_code == 415 and "not an audio file" in r.json()["error"]
    r = post(files={"file": ("e.wav", b"")})
    assert r.status_code == 415 and "empty" in r.json()["error"] or r.status_code == 415
    r = post(files={"file": ("big.wav", os.urandom(9_000_000))})
    assert r.status_code == 413 and "--max-upload-mb" in r.json()["error"]
    assert post().status_code == 422  # no file field
    assert post(files={"file": ("a.wav", wav)}, url="/v1/tags?format=xml").status_code == 422


def test_duration_limit_and_api_key(keyed, uploads):
    wav = uploads["wav"].read_bytes()  # 12 s > --max-duration-s 5
    auth = {"Authorization": "Bearer sekrit"}
    assert httpx.get(keyed.url + "/health").status_code == 200  # open
    for path in ("/ready", "/info", "/v1/labels", "/metrics"):
        assert httpx.get(keyed.url + path).status_code == 401
        assert httpx.get(keyed.url + path, headers={"Authorization": "Bearer wrong"}).status_code == 401
        assert httpx.get(keyed.url + path, headers=auth).status_code == 200
    r = httpx.post(keyed.url + "/v1/tags", files={"file": ("a.wav", wav)}, headers=auth, timeout=60)
    assert r.status_code == 413 and "more than the maximum 5 s" in r.json()["error"]
    assert httpx.post(keyed.url + "/v1/tags", files={"file": ("a.wav", wav)}, timeout=60).status_code == 401


def test_queue_full_is_429_and_nothing_is_lost(server, tmp_path):
    """--workers 1 --queue 1: two uploads in the house at most; the rest get 429 with Retry-After."""
    long = write_wav(tmp_path / "long.wav", scene(120, sr=8000, seed=2), 8000).read_bytes()  # 12 windows
    results: list = []

    def one():
        r = httpx.post(server.url + "/v1/tags", files={"file": ("l.wav", long)}, timeout=120)
        results.append((r.status_code, r.headers.get("retry-after"), r.json()))

    threads = [threading.Thread(target=one) for _ in range(5)]
    for t in threads:
        t.start()
        time.sleep(0.05)
    for t in threads:
        t.join()
    codes = sorted(c for c, _, _ in results)
    assert len(results) == 5 and set(codes) <= {200, 429} and codes.count(429) >= 1 and codes.count(200) >= 2
    assert all(ra == "2" for c, ra, _ in results if c == 429)
    assert all(len(body["windows"]) == 12 for c, _, body in results if c == 200)


def test_client_gone_before_its_turn_is_499(server, tmp_path):
    long = write_wav(tmp_path / "long.wav", scene(600, sr=4000, seed=3), 4000).read_bytes()  # 60 windows, 4.8 MB
    first = threading.Thread(target=lambda: httpx.post(server.url + "/v1/tags", files={"file": ("a.wav", long)},
                                                       timeout=120))
    first.start()
    time.sleep(0.5)  # the first upload holds the only turn
    with pytest.raises(httpx.TimeoutException):
        httpx.post(server.url + "/v1/tags", files={"file": ("b.wav", long[:100_000])}, timeout=1.0)  # gives up waiting
    first.join()
    end = time.time() + 30
    while time.time() < end and 'status="499"' not in httpx.get(server.url + "/metrics").text:
        time.sleep(0.2)
    text = httpx.get(server.url + "/metrics").text
    assert 'soundtag_requests_total{endpoint="/v1/tags",status="499"}' in text, [
        line for line in text.splitlines() if line.startswith("soundtag_requests_total")]


def test_websocket_stream_equals_file(server, int8, tmp_path):
    import websockets

    x = scene(23, sr=48000, seed=7)
    path = write_wav(tmp_path / "s.wav", x, 48000, subtype="FLOAT")
    from soundtag import Tagger, TaggerOptions

    ref = Tagger(TaggerOptions(model_path=str(int8), hop_s=5.0)).tag_file(path)

    async def talk():
        got = []
        async with websockets.connect(f"ws://127.0.0.1:{server.port}/v1/stream", max_size=None) as ws:
            await ws.send(json.dumps({"sample_rate": 48000, "channels": 1, "encoding": "f32le", "hop_s": 5}))
            data = x.astype("<f4").tobytes()
            for i in range(0, len(data), 48000 * 4 // 3):  # a third of a second per message
                await ws.send(data[i : i + 48000 * 4 // 3])
            await ws.send(b"")
            async for msg in ws:
                got.append(json.loads(msg))
        return got

    msgs = asyncio.run(talk())
    windows = [m for m in msgs if m["type"] == "window"]
    assert msgs[-1] == {"type": "done"}
    assert [w["start_s"] for w in windows] == pytest.approx([w.start_s for w in ref.windows])
    assert [[t["index"] for t in w["tags"]] for w in windows] == [[c.index for c in w.categories] for w in ref.windows]
    for w, r in zip(windows, ref.windows):
        np.testing.assert_allclose([t["score"] for t in w["tags"]], [c.score for c in r.categories], atol=1e-4)

    async def bad(config, key=""):
        async with websockets.connect(f"ws://127.0.0.1:{server.port}/v1/stream{key}") as ws:
            await ws.send(config)
            return json.loads(await ws.recv())

    assert "sample_rate" in asyncio.run(bad(json.dumps({"sample_rate": 5})))["error"]
    assert "encoding" in asyncio.run(bad(json.dumps({"sample_rate": 16000, "encoding": "mp3"})))["error"]
    assert asyncio.run(bad("not json"))["type"] == "error"


def test_websocket_needs_the_key(keyed):
    import websockets

    async def connect(suffix):
        async with websockets.connect(f"ws://127.0.0.1:{keyed.port}/v1/stream{suffix}") as ws:
            await ws.send(json.dumps({"sample_rate": 16000}))
            await ws.send(np.zeros(16000, "<f4").tobytes())
            await ws.send(b"")
            return [json.loads(m) async for m in ws]

    with pytest.raises(Exception):
        asyncio.run(connect(""))
    assert asyncio.run(connect("?api_key=sekrit"))[-1] == {"type": "done"}


def test_malformed_form_is_one_line_422(server, uploads):
    wav = uploads["wav"].read_bytes()
    r = httpx.post(server.url + "/v1/tags", files={"file": ("a.wav", wav)}, data={"top_k": "abc"}, timeout=60)
    assert r.status_code == 422 and set(r.json()) == {"error"} and r.json()["error"].startswith("top_k: ")
    r = httpx.post(server.url + "/v1/tags", data={"top_k": "3"}, timeout=60)
    assert r.status_code == 422 and r.json()["error"].startswith("file: ")


def test_chunked_upload_over_the_limit_is_413(server):
    """Issue #18: (--max-upload-mb 8) a body without Content-Length that streams past the limit."""

    def chunks():
        yield b"--x\r\nContent-Disposition: form-data; name=\"file\"; filename=\"a.wav\"\r\n\r\n"
        for _ in range(10):
            yield b"\0" * 1_000_000

    r = httpx.post(server.url + "/v1/tags", content=chunks(), headers={"Content-Type": "multipart/form-data; boundary=x"},
                   timeout=60)
    assert r.status_code == 413 and "--max-upload-mb" in r.json()["error"]
