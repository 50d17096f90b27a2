"""Host log-mel front end of PANNs CNN14, in numpy + scipy.fft.

Matches torchlibrosa's ``Spectrogram`` + ``LogmelFilterBank`` as used by upstream Cnn14:
center=True with reflect padding, periodic Hann window, power spectrum |rFFT|^2, slaney mel
filterbank (librosa defaults), 10*log10(max(x, 1e-10)), no top_db clipping.

The spectrum is computed in float64 so the log of quiet bins is exact; the result is float32,
shaped [frames, mel bins], ready for the model's [1, 1, frames, mel] input.
"""

from __future__ import annotations

from functools import lru_cache
from importlib import resources

import numpy as np
import scipy.fft

SAMPLE_RATE = 32_000  # Hz, the rate CNN14 was trained at
CLIP_SAMPLES = 320_000  # samples per model window: 10 s at 32 kHz
N_FFT = 1024  # samples per STFT frame: 32 ms at 32 kHz
HOP_SAMPLES = 320  # samples between frames: 10 ms at 32 kHz
N_MELS = 64  # mel bins
FMIN_HZ = 50.0  # lowest mel band edge, Hz
FMAX_HZ = 14_000.0  # highest mel band edge, Hz
AMIN = 1e-10  # power floor before the log (torchlibrosa's amin)
N_FREQS = N_FFT // 2 + 1  # rFFT bins: 513
N_FRAMES = 1 + CLIP_SAMPLES // HOP_SAMPLES  # frames per window with center=True: 1001
FRAME_CHUNK = 256  # frames per FFT batch: caps the float64 temporaries, no effect on the result
MEL_BASIS_FILE = "mel_basis.bin"  # float32, row-major [N_MELS, N_FREQS]


@lru_cache(maxsize=1)
def mel_basis() -> np.ndarray:
    """The slaney mel filterbank [64, 513] shipped with the package (read-only, float32)."""
    data = resources.files("soundtag.assets").joinpath(MEL_BASIS_FILE).read_bytes()
    basis = np.frombuffer(data, dtype="<f4")
    if basis.size != N_MELS * N_FREQS:
        raise RuntimeError(f"{MEL_BASIS_FILE}: expected {N_MELS * N_FREQS} floats, found {basis.size}")
    return basis.reshape(N_MELS, N_FREQS)


@lru_cache(maxsize=1)
def _window() -> np.ndarray:
    """Periodic Hann window of N_FFT samples (scipy.signal.get_window('hann', N_FFT, fftbins=True))."""
    n = np.arange(N_FFT, dtype=np.float64)
    return 0.5 - 0.5 * np.cos(2.0 * np.pi * n / N_FFT)


@lru_cache(maxsize=1)
def _mel_basis_sparse():
    """The basis as a float64 CSR matrix: each FFT bin feeds at most two mel bands, so the product is
    ~1 000 multiply-adds per frame, and it runs without BLAS, whose idle worker threads would
    otherwise spin on the cores LiteRT is using."""
    import scipy.sparse

    return scipy.sparse.csr_matrix(mel_basis().astype(np.float64))


def logmel(waveform: np.ndarray, workers: int = 1) -> np.ndarray:
    """Log-mel spectrogram of a mono 32 kHz waveform.

    Returns float32 [1 + len // HOP_SAMPLES, N_MELS] in dB (ref 1.0, floor -100 dB).
    For a 10 s window (CLIP_SAMPLES samples) that is [1001, 64].
    """
    x = np.asarray(waveform)
    if x.ndim != 1:
        raise ValueError(f"logmel expects a 1-D waveform, got shape {x.shape}")
    if x.size <= N_FFT // 2:
        raise ValueError(f"logmel needs more than {N_FFT // 2} samples, got {x.size}")
    padded = np.pad(x.astype(np.float64, copy=False), N_FFT // 2, mode="reflect")
    frames = np.lib.stride_tricks.sliding_window_view(padded, N_FFT)[::HOP_SAMPLES]
    out = np.empty((frames.shape[0], N_MELS), np.float32)
    for i in range(0, frames.shape[0], FRAME_CHUNK):  # bounded float64 temporaries (~2 MB per chunk)
        spectrum = scipy.fft.rfft(frames[i : i + FRAME_CHUNK] * _window(), axis=-1, workers=workers)
        power = spectrum.real**2 + spectrum.imag**2
        mel = (_mel_basis_sparse() @ power.T).T
        out[i : i + FRAME_CHUNK] = 10.0 * np.log10(np.maximum(mel, AMIN))
    return out
