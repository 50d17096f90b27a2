"""Host log-mel vs torchlibrosa (the upstream front end) and the mel basis vs librosa."""

import librosa
import numpy as np
import pytest
import torch
from torchlibrosa.stft import LogmelFilterBank, Spectrogram

from soundtag import features
from soundtag.convert.family import FRONT_END_8K, FRONT_END_16K
from soundtag.spec import CNN14, CNN14_FRONT_END
from tests.fixtures import SR, scene, speech_wave, tone

TOL_DB = 1e-3  # issue #2: max |delta| vs torchlibrosa


def torchlibrosa_logmel(x: np.ndarray, dtype=torch.float64) -> np.ndarray:
    """Upstream Cnn14's front end, exactly as PANNs builds it."""
    sp = Spectrogram(n_fft=1024, hop_length=320, win_length=1024, window="hann", center=True,
                     pad_mode="reflect", freeze_parameters=True).to(dtype)
    lm = LogmelFilterBank(sr=SR, n_fft=1024, n_mels=64, fmin=50, fmax=14000, ref=1.0, amin=1e-10,
                          top_db=None, freeze_parameters=True).to(dtype)
    with torch.no_grad():
        return lm(sp(torch.tensor(x[None], dtype=dtype)))[0, 0].numpy()


def exact_logmel(x: np.ndarray) -> np.ndarray:
    """float64 reference through librosa's STFT (independent of both implementations)."""
    power = np.abs(librosa.stft(x.astype(np.float64), n_fft=1024, hop_length=320, window="hann",
                                center=True, pad_mode="reflect")) ** 2
    basis = librosa.filters.mel(sr=SR, n_fft=1024, n_mels=64, fmin=50, fmax=14000).astype(np.float64)
    return (10 * np.log10(np.maximum(basis @ power, 1e-10))).T


def test_mel_basis_equals_librosa():
    ref = librosa.filters.mel(sr=SR, n_fft=1024, n_mels=64, fmin=50, fmax=14000)
    basis = features.mel_basis()
    assert basis.shape == (64, 513) and basis.dtype == np.float32
    np.testing.assert_array_equal(basis, ref)


def test_constants_match_model_card():
    assert CNN14.frames == 1001 and CNN14.input_shape == (1, 1, 1001, 64)
    assert CNN14.window_samples == 10 * CNN14.sample_rate == 320_000
    assert CNN14_FRONT_END.n_freqs == 513 and CNN14.num_classes == 527


FAMILY_FRONT_ENDS = {"32k": CNN14_FRONT_END, "16k": FRONT_END_16K, "8k": FRONT_END_8K}


@pytest.mark.parametrize("name", list(FAMILY_FRONT_ENDS))
def test_family_mel_basis_equals_librosa(name):
    """Each front end's basis (computed, except CNN14's shipped file) equals librosa.filters.mel's
    for it, within float32 rounding of the same float64 formula."""
    fe = FAMILY_FRONT_ENDS[name]
    ref = librosa.filters.mel(sr=fe.sample_rate, n_fft=fe.n_fft, n_mels=fe.n_mels, fmin=fe.fmin, fmax=fe.fmax)
    for basis in (features.slaney_mel_basis(fe), features.mel_basis(fe)):
        assert basis.shape == (fe.n_mels, fe.n_freqs) and basis.dtype == np.float32
        np.testing.assert_allclose(basis, ref, rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("name", ["16k", "8k"])
def test_family_logmel_matches_torchlibrosa(name):
    """The 16 and 8 kHz front ends (Cnn14_16k, Cnn14_8k) vs torchlibrosa built with their numbers."""
    fe = FAMILY_FRONT_ENDS[name]
    rng = np.random.default_rng(3)
    speech, sr = speech_wave()
    x = librosa.resample(speech, orig_sr=sr, target_sr=fe.sample_rate, res_type="soxr_hq")[: 10 * fe.sample_rate]
    for sig in (x, 0.1 * rng.standard_normal(10 * fe.sample_rate)):
        sp = Spectrogram(n_fft=fe.n_fft, hop_length=fe.hop, win_length=fe.n_fft, window="hann", center=True,
                         pad_mode="reflect", freeze_parameters=True).double()
        lm = LogmelFilterBank(sr=fe.sample_rate, n_fft=fe.n_fft, n_mels=fe.n_mels, fmin=fe.fmin, fmax=fe.fmax,
                              ref=1.0, amin=1e-10, top_db=None, freeze_parameters=True).double()
        with torch.no_grad():
            ref = lm(sp(torch.tensor(sig[None], dtype=torch.float64)))[0, 0].numpy()
        got = features.logmel(sig, fe)
        assert got.shape == (fe.frames(sig.size), fe.n_mels)
        near = ref >= ref.max(axis=1, keepdims=True) - DYNAMIC_RANGE_DB
        np.testing.assert_allclose(got[near], ref[near], rtol=0, atol=TOL_DB)


def _signals():
    rng = np.random.default_rng(1)
    n = CNN14.window_samples
    speech, sr = speech_wave()
    speech32 = librosa.resample(speech, orig_sr=sr, target_sr=SR, res_type="soxr_hq")[:n]
    return {
        "white_noise": 0.1 * rng.standard_normal(n),
        "quiet_noise": 1e-4 * rng.standard_normal(n),
        "tone_1k": tone(10, freq=1000.0),
        "tone_3k": tone(10, freq=3000.0),
        "silence": np.zeros(n),
        "clipping": np.clip(3 * tone(10, freq=700.0), -1, 1),
        "scene": scene(10),
        "speech_recording": np.pad(speech32, (0, n - speech32.size)),
    }


DYNAMIC_RANGE_DB = 100  # bins further below their frame's peak are limited by torchlibrosa's float32 DFT kernels
TOL_F32_DB = 5e-3  # vs torchlibrosa run in float32 (upstream's runtime), whose own rounding is ~1e-3 dB


@pytest.mark.parametrize("name", list(_signals()))
def test_logmel_matches_torchlibrosa(name):
    """Within 1e-3 dB of torchlibrosa (float64) on every bin less than 100 dB below its frame's
    peak; bins further down (pure tones only) are checked against an exact float64 STFT instead,
    because there torchlibrosa's float32 DFT kernels, not our code, set the error (up to 0.008 dB)."""
    x = _signals()[name]
    got = features.logmel(x)
    assert got.shape == (1001, 64) and got.dtype == np.float32
    ref = torchlibrosa_logmel(x)
    near = ref >= ref.max(axis=1, keepdims=True) - DYNAMIC_RANGE_DB
    np.testing.assert_allclose(got[near], ref[near], rtol=0, atol=TOL_DB)
    np.testing.assert_allclose(got, exact_logmel(x), rtol=0, atol=1e-4)


@pytest.mark.parametrize("name", ["white_noise", "clipping", "silence", "speech_recording"])
def test_logmel_matches_float32_torchlibrosa(name):
    """Against torchlibrosa as upstream runs it (float32), all bins."""
    x = _signals()[name]
    np.testing.assert_allclose(features.logmel(x), torchlibrosa_logmel(x, torch.float32), rtol=0, atol=TOL_F32_DB)


def test_dynamic_range_exclusion_is_rare():
    """The exclusion above touches only tonal signals, and only a minority of their bins."""
    sig = _signals()
    for name in ("white_noise", "quiet_noise", "silence"):
        ref = torchlibrosa_logmel(sig[name])
        assert (ref >= ref.max(axis=1, keepdims=True) - DYNAMIC_RANGE_DB).all(), name
    x = tone(10, freq=440.0)
    ref = torchlibrosa_logmel(x)
    near = ref >= ref.max(axis=1, keepdims=True) - DYNAMIC_RANGE_DB
    assert near.mean() > 0.25
    np.testing.assert_allclose(features.logmel(x)[near], ref[near], rtol=0, atol=TOL_DB)


def test_logmel_any_length_frames():
    assert features.logmel(np.zeros(16_000)).shape == (1 + 16_000 // 320, 64)
    with pytest.raises(ValueError):
        features.logmel(np.zeros(100))
