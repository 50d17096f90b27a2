"""The PANNs AudioSet family as data: each architecture's body, front end, export layout and files.

An architecture is recognised from a checkpoint (``detect``): by its body's tensor names and shapes,
then by its front-end tensors (the STFT size and the mel matrix, which tell Cnn14 from Cnn14_16k and
Cnn14_8k), then by the upstream file name (``Cnn14_16k_mAP=0.438.pth``); where that still leaves a
choice, ``--arch`` is required. A new architecture is a module with its body and an entry here.

Front ends from upstream's README and scripts (qiuqiangkong/audioset_tagging_cnn; its #16 #18 are
the 16 kHz model's STFT size, #54 the 8 kHz parameters).
"""

from __future__ import annotations

import importlib
import logging
import re
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch

from ..errors import SoundtagError
from ..spec import CNN14_FRONT_END, FrontEnd, ModelSpec

log = logging.getLogger(__name__)

FRONT_END_PREFIXES = ("spectrogram_extractor.", "logmel_extractor.")  # keys the body does not take
STFT_KEY = "spectrogram_extractor.stft.conv_real.weight"  # [n_freqs, 1, n_fft]
MEL_KEY = "logmel_extractor.melW"  # [n_freqs, n_mels]
MEL_MATCH_ATOL = 1e-6  # a checkpoint's mel matrix vs a front end's slaney basis (float32 storage)
FRONT_END_16K = FrontEnd(16_000, 512, 160, 64, 50.0, 8_000.0)
FRONT_END_8K = FrontEnd(8_000, 256, 80, 64, 50.0, 4_000.0)


class CheckpointError(SoundtagError, ValueError):
    """The file is not a checkpoint of an architecture soundtag converts."""


@dataclass(frozen=True)
class Architecture:
    name: str  # upstream's class name (and the file name's prefix)
    body: str  # "module:Class" under soundtag.convert, imported when used
    front_end: FrontEnd
    published_map: float  # mAP on AudioSet eval, upstream README
    layout: str = "cnn14"  # "cnn14": folded BatchNorm and the Winograd/GPU layouts of export.py; "plain": the module
    upstream_file: str | None = None  # the checkpoint's name on Zenodo 3987831
    # what `convert` writes unless told: MobileNets' fp16/int8 miss the gates on synthetic weights
    # (fp16 corr 0.99990 at a 0.9999 gate, int8 0.987 at 0.998), so only fp32 is their default
    precisions: tuple[str, ...] = ("fp32", "fp16")
    upstream_md5: str | None = None  # the upstream checkpoint's, where it decides between equal keys (fetch.py pins it too)

    def body_class(self):
        module, cls = self.body.split(":")
        return getattr(importlib.import_module(f"soundtag.convert.{module}"), cls)

    @property
    def inputs(self) -> tuple[str, ...]:
        return tuple(getattr(self.body_class(), "INPUTS", ("logmel",)))

    @property
    def embedding_size(self) -> int | None:
        """The clip embedding's size; None for the DecisionLevel (SED) models, which have none."""
        dim = self.body_class().EMBEDDING_DIM
        return None if dim is None else int(dim)

    @property
    def frames_per_segment(self) -> int | None:
        """Log-mel frames per segmentwise step of a sound event detection model; None for a clip model."""
        return getattr(self.body_class(), "FRAMES_PER_SEGMENT", None)

    def file(self, precision: str, waveform: bool = False) -> str:
        """`cnn14_audioset_fp32.tflite`, `cnn14_16k_audioset_fp16.tflite`, ..._waveform_... for waveform-in models."""
        return f"{self.name.lower()}_audioset_{'waveform_' if waveform else ''}{precision}.tflite"

    def spec(self, precision: str, md5: str | None, waveform: bool, embedding: bool) -> ModelSpec:
        window = ModelSpec().window_s * self.front_end.sample_rate
        return ModelSpec(architecture=self.name, front_end=self.front_end,
                         input="waveform" if waveform or self.inputs != ("logmel",) else "logmel",
                         window_samples=int(round(window)), embedding_size=self.embedding_size if embedding else None,
                         checkpoint_md5=md5, precision=precision, frames_per_segment=self.frames_per_segment)

    def body_signature(self) -> dict[str, tuple[int, ...]]:
        return _signature(self.body)


ARCHITECTURES = {a.name: a for a in (
    Architecture("Cnn14", "cnn14:Cnn14Body", CNN14_FRONT_END, 0.431, upstream_file="Cnn14_mAP=0.431.pth"),
    Architecture("Cnn14_16k", "cnn14:Cnn14Body", FRONT_END_16K, 0.438, upstream_file="Cnn14_16k_mAP=0.438.pth"),
    Architecture("Cnn14_8k", "cnn14:Cnn14Body", FRONT_END_8K, 0.416, upstream_file="Cnn14_8k_mAP=0.416.pth"),
    # the sound event detection models: Cnn14's keys (Max) or Cnn14's with an AttBlock for fc_audioset (Att)
    Architecture("Cnn14_DecisionLevelMax", "cnn14:Cnn14DecisionLevelMaxBody", CNN14_FRONT_END, 0.385,
                 upstream_file="Cnn14_DecisionLevelMax_mAP=0.385.pth", upstream_md5="70539c43c18b6a289b3199c503a82c5a"),
    Architecture("Cnn14_DecisionLevelAtt", "cnn14:Cnn14DecisionLevelAttBody", CNN14_FRONT_END, 0.425,
                 upstream_file="Cnn14_DecisionLevelAtt_mAP=0.425.pth"),
    Architecture("Cnn10", "cnns:Cnn10Body", CNN14_FRONT_END, 0.380, "plain", "Cnn10_mAP=0.380.pth"),
    Architecture("Cnn6", "cnns:Cnn6Body", CNN14_FRONT_END, 0.343, "plain", "Cnn6_mAP=0.343.pth"),
    Architecture("MobileNetV1", "mobilenet:MobileNetV1Body", CNN14_FRONT_END, 0.389, "plain", "MobileNetV1_mAP=0.389.pth",
                 ("fp32",)),
    Architecture("MobileNetV2", "mobilenet:MobileNetV2Body", CNN14_FRONT_END, 0.383, "plain", "MobileNetV2_mAP=0.383.pth",
                 ("fp32",)),
    Architecture("ResNet38", "resnet:ResNet38Body", CNN14_FRONT_END, 0.434, "plain", "ResNet38_mAP=0.434.pth"),
    Architecture("Wavegram_Logmel_Cnn14", "wavegram:WavegramLogmelCnn14Body", CNN14_FRONT_END, 0.439, "plain",
                 "Wavegram_Logmel_Cnn14_mAP=0.439.pth"),
)}


def available() -> list[Architecture]:
    """The architectures whose body module is installed (all, once every module has landed)."""
    out = []
    for a in ARCHITECTURES.values():
        try:
            a.body_class()
        except (ImportError, AttributeError):
            continue
        out.append(a)
    return out


@lru_cache(maxsize=None)
def _signature(body: str) -> dict[str, tuple[int, ...]]:
    """{key: shape} of a body's state_dict, built on the meta device (no memory, no time)."""
    module, cls = body.split(":")
    with torch.device("meta"):
        b = getattr(importlib.import_module(f"soundtag.convert.{module}"), cls)()
    return {k: tuple(v.shape) for k, v in b.state_dict().items()}


def read_checkpoint(path: str | Path) -> dict[str, torch.Tensor]:
    """The state_dict of an upstream checkpoint ({"model": sd, ...} or a bare state_dict), loaded with
    ``weights_only=True``. The 16 kHz checkpoint also holds its training sampler's state (numpy
    arrays and a RandomState): those numpy types are allowed as data, nothing else."""
    path = Path(path)
    try:
        with torch.serialization.safe_globals(_numpy_globals()):
            checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise
    except Exception as exc:  # torch raises many types for a non-checkpoint file
        raise CheckpointError(f"{path}: not a PyTorch checkpoint ({type(exc).__name__}: {' '.join(str(exc).split())[:300]})") from None
    sd = checkpoint.get("model", checkpoint) if isinstance(checkpoint, dict) else None
    if not isinstance(sd, dict) or not sd or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise CheckpointError(f"{path}: not a state_dict (expected {{'model': state_dict}} or a bare state_dict)")
    return sd


def _numpy_globals() -> list:
    """numpy's array reconstruction and dtypes, which a pickled numpy array or RandomState names."""
    out = [np.ndarray, np.dtype, np.random.RandomState, np.random.mtrand._rand.__class__]
    for name in ("_reconstruct", "scalar"):
        for mod in ("numpy.core.multiarray", "numpy._core.multiarray"):
            try:
                out.append(getattr(importlib.import_module(mod), name))
            except (ImportError, AttributeError):
                pass
    out += [type(np.dtype(t)) for t in ("float32", "float64", "int64", "int32", "uint32", "bool", "uint8")]
    try:
        from numpy.random import _pickle

        out += [_pickle.__randomstate_ctor]
    except (ImportError, AttributeError):
        pass
    return out


def body_state(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v for k, v in sd.items() if not k.startswith(FRONT_END_PREFIXES)}


def detect(sd: dict[str, torch.Tensor], path: str | Path, arch: str | None = None, md5: str | None = None) -> Architecture:
    """The architecture of a checkpoint's state_dict (see the module docstring); where several fit,
    the file's ``md5`` (an upstream checkpoint's), then its name decide, then the one clip model among
    them (Cnn14 over Cnn14_DecisionLevelMax, with a warning). CheckpointError (one line) when none
    fits, or when several still do and ``arch`` does not say."""
    path = Path(path)
    body = {k: tuple(v.shape) for k, v in body_state(sd).items()}
    if arch is not None:
        named = {a.name.lower(): a for a in ARCHITECTURES.values()}.get(arch.lower())
        if named is None:
            raise CheckpointError(f"unknown architecture {arch!r}; choose from {', '.join(ARCHITECTURES)}")
        _check_keys(named, body, path)
        return named
    fits = [a for a in available() if a.body_signature() == body]
    if not fits:
        best = min(available(), key=lambda a: len(set(a.body_signature()) ^ set(body)))
        _check_keys(best, body, path)  # raises, naming what differs from the closest architecture
    front = _front_end_of(sd)
    if front is not None and len(fits) > 1:
        fits = [a for a in fits if front(a.front_end)] or fits
    if len(fits) > 1 and md5 is not None:
        by_md5 = [a for a in fits if a.upstream_md5 == md5]
        if by_md5:
            return by_md5[0]
    if len(fits) > 1:
        stem = re.split(r"_mAP=", path.name, maxsplit=1)[0].lower()
        by_name = [a for a in fits if a.name.lower() == stem]
        if by_name:
            return by_name[0]
        clip = [a for a in fits if a.frames_per_segment is None]
        if len(clip) == 1 and "decisionlevel" not in path.name.lower():
            # Cnn14_DecisionLevelMax has Cnn14's very keys: a file that neither its name nor its md5 calls a
            # SED model is taken for the clip model, as before the SED models existed, and the log says so
            log.warning("%s: the weights fit %s; converting it as %s (name the file %s_mAP=... or give --arch "
                        "for another)", path, ", ".join(a.name for a in fits), clip[0].name,
                        next(a.name for a in fits if a is not clip[0]))
            return clip[0]
        raise CheckpointError(f"{path}: the weights fit {', '.join(a.name for a in fits)}, and the file name does "
                              f"not say which; give --arch ({' or '.join(a.name for a in fits)})")
    return fits[0]


def _front_end_of(sd: dict[str, torch.Tensor]):
    """A test of a FrontEnd against the checkpoint's own front-end tensors (None when it has none):
    the STFT kernel's size and the mel matrix's values."""
    if STFT_KEY not in sd or MEL_KEY not in sd:
        return None
    n_fft = int(sd[STFT_KEY].shape[-1])
    mel = sd[MEL_KEY].detach().float().numpy()

    def fits(fe: FrontEnd) -> bool:
        from ..features import mel_basis

        if fe.n_fft != n_fft or mel.shape != (fe.n_freqs, fe.n_mels):
            return False
        return bool(np.allclose(mel, mel_basis(fe).T, atol=MEL_MATCH_ATOL))

    return fits


def _check_keys(arch: Architecture, body: dict[str, tuple[int, ...]], path: Path) -> None:
    want = arch.body_signature()
    missing, unexpected = sorted(set(want) - set(body)), sorted(set(body) - set(want))
    if missing or unexpected:
        raise CheckpointError(f"{path}: not a {arch.name} checkpoint; missing keys {_short(missing)}, "
                              f"unexpected keys {_short(unexpected)}")
    wrong = [k for k in want if want[k] != body[k]]
    if wrong:
        raise CheckpointError(f"{path}: not a {arch.name} checkpoint; wrong shapes for {_short(wrong)}")


def load(path: str | Path, arch: str | None = None, md5: str | None = None) -> tuple[Architecture, torch.nn.Module]:
    """(architecture, its eval-mode body with the checkpoint's weights) for an upstream checkpoint
    (``md5``: the file's, when known, see detect)."""
    sd = read_checkpoint(path)
    a = detect(sd, path, arch, md5)
    body = a.body_class()()
    body.load_state_dict(body_state(sd), strict=True)
    return a, body.eval()


def _short(keys: list[str], n: int = 8) -> str:
    if not keys:
        return "[]"
    more = f" ... (+{len(keys) - n})" if len(keys) > n else ""
    return "[" + ", ".join(keys[:n]) + more + "]"
