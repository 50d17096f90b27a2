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

from .family import FRONT_END_PREFIXES, CheckpointError  # noqa: F401 (re-exported: the errors of load_body)

NUM_CLASSES = 527  # AudioSet
MEL_BINS = 64
CHANNELS = (1, 64, 128, 256, 512, 1024, 2048)  # conv block widths, input first
EMBEDDING_DIM = 2048


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
    EMBEDDING_DIM = EMBEDDING_DIM
    INPUTS = ("logmel",)

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

    def classify(self, emb: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.fc_audioset(emb))

    def forward(self, logmel: torch.Tensor) -> torch.Tensor:
        return self.classify(self.embed(logmel))


def load_body(path: str | Path) -> Cnn14Body:
    """Load an upstream-format CNN14 checkpoint (any of the Cnn14 front ends: the body is the same;
    weights only, strict key check): family.load with the architecture fixed."""
    from .family import load

    return load(path, "Cnn14")[1]
