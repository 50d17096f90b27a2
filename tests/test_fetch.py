"""`soundtag fetch` against a local HTTP server on 127.0.0.1: resume, checksum, conversion into the cache."""

import hashlib
import http.server
import json
import re
import subprocess
import sys
import threading
from importlib import resources

import pytest

from soundtag import fetch
from soundtag.cli import main
from tests.fixtures import absent_gpu_env


def _cli(*args, env):
    return subprocess.run([sys.executable, "-m", "soundtag", *map(str, args)], capture_output=True, text=True, env=env,
                          timeout=600)


class _Handler(http.server.BaseHTTPRequestHandler):
    """Serves one payload with Range support; the first `breaks` responses stop half-way."""

    payload = b""
    breaks = 0
    requests: list = []

    def do_GET(self):  # noqa: N802
        cls = type(self)
        cls.requests.append(self.headers.get("Range"))
        start = 0
        if self.headers.get("Range"):
            start = int(self.headers["Range"].split("=")[1].split("-")[0])
            if start >= len(cls.payload):
                self.send_response(416)
                self.end_headers()
                return
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(cls.payload) - 1}/{len(cls.payload)}")
        else:
            self.send_response(200)
        body = cls.payload[start:]
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if cls.breaks > 0:
            cls.breaks -= 1
            self.wfile.write(body[: len(body) // 2])
            self.wfile.flush()
            self.connection.close()  # broken download
            return
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.fixture
def server(checkpoint):
    _Handler.payload = checkpoint.read_bytes()
    _Handler.requests = []
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}/Cnn14_mAP%3D0.431.pth"
    httpd.shutdown()
    httpd.server_close()


def test_download_resumes_broken_connection(server, checkpoint, tmp_path):
    _Handler.breaks = 2
    data = checkpoint.read_bytes()
    dest = fetch.download(server, tmp_path / "c.pth", len(data), hashlib.md5(data).hexdigest())
    assert dest.read_bytes() == data
    assert _Handler.requests[0] is None and all(r and r.startswith("bytes=") for r in _Handler.requests[1:])
    assert len(_Handler.requests) == 3
    assert not (tmp_path / "c.pth.part").exists()


def test_partial_file_from_earlier_run_is_resumed(server, checkpoint, tmp_path):
    data = checkpoint.read_bytes()
    (tmp_path / "c.pth.part").write_bytes(data[:1000])
    fetch.download(server, tmp_path / "c.pth", len(data), hashlib.md5(data).hexdigest())
    assert _Handler.requests == ["bytes=1000-"]
    assert (tmp_path / "c.pth").read_bytes() == data


def test_wrong_checksum_leaves_nothing(server, checkpoint, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("SOUNDTAG_CACHE", str(tmp_path / "cache"))
    size = checkpoint.stat().st_size
    code = main(["fetch", "--url", server, "--md5", "0" * 32, "--bytes", str(size)])
    err = capsys.readouterr().err
    assert code == 1 and "md5" in err and "does not match" in err
    assert not any(p.is_file() for p in (tmp_path / "cache").rglob("*"))
    code = main(["fetch", "--url", server, "--bytes", str(size + 1)])
    assert code == 1 and f"expected {size + 1}" in capsys.readouterr().err


def test_fetch_converts_into_cache_and_tag_finds_it(server, checkpoint, tmp_path):
    """On a machine with a Vulkan driver file but no device Dawn accepts (issue #18), fetch converts and
    writes the models (the GPU check is recorded as not possible); `tag --accelerator auto` tags on the
    CPU with one warning, `--accelerator gpu` is one line and exit 1. Subprocesses: the Vulkan loader
    reads its driver files once per process."""
    env = {**absent_gpu_env(tmp_path), "SOUNDTAG_CACHE": str(tmp_path / "cache")}
    env.pop("SOUNDTAG_MODEL", None)
    data = checkpoint.read_bytes()
    r = _cli("fetch", "--url", server, "--md5", hashlib.md5(data).hexdigest(), "--bytes", str(len(data)),
             "--precision", "fp32", env=env)
    assert r.returncode == 0, r.stderr
    models = tmp_path / "cache" / "models"
    report = json.loads((models / "conversion_report.json").read_text())
    assert report["passed"] and report["checkpoint"]["md5"] == hashlib.md5(data).hexdigest()
    assert report["models"]["fp32"]["gpu"]["checked"] is False and "No adapters found" in report["models"]["fp32"]["gpu"]["reason"]
    assert (models / "cnn14_audioset_fp32.tflite").is_file()
    speech = str(resources.files("soundtag.assets").joinpath("speech_espeak.flac"))
    r = _cli("tag", speech, "--accelerator", "auto", "--format", "jsonl", env=env)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["tags"] and str(models / "cnn14_audioset_fp32.tflite") in r.stderr
    warnings = [x for x in r.stderr.splitlines() if "GPU not used" in x]
    assert len(warnings) == 1 and "no usable GPU adapter" in warnings[0], r.stderr
    r = _cli("tag", speech, "--accelerator", "gpu", env=env)
    lines = [x for x in r.stderr.splitlines() if x.strip() and not x.startswith(("INFO: ", "soundtag: model "))]
    assert r.returncode == 1 and r.stdout == "" and len(lines) == 1, r.stderr
    assert "no GPU accelerator: Dawn found no usable GPU adapter" in lines[0]


def test_upstream_constants():
    assert fetch.UPSTREAM_BYTES == 327_428_481 and fetch.UPSTREAM_MD5 == "541141fa2ee191a88f24a3219fff024e"
    assert "3987831" in fetch.UPSTREAM_URL


def test_mirror_is_verified_against_upstream_unless_told(server, checkpoint, tmp_path, monkeypatch, capsys):
    """A --url mirror gets the upstream size and md5 checks (the synthetic checkpoint is not upstream's)."""
    monkeypatch.setenv("SOUNDTAG_CACHE", str(tmp_path / "cache"))
    code = main(["fetch", "--url", server, "--precision", "fp32"])
    err = capsys.readouterr().err
    assert code == 1 and f"expected {fetch.UPSTREAM_BYTES}" in err
    assert not any(p.is_file() for p in (tmp_path / "cache").rglob("*"))
    assert main(["fetch", "--url", server, "--no-verify", "--md5", "0" * 32]) == 2


def test_connection_closed_before_content_length_is_never_cached(server, checkpoint, tmp_path):
    _Handler.breaks = 100  # every response stops half-way, even with verification off
    dest = tmp_path / "c.pth"
    with pytest.raises(fetch.FetchError, match="connection closed at|download failed"):
        fetch.download(server, dest, None, None)
    assert not dest.exists()


def test_part_file_symlink_is_not_followed(server, checkpoint, tmp_path):
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    (tmp_path / "c.pth.part").symlink_to(victim)
    data = checkpoint.read_bytes()
    with pytest.raises(fetch.FetchError, match="symbolic link"):
        fetch.download(server, tmp_path / "c.pth", len(data), hashlib.md5(data).hexdigest())
    assert victim.read_text() == "precious" and not (tmp_path / "c.pth").exists()


def test_broken_cached_model_says_which_file_and_what_to_do(tmp_path, monkeypatch, capsys):
    from tests.fixtures import scene, write_wav

    monkeypatch.setenv("SOUNDTAG_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("SOUNDTAG_MODEL", raising=False)
    cached = tmp_path / "cache" / "models" / "cnn14_audioset_fp32.tflite"
    cached.parent.mkdir(parents=True)
    cached.write_bytes(b"\x00" * 4096)  # a download or conversion cut short
    wav = write_wav(tmp_path / "a.wav", scene(2), 32000)
    code = main(["tag", str(wav)])
    err = capsys.readouterr().err
    assert code == 1 and f"{cached}: not a LiteRT model" in err and "run 'soundtag fetch' again" in err
    assert err.count("\n") == 1


@pytest.fixture
def cnn6_server():
    """The handler above serving the synthetic Cnn6 checkpoint (upstream format) instead."""
    from tests.fixtures import cached_family_models

    _, checkpoint = cached_family_models("Cnn6", ("fp32", "fp16", "int8"))
    _Handler.payload, _Handler.requests, _Handler.breaks = checkpoint.read_bytes(), [], 0
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}/Cnn6_mAP%3D0.343.pth", checkpoint
    httpd.shutdown()
    httpd.server_close()


def test_fetch_a_family_member_by_name(cnn6_server, tmp_path, monkeypatch, capsys):
    """`soundtag fetch cnn6` downloads under the upstream file name, converts with the registry's
    architecture into {arch}_audioset_{precision}.tflite, and `soundtag models` lists it as installed;
    a model without an md5 pin needs --md5 or --no-verify; an unknown name is a usage error."""
    url, checkpoint = cnn6_server
    monkeypatch.setenv("SOUNDTAG_CACHE", str(tmp_path / "cache"))
    data = checkpoint.read_bytes()
    code = main(["fetch", "cnn6", "--url", url, "--md5", hashlib.md5(data).hexdigest(), "--gpu-check", "off"])
    out, err = capsys.readouterr()
    assert code == 0, err
    models = tmp_path / "cache" / "models"
    assert (tmp_path / "cache" / "Cnn6_mAP=0.343.pth").read_bytes() == data
    assert {p.name for p in models.glob("cnn6_*.tflite")} == {"cnn6_audioset_fp32.tflite", "cnn6_audioset_fp16.tflite"}
    assert json.loads((models / "cnn6_conversion_report.json").read_text())["architecture"] == "Cnn6"
    assert main(["selftest", "--model", str(models / "cnn6_audioset_fp32.tflite"), "--runs", "1"]) == 0
    capsys.readouterr()
    assert main(["models"]) == 0
    row = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("cnn6 "))
    assert "Cnn6_mAP=0.343.pth" in row and "e25e26b84585b14c7754c91e48efc9be" in row and " 4.8M " in row
    assert re.search(r"fp16 10, fp32 19 [0-9.]+ms$", row), row  # sizes (MB) and what selftest measured
    assert main(["fetch", "cnn14-8k", "--url", url]) == 1
    assert "no md5 pin is known for Cnn14_8k_mAP=0.416.pth" in capsys.readouterr().err
    assert main(["fetch", "cnn99"]) == 2
    assert "unknown model 'cnn99'; choose from cnn14, cnn14-16k" in capsys.readouterr().err
    assert fetch.checkpoint("Wavegram_Logmel_Cnn14").url.endswith("Wavegram_Logmel_Cnn14_mAP%3D0.439.pth?download=1")


def test_registry_agrees_with_the_converter():
    """Every registry entry names an architecture the converter knows, at that architecture's rate."""
    from soundtag.convert.family import ARCHITECTURES

    for c in fetch.CHECKPOINTS.values():
        a = ARCHITECTURES[c.arch]
        assert c.sample_rate == a.front_end.sample_rate and c.file == a.upstream_file and c.published_map == a.published_map
        assert a.upstream_md5 in (None, c.md5)  # where the converter pins an md5 (to tell equal keys apart), the same
