"""The PANNs ResNet38 body, state_dict-compatible with upstream.

Follows upstream ``ResNet38`` (qiuqiangkong/audioset_tagging_cnn, pytorch/models.py) in eval mode after
the spectral front end: bn0 over the mel bins, conv_block1 (CNN14's block, 2x2 average pooling), a ResNet
of basic blocks [3, 4, 6, 3] at widths 64-512, 2x2 average pooling, conv_block_after1 (512 -> 2048, no
pooling), mean over mel, max + mean over time, fc1 + ReLU (the 2048-d embedding), fc_audioset + sigmoid.
Upstream's basic block downsamples by 2x2 average pooling before a stride-1 conv1, and its shortcut by
``AvgPool2d(2)`` + 1x1 conv + BN (keys ``downsample.1`` / ``downsample.2``). No dropout (training only).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .cnn14 import MEL_BINS, NUM_CLASSES, ConvBlock
from .cnns import LogmelBody

STEM_CHANNELS = 64  # conv_block1's width
STEM_POOL = 2  # average pooling after conv_block1, and again after the ResNet
LAYER_WIDTHS = (64, 128, 256, 512)  # resnet.layer1..4
LAYER_BLOCKS = (3, 4, 6, 3)  # basic blocks per layer (ResNet38)
LAYER_STRIDES = (1, 2, 2, 2)  # first block's downsampling per layer
EMBEDDING_DIM = 2048


class BasicBlock(nn.Module):
    """Upstream ``_ResnetBasicBlock``: [pool], conv3x3-BN-ReLU, conv3x3-BN, + shortcut, ReLU."""

    def __init__(self, inplanes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.stride = stride
        self.conv1 = nn.Conv2d(inplanes, planes, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = None
        if stride == 2:
            pool = nn.AvgPool2d(2)
            self.downsample = nn.Sequential(pool, nn.Conv2d(inplanes, planes, 1, bias=False), nn.BatchNorm2d(planes))
        elif inplanes != planes:
            self.downsample = nn.Sequential(nn.Conv2d(inplanes, planes, 1, bias=False), nn.BatchNorm2d(planes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.avg_pool2d(x, 2) if self.stride == 2 else x
        out = F.relu(self.bn1(self.conv1(out)))
        out = self.bn2(self.conv2(out))
        identity = self.downsample(x) if self.downsample is not None else x
        return F.relu(out + identity)


class ResNet(nn.Module):
    """Upstream ``_ResNet`` with basic blocks (keys ``layer1`` .. ``layer4``)."""

    def __init__(self, blocks: tuple[int, ...] = LAYER_BLOCKS) -> None:
        super().__init__()
        inplanes = STEM_CHANNELS
        for i, (planes, n, stride) in enumerate(zip(LAYER_WIDTHS, blocks, LAYER_STRIDES)):
            layer = [BasicBlock(inplanes, planes, stride)] + [BasicBlock(planes, planes) for _ in range(n - 1)]
            setattr(self, f"layer{i + 1}", nn.Sequential(*layer))
            inplanes = planes

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for i in range(len(LAYER_WIDTHS)):
            x = getattr(self, f"layer{i + 1}")(x)
        return x


class ResNet38Body(LogmelBody):
    """Upstream ``ResNet38`` without its front end (eval-mode inference only)."""

    EMBEDDING_DIM = EMBEDDING_DIM

    def __init__(self, num_classes: int = NUM_CLASSES) -> None:
        super().__init__()
        self.bn0 = nn.BatchNorm2d(MEL_BINS)
        self.conv_block1 = ConvBlock(1, STEM_CHANNELS)
        self.resnet = ResNet(LAYER_BLOCKS)
        self.conv_block_after1 = ConvBlock(LAYER_WIDTHS[-1], EMBEDDING_DIM)
        self.fc1 = nn.Linear(EMBEDDING_DIM, EMBEDDING_DIM)
        self.fc_audioset = nn.Linear(EMBEDDING_DIM, num_classes)
        self.eval()

    def trunk(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv_block1(x, STEM_POOL)
        x = F.avg_pool2d(self.resnet(x), STEM_POOL)
        return self.conv_block_after1(x, 1)


BODIES = {"ResNet38": ResNet38Body}
