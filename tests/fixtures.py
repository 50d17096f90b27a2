"""Test and benchmark helpers: real-ish audio scenes, and the synthetic checkpoint and its converted
models, built once and cached on disk by content hash (sources that shape them + tool versions).

bench/ imports this module too (run it as ``python -m bench.run`` from the repository root).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from importlib.metadata import version
from pathlib import Path

import numpy as np
import soundfile as sf

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src" / "soundtag"
CACHE = Path(os.environ.get("SOUNDTAG_TEST_CACHE", ROOT / ".test-cache"))
SR = 32_000
CHECKPOINT_SOURCES = ("convert/synthetic.py", "convert/cnn14.py", "features.py", "assets/mel_basis.bin")
MODEL_SOURCES = ("convert/export.py", "convert/validate.py", "convert/winograd.py", "convert/frontend.py", "model.py",
                 "assets/speech_espeak.flac")
TOOLS = ("torch", "litert-torch", "ai-edge-litert", "ai-edge-quantizer", "numpy")
ALL_PRECISIONS = ("fp32", "fp16", "int8")


def cache_key(precisions: tuple[str, ...] = ()) -> str:
    """Content hash of everything that shapes the synthetic checkpoint (and, with precisions, its models)."""
    h = hashlib.sha256()
    for rel in CHECKPOINT_SOURCES + (MODEL_SOURCES if precisions else ()):
        h.update((SRC / rel).read_bytes())
    for pkg in TOOLS:
        h.update(version(pkg).encode())
    h.update(",".join(precisions).encode())
    return h.hexdigest()[:16]


def cached_checkpoint(cache: str | Path = CACHE) -> Path:
    """The synthetic checkpoint under cache/, built once per content hash."""
    from soundtag.convert.synthetic import write_synthetic_checkpoint

    path = Path(cache) / f"synthetic-{cache_key()}" / "Cnn14_synthetic.pth"
    if not path.is_file():
        write_synthetic_checkpoint(path)
    return path


def cached_models(cache: str | Path = CACHE, precisions: tuple[str, ...] = ALL_PRECISIONS) -> Path:
    """Converted, validated models of the synthetic checkpoint under cache/, built once per hash
    (with the waveform models of fp32 and fp16; proven on the GPU where there is one)."""
    from soundtag.convert.export import REPORT_FILE, convert_checkpoint

    out = Path(cache) / f"models-{cache_key(precisions)}"
    report = out / REPORT_FILE
    if not (report.is_file() and json.loads(report.read_text()).get("passed")):
        shutil.rmtree(out, ignore_errors=True)
        convert_checkpoint(cached_checkpoint(cache), out, precisions, waveform=True)
    return out


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
