"""The wheel installs (issue #23): `python -m build` writes the sdist and the wheel, the wheel goes into a
fresh virtual environment (not editable, outside the checkout), and the installed `soundtag` prints its
version, its labels, and tags a file like the checkout does. Package data that is not in the wheel
(labels, mel bases, the speech clip, the web page) fails here."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tarfile
import tomllib
import zipfile
from pathlib import Path

import numpy as np
import pytest

from tests.fixtures import ROOT

pytestmark = pytest.mark.slow

ASSETS = ("class_labels_indices.csv", "mel_basis.bin", "speech_espeak.flac", "web/index.html", "web/app.js",
          "web/style.css")


@pytest.fixture(scope="module")
def dist(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("dist")
    done = subprocess.run([sys.executable, "-m", "build", "--sdist", "--wheel", "--outdir", str(out), str(ROOT)],
                          capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return out


@pytest.fixture(scope="module")
def installed(dist, tmp_path_factory) -> Path:
    """bin/ of a fresh venv holding the wheel and its dependencies only."""
    venv = tmp_path_factory.mktemp("wheel-venv") / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=300)
    wheel = next(dist.glob("soundtag-*.whl"))
    done = subprocess.run([str(venv / "bin" / "python"), "-m", "pip", "install", "-q", "-c", str(ROOT / "constraints.txt"),
                           str(wheel)], capture_output=True, text=True, timeout=1200)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return venv / "bin"


def _version() -> str:
    return tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]["version"]


def test_the_wheel_and_sdist_hold_the_package_data(dist):
    wheel = next(dist.glob("soundtag-*.whl"))
    assert wheel.name.startswith(f"soundtag-{_version()}-py3-none-any")
    names = set(zipfile.ZipFile(wheel).namelist())
    for asset in ASSETS:
        assert f"soundtag/assets/{asset}" in names, asset
    assert "soundtag/py.typed" in names
    assert not any(n.startswith(("tests/", "bench/")) for n in names)
    sdist = next(dist.glob("soundtag-*.tar.gz"))
    members = tarfile.open(sdist).getnames()
    assert any(m.endswith("src/soundtag/assets/web/index.html") for m in members)


def _run(bin_dir: Path, *args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "SOUNDTAG_MODEL", "VIRTUAL_ENV")}
    env["PATH"] = os.pathsep.join([str(bin_dir), "/usr/bin", "/bin"])
    return subprocess.run([str(bin_dir / "soundtag"), *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=600)


def test_the_installed_wheel_runs(installed, models, tmp_path):
    """--version, --labels and a tag run from the wheel alone, outside the checkout."""
    out = _run(installed, "--version", cwd=tmp_path)
    assert out.returncode == 0 and out.stdout.split() == ["soundtag", _version()], out.stdout + out.stderr
    where = subprocess.run([str(installed / "python"), "-c", "import soundtag; print(soundtag.__file__)"],
                           cwd=tmp_path, capture_output=True, text=True, check=True)
    assert str(ROOT) not in where.stdout and "site-packages" in where.stdout  # the wheel, not the checkout

    out = _run(installed, "tag", "--labels", cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    rows = out.stdout.strip().split("\n")
    assert len(rows) == 527 and "Speech" in rows[0]

    from soundtag import Tagger, TaggerOptions

    clip = ROOT / "src" / "soundtag" / "assets" / "speech_espeak.flac"
    model = models / "cnn14_audioset_int8.tflite"
    out = _run(installed, "tag", str(clip), "--model", str(model), "--format", "jsonl", "--top-k", "5", cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    record = json.loads(out.stdout)
    here = Tagger(TaggerOptions(model_path=str(model), top_k=5)).tag_file(clip).to_record()
    assert [t["label"] for t in record["tags"]] == [t["label"] for t in here["tags"]]
    np.testing.assert_allclose([t["score"] for t in record["tags"]], [t["score"] for t in here["tags"]], atol=2e-6)
