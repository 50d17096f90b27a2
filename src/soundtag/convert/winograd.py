"""3x3 convolution as Winograd F(m x m, 3x3), written in ops the LiteRT converter and runtime know.

XNNPACK runs CNN14's 3x3 convolutions as direct GEMMs. The Winograd form computes an m x m output
tile from an (m+2) x (m+2) input tile with (m+2)^2 multiplies per channel pair instead of 9 m^2:
2.25x fewer multiply-adds for F(2x2, 3x3), 4x fewer for F(4x4, 3x3). With n = m + 2, per input tile
``V = B^T d B`` (one n x n stride-m convolution from 1 to n² channels, with the input's channels as
its batch), n² GEMMs ``M = V U`` with ``U = G g G^T`` precomputed (one grouped 1x1 CONV_2D with n²
groups per group of input channels: XNNPACK's weight cache maps a CONV_2D's packed weights from a
file, a BATCH_MATMUL's it packs on the heap; same speed), then ``Y = A^T M A`` as one more GEMM by the
constant [n², m²] matrix (A^T (x) A^T)^T, and an m x m pixel shuffle. Every op is in the GPU
delegate's list and no tensor exceeds rank 4. A map exactly 2 wide (block 6) takes WidthTwoConv3x3:
12 components per 2 x 2 tile instead of 16.
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
# How the n² GEMMs are written: "conv", one grouped 1x1 CONV_2D per group of input channels (XNNPACK's
# weight cache holds its packed weights: see model.py), or "bmm", one BATCH_MATMUL (packed on the heap)
GEMM_FORMS = ("conv", "bmm")


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
    """relu(conv2d(x, w, b, padding=1)) for a fixed input size [B, Cin, H, W], as F(m x m, 3x3); with
    ``pool=2`` (m even) avg_pool2d of that, 2 x 2, computed inside the output tiles.

    ``group`` input channels at most per GEMM: the GEMMs are split along their reduction axis
    (Cin) into parts whose outputs are added, so no GPU accumulation runs over more than ``group``
    terms and no weight operand exceeds (m+2)^2 x group x Cout floats (export.LAYOUTS).

    The three stages are data: ``input_kernel`` [K, 1, kh, kw] (stride ``stride``) maps each input tile
    to K components, ``u`` holds the K GEMMs' weights, ``output_matrix`` [K, m²] maps the K products to
    the m x m output tile. Subclasses choose other components (WidthTwoConv3x3)."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor, height: int, width: int, const,
                 group: int | None = None, m: int = 2, gemm: str = "conv", pool: int = 1) -> None:
        at, g, bt = (torch.from_numpy(a) for a in transforms(m))
        n = m + KERNEL - 1
        u = torch.einsum("ia,koab,jb->ijok", g, weight.double(), g).reshape(n * n, *weight.shape[1::-1])  # [n², Cin, Cout]
        tile = torch.einsum("ia,jb->ijab", bt, bt).reshape(n * n, 1, n, n)  # B^T d B of every tile
        # A^T M A as one GEMM by (A^T (x) A^T)^T [n², m²], a constant right-hand side (the GPU delegate
        # does not take a constant left-hand side)
        out = torch.einsum("ia,jb->ijab", at, at).reshape(m * m, n * n).t()
        self._setup(weight, bias, height, width, const, group, m, gemm, u, tile, (m, m), out, pool)

    def _setup(self, weight, bias, height, width, const, group, m, gemm, u, tile, stride, out, pool=1) -> None:
        assert gemm in GEMM_FORMS, gemm
        assert pool == 1 or (pool == 2 and m % 2 == 0 and stride == (m, m)), (pool, m, stride)
        cout, cin = weight.shape[:2]
        self.m, self.k = m, u.shape[0]
        self.cin, self.cout, self.h, self.w = cin, cout, height, width
        self.th = -(-height // m)  # output tiles of m x m
        self.tw = -(-width // m) if stride[1] == m else 1
        self.group = min(group or cin, cin)
        # right-hand operands (int8 kernels want a constant RHS), one per group of input channels
        parts = [u[:, j : j + self.group] for j in range(0, cin, self.group)]
        self.gemm = gemm
        assert gemm == "bmm" or cin % self.group == 0, (cin, self.group)
        if gemm == "bmm":  # [K, group, Cout] right-hand operands
            self.u = [const(part) for part in parts]
        else:  # one grouped 1x1 convolution per part: K groups, filters [K Cout, group, 1, 1]
            self.u = [const(part.permute(0, 2, 1).reshape(self.k * cout, part.shape[1], 1, 1)) for part in parts]
        self.input_kernel, self.stride = const(tile), stride
        self.output_matrix = const(out)  # [K, m²]
        self.bias = const(bias.reshape(1, cout, 1, 1))
        self.pool = pool
        if pool == 2:
            # The bias enters the GEMMs at the component whose output-transform row is all ones (the
            # point 1 in both directions), so the ReLU follows the output GEMM directly; then the 2 x 2
            # average pool inside each m x m tile is one more GEMM by a constant [m², (m/2)²], and only
            # a quarter of the pixels are shuffled back into the map (no AVERAGE_POOL_2D, no ADD)
            ones = [k for k in range(self.k) if bool(torch.all(out[k] == 1))]
            assert ones, "no output-transform row of ones to carry the bias"
            gemm_bias = torch.zeros(self.k, cout, dtype=torch.float64)
            gemm_bias[ones[0]] = bias.reshape(-1)
            self.gemm_bias = const(gemm_bias.reshape(self.k, 1, cout) if gemm == "bmm" else gemm_bias.reshape(-1))
            q = m // 2
            pooling = torch.zeros(m, m, q, q, dtype=torch.float64)
            for a in range(m):
                for b in range(m):
                    pooling[a, b, a // 2, b // 2] = 0.25
            self.pool_matrix = const(pooling.reshape(m * m, q * q))

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        # x [B, Cin, H, W]: B windows at once; every reshape keeps the batch beside the tiles (the GEMMs
        # run over B x tiles rows: weights read once per invoke), and no tensor exceeds rank 4
        h, w, th, tw, cout, m, k, cin = self.h, self.w, self.th, self.tw, self.cout, self.m, self.k, self.cin
        b = x.shape[0]
        pad_w = (1, m * tw + 1 - w) if self.stride[1] == m else (0, 0)
        x = F.pad(x, (*pad_w, 1, m * th + 1 - h))
        # channels as the batch: one 1 -> K channel convolution (kh x kw, stride m) instead of a depthwise
        # one with K outputs per channel; its NHWC output [B Cin, th, tw, K] needs one transpose for the GEMMs
        v = F.conv2d(x.reshape(b * cin, 1, x.shape[2], x.shape[3]), self.input_kernel, stride=self.stride)
        tiles, parts = th * tw, len(self.u)
        v = v.permute(0, 2, 3, 1)  # the NHWC order of the depthwise output: [B Cin, th, tw, K]
        p = None
        if self.gemm == "bmm":
            v = v.reshape(b, cin, tiles, k).permute(3, 0, 2, 1).reshape(k, b * tiles, cin)  # [K, B tiles, Cin]
            for j, u in enumerate(self.u):  # [K, B tiles, Cout], summed over the groups of input channels
                part = torch.bmm(v if parts == 1 else v[:, :, j * self.group : (j + 1) * self.group], u)
                p = part if p is None else p + part
            if self.pool == 2:
                p = p + self.gemm_bias
            p = p.permute(1, 2, 0)  # [B tiles, Cout, K]
        else:
            # (b, part, c, t, k) -> (part, b, t, k, c): one rank-4 transpose with tiles and K as one axis
            v = v.reshape(b, parts, self.group, tiles * k).permute(1, 0, 3, 2)  # [parts, B, tiles K, group]
            for j, u in enumerate(self.u):
                # the NCHW view of the NHWC [1, B tiles, 1, K group], so the converter's layout
                # transposes cancel; groups=K: the K GEMMs of one part in one CONV_2D
                vj = v[j].reshape(1, b * tiles, 1, k * self.group).permute(0, 3, 1, 2)
                gemm_bias = self.gemm_bias if self.pool == 2 and j == 0 else None
                part = F.conv2d(vj, u, gemm_bias, groups=k).permute(0, 2, 3, 1)  # [1, B tiles, 1, K Cout]
                p = part if p is None else p + part
            p = p.reshape(b * tiles, k, cout).permute(0, 2, 1)  # [B tiles, Cout, K]
        y = torch.matmul(p, self.output_matrix)  # [B tiles, Cout, m²]
        if self.pool == 2:  # avg_pool2d(relu(conv), 2): rows and columns past an odd size's last pair dropped
            q = m // 2
            y = torch.matmul(F.relu(y), self.pool_matrix)  # [B tiles, Cout, (m/2)²]
            y = y.reshape(b, tiles, cout * q * q).permute(0, 2, 1).reshape(b, cout * q * q, th, tw)
            return F.pixel_shuffle(y, q)[:, :, : h // 2, : w // 2]
        y = y.reshape(b, tiles, cout * m * m).permute(0, 2, 1).reshape(b, cout * m * m, th, tw)
        y = F.pixel_shuffle(y, m)[:, :, :h, :w]
        return F.relu(y + self.bias)


class WidthTwoConv3x3(WinogradConv3x3):
    """The same convolution for a feature map exactly 2 wide (CNN14's block 6, 31 x 2), in 12 GEMMs
    per 2 x 2 output tile instead of F(2x2)'s 16: 3 / 4 of its weights to read, which bound that block.

    With padding 1 a width-2 map has 2 of the kernel's 3 columns per output column: with x0, x1 the
    input columns and w0, w1, w2 the kernel's, y0 = w1 x0 + w2 x1 and y1 = w0 x0 + w1 x1. Karatsuba's
    3 products give both: P = w1 (x0 + x1), y0 = P + (w2 - w1) x1, y1 = P + (w0 - w1) x0. Each product
    is a 3 x 1 convolution down the time axis, computed as 1-D Winograd F(2, 3) (4 components per 2
    rows): 3 x 4 = 12 components, MACs 3 per output instead of 9 (direct) or 4 (F(2x2))."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor, height: int, width: int, const,
                 group: int | None = None, m: int = 2, gemm: str = "conv", pool: int = 1) -> None:
        assert width == 2 and m == 2 and pool == 1, (width, m, pool)
        at, g, bt = (torch.from_numpy(a) for a in transforms(m))
        w = weight.double()
        # the three products' kernels [3 (product), Cout, Cin, 3 (rows)], the columns they read, and
        # which output columns each feeds
        kernels = torch.stack([w[..., 1], w[..., 2] - w[..., 1], w[..., 0] - w[..., 1]])
        reads = torch.tensor([[1.0, 1.0], [0.0, 1.0], [1.0, 0.0]], dtype=torch.float64)  # x0 + x1, x1, x0
        feeds = torch.tensor([[1.0, 1.0], [1.0, 0.0], [0.0, 1.0]], dtype=torch.float64)  # y0 and y1, y0, y1
        u = torch.einsum("ia,tkoa->tiok", g, kernels).reshape(12, *weight.shape[1::-1])  # [12, Cin, Cout]
        tile = torch.einsum("ia,tb->tiab", bt, reads).reshape(12, 1, 4, 2)  # 4 rows x both columns
        out = torch.einsum("ri,tc->tirc", at, feeds).reshape(12, 4)  # [12, (row, column)]
        self._setup(weight, bias, height, width, const, group, m, gemm, u, tile, (m, 1), out)
