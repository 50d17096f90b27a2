"""`fetch.download` stops at the expected size: a mirror that sends more (with a Content-Length or
none, on a first or a resumed request) cannot fill the disk. A local HTTP server on 127.0.0.1 only."""

from __future__ import annotations

import http.server
import threading

import pytest

from soundtag import fetch

EXPECTED = 3 * fetch.CHUNK_BYTES + 12_345  # bytes the caller expects: a few read chunks, not a whole one
SENT = 8 * EXPECTED  # what the mirror sends


class _Oversized(http.server.BaseHTTPRequestHandler):
    """Sends SENT bytes (from any Range start); ``length``: the Content-Length it announces ("true" or "none")."""

    length = "true"
    ranges: list = []

    def do_GET(self):  # noqa: N802
        cls = type(self)
        cls.ranges.append(self.headers.get("Range"))
        if self.headers.get("Range"):
            start = int(self.headers["Range"].split("=")[1].split("-")[0])
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{start + SENT - 1}/*")
        else:
            self.send_response(200)
        if cls.length == "true":
            self.send_header("Content-Length", str(SENT))
        self.end_headers()  # HTTP/1.0: without a length, the body ends when the connection closes
        block = b"\x5a" * (64 * 1024)
        try:
            for _ in range(SENT // len(block)):
                self.wfile.write(block)
        except OSError:  # the client hung up: what the test wants
            pass

    def log_message(self, *args):
        pass


@pytest.fixture
def mirror():
    _Oversized.ranges = []
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Oversized)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}/big.pth"
    httpd.shutdown()
    httpd.server_close()


@pytest.mark.parametrize("length", ["true", "none"])
def test_download_stops_at_the_expected_size(mirror, tmp_path, length):
    """The .part never holds more than the expected bytes; the download fails and leaves nothing."""
    _Oversized.length = length
    dest = tmp_path / "c.pth"
    seen = []
    with pytest.raises(fetch.FetchError) as err:
        fetch.download(mirror, dest, EXPECTED, "0" * 32, progress=lambda have, total: seen.append(have))
    assert f"more than the expected {EXPECTED} bytes" in str(err.value) and "\n" not in str(err.value)
    assert max(seen, default=0) <= EXPECTED
    assert not dest.exists() and not (tmp_path / "c.pth.part").exists()


@pytest.mark.parametrize("length", ["true", "none"])
def test_a_resumed_download_stops_at_the_expected_size(mirror, tmp_path, length):
    """A .part from an earlier run, and a mirror whose ranged answer runs on past the expected end."""
    _Oversized.length = length
    dest = tmp_path / "c.pth"
    (tmp_path / "c.pth.part").write_bytes(b"\x5a" * 1000)
    seen = []
    with pytest.raises(fetch.FetchError, match=f"more than the expected {EXPECTED} bytes"):
        fetch.download(mirror, dest, EXPECTED, None, progress=lambda have, total: seen.append(have))
    assert max(seen, default=0) <= EXPECTED and _Oversized.ranges == ["bytes=1000-"]
    assert not dest.exists() and not (tmp_path / "c.pth.part").exists()
