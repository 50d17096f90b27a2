"""Timeline picture: scores of the top classes over time (matplotlib, imported lazily)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .labels import labels
from .results import TagResult
from .spec import DEFAULT_WINDOW_S as WINDOW_S

PLOT_CLASSES = 10  # rows in the timeline: the classes with the highest clip scores


def plot_timeline(result: TagResult, path: str | Path, n_classes: int = PLOT_CLASSES) -> Path:
    """Heat map of window scores for the n_classes best classes; saved as PNG at path."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:
        raise ImportError("--plot needs matplotlib: pip install 'soundtag[plot]'") from exc
    top = np.argsort(-result.clip_scores)[:n_classes]
    scores = result.window_scores[:, top].T  # [classes, windows]
    starts = result.window_starts_s
    hop = float(starts[1] - starts[0]) if starts.size > 1 else WINDOW_S
    end = float(starts[-1] + hop) if starts.size else WINDOW_S
    fig, ax = plt.subplots(figsize=(10, 0.45 * n_classes + 1.5), constrained_layout=True)
    im = ax.imshow(scores, aspect="auto", origin="upper", cmap="viridis", vmin=0, vmax=1,
                   extent=(0, end, n_classes - 0.5, -0.5), interpolation="nearest")
    ax.set_yticks(range(len(top)), [labels()[i].name for i in top])
    ax.set_xlabel("time (s); each column is a window starting there")
    ax.set_title(f"{Path(result.path).name if result.path else 'waveform'}: top {n_classes} classes over time")
    fig.colorbar(im, ax=ax, label="probability")
    path = Path(path)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
