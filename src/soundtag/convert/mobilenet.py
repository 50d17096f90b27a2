"""The PANNs MobileNetV1 and MobileNetV2 bodies, state_dict-compatible with upstream.

Follows upstream ``MobileNetV1`` / ``MobileNetV2`` (qiuqiangkong/audioset_tagging_cnn, pytorch/models.py)
in eval mode after the spectral front end: bn0 over the mel bins, the ``features`` stack, mean over mel,
max + mean over time, fc1 + ReLU (the 1024-d embedding), fc_audioset + sigmoid. Upstream downsamples with
a stride-1 conv followed by ``AvgPool2d(stride)`` (not a strided conv); a stride-1 layer's
``AvgPool2d(1)`` is an identity and is built here as ``nn.Identity`` (no parameters, same keys).
MobileNetV1 uses ReLU, MobileNetV2 ReLU6. No dropout (training only).
"""

from __future__ import annotations

from torch import nn

from .cnn14 import MEL_BINS, NUM_CLASSES
from .cnns import LogmelBody

KERNEL = 3  # every spatial (full or depthwise) conv is 3x3, padded to keep the size
V1_STEM = (1, 32, 2)  # (in, out, stride) of the first full conv
V1_DEPTHWISE = (  # (in, out, stride) of each depthwise-separable layer
    (32, 64, 1), (64, 128, 2), (128, 128, 1), (128, 256, 2), (256, 256, 1), (256, 512, 2),
    (512, 512, 1), (512, 512, 1), (512, 512, 1), (512, 512, 1), (512, 512, 1),
    (512, 1024, 2), (1024, 1024, 1),
)  # fmt: skip
V1_EMBEDDING_DIM = 1024
V2_STEM = (1, 32, 2)
V2_SETTING = (  # (expand ratio t, out channels c, repeats n, first stride s), upstream's width_mult 1
    (1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 2), (6, 160, 3, 1), (6, 320, 1, 1),
)  # fmt: skip
V2_LAST_CHANNELS = 1280  # the final 1x1 conv's width (fc1's input)
V2_EMBEDDING_DIM = 1024


def _pool(stride: int) -> nn.Module:
    return nn.AvgPool2d(stride) if stride > 1 else nn.Identity()


def _conv_bn(inp: int, oup: int, stride: int, act: type[nn.Module]) -> nn.Sequential:
    """Upstream ``conv_bn``: [conv3x3, pool, BN, act]."""
    return nn.Sequential(
        nn.Conv2d(inp, oup, KERNEL, 1, KERNEL // 2, bias=False), _pool(stride), nn.BatchNorm2d(oup), act()
    )


def _depthwise_pointwise(channels: int, oup: int, stride: int, act: type[nn.Module], last_act: bool) -> list[nn.Module]:
    """[depthwise 3x3, pool, BN, act, pointwise 1x1, BN(, act)]: both MobileNets' separable convolution."""
    return [
        nn.Conv2d(channels, channels, KERNEL, 1, KERNEL // 2, groups=channels, bias=False),
        _pool(stride),
        nn.BatchNorm2d(channels),
        act(),
        nn.Conv2d(channels, oup, 1, 1, 0, bias=False),
        nn.BatchNorm2d(oup),
    ] + ([act()] if last_act else [])


def _conv_dw(inp: int, oup: int, stride: int) -> nn.Sequential:
    """Upstream MobileNetV1 ``conv_dw``: [depthwise 3x3, pool, BN, ReLU, pointwise 1x1, BN, ReLU]."""
    return nn.Sequential(*_depthwise_pointwise(inp, oup, stride, nn.ReLU, last_act=True))


class InvertedResidual(nn.Module):
    """Upstream ``InvertedResidual`` (key ``conv.N``); the residual when stride 1 and in == out."""

    def __init__(self, inp: int, oup: int, stride: int, expand_ratio: int) -> None:
        super().__init__()
        hidden = round(inp * expand_ratio)
        self.use_res_connect = stride == 1 and inp == oup
        depthwise = _depthwise_pointwise(hidden, oup, stride, nn.ReLU6, last_act=False)
        expand = []  # the 1x1 expansion, absent when expand_ratio is 1
        if expand_ratio != 1:
            expand = [nn.Conv2d(inp, hidden, 1, 1, 0, bias=False), nn.BatchNorm2d(hidden), nn.ReLU6()]
        self.conv = nn.Sequential(*expand, *depthwise)

    def forward(self, x):
        return x + self.conv(x) if self.use_res_connect else self.conv(x)


class MobileNetV1Body(LogmelBody):
    """Upstream ``MobileNetV1`` without its front end (eval-mode inference only)."""

    EMBEDDING_DIM = V1_EMBEDDING_DIM

    def __init__(self, num_classes: int = NUM_CLASSES) -> None:
        super().__init__()
        self.bn0 = nn.BatchNorm2d(MEL_BINS)
        self.features = nn.Sequential(_conv_bn(*V1_STEM, nn.ReLU), *(_conv_dw(*layer) for layer in V1_DEPTHWISE))
        self.fc1 = nn.Linear(V1_DEPTHWISE[-1][1], V1_EMBEDDING_DIM)
        self.fc_audioset = nn.Linear(V1_EMBEDDING_DIM, num_classes)
        self.eval()

    def trunk(self, x):
        return self.features(x)


class MobileNetV2Body(LogmelBody):
    """Upstream ``MobileNetV2`` without its front end (eval-mode inference only)."""

    EMBEDDING_DIM = V2_EMBEDDING_DIM

    def __init__(self, num_classes: int = NUM_CLASSES) -> None:
        super().__init__()
        self.bn0 = nn.BatchNorm2d(MEL_BINS)
        layers: list[nn.Module] = [_conv_bn(*V2_STEM, nn.ReLU6)]
        channels = V2_STEM[1]
        for t, c, n, s in V2_SETTING:
            for i in range(n):
                layers.append(InvertedResidual(channels, c, s if i == 0 else 1, expand_ratio=t))
                channels = c
        last = V2_LAST_CHANNELS  # upstream conv_1x1_bn
        layers.append(nn.Sequential(nn.Conv2d(channels, last, 1, 1, 0, bias=False), nn.BatchNorm2d(last), nn.ReLU6()))
        self.features = nn.Sequential(*layers)
        self.fc1 = nn.Linear(V2_LAST_CHANNELS, V2_EMBEDDING_DIM)
        self.fc_audioset = nn.Linear(V2_EMBEDDING_DIM, num_classes)
        self.eval()

    def trunk(self, x):
        return self.features(x)


BODIES = {"MobileNetV1": MobileNetV1Body, "MobileNetV2": MobileNetV2Body}
