"""Regenerate src/soundtag/assets/mel_basis.bin from librosa (reproducible).

    pip install librosa && python tools/make_mel_basis.py

The basis is librosa.filters.mel(sr=32000, n_fft=1024, n_mels=64, fmin=50, fmax=14000) with the
defaults htk=False, norm='slaney' -- exactly what torchlibrosa's LogmelFilterBank uses for CNN14 --
stored float32, row-major [64, 513] (the model card's layout).
"""

from pathlib import Path

import librosa
import numpy as np

from soundtag.features import FMAX_HZ, FMIN_HZ, MEL_BASIS_FILE, N_FFT, N_MELS, SAMPLE_RATE

OUT = Path(__file__).resolve().parents[1] / "src" / "soundtag" / "assets" / MEL_BASIS_FILE


def main() -> None:
    basis = librosa.filters.mel(sr=SAMPLE_RATE, n_fft=N_FFT, n_mels=N_MELS, fmin=FMIN_HZ, fmax=FMAX_HZ)
    basis = np.ascontiguousarray(basis, dtype="<f4")
    OUT.write_bytes(basis.tobytes())
    print(f"wrote {OUT} {basis.shape} librosa {librosa.__version__}")


if __name__ == "__main__":
    main()
