"""The PANNs CNN14 body in PyTorch, state_dict-compatible with the upstream checkpoint.

Input: log-mel [B, 1, frames, 64] (the host front end's output). Output: sigmoid probabilities
[B, 527]. Same computation as upstream ``Cnn14.forward`` in eval mode after its front end:
bn0 over the mel bins, six conv blocks (2x2 average pooling after blocks 1-5, none after 6),
mean over mel, max + mean over time, fc1 + ReLU (the 2048-d embedding), fc_audioset + sigmoid.
No extra smoothing over time (that belongs to the DecisionLevel variants).
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import SoundtagError

NUM_CLASSES = 527
MEL_BINS = 64
CHANNELS = (1, 64, 128, 256, 512, 1024, 2048)  # conv block widths, input first
EMBEDDING_DIM = 2048
FRONT_END_PREFIXES = ("spectrogram_extractor.", "logmel_extractor.")  # keys the body does not take


class CheckpointError(SoundtagError, ValueError):
    """The file is not a CNN14 checkpoint this body can load."""


class ConvBlock(nn.Module):
    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.bn2 = nn.BatchNorm2d(out_channels)

    def forward(self, x: torch.Tensor, pool: int) -> torch.Tensor:
        x = F.relu(self.bn1(self.conv1(x)))
        x = F.relu(self.bn2(self.conv2(x)))
        return F.avg_pool2d(x, pool) if pool > 1 else x


class Cnn14Body(nn.Module):
    """CNN14 without its spectral front end (eval-mode inference only)."""

    POOLS = (2, 2, 2, 2, 2, 1)  # average-pool size after each conv block

    def __init__(self, num_classes: int = NUM_CLASSES) -> None:
        super().__init__()
        self.bn0 = nn.BatchNorm2d(MEL_BINS)
        for i in range(6):
            setattr(self, f"conv_block{i + 1}", ConvBlock(CHANNELS[i], CHANNELS[i + 1]))
        self.fc1 = nn.Linear(EMBEDDING_DIM, EMBEDDING_DIM)
        self.fc_audioset = nn.Linear(EMBEDDING_DIM, num_classes)
        self.eval()

    def blocks(self) -> list[ConvBlock]:
        return [getattr(self, f"conv_block{i + 1}") for i in range(6)]

    def embed(self, logmel: torch.Tensor) -> torch.Tensor:
        x = self.bn0(logmel.transpose(1, 3)).transpose(1, 3)  # BN over the mel axis
        for block, pool in zip(self.blocks(), self.POOLS):
            x = block(x, pool)
        x = x.mean(dim=3)  # over mel
        x = x.max(dim=2).values + x.mean(dim=2)  # over time
        return F.relu(self.fc1(x))

    def forward(self, logmel: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.fc_audioset(self.embed(logmel)))


def body_state_dict(checkpoint: object) -> dict[str, torch.Tensor]:
    """The body's tensors from an upstream checkpoint ({"model": sd} or a bare state_dict)."""
    sd = checkpoint.get("model", checkpoint) if isinstance(checkpoint, dict) else None
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise CheckpointError("not a state_dict (expected {'model': state_dict} or a bare state_dict)")
    return {k: v for k, v in sd.items() if not k.startswith(FRONT_END_PREFIXES)}


def load_body(path: str | Path) -> Cnn14Body:
    """Load an upstream-format CNN14 checkpoint (weights only, strict key check)."""
    path = Path(path)
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise
    except Exception as exc:  # torch raises many types for a non-checkpoint file
        raise CheckpointError(f"{path}: not a PyTorch checkpoint ({type(exc).__name__}: {exc})") from None
    try:
        sd = body_state_dict(checkpoint)
    except CheckpointError as exc:
        raise CheckpointError(f"{path}: {exc}") from None
    body = Cnn14Body()
    expected = set(body.state_dict())
    missing, unexpected = sorted(expected - set(sd)), sorted(set(sd) - expected)
    if missing or unexpected:
        raise CheckpointError(
            f"{path}: not a CNN14 checkpoint; missing keys {_short(missing)}, unexpected keys {_short(unexpected)}"
        )
    wrong = [k for k, v in body.state_dict().items() if sd[k].shape != v.shape]
    if wrong:
        raise CheckpointError(f"{path}: wrong shapes for {_short(wrong)}")
    body.load_state_dict(sd, strict=True)
    return body.eval()


def _short(keys: list[str], n: int = 8) -> str:
    if not keys:
        return "[]"
    more = f" ... (+{len(keys) - n})" if len(keys) > n else ""
    return "[" + ", ".join(keys[:n]) + more + "]"
