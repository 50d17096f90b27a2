"""Test and benchmark helpers: real-ish audio scenes, and the synthetic checkpoint and its converted
models, built once and cached on disk by content hash (sources that shape them + tool versions).

bench/ imports this module too (run it as ``python -m bench.run`` from the repository root).
"""

from __future__ import annotations

import hashlib
import itertools
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
MODEL_SOURCES = ("convert/export.py", "convert/validate.py", "convert/winograd.py", "convert/int8.py", "convert/frontend.py",
                 "model.py", "assets/speech_espeak.flac")
TOOLS = ("torch", "litert-torch", "ai-edge-litert", "ai-edge-quantizer", "numpy")
ALL_PRECISIONS = ("fp32", "fp16", "int8")
GPU_CHECK = "require" if os.environ.get("SOUNDTAG_REQUIRE_GPU") == "1" else "auto"  # convert --gpu-check


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
    """The synthetic checkpoint under cache/, built once per content hash (torch imported only then:
    bench/peers.py's runtime processes measure their own peak RSS)."""
    path = Path(cache) / f"synthetic-{cache_key()}" / "Cnn14_synthetic.pth"
    if not path.is_file():
        from soundtag.convert.synthetic import write_synthetic_checkpoint

        write_synthetic_checkpoint(path)
    return path


def cached_models(cache: str | Path = CACHE, precisions: tuple[str, ...] = ALL_PRECISIONS) -> Path:
    """Converted, validated models of the synthetic checkpoint under cache/, built once per hash
    (with the waveform models of fp32 and fp16; proven on the GPU where there is one)."""
    out = Path(cache) / f"models-{cache_key(precisions)}"
    report = out / "conversion_report.json"  # export.REPORT_FILE (export imports torch)
    if not (report.is_file() and json.loads(report.read_text()).get("passed")):
        from soundtag.convert.export import REPORT_FILE, convert_checkpoint

        assert report.name == REPORT_FILE
        shutil.rmtree(out, ignore_errors=True)
        # CI (SOUNDTAG_REQUIRE_GPU=1) proves every model on its GPU (lavapipe) or fails
        convert_checkpoint(cached_checkpoint(cache), out, precisions, waveform=True, gpu_check=GPU_CHECK)
    return out


FAMILY_SOURCES = ("convert/family.py", "convert/cnns.py", "convert/mobilenet.py", "convert/resnet.py",
                  "convert/wavegram.py", "spec.py")


def cached_family_models(arch: str, precisions: tuple[str, ...]) -> tuple[Path, Path]:
    """(models dir, checkpoint) of a synthetic checkpoint of any family architecture, converted and
    proven (no GPU check: the CNN14 fixture holds the GPU gates), cached like cached_models."""
    from soundtag.convert.export import convert_checkpoint, report_file
    from soundtag.convert.family import ARCHITECTURES
    from soundtag.convert.synthetic import write_synthetic_checkpoint

    h = hashlib.sha256(cache_key(precisions).encode())
    for rel in FAMILY_SOURCES:
        h.update((SRC / rel).read_bytes())
    key = f"{arch}-{h.hexdigest()[:16]}"
    checkpoint = CACHE / f"family-{key}" / f"{arch}_synthetic.pth"
    out = CACHE / f"family-{key}" / "models"
    if not checkpoint.is_file():
        write_synthetic_checkpoint(checkpoint, arch=arch)
    report = out / report_file(ARCHITECTURES[arch])
    if not (report.is_file() and json.loads(report.read_text()).get("passed")):
        shutil.rmtree(out, ignore_errors=True)
        convert_checkpoint(checkpoint, out, precisions, gpu_check="off", arch=arch)
    return out, checkpoint


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


def absent_gpu_env(directory: Path) -> dict:
    """The environment of a machine with a Vulkan loader and a driver file but no device behind it (a
    driver for absent hardware; Debian 12's own Mesa 22 lavapipe looks the same to Dawn: "No adapters
    found"): os.environ with VK_ICD_FILENAMES/VK_DRIVER_FILES at a driver file written in ``directory``
    for Mesa's radeon driver where it is installed (there is no AMD GPU here), else for a library that
    does not exist. For subprocesses: the Vulkan loader reads these once per process."""
    radeon = next((p for d in ("/usr/lib/x86_64-linux-gnu", "/usr/lib/aarch64-linux-gnu", "/usr/lib64", "/usr/lib")
                   if (p := Path(d) / "libvulkan_radeon.so").is_file()), None)
    icd = Path(directory) / "absent_gpu_icd.json"
    library = str(radeon) if radeon else str(Path(directory) / "libvulkan_absent_gpu.so")
    icd.write_text(json.dumps({"file_format_version": "1.0.0", "ICD": {"library_path": library, "api_version": "1.3.0"}}))
    return {**os.environ, "VK_ICD_FILENAMES": str(icd), "VK_DRIVER_FILES": str(icd)}


DRUMKITS = Path("/usr/share/hydrogen/data/drumkits")  # Debian hydrogen-drumkits (tools/os-deps.sh)
# instrument -> file-name pattern, for the kits whose samples are named by instrument
DRUM_CLASSES = {"kick": r"kick|bassdrum|(^|_)bd", "snare": r"snare|(^|_)sd_", "hihat": r"hat|(^|_)hh",
                "cymbal": r"crash|ride|cymbal"}
TRAIN_KITS = ("ForzeeStereo", "The Black Pearl 1.0", "Millo_MultiLayered2", "ElectricEmpireKit")
TEST_KITS = ("ColomboAcousticDrumkit", "Millo_MultiLayered3", "VariBreaks", "Millo-Drums_v.1")


def drum_files(kits: tuple[str, ...], per_class: int) -> dict[str, list[Path]]:
    """Up to ``per_class`` samples per instrument from each kit (sorted, spread over the kit's files)."""
    import re

    out: dict[str, list[Path]] = {c: [] for c in DRUM_CLASSES}
    for kit in kits:
        files = sorted(p for p in (DRUMKITS / kit).iterdir() if p.suffix.lower() in (".wav", ".flac"))
        for c, pattern in DRUM_CLASSES.items():
            found = [p for p in files if re.search(pattern, p.stem, re.I)
                     and not any(re.search(q, p.stem, re.I) for k, q in DRUM_CLASSES.items() if k != c)]
            step = max(1, len(found) // per_class)
            out[c].extend(found[::step][:per_class])
    return out


def drum_logmels(n: int = 12) -> dict[str, np.ndarray]:
    """Real recordings as model inputs: ``n`` drum hits of the test kits (instruments in turn), each
    decoded at 32 kHz (soundtag.audio), zero-padded to one window, as host log-mels [1, 1, 1001, 64];
    {} without hydrogen-drumkits."""
    from soundtag import features
    from soundtag.audio import load_audio
    from soundtag.spec import CNN14

    if not DRUMKITS.is_dir():
        return {}
    files = drum_files(TEST_KITS, max(1, -(-n // (len(DRUM_CLASSES) * len(TEST_KITS)))))
    picked = [p for group in itertools.zip_longest(*files.values()) for p in group if p is not None][:n]
    out = {}
    for p in picked:
        wave, _, _ = load_audio(p, sample_rate=CNN14.sample_rate)
        wave = np.pad(wave[: CNN14.window_samples], (0, max(0, CNN14.window_samples - wave.size)))
        out[f"drum:{p.parent.name}/{p.stem}"] = features.logmel(wave).reshape(CNN14.input_shape)
    return out


def drum_dataset(root: Path, kits: tuple[str, ...], per_class: int) -> Path:
    """A class-folder dataset of symlinks to real drum samples: root/<instrument>/<kit>__<file>."""
    for c, files in drum_files(kits, per_class).items():
        (root / c).mkdir(parents=True, exist_ok=True)
        for p in files:
            link = root / c / f"{p.parent.name.replace(' ', '_')}__{p.name}"
            if not link.exists():
                link.symlink_to(p)
    return root
