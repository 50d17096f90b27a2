"""The PANNs CNN6 and CNN10 bodies, and the log-mel body that every PANNs body here shares.

Follows upstream ``Cnn6`` / ``Cnn10`` (qiuqiangkong/audioset_tagging_cnn, pytorch/models.py) in eval mode
after the spectral front end: bn0 over the mel bins, four conv blocks with 2x2 average pooling after each,
mean over mel, max + mean over time, fc1 + ReLU (the 512-d embedding), fc_audioset + sigmoid.
CNN6's block is one 5x5 conv + BN (upstream ``ConvBlock5x5``); CNN10's is CNN14's two 3x3 convs + BNs.
No dropout, SpecAugment or mixup (training only). State_dict keys and shapes equal upstream's, minus
the front end's (``spectrogram_extractor.*``, ``logmel_extractor.*``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .cnn14 import MEL_BINS, NUM_CLASSES, ConvBlock

CNN_CHANNELS = (1, 64, 128, 256, 512)  # CNN6 / CNN10 conv block widths, input first
CNN_POOL = 2  # average-pool size after every CNN6 / CNN10 block (both axes)
CNN_EMBEDDING_DIM = 512
CONV5_KERNEL = 5  # ConvBlock5x5's kernel, padded to keep the size


def bn_over_mel(bn0: nn.BatchNorm2d, logmel: torch.Tensor) -> torch.Tensor:
    """Upstream's bn0: BatchNorm2d over the mel axis of [B, 1, T, mel] (via transpose)."""
    return bn0(logmel.transpose(1, 3)).transpose(1, 3)


def clip_pool(x: torch.Tensor) -> torch.Tensor:
    """Upstream's clip pooling of [B, C, T, F]: mean over freq, then max + mean over time -> [B, C]."""
    x = x.mean(dim=3)
    return x.max(dim=2).values + x.mean(dim=2)


class LogmelBody(nn.Module):
    """Shared tail of the log-mel PANNs bodies: bn0, a trunk, clip pooling, fc1 + ReLU, fc_audioset.

    A subclass builds ``bn0``, its layers, ``fc1`` and ``fc_audioset`` and defines ``trunk``.
    """

    EMBEDDING_DIM: int
    INPUTS: tuple[str, ...] = ("logmel",)

    def trunk(self, x: torch.Tensor) -> torch.Tensor:  # [B, 1, T, mel] after bn0 -> [B, C, T', F']
        raise NotImplementedError

    def embed(self, logmel: torch.Tensor) -> torch.Tensor:
        """Log-mel [B, 1, T, 64] -> embedding [B, EMBEDDING_DIM] (fc1 + ReLU)."""
        x = self.trunk(bn_over_mel(self.bn0, logmel))
        return F.relu(self.fc1(clip_pool(x)))

    def classify(self, embedding: torch.Tensor) -> torch.Tensor:
        """Embedding -> sigmoid probabilities [B, num_classes]."""
        return torch.sigmoid(self.fc_audioset(embedding))

    def forward(self, *inputs: torch.Tensor) -> torch.Tensor:
        return self.classify(self.embed(*inputs))


class ConvBlock5x5(nn.Module):
    """Upstream ``ConvBlock5x5``: 5x5 conv (no bias) + BN + ReLU, then average pooling."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, CONV5_KERNEL, padding=CONV5_KERNEL // 2, bias=False)
        self.bn1 = nn.BatchNorm2d(out_channels)

    def forward(self, x: torch.Tensor, pool: int) -> torch.Tensor:
        x = F.relu(self.bn1(self.conv1(x)))
        return F.avg_pool2d(x, pool) if pool > 1 else x


class _FourBlockCnn(LogmelBody):
    """CNN6 / CNN10: four conv blocks of ``BLOCK`` with 2x2 average pooling after each."""

    BLOCK: type[nn.Module]
    EMBEDDING_DIM = CNN_EMBEDDING_DIM

    def __init__(self, num_classes: int = NUM_CLASSES) -> None:
        super().__init__()
        self.bn0 = nn.BatchNorm2d(MEL_BINS)
        for i in range(len(CNN_CHANNELS) - 1):
            setattr(self, f"conv_block{i + 1}", self.BLOCK(CNN_CHANNELS[i], CNN_CHANNELS[i + 1]))
        self.fc1 = nn.Linear(CNN_EMBEDDING_DIM, CNN_EMBEDDING_DIM)
        self.fc_audioset = nn.Linear(CNN_EMBEDDING_DIM, num_classes)
        self.eval()

    def trunk(self, x: torch.Tensor) -> torch.Tensor:
        for i in range(len(CNN_CHANNELS) - 1):
            x = getattr(self, f"conv_block{i + 1}")(x, CNN_POOL)
        return x


class Cnn6Body(_FourBlockCnn):
    """Upstream ``Cnn6`` without its front end: four ConvBlock5x5 (eval-mode inference only)."""

    BLOCK = ConvBlock5x5


class Cnn10Body(_FourBlockCnn):
    """Upstream ``Cnn10`` without its front end: four CNN14 ConvBlocks (eval-mode inference only)."""

    BLOCK = ConvBlock


BODIES = {"Cnn6": Cnn6Body, "Cnn10": Cnn10Body}
