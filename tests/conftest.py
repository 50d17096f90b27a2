"""Session fixtures: the synthetic upstream-format checkpoint and its converted models (tests/fixtures.py)."""

from __future__ import annotations

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
