"""Session fixtures: the synthetic upstream-format checkpoint and its converted models, built once and
cached on disk by content hash (sources that shape them + tool versions)."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src" / "soundtag"
CACHE = Path(os.environ.get("SOUNDTAG_TEST_CACHE", ROOT / ".test-cache"))
SR = 32_000


@pytest.fixture(scope="session")
def checkpoint() -> Path:
    from soundtag.convert.synthetic import cached_checkpoint

    return cached_checkpoint(CACHE)


@pytest.fixture(scope="session")
def models(checkpoint) -> Path:
    """Directory with fp32 + fp16 + int8 models, labels, mel basis and conversion_report.json."""
    from soundtag.convert.synthetic import cached_models

    return cached_models(CACHE)


@pytest.fixture(scope="session")
def fp32_model(models) -> Path:
    return models / "cnn14_audioset_fp32.tflite"


@pytest.fixture(scope="session")
def body(checkpoint):
    from soundtag.convert.cnn14 import load_body

    return load_body(checkpoint)


def tone(seconds: float, sr: int = SR, freq: float = 1000.0, amp: float = 0.5) -> np.ndarray:
    t = np.arange(int(seconds * sr)) / sr
    return (amp * np.sin(2 * np.pi * freq * t)).astype(np.float32)


def scene(seconds: float, sr: int = SR, seed: int = 0, channels: int = 1) -> np.ndarray:
    """Real-ish test audio: noise bursts, harmonic tones with vibrato, clicks; [n] or [n, channels]."""
    rng = np.random.default_rng(seed)
    n = int(seconds * sr)
    t = np.arange(n) / sr
    env = (np.sin(2 * np.pi * 0.3 * t) > 0).astype(float)
    f0 = 220 * (1 + seed % 3)
    tones = sum(np.sin(2 * np.pi * f0 * h * t + 2 * np.sin(2 * np.pi * 4 * t)) / h for h in range(1, 5))
    x = 0.2 * rng.standard_normal(n) * env + 0.15 * tones * (1 - env)
    x[rng.integers(0, n, 20)] += 0.6
    x = np.clip(x, -1, 1) * 0.8
    if channels == 1:
        return x.astype(np.float32)
    mix = np.stack([x * (0.5 + 0.5 * c / channels) for c in range(channels)], axis=1)
    return mix.astype(np.float32)


def write_wav(path: Path, data: np.ndarray, sr: int = SR, **kw) -> Path:
    sf.write(str(path), data, sr, **kw)
    return path


def speech_wave() -> tuple[np.ndarray, int]:
    """The espeak-ng speech clip shipped as the converter's validation input (16 kHz mono)."""
    data, sr = sf.read(str(SRC / "assets" / "speech_espeak.flac"), dtype="float32")
    return data, sr
