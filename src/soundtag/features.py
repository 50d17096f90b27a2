"""Host log-mel front end of the PANNs models (any spec.FrontEnd), in numpy + scipy.fft.

Matches torchlibrosa's ``Spectrogram`` + ``LogmelFilterBank`` as used by upstream Cnn14:
center=True with reflect padding, periodic Hann window, power spectrum |rFFT|^2, slaney mel
filterbank (librosa defaults), 10*log10(max(x, 1e-10)), no top_db clipping.

The spectrum is computed in float64 so the log of quiet bins is exact; the result is float32,
shaped [frames, mel bins], ready for the model's [1, 1, frames, mel] input. The mel basis of a
front end equals librosa.filters.mel's for it (tests/test_features.py).
"""

from __future__ import annotations

from functools import lru_cache
from importlib import resources

import numpy as np
import scipy.fft

from .spec import CNN14_FRONT_END, FrontEnd

AMIN = 1e-10  # power floor before the log (torchlibrosa's amin)
FRAME_CHUNK = 256  # frames per FFT batch: caps the float64 temporaries, no effect on the result
MEL_BASIS_FILE = "mel_basis.bin"  # CNN14's basis as the model card ships it: float32, row-major [64, 513]
# Slaney's mel scale (librosa.hz_to_mel with htk=False): linear below 1 kHz, logarithmic above
MEL_F_SP = 200.0 / 3  # Hz per mel in the linear part
MEL_MIN_LOG_HZ = 1000.0  # Hz where the logarithmic part begins
MEL_LOGSTEP = np.log(6.4) / 27.0  # log-Hz per mel in the logarithmic part


def _hz_to_mel(hz: np.ndarray) -> np.ndarray:
    hz = np.asarray(hz, np.float64)
    min_log_mel = MEL_MIN_LOG_HZ / MEL_F_SP
    mel = hz / MEL_F_SP
    log = hz >= MEL_MIN_LOG_HZ
    return np.where(log, min_log_mel + np.log(np.maximum(hz, MEL_MIN_LOG_HZ) / MEL_MIN_LOG_HZ) / MEL_LOGSTEP, mel)


def _mel_to_hz(mel: np.ndarray) -> np.ndarray:
    mel = np.asarray(mel, np.float64)
    min_log_mel = MEL_MIN_LOG_HZ / MEL_F_SP
    return np.where(mel >= min_log_mel, MEL_MIN_LOG_HZ * np.exp(MEL_LOGSTEP * (mel - min_log_mel)), MEL_F_SP * mel)


def slaney_mel_basis(fe: FrontEnd) -> np.ndarray:
    """The slaney mel filterbank [n_mels, n_freqs] of a front end, float32: what
    ``librosa.filters.mel(sr=, n_fft=, n_mels=, fmin=, fmax=)`` returns with its defaults (htk=False,
    norm='slaney'), computed in float64 (triangles between adjacent mel centres, area-normalised)."""
    fft_hz = np.linspace(0.0, fe.sample_rate / 2, fe.n_freqs)
    mel_hz = _mel_to_hz(np.linspace(_hz_to_mel(fe.fmin), _hz_to_mel(fe.fmax), fe.n_mels + 2))
    widths = np.diff(mel_hz)
    ramps = mel_hz[:, None] - fft_hz[None, :]
    lower = -ramps[:-2] / widths[:-1, None]
    upper = ramps[2:] / widths[1:, None]
    weights = np.maximum(0.0, np.minimum(lower, upper))
    weights *= (2.0 / (mel_hz[2:] - mel_hz[:-2]))[:, None]
    return weights.astype(np.float32)


@lru_cache(maxsize=8)
def mel_basis(fe: FrontEnd = CNN14_FRONT_END) -> np.ndarray:
    """The mel filterbank [n_mels, n_freqs] of a front end (read-only, float32): for CNN14's, the one
    shipped with the package (the model card's file); for any other, slaney_mel_basis."""
    if fe != CNN14_FRONT_END:
        basis = slaney_mel_basis(fe)
        basis.setflags(write=False)
        return basis
    data = resources.files("soundtag.assets").joinpath(MEL_BASIS_FILE).read_bytes()
    basis = np.frombuffer(data, dtype="<f4")
    if basis.size != fe.n_mels * fe.n_freqs:
        raise RuntimeError(f"{MEL_BASIS_FILE}: expected {fe.n_mels * fe.n_freqs} floats, found {basis.size}")
    return basis.reshape(fe.n_mels, fe.n_freqs)


@lru_cache(maxsize=8)
def _window(n_fft: int) -> np.ndarray:
    """Periodic Hann window of n_fft samples (scipy.signal.get_window('hann', n_fft, fftbins=True))."""
    n = np.arange(n_fft, dtype=np.float64)
    return 0.5 - 0.5 * np.cos(2.0 * np.pi * n / n_fft)


@lru_cache(maxsize=8)
def _mel_basis_sparse(fe: FrontEnd):
    """The basis as a float64 CSR matrix: each FFT bin feeds at most two mel bands, so the product is
    ~1 000 multiply-adds per frame, and it runs without BLAS, whose idle worker threads would
    otherwise spin on the cores LiteRT is using."""
    import scipy.sparse

    return scipy.sparse.csr_matrix(mel_basis(fe).astype(np.float64))


def logmel(waveform: np.ndarray, fe: FrontEnd = CNN14_FRONT_END, workers: int = 1) -> np.ndarray:
    """Log-mel spectrogram of a mono waveform, as torchlibrosa computes it for PANNs.

    Args:
        waveform: 1-D samples at the front end's sample rate.
        fe: The front end (a model's `spec.front_end`; default CNN14's: 32 kHz, n_fft 1024, hop 320,
            64 mels from 50 to 14 000 Hz).
        workers: scipy.fft workers.

    Returns:
        float32 [1 + len // hop, n_mels] in dB (ref 1.0, floor -100 dB); for CNN14's 10 s window
        (320 000 samples at 32 kHz) that is [1001, 64].

    Raises:
        ValueError: Not 1-D, or not longer than half an FFT frame.
    """
    x = np.asarray(waveform)
    if x.ndim != 1:
        raise ValueError(f"logmel expects a 1-D waveform, got shape {x.shape}")
    if x.size <= fe.n_fft // 2:
        raise ValueError(f"logmel needs more than {fe.n_fft // 2} samples, got {x.size}")
    padded = np.pad(x.astype(np.float64, copy=False), fe.n_fft // 2, mode="reflect")
    frames = np.lib.stride_tricks.sliding_window_view(padded, fe.n_fft)[:: fe.hop]
    out = np.empty((frames.shape[0], fe.n_mels), np.float32)
    window, basis = _window(fe.n_fft), _mel_basis_sparse(fe)
    for i in range(0, frames.shape[0], FRAME_CHUNK):  # bounded float64 temporaries (~2 MB per chunk)
        spectrum = scipy.fft.rfft(frames[i : i + FRAME_CHUNK] * window, axis=-1, workers=workers)
        power = spectrum.real**2 + spectrum.imag**2
        mel = (basis @ power.T).T
        out[i : i + FRAME_CHUNK] = 10.0 * np.log10(np.maximum(mel, AMIN))
    return out
