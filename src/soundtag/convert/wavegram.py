"""The PANNs Wavegram-Logmel-CNN14 body, state_dict-compatible with upstream.

Follows upstream ``Wavegram_Logmel_Cnn14`` (qiuqiangkong/audioset_tagging_cnn, pytorch/models.py) in eval
mode. Two inputs: the waveform [B, N] feeds the learned wavegram branch (pre_conv0: 1-D conv, stride 5;
pre_block1-3: two 1-D convs, the second dilated, + max pooling by 4; the 128 channels regrouped as 4
channels x 32 "frequency" bins; pre_block4: CNN14's block with (2, 1) average pooling); the host log-mel
[B, 1, T, 64] feeds bn0 over the mel bins and conv_block1 (2x2 average pooling). The two are concatenated
on the channel axis (64 + 64) before conv_block2, then CNN14's blocks 2-6, mean over freq, max + mean
over time, fc1 + ReLU (the 2048-d embedding), fc_audioset + sigmoid. No dropout, SpecAugment or mixup.

Time axes: upstream does not truncate; they meet because N = 320 000 gives 320 000 / 5 / 4^3 = 1000
wavegram frames, (2, 1) pooling -> 500, and T = 1001 log-mel frames give floor(1001 / 2) = 500 in
conv_block1's pooling (its last frame is dropped). Any (N, T) pair must meet the same way
(N a multiple of 640 and T = N / 320 + 1 does); ``embed`` refuses a pair that does not.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .cnn14 import CHANNELS, MEL_BINS, NUM_CLASSES, ConvBlock
from .cnns import LogmelBody, bn_over_mel, clip_pool

PRE_CHANNELS = (64, 64, 128, 128)  # pre_conv0's width, then pre_block1..3's
PRE_KERNEL, PRE_STRIDE, PRE_PADDING = 11, 5, 5  # pre_conv0 over samples (32 kHz -> 6.4 kHz)
PRE_DILATION = 2  # the second conv of each pre_block
PRE_POOL = 4  # max pooling after pre_block1..3 (6.4 kHz -> 100 frames per second)
WAVEGRAM_BINS = 32  # the wavegram's "frequency" bins: 128 channels = 4 channels x 32 bins
WAVEGRAM_POOL = (2, 1)  # average pooling after pre_block4 (time only)
LOGMEL_POOL = 2  # conv_block1's 2x2 average pooling
POOL = 2  # conv_block2..5's average pooling; block 6 has none
EMBEDDING_DIM = CHANNELS[-1]  # 2048


class ConvPreWavBlock(nn.Module):
    """Upstream ``ConvPreWavBlock``: 1-D conv3 + BN + ReLU, dilated 1-D conv3 + BN + ReLU, max pool."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv1d(in_channels, out_channels, 3, padding=1, bias=False)
        self.conv2 = nn.Conv1d(out_channels, out_channels, 3, padding=PRE_DILATION, dilation=PRE_DILATION, bias=False)
        self.bn1 = nn.BatchNorm1d(out_channels)
        self.bn2 = nn.BatchNorm1d(out_channels)

    def forward(self, x: torch.Tensor, pool: int) -> torch.Tensor:
        x = F.relu(self.bn1(self.conv1(x)))
        x = F.relu(self.bn2(self.conv2(x)))
        return F.max_pool1d(x, pool)


class WavegramLogmelCnn14Body(LogmelBody):
    """Upstream ``Wavegram_Logmel_Cnn14`` without its log-mel front end (eval-mode inference only)."""

    EMBEDDING_DIM = EMBEDDING_DIM
    INPUTS = ("waveform", "logmel")
    POOLS = (POOL, POOL, POOL, POOL, 1)  # after conv_block2..6

    def __init__(self, num_classes: int = NUM_CLASSES) -> None:
        super().__init__()
        self.pre_conv0 = nn.Conv1d(1, PRE_CHANNELS[0], PRE_KERNEL, stride=PRE_STRIDE, padding=PRE_PADDING, bias=False)
        self.pre_bn0 = nn.BatchNorm1d(PRE_CHANNELS[0])
        for i in range(3):
            setattr(self, f"pre_block{i + 1}", ConvPreWavBlock(PRE_CHANNELS[i], PRE_CHANNELS[i + 1]))
        self.pre_block4 = ConvBlock(PRE_CHANNELS[-1] // WAVEGRAM_BINS, CHANNELS[1])
        self.bn0 = nn.BatchNorm2d(MEL_BINS)
        self.conv_block1 = ConvBlock(CHANNELS[0], CHANNELS[1])
        self.conv_block2 = ConvBlock(2 * CHANNELS[1], CHANNELS[2])  # log-mel + wavegram channels
        for i in range(2, 6):
            setattr(self, f"conv_block{i + 1}", ConvBlock(CHANNELS[i], CHANNELS[i + 1]))
        self.fc1 = nn.Linear(EMBEDDING_DIM, EMBEDDING_DIM)
        self.fc_audioset = nn.Linear(EMBEDDING_DIM, num_classes)
        self.eval()

    def wavegram(self, waveform: torch.Tensor) -> torch.Tensor:
        """Waveform [B, N] -> [B, 64, N / 640, 32]."""
        a = F.relu(self.pre_bn0(self.pre_conv0(waveform[:, None, :])))
        for i in range(3):
            a = getattr(self, f"pre_block{i + 1}")(a, PRE_POOL)
        a = a.reshape(a.shape[0], -1, WAVEGRAM_BINS, a.shape[-1]).transpose(2, 3)  # [B, 4, frames, 32]
        return F.avg_pool2d(self.pre_block4(a, 1), WAVEGRAM_POOL)

    def embed(self, waveform: torch.Tensor, logmel: torch.Tensor) -> torch.Tensor:
        """Waveform [B, N] and its log-mel [B, 1, T, 64] -> embedding [B, 2048] (fc1 + ReLU)."""
        a = self.wavegram(waveform)
        x = self.conv_block1(bn_over_mel(self.bn0, logmel), LOGMEL_POOL)
        if a.shape[2:] != x.shape[2:]:
            raise ValueError(
                f"wavegram {tuple(a.shape[2:])} and log-mel {tuple(x.shape[2:])} (time, freq) do not meet: "
                f"waveform of {waveform.shape[-1]} samples, log-mel of {logmel.shape[2]} frames"
            )
        x = torch.cat((x, a), dim=1)
        for i, pool in enumerate(self.POOLS):
            x = getattr(self, f"conv_block{i + 2}")(x, pool)
        return F.relu(self.fc1(clip_pool(x)))


BODIES = {"Wavegram_Logmel_Cnn14": WavegramLogmelCnn14Body}
