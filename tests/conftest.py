"""Session fixtures: the synthetic upstream-format checkpoint and its converted models (tests/fixtures.py)."""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path

import pytest

# Ray reads this when first imported: the tests' local Ray then talks to itself on 127.0.0.1 only
# (soundtag.corpus.init_ray sets the same for the command line).
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")

# XNNPACK's packed weights (model.py): one file per model path, in a directory that goes with the session
_WEIGHTS = tempfile.TemporaryDirectory(prefix="soundtag-xnnpack-")
os.environ.setdefault("SOUNDTAG_WEIGHT_CACHE", _WEIGHTS.name)

from tests.fixtures import CACHE, SR, cached_checkpoint, cached_models, scene, speech_wave, tone, write_wav  # noqa: F401


@pytest.fixture(autouse=True)
def _weight_caches_of_temporary_models():
    """XNNPACK's packed weights of a model that a test wrote or copied into its own folder (one file of
    up to 700 MB per model path) go when the test ends; those of the cached models stay for the session."""
    folder = Path(_WEIGHTS.name)
    if os.environ.get("SOUNDTAG_WEIGHT_CACHE") != _WEIGHTS.name or not folder.is_dir():
        yield
        return
    before = set(folder.iterdir())
    yield
    new = set(folder.iterdir()) - before
    if not new:
        return
    from soundtag.model import weight_cache_file

    keep = set()
    for model in CACHE.rglob("*.tflite"):
        with contextlib.suppress(OSError):
            keep.add(weight_cache_file(model, folder).name)
    for f in new:
        if f.name.removesuffix(".crc32") not in keep:
            f.unlink(missing_ok=True)


@pytest.fixture(autouse=True)
def _working_directory_stays():
    """A test that moves the process into its own folder fails, and the next test starts where the suite
    did: a passed test's tmp_path is deleted, and every later subprocess (and torch's MKL loader) fails
    in a working directory that no longer exists (CI, stop 28)."""
    start = os.getcwd()
    yield
    try:
        moved = os.getcwd() != start
    except FileNotFoundError:
        moved = True
    if moved:
        os.chdir(start)
        pytest.fail("the test left the working directory changed: use monkeypatch.chdir", pytrace=False)


@pytest.fixture(scope="session")
def checkpoint() -> Path:
    return cached_checkpoint(CACHE)


@pytest.fixture(scope="session")
def models(checkpoint) -> Path:
    """Directory with fp32 + fp16 + int8 models, labels, mel basis and conversion_report.json."""
    return cached_models(CACHE)


@pytest.fixture(scope="session")
def fp32_model(models) -> Path:
    return models / "cnn14_audioset_fp32.tflite"


@pytest.fixture(scope="session")
def body(checkpoint):
    from soundtag.convert.cnn14 import load_body

    return load_body(checkpoint)
