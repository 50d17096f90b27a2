"""3x3 convolution as Winograd F(m x m, 3x3), written in ops the LiteRT converter and runtime know.

XNNPACK runs CNN14's 3x3 convolutions as direct GEMMs. The Winograd form computes an m x m output
tile from an (m+2) x (m+2) input tile with (m+2)^2 multiplies per channel pair instead of 9 m^2:
2.25x fewer multiply-adds for F(2x2, 3x3), 4x fewer for F(4x4, 3x3). With n = m + 2, per input tile
``V = B^T d B`` (one n x n stride-m convolution from 1 to n² channels, with the input's channels as
its batch), n² GEMMs ``M = V U`` with ``U = G g G^T`` precomputed (one BATCH_MATMUL per group of
input channels), then ``Y = A^T M A`` as one more GEMM by the constant [n², m²] matrix
(A^T (x) A^T)^T, and an m x m pixel shuffle. Every op is in the GPU delegate's list and no tensor exceeds rank 4.
Transforms and layout changes are memory-bound, so a block pays only where its GEMMs dominate
(measured per layer in bench/profile_blocks.py); the weights grow n²/9 times.

The transform matrices come from Toom-Cook interpolation points (``POINTS``); B^T is solved from the
bilinear identity in float64 and checked exact. Float32 rounding grows with m (F(4x4) multiplies by
up to 8 in A^T and 5 in B^T, F(2x2) by 1): the unit test holds each against torch's conv2d in float64
and the converter's parity gate holds the whole model.

Reference: Lavin & Gray, "Fast Algorithms for Convolutional Neural Networks" (2016).
"""

from __future__ import annotations

import functools

import numpy as np
import torch
import torch.nn.functional as F

KERNEL = 3  # CNN14's convolutions are all 3x3, padding 1
# Finite interpolation points per output tile size (plus the point at infinity): Lavin & Gray's.
POINTS = {2: (0.0, 1.0, -1.0), 4: (0.0, 1.0, -1.0, 2.0, -2.0)}
TILES = tuple(POINTS)


@functools.lru_cache(maxsize=None)
def transforms(m: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(A^T [m, n], G [n, 3], B^T [n, n]) of F(m, 3) in float64, n = m + 2, from POINTS[m].

    A^T evaluates at the points (and infinity), G interpolates the kernel, and B^T is the unique
    solution of sum_k A^T[i,k] G[k,j] B^T[k,l] = [l == i + j] (1-D correlation), verified exact."""
    points, r = POINTS[m], KERNEL
    n = m + r - 1
    at = np.zeros((m, n))
    g = np.zeros((n, r))
    for k, p in enumerate(points):
        at[:, k] = [p**i for i in range(m)]
        norm = np.prod([p - q for q in points if q != p])
        g[k] = [p**j / norm for j in range(r)]
    at[m - 1, n - 1] = 1.0  # the point at infinity: leading coefficients
    g[n - 1, r - 1] = 1.0
    system = np.einsum("ik,kj->ijk", at, g).reshape(m * r, n)
    target = np.zeros((m * r, n))
    for i in range(m):
        for j in range(r):
            target[i * r + j, i + j] = 1.0
    bt = np.linalg.solve(system.T @ system, system.T @ target)
    bt = np.round(bt * 24) / 24  # integer (or small-fraction) entries; rounding removes solve noise
    assert np.abs(system @ bt - target).max() < 1e-12, "Winograd transform is not exact"
    return at, g, bt


class WinogradConv3x3:
    """relu(conv2d(x, w, b, padding=1)) for a fixed input size [1, Cin, H, W], as F(m x m, 3x3).

    ``group`` input channels at most per GEMM: the GEMMs are split along their reduction axis
    (Cin) into parts whose outputs are added, so no GPU accumulation runs over more than ``group``
    terms and no weight operand exceeds (m+2)^2 x group x Cout floats (export.LAYOUTS)."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor, height: int, width: int, const,
                 group: int | None = None, m: int = 2) -> None:
        cout, cin = weight.shape[:2]
        at, g, bt = (torch.from_numpy(a) for a in transforms(m))
        n = m + KERNEL - 1
        self.m, self.n = m, n
        self.cin, self.cout, self.h, self.w = cin, cout, height, width
        self.th, self.tw = -(-height // m), -(-width // m)  # output tiles of m x m
        u = torch.einsum("ia,koab,jb->ijok", g, weight.double(), g).reshape(n * n, cin, cout)  # [n², Cin, Cout]
        self.group = min(group or cin, cin)
        # right-hand operands (int8 kernels want a constant RHS), one per group of input channels
        self.u = [const(u[:, k : k + self.group]) for k in range(0, cin, self.group)]
        tile = torch.einsum("ia,jb->ijab", bt, bt).reshape(n * n, 1, n, n)
        self.input_kernel = const(tile)  # B^T d B of every tile, one channel at a time
        # A^T M A as one GEMM by (A^T (x) A^T)^T [n², m²], a constant right-hand side (the GPU delegate
        # does not take a constant left-hand side)
        self.output_matrix = const(torch.einsum("ia,jb->ijab", at, at).reshape(m * m, n * n).t())
        self.bias = const(bias.reshape(1, cout, 1, 1))

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        h, w, th, tw, cout, m, n, cin = self.h, self.w, self.th, self.tw, self.cout, self.m, self.n, self.cin
        x = F.pad(x, (1, m * tw + 1 - w, 1, m * th + 1 - h))
        # channels as the batch: one 1 -> n² channel convolution (n x n, stride m) instead of a depthwise
        # one with n² outputs per channel; its NHWC output [Cin, th, tw, n²] needs one transpose for the GEMMs
        v = F.conv2d(x.reshape(cin, 1, x.shape[2], x.shape[3]), self.input_kernel, stride=m)  # [Cin, n², th, tw]
        v = v.permute(0, 2, 3, 1).reshape(cin, th * tw, n * n).permute(2, 1, 0)  # [n², tiles, Cin]
        p = None
        for k, u in enumerate(self.u):  # [n², tiles, Cout], summed over the groups of input channels
            part = torch.bmm(v if len(self.u) == 1 else v[:, :, k * self.group : (k + 1) * self.group], u)
            p = part if p is None else p + part
        y = torch.matmul(p.permute(1, 2, 0), self.output_matrix)  # [tiles, Cout, m²]
        y = y.reshape(th * tw, cout * m * m).permute(1, 0).reshape(1, cout * m * m, th, tw)
        y = F.pixel_shuffle(y, m)[:, :, :h, :w]
        return F.relu(y + self.bias)
