"""The web page of `soundtag serve`, in a real Chromium (Playwright) against a real server process.

Each module fixture starts `python -m soundtag serve` on a free port with the int8 synthetic model and
waits for /ready. The browser gets a fake microphone that plays a 48 kHz test scene. Screenshots of each
state go to test-artifacts/web/ (repository root) for a person to look at.

Chromium: Playwright cannot download its own browser here; tools/os-deps.sh installs Debian's
(`/usr/bin/chromium`, or $SOUNDTAG_CHROMIUM).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from soundtag import Tagger, TaggerOptions
from tests.fixtures import ROOT, scene, write_wav

pytestmark = pytest.mark.slow

CHROMIUM = os.environ.get("SOUNDTAG_CHROMIUM", "/usr/bin/chromium")
ARTIFACTS = ROOT / "test-artifacts" / "web"
READY_TIMEOUT_S = 90  # model load of the server process
UPLOAD_TIMEOUT_MS = 90_000  # upload + tagging a 25 s scene, 2 CPU cores
LIVE_TIMEOUT_MS = 60_000  # first live window: 10 s of (real-time) fake microphone audio + tagging
API_KEY = "web-test-key"


# ------------------------------------------------------------------------------------------ fixtures

def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start_server(model: Path, log: Path, *extra: str):
    """A real `soundtag serve` process; yields its base URL once /ready answers 200; terminates it."""
    port = _free_port()
    with open(log, "wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "soundtag", "serve", "--model", str(model), "--host", "127.0.0.1",
                                 "--port", str(port), *extra], stdout=out, stderr=subprocess.STDOUT, cwd=ROOT)
    base = f"http://127.0.0.1:{port}"
    headers = {"Authorization": f"Bearer {extra[extra.index('--api-key') + 1]}"} if "--api-key" in extra else {}
    try:
        deadline = time.monotonic() + READY_TIMEOUT_S
        while True:
            if proc.poll() is not None:
                pytest.fail(f"soundtag serve exited with {proc.returncode}:\n{log.read_text(errors='replace')}")
            try:
                if httpx.get(f"{base}/ready", headers=headers, timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"soundtag serve not ready after {READY_TIMEOUT_S} s:\n{log.read_text(errors='replace')}")
            time.sleep(0.25)
        yield base
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=15)


@pytest.fixture(scope="module")
def int8_model(models) -> Path:
    return models / "cnn14_audioset_int8.tflite"


@pytest.fixture(scope="module")
def server(int8_model, tmp_path_factory):
    yield from _start_server(int8_model, tmp_path_factory.mktemp("serve") / "serve.log")


@pytest.fixture(scope="module")
def locked_server(int8_model, tmp_path_factory):
    """A second server with an API key and a 0.5 MB upload limit."""
    yield from _start_server(int8_model, tmp_path_factory.mktemp("serve-key") / "serve.log",
                             "--api-key", API_KEY, "--max-upload-mb", "0.5")


@pytest.fixture(scope="module")
def media(tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("web-media")
    not_audio = d / "notes.wav"
    not_audio.write_text("These are meeting notes, not a recording.\n" * 20, encoding="utf-8")
    return {
        "scene": write_wav(d / "scene25.wav", scene(25, seed=1), 32000),
        "mic": write_wav(d / "mic48k.wav", scene(15, 48000, seed=2), 48000, subtype="PCM_16"),
        "not_audio": not_audio,
    }


@pytest.fixture(scope="module")
def browser(media):
    from playwright import sync_api  # a [dev] dependency: missing is a failure, not a skip
    assert Path(CHROMIUM).exists(), f"no Chromium at {CHROMIUM}: run tools/os-deps.sh (or set SOUNDTAG_CHROMIUM)"
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=[
            "--use-fake-ui-for-media-stream",
            "--use-fake-device-for-media-stream",
            f"--use-file-for-fake-audio-capture={media['mic']}",
            "--autoplay-policy=no-user-gesture-required",
        ])
        yield b
        b.close()


def _page(browser, base: str, width: int = 1200, height: int = 900):
    context = browser.new_context(viewport={"width": width, "height": height}, accept_downloads=True)
    context.grant_permissions(["microphone"], origin=base)
    page = context.new_page()
    problems: list[str] = []
    page.on("pageerror", lambda exc: problems.append(f"page error: {exc}"))
    page.on("console", lambda msg: problems.append(f"console {msg.type}: {msg.text}") if msg.type == "error" else None)
    page.goto(base + "/")
    return context, page, problems


@pytest.fixture
def page(browser, server):
    context, page, problems = _page(browser, server)
    page.problems = problems
    yield page
    context.close()


def shot(page, name: str) -> None:
    page.screenshot(path=str(ARTIFACTS / f"{name}.png"), full_page=True)


CANVAS_STATS = """() => {
  const c = document.querySelector('#timeline');
  const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
  let painted = 0; const colours = new Set();
  for (let i = 0; i < d.length; i += 4) {
    if (d[i + 3] > 0) { painted++; colours.add((d[i] << 16) | (d[i + 1] << 8) | d[i + 2]); }
  }
  return {width: c.width, height: c.height, painted, colours: colours.size, url: c.toDataURL().length};
}"""


def _wait_for_tags(page, timeout: int = UPLOAD_TIMEOUT_MS) -> None:
    page.wait_for_function("document.querySelectorAll('#tags li.tag').length > 0 || !document.querySelector('#error').hidden",
                           timeout=timeout)
    assert page.locator("#error").is_hidden(), page.locator("#error").inner_text()


# ------------------------------------------------------------------------------------------ tests

def test_page_is_self_contained(server):
    html = httpx.get(server + "/").text
    assert "/static/app.js" in html and "/static/style.css" in html
    assert "http://" not in html.replace("http://127.0.0.1", "") and "https://" not in html
    for name in ("app.js", "style.css"):
        res = httpx.get(f"{server}/static/{name}")
        assert res.status_code == 200, name
        assert "https://" not in res.text and "@import" not in res.text, name


def test_upload_shows_tags_timeline_events(page, media, int8_model):
    ref = Tagger(TaggerOptions(model_path=str(int8_model))).tag_file(media["scene"])
    assert ref.events, "the reference scene should have events at the default threshold"
    page.set_input_files("#file", str(media["scene"]))
    _wait_for_tags(page)

    labels = page.locator("#tags .tag-label").all_inner_texts()
    assert labels == [c.name for c in ref.clip]
    scores = [float(s) for s in page.locator("#tags .tag-score").all_inner_texts()]
    assert scores == pytest.approx([c.score for c in ref.clip], abs=0.0011)
    widths = page.locator("#tags .fill").evaluate_all("els => els.map(e => e.getBoundingClientRect().width)")
    assert all(w > 0 for w in widths) and widths == sorted(widths, reverse=True)

    stats = page.evaluate(CANVAS_STATS)
    assert stats["width"] > 0 and stats["height"] > 0
    assert stats["painted"] > 0.3 * stats["width"] * stats["height"], stats  # cells cover most of it
    assert stats["colours"] > 10, stats  # several scores, labels, axis
    described = page.locator("#timeline-text").inner_text()
    assert ref.clip[0].name in described and "3 windows" in described

    rows = page.locator("#events tbody tr")
    assert rows.count() == len(ref.events)
    first = rows.nth(0).locator("td").all_inner_texts()
    assert first[2] == ref.events[0].name and float(first[0]) == ref.events[0].start_s
    assert page.locator("#no-events").is_hidden()
    assert "25 s" in page.locator("#summary").inner_text()
    shot(page, "upload")

    with page.expect_download() as dl:
        page.click("#download-json")
    record = json.loads(Path(dl.value.path()).read_text())
    assert [t["label"] for t in record["tags"]] == labels and len(record["clip_scores"]) == 527
    assert dl.value.suggested_filename == "scene25.soundtag.json"
    with page.expect_download(timeout=UPLOAD_TIMEOUT_MS) as dl:
        page.click("#download-csv")
    csv_lines = Path(dl.value.path()).read_text().splitlines()
    assert csv_lines[0] == "path,duration_s,rank,index,mid,label,score,error"
    assert [line.split(",")[5] for line in csv_lines[1:]] == labels
    assert page.locator("#error").is_hidden()
    assert not page.problems, page.problems


def test_not_audio_is_an_error_in_words(page, media, server):
    said = httpx.post(f"{server}/v1/tags", files={"file": ("notes.wav", media["not_audio"].read_bytes())})
    assert said.status_code == 415
    message = said.json()["error"]
    page.set_input_files("#file", str(media["not_audio"]))
    page.wait_for_selector("#error", state="visible", timeout=UPLOAD_TIMEOUT_MS)
    text = page.locator("#error").inner_text()
    assert message in text
    assert "not" in text.lower() and "audio" in text.lower()
    assert page.locator("#error").get_attribute("role") == "alert"
    assert page.locator("#tags li.tag").count() == 0 and page.locator("#results").is_hidden()
    shot(page, "not-audio")


def test_bad_option_is_refused_in_words(page, media):
    page.fill("#threshold", "1.5")
    page.set_input_files("#file", str(media["scene"]))
    page.wait_for_selector("#error", state="visible", timeout=10_000)
    assert "Threshold" in page.locator("#error").inner_text()
    assert page.locator("#tags li.tag").count() == 0


def test_microphone_live_windows(page):
    page.click("#record")
    page.wait_for_function("document.querySelector('#record').textContent === 'Stop'", timeout=20_000)
    page.wait_for_function(
        "document.querySelectorAll('#live-windows li.window').length > 0 && "
        "document.querySelectorAll('#live-tags li.tag').length > 0 || !document.querySelector('#error').hidden",
        timeout=LIVE_TIMEOUT_MS)
    assert page.locator("#error").is_hidden(), page.locator("#error").inner_text()
    first = page.locator("#live-windows li.window").last.inner_text()
    assert first.startswith("0.0–10.0 s:"), first
    assert page.locator("#live-tags .tag-label").count() == 5  # default top-k, no threshold
    shot(page, "live")
    seen = page.locator("#live-windows li.window").count()
    page.click("#record")  # Stop: the server sends the last window(s), then "done"
    page.wait_for_function("document.querySelector('#live-status').textContent.startsWith('Finished')",
                           timeout=LIVE_TIMEOUT_MS)
    assert page.locator("#error").is_hidden(), page.locator("#error").inner_text()
    assert page.locator("#live-windows li.window").count() >= seen
    assert page.locator("#record").inner_text() == "Record" and page.locator("#record").is_enabled()
    shot(page, "live-finished")
    assert not page.problems, page.problems


def test_microphone_denied_is_an_error_in_words(browser, server):
    context, page, _ = _page(browser, server)
    try:
        page.evaluate("""() => { navigator.mediaDevices.getUserMedia =
            () => Promise.reject(new DOMException('Permission denied', 'NotAllowedError')); }""")
        page.click("#record")
        page.wait_for_selector("#error", state="visible", timeout=20_000)
        assert "denied" in page.locator("#error").inner_text().lower()
        assert page.locator("#record").inner_text() == "Record"
        shot(page, "mic-denied")
    finally:
        context.close()


def test_keyboard_and_phone_width(browser, server, media):
    context, page, problems = _page(browser, server)
    try:
        seen = {}
        for _ in range(30):
            page.keyboard.press("Tab")
            focus = page.evaluate("""() => { const e = document.activeElement; const s = getComputedStyle(e);
                return {id: e.id, tag: e.tagName, visible: e.matches(':focus-visible') && s.outlineStyle !== 'none'
                        && parseFloat(s.outlineWidth) >= 2}; }""")
            if focus["id"] in ("file", "record"):
                seen[focus["id"]] = focus
                if focus["id"] == "file":
                    shot(page, "keyboard-file")
            if len(seen) == 2:
                break
        assert set(seen) == {"file", "record"}, seen
        assert seen["file"]["tag"] == "INPUT" and seen["record"]["tag"] == "BUTTON"
        assert all(f["visible"] for f in seen.values()), seen
        assert page.evaluate("document.querySelector('label[for=file]') !== null")
        shot(page, "keyboard-record")
    finally:
        context.close()

    context, page, problems = _page(browser, server, width=375, height=812)
    try:
        assert page.evaluate("document.documentElement.scrollWidth") <= 375
        page.set_input_files("#file", str(media["scene"]))
        _wait_for_tags(page)
        assert page.evaluate("document.documentElement.scrollWidth") <= 375
        canvas = page.evaluate("(() => { const r = document.querySelector('#timeline').getBoundingClientRect(); "
                               "return [r.left, r.right]; })()")
        assert canvas[0] >= 0 and canvas[1] <= 375
        shot(page, "phone")
        assert not problems, problems
    finally:
        context.close()


def test_api_key_and_upload_limit(browser, locked_server, media):
    context, page, problems = _page(browser, locked_server)
    try:
        page.evaluate("sessionStorage.clear()")
        page.set_input_files("#file", str(media["scene"]))  # 1.6 MB: over the 0.5 MB limit, once the key is in
        page.wait_for_selector("#key-form", state="visible", timeout=20_000)
        assert "API key" in page.locator("#error").inner_text()
        shot(page, "api-key")
        page.fill("#api-key", "wrong")
        page.click("#key-submit")
        page.wait_for_function("!document.querySelector('#key-form').hidden && "
                               "document.querySelector('#error').textContent.includes('not accepted')", timeout=20_000)
        page.fill("#api-key", API_KEY)
        page.press("#api-key", "Enter")
        page.wait_for_function("document.querySelector('#error').textContent.includes('Too big')", timeout=20_000)
        assert page.locator("#key-form").is_hidden()
        assert "0.5 MB" in page.locator("#error").inner_text()
        assert page.evaluate("sessionStorage.getItem('soundtag.apiKey')") == API_KEY
        shot(page, "too-big")
        page.fill("#hop", "5")  # a small file with the kept key: tags
        small = write_wav(media["scene"].with_name("short.wav"), scene(4, seed=3), 32000)
        page.set_input_files("#file", str(small))
        _wait_for_tags(page)
        assert "1 window" in page.locator("#summary").inner_text()
        assert page.locator("#no-events").is_visible() or page.locator("#events tbody tr").count() > 0
        assert not [p for p in problems if "401" not in p and "413" not in p], problems
    finally:
        context.close()


@pytest.fixture(scope="module")
def sed_server(tmp_path_factory):
    """A server with a sound event detection model (issue #20)."""
    from soundtag.convert.family import ARCHITECTURES
    from tests.fixtures import cached_family_models

    arch = "Cnn14_DecisionLevelMax"
    out, _ = cached_family_models(arch, ("fp32", "fp16"))
    yield from _start_server(out / ARCHITECTURES[arch].file("fp16"), tmp_path_factory.mktemp("serve-sed") / "serve.log")


def test_sed_upload_draws_framewise_scores(browser, sed_server, media):
    """A SED model's answer carries each window's segmentwise scores: the heat map has a column per 320 ms
    step (each window's steps until the next window starts), not one per window, and its events table
    has the frame-resolution events."""
    context, page, problems = _page(browser, sed_server)
    try:
        page.set_input_files("#file", str(media["scene"]))
        _wait_for_tags(page)
        rec = httpx.post(f"{sed_server}/v1/tags?scores=1", files={"file": media["scene"].open("rb")}, timeout=120).json()
        starts = [w["start_s"] for w in rec["windows"]]
        want = sum(1 for i, w in enumerate(rec["windows"]) for k in range(len(w["segmentwise"]))
                   if w["start_s"] + k * rec["segment_s"] < min(starts[i + 1] if i + 1 < len(starts) else 1e9, w["end_s"]))
        assert want > 10 * len(rec["windows"])
        described = page.locator("#timeline-text").inner_text()
        assert f"Framewise heat map of {want} steps of 0.32 s in {len(rec['windows'])} windows" in described, described
        stats = page.evaluate(CANVAS_STATS)
        assert stats["painted"] > 0.3 * stats["width"] * stats["height"] and stats["colours"] > 10, stats
        rows = page.locator("#events tbody tr")
        assert rows.count() == len(rec["events"])
        if rec["events"]:
            assert float(rows.nth(0).locator("td").all_inner_texts()[0]) == rec["events"][0]["start_s"]
        shot(page, "upload-sed")
        assert not problems, problems
    finally:
        context.close()
