"""The documentation is something the tests prove (issue #23).

- `mkdocs build --strict` builds the site: a broken link, a missing anchor or a reference that does not
  resolve fails here (and with it CI); the CLI and HTTP references are generated from the code.
- Every ``sh`` and ``python`` block of README.md and docs/*.md runs, in a folder holding the files it
  names (made here from the test scenes and the synthetic models), and must exit 0. A block that
  needs what CI does not have is marked just above its fence: ``<!-- not run: REASON -->``, where
  REASON says what is missing (the real weights, a GPU, a microphone, a server that runs until
  stopped, ...) and which test covers it instead.
- README's links into docs/ point at files and headings that exist.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tests.fixtures import ROOT, SR, cached_family_models, scene, write_wav

pytestmark = pytest.mark.slow

PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
RUNNABLE = ("sh", "python")
NOT_RUN = re.compile(r"^<!-- not run: (?P<reason>.{10,}) -->$")
FENCE = re.compile(r"^```(?P<lang>[\w-]*)\s*$")
SED_ARCH = "Cnn14_DecisionLevelMax"


def code_blocks(page: Path):
    """(line, language, code, reason it is not run or None) of each fenced block of a page."""
    lines = page.read_text(encoding="utf-8").split("\n")
    i = 0
    while i < len(lines):
        m = FENCE.match(lines[i])
        if m and m["lang"]:
            end = next(j for j in range(i + 1, len(lines)) if lines[j].startswith("```"))
            marker = NOT_RUN.match(lines[i - 1]) if i else None
            yield i + 1, m["lang"], "\n".join(lines[i + 1:end]), marker["reason"] if marker else None
            i = end
        i += 1


def _examples():
    for page in PAGES:
        for line, lang, code, reason in code_blocks(page):
            if lang in RUNNABLE:
                rel = page.relative_to(ROOT)
                marks = [pytest.mark.skip(reason=f"not run: {reason}")] if reason else []
                yield pytest.param(rel, line, lang, code, id=f"{rel}:{line}", marks=marks)


EXAMPLES = list(_examples())


def test_every_marker_names_a_block_and_a_reason():
    """A `not run` marker stands right above a runnable block; nothing else looks like one."""
    for page in PAGES:
        lines = page.read_text(encoding="utf-8").split("\n")
        for i, line in enumerate(lines):
            if line.startswith("<!-- not run"):
                assert NOT_RUN.match(line), f"{page}:{i + 1}: a marker needs a reason: {line}"
                m = FENCE.match(lines[i + 1]) if i + 1 < len(lines) else None
                assert m and m["lang"] in RUNNABLE, f"{page}:{i + 1}: the marker is not above a sh/python block"
    assert len(EXAMPLES) >= 20
    ran = [p for p in EXAMPLES if not p.marks]
    assert len(ran) >= len(EXAMPLES) // 2, "most examples must run"


def test_the_site_builds_strictly(tmp_path):
    """mkdocs (Material) with --strict: links, anchors, mkdocstrings references, the generated pages."""
    site = tmp_path / "site"
    done = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(site)],
                          cwd=ROOT, capture_output=True, text=True, timeout=600,
                          env=dict(os.environ, NO_MKDOCS_2_WARNING="1"))
    assert done.returncode == 0, done.stderr[-4000:]
    cli = (site / "reference" / "cli" / "index.html").read_text(encoding="utf-8")
    from soundtag.cli import build_parser

    commands = [a for a in build_parser()._actions if hasattr(a, "choices") and isinstance(a.choices, dict)][0]
    for name in commands.choices:  # every subcommand has its section, with its options
        assert f'id="soundtag-{name}"' in cli, name
    assert "--max-upload-mb" in cli and "--top-k" in cli
    http = (site / "reference" / "http" / "index.html").read_text(encoding="utf-8")
    assert "/v1/tags" in http and "429" in http and "/metrics" in http
    import json

    schema = json.loads((site / "reference" / "openapi.json").read_text(encoding="utf-8"))
    assert "/v1/tags" in schema["paths"] and "/docs" not in schema["paths"]
    python = (site / "reference" / "python" / "index.html").read_text(encoding="utf-8")
    for name in ("soundtag.Tagger", "soundtag.TaggerOptions", "soundtag.TagResult", "soundtag.SoundtagError"):
        assert f'id="{name}"' in python, name
    assert "tag_file" in python and "Raises" in python


def _slug(heading: str) -> str:
    from markdown.extensions.toc import slugify

    return slugify(re.sub(r"[`*]", "", heading), "-")


def test_readme_links_point_at_pages_and_headings_that_exist():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    assert len(readme.split("\n")) <= 200
    links = re.findall(r"\]\((docs/[^)#\s]+)(?:#([^)\s]+))?\)", readme)
    assert len(links) >= 8
    for target, anchor in links:
        page = ROOT / target
        assert page.is_file(), target
        if anchor:
            heads = {_slug(h) for h in re.findall(r"^#+ (.+)$", page.read_text(encoding="utf-8"), re.M)}
            assert anchor in heads, f"{target}#{anchor}: no such heading"


def test_readme_starts_with_the_two_commands():
    lines = (ROOT / "README.md").read_text(encoding="utf-8").split("\n")
    commands = [line.strip() for line in lines[:12] if line.startswith("    ")]
    assert len(commands) == 2
    assert commands[0].endswith("soundtag tag src/soundtag/assets/speech_espeak.flac")
    assert commands[1].startswith("bash tools/os-deps.sh") and commands[1].endswith("python -m pytest -q")


# --- the examples' world ------------------------------------------------------------------------------
def _ffmpeg(src: Path, dst: Path, *args: str) -> None:
    subprocess.run(["ffmpeg", "-loglevel", "error", "-y", "-i", str(src), *args, str(dst)], check=True, timeout=120)


@pytest.fixture(scope="module")
def world(tmp_path_factory, models, checkpoint):
    """A folder with every file the examples name: audio in several formats, a truncated WAV, raw
    PCM, lists, strong labels, and the synthetic models (also as the default model of the cache)."""
    w = tmp_path_factory.mktemp("docs-world")
    sed_dir, _ = cached_family_models(SED_ARCH, ("fp32", "fp16"))
    (w / "models").mkdir()
    for d in (models, sed_dir):
        for f in d.iterdir():
            for place in (w / "models", w):  # the CNN14 models' files first: mel_basis.bin etc. are theirs
                if f.is_file() and not (place / f.name).exists():
                    (place / f.name).symlink_to(f)
    cache = w / "cache" / "models"
    cache.mkdir(parents=True)
    for f in models.iterdir():
        if f.is_file():
            (cache / f.name).symlink_to(f)
    (w / "Cnn14_mAP=0.431.pth").symlink_to(checkpoint)  # the synthetic checkpoint in the upstream format
    (w / "src").symlink_to(ROOT / "src")

    write_wav(w / "clip.wav", scene(10.0, 44_100, seed=1, channels=2), 44_100)
    write_wav(w / "query.wav", scene(10.0, SR, seed=2))
    write_wav(w / "field.wav", scene(25.0, 48_000, seed=3), 48_000)
    _ffmpeg(w / "field.wav", w / "field.flac")
    (w / "field.wav").unlink()
    _ffmpeg(w / "clip.wav", w / "clip.m4a", "-c:a", "aac")
    write_wav(w / "long.wav", scene(32.0, SR, seed=4))
    _ffmpeg(w / "long.wav", w / "long.m4a", "-c:a", "aac")
    (w / "long.wav").unlink()
    write_wav(w / "x.wav", scene(12.0, 44_100, seed=5), 44_100)
    _ffmpeg(w / "x.wav", w / "x.mp3")
    (w / "x.wav").unlink()
    write_wav(w / "meeting.flac", scene(30.0, SR, seed=6))
    recordings = w / "recordings"
    (recordings / "day2").mkdir(parents=True)
    write_wav(recordings / "a.wav", scene(10.0, SR, seed=7))
    write_wav(recordings / "b.flac", scene(15.0, 22_050, seed=8), 22_050)
    write_wav(recordings / "day2" / "c.wav", scene(8.0, SR, seed=9))
    (w / "paths.txt").write_text("# one path per line\nclip.wav\nfield.flac\n", encoding="utf-8")
    broken = (w / "clip.wav").read_bytes()
    (w / "broken.wav").write_bytes(broken[: len(broken) // 2])
    pcm = scene(25.0, 44_100, seed=10, channels=2).astype("<f4")
    (w / "capture.raw").write_bytes(pcm.tobytes())
    clips = w / "clips"
    clips.mkdir()
    write_wav(clips / "s1.wav", scene(10.0, SR, seed=11))
    write_wav(clips / "s2.wav", scene(10.0, SR, seed=12))
    (w / "strong.tsv").write_text("filename\tonset\toffset\tevent_label\n"
                                  "s1.wav\t1.0\t3.5\tSpeech\ns1.wav\t6.0\t7.0\tDog\ns2.wav\t2.0\t8.0\tSpeech\n",
                                  encoding="utf-8")
    return w


_PAGE_DIRS: dict[str, Path] = {}


def _page_dir(world: Path, tmp_path_factory, page: Path) -> Path:
    """One copy of the world per page: a page's blocks run in order, in the same folder, as a reader would."""
    key = str(page)
    if key not in _PAGE_DIRS:
        target = tmp_path_factory.mktemp("docs-page") / "work"
        shutil.copytree(world, target, symlinks=True)
        _PAGE_DIRS[key] = target
    return _PAGE_DIRS[key]


@pytest.mark.parametrize("page,line,lang,code", EXAMPLES)
def test_example_runs(page, line, lang, code, world, tmp_path_factory):
    cwd = _page_dir(world, tmp_path_factory, page)
    env = dict(os.environ, SOUNDTAG_CACHE=str(cwd / "cache"), PYTHONUNBUFFERED="1",
               PATH=os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")]))
    env.pop("SOUNDTAG_MODEL", None)
    if lang == "sh":
        # `bash -e`, as a reader's shell runs it: a pipeline's status is its last command's, so
        # `soundtag tag --labels | head -3` is fine when head closes the pipe first (soundtag exits 141)
        cmd = ["bash", "-e", "-c", code]
    else:
        script = cwd / f"example_{line}.py"
        script.write_text(code + "\n", encoding="utf-8")
        cmd = [sys.executable, str(script)]
    done = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=600,
                          stdin=subprocess.DEVNULL)
    assert done.returncode == 0, (f"{page}:{line} exited {done.returncode}\n--- stdout\n{done.stdout[-3000:]}"
                                  f"\n--- stderr\n{done.stderr[-3000:]}")
    assert "Traceback" not in done.stderr, done.stderr[-3000:]


def test_examples_write_what_they_say(world, tmp_path_factory):
    """After the runs: the README tour's outputs exist and are what their format says."""
    readme = _PAGE_DIRS.get("README.md")
    if readme is None:
        pytest.skip("the README examples did not run")
    import json

    import pyarrow.parquet as pq

    lines = [json.loads(x) for x in (readme / "tags.jsonl").read_text(encoding="utf-8").splitlines()]
    assert sorted(Path(r["path"]).name for r in lines) == ["a.wav", "b.flac", "c.wav"]
    assert all(len(r["tags"]) == 5 and "error" not in r for r in lines)
    assert (readme / "events.txt").read_text(encoding="utf-8").startswith("Selection\tView\tChannel")
    table = pq.read_table(readme / "all.parquet")
    assert table.num_rows == 2 and all(len(s) == 527 for s in table.column("clip_scores").to_pylist())
    assert np.isfinite(np.array(table.column("clip_scores").to_pylist())).all()
