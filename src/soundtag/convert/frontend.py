"""CNN14's log-mel front end as a torch module that converts to LiteRT and runs in the GPU delegate.

Computes what :func:`soundtag.features.logmel` computes on the host (reflect pad 512, periodic Hann
window, |rFFT|^2 of 1024 samples every 320, slaney mel basis [64, 513], ``10*log10(max(mel,
1e-10))``) for one window: waveform float32 [1, 320000] -> log-mel float32 [1, 1, 1001, 64] dB, the
body's input.

Ops (LiteRT): SLICE, FULLY_CONNECTED, CONCATENATION, RESHAPE, ABS, REDUCE_MAX, MAXIMUM, DIV, MUL, SUB,
ADD, SQRT, LOG; all in the GPU delegate's list, no tensor above rank 2 but the [1, 1, 1001, 64]
output, no gather, FFT, complex tensor or 1024-tap Conv1d (litert-torch lowered torchlibrosa's
DFT-as-Conv1d wrongly). ``F.pad(mode="reflect")`` lowers to GATHER_ND with integer index arithmetic,
which the GPU delegate refuses, so the reflect padding is a product with a reversal matrix (exact:
one 1.0 per row). Frames are 4 hop rows side by side (320 + 320 + 320 + 64 samples); the DFT is
FULLY_CONNECTED with cos and sin rows for bins 2..447 only, the bins the mel basis uses (50 Hz -
14 kHz), split into an exact float32 product and a small remainder (split_dft: FLOOR makes the
8-bit part of the samples) so that bins 120-140 dB under a loud frame's peak keep float32 accuracy.

Float16 range, by construction. The GPU delegate's fp16 mode stores every intermediate in float16
(largest 65504, smallest normal 6.1e-5). Exact rescalings, undone in dB at the end, keep each step
inside that range for any input level (+-2 after resampling, or 1e-5 near-silence):

- each frame is divided by its peak |sample| ``m`` (at least 2^-14): samples in [-1, 1];
- windowed, its content in rFFT bins 0 and 1 is projected out (1, cos, sin of one period; no band
  uses those bins and bins >= 2 are unchanged): DC, rumble below ~47 Hz and loud samples at the
  window's edges no longer dominate the float16 DFT sums; |samples| <= 4 after;
- divided again by its peak ``p`` (at least 2^-14), so the DFT input is in [-1, 1] and the DFT
  (rows scaled by ``DFT_GAIN`` = 1/16) gives |re|, |im| <= 1024 / 16 = 64;
- re and im are divided by ``q = max(largest |re|, |im|, 2^-8) / 64``: in [-64, 64], squares in
  [0, 4096], and squares down to 78 dB under that are float16 normals. The mel product with
  ``MEL_GAIN`` (32) x basis is at most 2 * 4096 * 32 * 0.0338 (largest band sum) = 8 860;
- the mel energies are taken to the 1/4 power (two SQRTs, which map float16 zeros and subnormals
  to >= 0) and floored at 2^-14 before LOG, so LOG never sees 0 or a subnormal. In float32 that
  floor is a mel energy of 2^-56, ~210 dB under the largest possible value and far under float32
  rounding of the DFT (~140 dB under a frame's peak), so it never binds there.

Output ``max(40*log10(mel'^(1/4)) + 20*log10(m * p * q) + DB_OFFSET, -100)``, ``DB_OFFSET =
-20*log10(DFT_GAIN) - 10*log10(MEL_GAIN)``: the host's ``10*log10(max(mel, 1e-10))`` (log is
monotonic, so the floor moves to the dB domain unchanged). Digital silence: m, p and q take their
floors, mel' is 0, the sum is ~-410 dB, the output exactly -100 dB everywhere, as on the host.

Accuracy vs the host (tests/test_frontend.py): float32 (torch, LiteRT CPU, GPU fp32) within 3e-4
dB on bins less than 60 dB under their frame's loudest bin, 0.01 dB within 100 dB. GPU fp16
(float16 has an 11-bit mantissa; rounding in the 1024-term DFT sums sets a floor ~70 dB under a
frame's spectral peak): within 0.25 dB on bins less than 30 dB down, 0.6 dB at 40 dB down, 1.5 dB
at 60 dB down, mean 0.05 dB. The waveform itself enters the GPU as float16, so near-silence
(|x| < 6.1e-5, -84 dBFS) arrives as float16 subnormals (steps of 6.0e-8; a GPU that flushes them
reads silence), and content 40 dB or more under a frame's low-frequency energy (strong rumble at
50-100 Hz) comes through with errors of several dB at 60 dB down.
"""

from __future__ import annotations

import math
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .. import features
from ..spec import CNN14, CNN14_FRONT_END

FE = CNN14_FRONT_END  # the front end this graph is built for (its bin split and gains are measured for it)
WINDOW_SAMPLES = CNN14.window_samples  # 320 000 samples: 10 s at 32 kHz
FRAMES = CNN14.frames  # 1001
PAD_SAMPLES = FE.n_fft // 2  # reflect padding each side (center=True): 512 samples
PADDED_SAMPLES = WINDOW_SAMPLES + 2 * PAD_SAMPLES  # 321 024 samples
HOPS_PER_FRAME = -(-FE.n_fft // FE.hop)  # hop rows spanned by one frame: 4
LAST_HOP_SAMPLES = FE.n_fft - (HOPS_PER_FRAME - 1) * FE.hop  # of the 4th row: 64
HOP_ROWS = FRAMES + HOPS_PER_FRAME - 1  # 1004 rows of 320 samples
TAIL_ZEROS = HOP_ROWS * FE.hop - PADDED_SAMPLES  # zero samples to fill the rows: 256
DFT_GAIN = 1.0 / 16  # DFT rows scale: |re|, |im| <= 1024 * DFT_GAIN = 64 for inputs in [-1, 1]
SPECTRUM_RANGE = 64.0  # |re|, |im| after the spectral rescaling: squares <= 4096
MEL_GAIN = 32.0  # mel basis scale: largest weight 0.58, largest mel energy 8 860 (fp16 max 65504)
SAMPLE_FLOOR = 2.0**-14  # smallest time-domain divisor m, p (float16's smallest normal), full scale 1
SPECTRUM_FLOOR = 2.0**-8  # smallest spectral divisor before / SPECTRUM_RANGE: q >= 2^-14
ROOT4_FLOOR = 2.0**-14  # floor of mel'^(1/4) before LOG: mel' >= 2^-56
LOW_BINS = 2  # rFFT bins 0, 1: where 1, cos and sin of one frame period have their whole DFT
DB_FLOOR = 10.0 * math.log10(features.AMIN)  # -100 dB, the host's floor
DB_PER_NEPER_POWER = 10.0 / math.log(10.0)  # dB per natural-log unit of a power: 4.343
DB_OFFSET = -20.0 * math.log10(DFT_GAIN) - 10.0 * math.log10(MEL_GAIN)  # +24.08 - 15.05 dB


def mel_bins() -> tuple[int, int]:
    """First and one-past-last rFFT bin with a nonzero mel weight: (2, 448) for 50 Hz - 14 kHz.

    Bins outside carry no weight in any band, so the DFT skips them (892 rows instead of 1026)."""
    used = np.flatnonzero(features.mel_basis(FE).any(axis=0))
    return int(used[0]), int(used[-1]) + 1


def dft_matrix() -> torch.Tensor:
    """float64 [2 * bins, 1024]: DFT_GAIN * cos rows, then DFT_GAIN * sin rows, for the rFFT bins
    of mel_bins() (the window is applied before, in the time domain)."""
    first, stop = mel_bins()
    n = torch.arange(FE.n_fft, dtype=torch.float64)
    k = torch.arange(first, stop, dtype=torch.float64)
    # exact phase: k * n mod N in integers, so the angles are those of the host's rFFT
    angle = (2.0 * math.pi / FE.n_fft) * ((k[:, None] * n[None, :]) % FE.n_fft)
    return DFT_GAIN * torch.cat([torch.cos(angle), torch.sin(angle)])


SPLIT_SAMPLE_GRID = 2.0**7  # u = u_hi + u_lo with u_hi on a grid of 2^-7 (|u| <= 1: 8 bits)
SPLIT_WEIGHT_GRID = 2.0**10  # W = W_hi + W_lo with W_hi on a grid of 2^-10 (|W| <= 1/16: 6 bits)


def split_dft() -> tuple[torch.Tensor, torch.Tensor]:
    """The DFT matrix as float64 (W_hi [bins2, 1024], [W_lo | W_hi | W_lo] [bins2, 3072]).

    u W = u_hi W_hi + u_hi W_lo + u_lo W_hi + u_lo W_lo. The first product is EXACT in float32: its
    terms lie on a grid of 2^-17 and its partial sums stay under 1024 / 16 = 2^6, i.e. within 23 bits.
    The other three have partial sums 2^8 times smaller, so their rounding is too. One float32 matmul
    rounds at ~2^-24 of its partial sums, which for a bin far from a loud tone are ~100x the bin
    itself: bins 120-140 dB under their frame's peak (a chirp) came out 0.2 dB off and moved the
    body's probabilities by 1.2e-4, over the fp32 gate; split, 0.04 dB and 2.3e-5. Cost: 4x the DFT's
    multiply-adds (3.6 G per window, ~15 % of the body)."""
    w = dft_matrix()
    hi = torch.round(w * SPLIT_WEIGHT_GRID) / SPLIT_WEIGHT_GRID
    lo = w - hi
    return hi, torch.cat([lo, hi, lo], dim=1)


def low_bins_basis() -> torch.Tensor:
    """float64 [3, 1024]: 1, cos(2 pi n / N), sin(2 pi n / N), whose DFTs are confined to bins 0 and 1.

    Orthogonal over the frame (squared norms N, N/2, N/2)."""
    angle = (2.0 * math.pi / FE.n_fft) * torch.arange(FE.n_fft, dtype=torch.float64)
    return torch.stack([torch.ones_like(angle), torch.cos(angle), torch.sin(angle)])


def scalar_const(const: Callable[[torch.Tensor], torch.Tensor], value: float) -> torch.Tensor:
    return const(torch.tensor([[value]], dtype=torch.float64))


class LogmelFrontEnd(nn.Module):
    """waveform float32 [1, 320000] -> log-mel float32 [1, 1, 1001, 64] dB, equal to features.logmel
    (with ``mel_affine`` (scale, shift), that log-mel times scale plus shift per mel bin: a body's bn0).

    ``const`` registers a float64 tensor as a graph constant (float32, contiguous, kept alive; see
    export.py on litert-torch #1061/#1238); by default a local equivalent keeping them in
    ``self.keepalive``.
    """

    def __init__(self, const: Callable[[torch.Tensor], torch.Tensor] | None = None,
                 mel_affine: tuple[torch.Tensor, torch.Tensor] | None = None) -> None:
        super().__init__()
        self.keepalive: list[torch.Tensor] = []
        if const is None:
            const = self._const
        first, stop = mel_bins()
        if first < LOW_BINS:  # projecting bins 0 and 1 out is exact only if no band uses them
            raise ValueError(f"mel basis uses rFFT bin {first}; the front end needs bins >= {LOW_BINS}")
        mel = torch.from_numpy(features.mel_basis(FE)[:, first:stop].astype(np.float64))
        self.window = const(torch.from_numpy(features._window(FE.n_fft)).reshape(1, -1))  # [1, 1024]
        basis = low_bins_basis()
        norms = torch.tensor([1.0, 0.5, 0.5], dtype=torch.float64) * FE.n_fft
        self.low_bins_analysis = const(basis / norms[:, None])  # [3, 1024]: projection coefficients
        self.low_bins_synthesis = const(basis.T)  # [1024, 3]
        dft_hi, dft_rest = split_dft()
        self.dft_hi, self.dft_rest = const(dft_hi), const(dft_rest)  # [892, 1024], [892, 3072]
        self.sample_grid, self.round_half = scalar_const(const, SPLIT_SAMPLE_GRID), scalar_const(const, 0.5)
        reverse = torch.eye(PAD_SAMPLES, dtype=torch.float64).flip(0)
        self.reverse = const(reverse)  # [512, 512]
        self.reverse_tail = const(F.pad(reverse, (0, 0, 0, TAIL_ZEROS)))  # [768, 512]: 256 zero rows
        self.mel = const(MEL_GAIN * torch.cat([mel, mel], dim=1))  # [64, 892]: re^2 and im^2 halves

        def scalar(value: float) -> torch.Tensor:
            return scalar_const(const, value)

        self.sample_floor = scalar(SAMPLE_FLOOR)
        self.spectrum_floor = scalar(SPECTRUM_FLOOR)
        self.spectrum_scale = scalar(1.0 / SPECTRUM_RANGE)
        self.root4_floor = scalar(ROOT4_FLOOR)
        self.db_per_log_root4 = scalar(4.0 * DB_PER_NEPER_POWER)
        self.db_per_log_amplitude = scalar(2.0 * DB_PER_NEPER_POWER)
        self.db_offset = scalar(DB_OFFSET)
        self.db_floor = scalar(DB_FLOOR)
        # a body's bn0 (scale, shift per mel bin), applied to the rank-2 [frames, mels] log-mel before its
        # reshape to [1, 1, frames, mels]: LiteRT's GPU delegate gets a [.., mels] constant broadcast
        # over that reshaped output wrong (only frame 0 right, on lavapipe and NVIDIA alike; the mixed-rank
        # BHWC misalignment of google-ai-edge/LiteRT#8980), so the affine must not follow the reshape
        self.mel_affine = None if mel_affine is None else tuple(const(t.reshape(1, -1)) for t in mel_affine)

    def _dft(self, u: torch.Tensor) -> torch.Tensor:
        """[frames, 1024], |u| <= 1 -> [frames, 2 * bins]: re | im of the used rFFT bins (DFT_GAIN
        scaled), as split_dft's exact-first sum of products."""
        u_hi = torch.floor(u * self.sample_grid + self.round_half) / self.sample_grid
        u_lo = u - u_hi  # exact in float32
        return F.linear(u_hi, self.dft_hi) + F.linear(torch.cat([u_hi, u_lo, u_lo], dim=1), self.dft_rest)

    def _const(self, t: torch.Tensor) -> torch.Tensor:
        c = t.detach().to(torch.float32).contiguous().clone()
        self.keepalive.append(c)
        return c

    def forward(self, wave: torch.Tensor) -> torch.Tensor:
        # reflect padding as a product with the reversal matrix (F.pad's "reflect" lowers to
        # GATHER_ND); the right edge also appends the zeros that complete the last hop row
        n_in = WINDOW_SAMPLES
        left = F.linear(wave[:, 1 : PAD_SAMPLES + 1], self.reverse)  # x[512] ... x[1]
        tail = wave[:, n_in - PAD_SAMPLES - 1 : n_in - 1]
        right = F.linear(tail, self.reverse_tail)  # x[n-2] ... x[n-513], then 256 zeros
        x = torch.cat([left, wave, right], dim=1)  # [1, 321280]
        hops = x.reshape(HOP_ROWS, FE.hop)  # [1004, 320]
        n = FRAMES
        parts = [hops[i : i + n] for i in range(HOPS_PER_FRAME - 1)]
        parts.append(hops[HOPS_PER_FRAME - 1 :, :LAST_HOP_SAMPLES])
        frames = torch.cat(parts, dim=1)  # [1001, 1024]
        # time rescaling: frame peak -> 1; then the window
        m = torch.maximum(torch.amax(torch.abs(frames), dim=1, keepdim=True), self.sample_floor)
        u = frames / m * self.window  # [1001, 1024], |u| <= 1
        # project out rFFT bins 0 and 1 (DC, rumble below ~47 Hz, loud samples at the window's
        # edges): no band uses them and bins >= 2 do not change, but left in, their float16 rounding
        # in the DFT sums would bury quiet in-band bins. Coefficients |a| <= 1, |(b, c)| <= 2: |u| <= 4
        u = u - F.linear(F.linear(u, self.low_bins_analysis), self.low_bins_synthesis)
        # second time rescaling: peak of what the DFT sees -> 1
        p = torch.maximum(torch.amax(torch.abs(u), dim=1, keepdim=True), self.sample_floor)
        u = u / p
        spec = self._dft(u)  # [1001, 892] re | im, |.| <= 1024 * DFT_GAIN = 64
        # spectral rescaling: largest |re|, |im| -> SPECTRUM_RANGE
        q = torch.maximum(torch.amax(torch.abs(spec), dim=1, keepdim=True), self.spectrum_floor)
        q = q * self.spectrum_scale
        spec = spec / q
        mel = F.linear(spec * spec, self.mel)  # [1001, 64], mel' <= 8 860
        root4 = torch.maximum(torch.sqrt(torch.sqrt(mel)), self.root4_floor)
        gain_db = (torch.log(m) + torch.log(p) + torch.log(q)) * self.db_per_log_amplitude + self.db_offset
        db = torch.log(root4) * self.db_per_log_root4 + gain_db
        db = torch.maximum(db, self.db_floor)
        if self.mel_affine is not None:
            db = db * self.mel_affine[0] + self.mel_affine[1]
        return db.reshape(1, 1, n, FE.n_mels)
