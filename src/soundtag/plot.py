"""Timeline pictures (matplotlib, imported lazily): the window scores of the top classes over time; for a
sound event detection model, upstream's SED demo picture: the log-mel spectrogram above the framewise
scores of the top classes, with the events drawn, in seconds (readable for a 10 min file: the
spectrogram is pooled to at most SPECTROGRAM_COLUMNS columns, the scores drawn as lines)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .labels import labels
from .results import TagResult
from .spec import DEFAULT_WINDOW_S as WINDOW_S

PLOT_CLASSES = 10  # rows in the timeline: the classes with the highest clip scores
SED_CLASSES = 6  # framewise lines in the SED picture: the classes with the highest clip scores
SPECTROGRAM_COLUMNS = 4000  # the SED picture's spectrogram is max-pooled over time to at most this many columns
SPECTROGRAM_CHUNK_S = 10.0  # s of audio turned into log-mel at a time (bounded memory for long files)


def _pyplot():
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:
        raise ImportError("--plot needs matplotlib: pip install 'soundtag[plot]'") from exc
    return plt


def plot_timeline(result: TagResult, path: str | Path, n_classes: int = PLOT_CLASSES, spec=None) -> Path:
    """Heat map of window scores for the n_classes best classes; saved as PNG at path. A sound event
    detection result (``result.timeline``) with its ``spec`` and a file to read gets plot_sed instead."""
    if result.timeline is not None and spec is not None and result.path:
        return plot_sed(result, path, spec)
    plt = _pyplot()
    table = spec.labels if spec is not None else labels()  # a trained head's classes, else AudioSet's
    top = np.argsort(-result.clip_scores)[:n_classes]
    n_classes = len(top)  # a model with fewer classes: all of them
    scores = result.window_scores[:, top].T  # [classes, windows]
    starts = result.window_starts_s
    hop = float(starts[1] - starts[0]) if starts.size > 1 else WINDOW_S
    end = float(starts[-1] + hop) if starts.size else WINDOW_S
    fig, ax = plt.subplots(figsize=(10, 0.45 * n_classes + 1.5), constrained_layout=True)
    im = ax.imshow(scores, aspect="auto", origin="upper", cmap="viridis", vmin=0, vmax=1,
                   extent=(0, end, n_classes - 0.5, -0.5), interpolation="nearest")
    ax.set_yticks(range(len(top)), [table[i].name for i in top])
    ax.set_xlabel("time (s); each column is a window starting there")
    ax.set_title(f"{Path(result.path).name if result.path else 'waveform'}: top {n_classes} classes over time")
    fig.colorbar(im, ax=ax, label="probability")
    path = Path(path)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def pooled_logmel(source: str, spec, columns: int = SPECTROGRAM_COLUMNS) -> tuple[np.ndarray, float]:
    """(log-mel [mels, <= columns], seconds per column) of a whole file at the model's front end,
    computed SPECTROGRAM_CHUNK_S at a time and max-pooled over time."""
    from .audio import AudioStream
    from .features import logmel

    fe = spec.front_end
    chunk = int(SPECTROGRAM_CHUNK_S * fe.sample_rate)
    parts, pending = [], np.zeros(0, np.float32)
    stream = AudioStream(source, sample_rate=fe.sample_rate)
    try:
        for block in stream:
            pending = np.concatenate([pending, block])
            while pending.size >= chunk:
                parts.append(logmel(pending[:chunk], fe)[:-1])  # frames of the chunk's own samples
                pending = pending[chunk:]
    finally:
        stream.close()
    if pending.size or not parts:
        parts.append(logmel(pending if pending.size else np.zeros(fe.n_fft, np.float32), fe))
    lm = np.concatenate(parts)  # [frames, mels]
    k = max(1, -(-lm.shape[0] // columns))
    pad = (-lm.shape[0]) % k
    if pad:
        lm = np.concatenate([lm, np.repeat(lm[-1:], pad, axis=0)])
    return lm.reshape(-1, k, lm.shape[1]).max(axis=1).T, k * fe.hop / fe.sample_rate


def plot_sed(result: TagResult, path: str | Path, spec, n_classes: int = SED_CLASSES) -> Path:
    """The SED picture of a result: log-mel spectrogram (top), framewise scores of the n_classes best
    classes over time with each class's events as bars beneath them (bottom); saved as PNG at path."""
    plt = _pyplot()
    lm, col_s = pooled_logmel(result.path, spec)
    top = np.argsort(-result.clip_scores)[:n_classes]
    tl = result.timeline
    scores = tl.scores(top)  # [frames, n]
    t = np.arange(scores.shape[0]) * tl.frame_hop_s
    end = max(result.duration_s, t[-1] if t.size else 0.0)
    names = [spec.labels[i].name for i in top]
    fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(14, 7), sharex=True, constrained_layout=True,
                                   gridspec_kw={"height_ratios": [1, 1.3]})
    ax1.imshow(lm, aspect="auto", origin="lower", cmap="magma", extent=(0, lm.shape[1] * col_s, 0, lm.shape[0]),
               interpolation="nearest")
    ax1.set_ylabel("mel bin")
    ax1.set_title(f"{Path(result.path).name}: log-mel spectrogram and framewise scores ({spec.architecture})")
    colors = plt.get_cmap("tab10")
    for k, name in enumerate(names):
        ax2.plot(t, scores[:, k], color=colors(k), lw=1.0, label=name)
    for e in result.events:
        if e.index in top:
            k = int(np.flatnonzero(top == e.index)[0])
            y = -0.06 - 0.05 * k
            ax2.plot([e.start_s, e.end_s], [y, y], color=colors(k), lw=4, solid_capstyle="butt")
    ax2.set_ylim(-0.08 - 0.05 * n_classes, 1.02)
    ax2.set_xlim(0, end)
    ax2.set_ylabel("probability (events below 0)")
    ax2.set_xlabel("time (s)")
    ax2.legend(loc="upper right", fontsize=8, ncol=2)
    ax2.grid(alpha=0.3)
    path = Path(path)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
