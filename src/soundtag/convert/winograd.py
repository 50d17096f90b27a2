"""3x3 convolution as Winograd F(2x2, 3x3), written in ops the LiteRT converter and runtime know.

XNNPACK runs CNN14's 3x3 convolutions as direct GEMMs; for the deep blocks (many channels, few
pixels) the Winograd form does 2.25x fewer multiply-adds: per 4x4 input tile ``V = B^T d B``
(a depthwise 4x4 stride-2 convolution), 16 GEMMs ``M = V U`` with ``U = G g G^T`` precomputed
(one BATCH_MATMUL), then ``Y = A^T M A`` (adds and subtracts) and a 2x2 pixel shuffle. Every op is
in the GPU delegate's list and no tensor exceeds rank 4. The transforms are memory-bound, so this
only pays where channels are many (measured per layer in bench/profile_blocks.py); the weights grow
16/9x. Float32 rounding differs from the direct convolution by ~3e-6 relative per layer; the
converter's parity gate still applies to the whole model.

Reference: Lavin & Gray, "Fast Algorithms for Convolutional Neural Networks" (2016).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

# F(2x2, 3x3) transforms (Lavin & Gray 2016)
_BT = torch.tensor([[1, 0, -1, 0], [0, 1, 1, 0], [0, -1, 1, 0], [0, 1, 0, -1]], dtype=torch.float64)
_G = torch.tensor([[1, 0, 0], [0.5, 0.5, 0.5], [0.5, -0.5, 0.5], [0, 0, 1]], dtype=torch.float64)


class WinogradConv3x3:
    """relu(conv2d(x, w, b, padding=1)) for a fixed input size [1, Cin, H, W].

    ``group`` input channels at most per GEMM: the 16 GEMMs are split along their reduction axis
    (Cin) into parts whose outputs are added, so no GPU accumulation runs over more than ``group``
    terms and no weight operand exceeds 16 x group x Cout floats (see export.GPU_GROUP_CHANNELS)."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor, height: int, width: int, const,
                 group: int | None = None) -> None:
        cout, cin = weight.shape[:2]
        self.cin, self.cout, self.h, self.w = cin, cout, height, width
        self.th, self.tw = (height + 1) // 2, (width + 1) // 2  # output tiles of 2x2
        u = torch.einsum("ia,koab,jb->ijok", _G, weight.double(), _G).reshape(16, cin, cout)  # [16, Cin, Cout]
        self.group = min(group or cin, cin)
        # right-hand operands (int8 kernels want a constant RHS), one per group of input channels
        self.u = [const(u[:, k : k + self.group]) for k in range(0, cin, self.group)]
        tile = torch.einsum("ia,jb->ijab", _BT, _BT).reshape(16, 1, 4, 4)
        self.input_kernel = const(tile.repeat(cin, 1, 1, 1))  # depthwise, 16 outputs per channel
        self.bias = const(bias.reshape(1, cout, 1, 1))

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        h, w, th, tw, cout = self.h, self.w, self.th, self.tw, self.cout
        x = F.pad(x, (1, 2 * tw + 1 - w, 1, 2 * th + 1 - h))
        v = F.conv2d(x, self.input_kernel, stride=2, groups=self.cin)  # [1, 16*Cin, th, tw]
        v = v.reshape(self.cin, 16, th * tw).permute(1, 2, 0)  # [16, tiles, Cin]
        m = None
        for k, u in enumerate(self.u):  # [16, tiles, Cout], summed over the groups of input channels
            part = torch.bmm(v if len(self.u) == 1 else v[:, :, k * self.group : (k + 1) * self.group], u)
            m = part if m is None else m + part
        m = m.reshape(4, 4, th * tw, cout)  # [4, 4, tiles, Cout]
        # A^T = [[1, 1, 1, 0], [0, 1, -1, -1]] applied on both tile axes
        r0, r1 = m[0] + m[1] + m[2], m[1] - m[2] - m[3]
        y = torch.cat([r0[0] + r0[1] + r0[2], r0[1] - r0[2] - r0[3], r1[0] + r1[1] + r1[2], r1[1] - r1[2] - r1[3]])
        y = y.reshape(4, th, tw, cout).permute(3, 0, 1, 2).reshape(1, cout * 4, th, tw)
        y = F.pixel_shuffle(y, 2)[:, :, :h, :w]
        return F.relu(y + self.bias)
