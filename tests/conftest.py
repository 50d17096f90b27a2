"""Session fixtures: the synthetic upstream-format checkpoint and its converted models (tests/fixtures.py)."""

from __future__ import annotations

from pathlib import Path

import pytest

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
