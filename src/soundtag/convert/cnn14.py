"""The PANNs CNN14 body in PyTorch, state_dict-compatible with the upstream checkpoint.

Input: log-mel [B, 1, frames, 64] (the host front end's output). Output: sigmoid probabilities
[B, 527]. Same computation as upstream ``Cnn14.forward`` in eval mode after its front end:
bn0 over the mel bins, six conv blocks (2x2 average pooling after blocks 1-5, none after 6),
mean over mel, max + mean over time, fc1 + ReLU (the 2048-d embedding), fc_audioset + sigmoid.
No extra smoothing over time (that belongs to the DecisionLevel variants below).

The DecisionLevel variants (upstream ``Cnn14_DecisionLevelMax`` / ``_Att``, the PANNs sound event
detection models) share the conv blocks and fc1 and end in a decision per time step: mean over mel,
max_pool1d + avg_pool1d (kernel 3, stride 1, padding 1, the average counting the padding) over time,
fc1 + ReLU per step, then sigmoid(fc_audioset) per step with the clip score their max over time (Max),
or AttBlock's sigmoid classifier per step weighted by a softmax attention over time (Att). Their
outputs: clipwise [B, 527] and segmentwise [B, frames // 32, 527]; upstream's framewise output is each
step repeated 32 times and padded with the last to the input's frames (``soundtag.sed.framewise``).
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

    FRAMES_PER_SEGMENT: int | None = None  # DecisionLevel variants: log-mel frames per segmentwise step

    def features(self, logmel: torch.Tensor) -> torch.Tensor:
        """bn0 and the six conv blocks: [B, 2048, frames // 32, mels // 32]."""
        x = self.bn0(logmel.transpose(1, 3)).transpose(1, 3)  # BN over the mel axis
        for block, pool in zip(self.blocks(), self.POOLS):
            x = block(x, pool)
        return x

    def embed(self, logmel: torch.Tensor) -> torch.Tensor:
        x = self.features(logmel).mean(dim=3)  # over mel
        x = x.max(dim=2).values + x.mean(dim=2)  # over time
        return F.relu(self.fc1(x))

    def classify(self, emb: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.fc_audioset(emb))

    def forward(self, logmel: torch.Tensor) -> torch.Tensor:
        return self.classify(self.embed(logmel))


class AttBlock(nn.Module):
    """Upstream's AttBlock with activation="sigmoid" (its bn_att is in the checkpoint, unused by forward)."""

    def __init__(self, n_in: int, n_out: int) -> None:
        super().__init__()
        self.att = nn.Conv1d(n_in, n_out, 1)
        self.cla = nn.Conv1d(n_in, n_out, 1)
        self.bn_att = nn.BatchNorm1d(n_out)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x [B, n_in, steps] -> (clipwise [B, n_out], segmentwise [B, n_out, steps])."""
        att = torch.softmax(torch.clamp(self.att(x), -10.0, 10.0), dim=-1)
        cla = torch.sigmoid(self.cla(x))
        return torch.sum(att * cla, dim=2), cla


def time_pools(x: torch.Tensor) -> torch.Tensor:
    """Upstream's max_pool1d + avg_pool1d (kernel 3, stride 1, padding 1) over the last axis, as upstream."""
    return F.max_pool1d(x, kernel_size=3, stride=1, padding=1) + F.avg_pool1d(x, kernel_size=3, stride=1, padding=1)


def shifted_time_pools(x: torch.Tensor) -> torch.Tensor:
    """time_pools without pooling ops, for export: each step's neighbours as shifted copies. The max of
    a padded edge is the max of what is there (an edge copy changes nothing); the average counts the
    zero padding, as avg_pool1d's count_include_pad. LiteRT's GPU runs the pooled form differently
    from its CPU (lavapipe: corr 0.997 on the probe), this one alike."""
    prev_edge = torch.cat([x[..., :1], x[..., :-1]], dim=-1)
    next_edge = torch.cat([x[..., 1:], x[..., -1:]], dim=-1)
    zero = torch.zeros_like(x[..., :1])
    prev_zero = torch.cat([zero, x[..., :-1]], dim=-1)
    next_zero = torch.cat([x[..., 1:], zero], dim=-1)
    return torch.maximum(torch.maximum(prev_edge, x), next_edge) + (prev_zero + x + next_zero) * (1.0 / 3.0)


def decision_level(x: torch.Tensor, fc1: nn.Linear, head: nn.Module, pools=time_pools) -> tuple[torch.Tensor, torch.Tensor]:
    """The DecisionLevel tail on the conv blocks' output x [B, C, steps, F]: (clipwise [B, classes],
    segmentwise [B, steps, classes]). ``head``: fc_audioset (max over steps) or an AttBlock."""
    x = pools(x.mean(dim=3))
    x = F.relu(fc1(x.transpose(1, 2)))  # [B, steps, 2048]
    if isinstance(head, AttBlock):
        clip, seg = head(x.transpose(1, 2))
        return clip, seg.transpose(1, 2)
    seg = torch.sigmoid(head(x))
    return seg.amax(dim=1), seg


class Cnn14DecisionLevelMaxBody(Cnn14Body):
    """Upstream Cnn14_DecisionLevelMax without its front end: (clipwise, segmentwise) per log-mel."""

    FRAMES_PER_SEGMENT = 32  # upstream's interpolate_ratio: five 2x poolings over time
    EMBEDDING_DIM = None  # no clip embedding: fc1 runs per time step

    def head(self) -> nn.Module:
        return self.fc_audioset

    def decide(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return decision_level(x, self.fc1, self.head())

    def forward(self, logmel: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.decide(self.features(logmel))


class Cnn14DecisionLevelAttBody(Cnn14DecisionLevelMaxBody):
    """Upstream Cnn14_DecisionLevelAtt without its front end (attention pooling over time)."""

    def __init__(self, num_classes: int = NUM_CLASSES) -> None:
        super().__init__(num_classes)
        del self.fc_audioset
        self.att_block = AttBlock(EMBEDDING_DIM, num_classes)
        self.eval()

    def head(self) -> nn.Module:
        return self.att_block


def load_body(path: str | Path) -> Cnn14Body:
    """Load an upstream-format CNN14 checkpoint (any of the Cnn14 front ends: the body is the same;
    weights only, strict key check): family.load with the architecture fixed."""
    from .family import load

    return load(path, "Cnn14")[1]
