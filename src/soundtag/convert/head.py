"""A classifier head on a body's clip embedding (issue #21: `soundtag train`), and how it is fitted.

The head maps the embedding (CNN14: fc1 + ReLU, 2048-d) to sigmoid probabilities of the user's
classes, multi-label: a logistic regression (one Linear) or one hidden layer (Linear, ReLU, Linear).
It is fitted in PyTorch on standardised embeddings; the standardisation is then folded into the first
Linear, so the head takes the raw embedding, as the converted graph hands it over (export.py puts
the head after the body: one LiteRT model from log-mel to the new classes).

Fitting: weighted binary cross-entropy (each example's weight from the caller, e.g. one file = one
unit however many windows it has), each class's positives up-weighted to balance its negatives
(``pos_weight`` = negative weight / positive weight), Adam on shuffled mini-batches from a fixed seed,
early stopping on the validation loss (the best epoch's weights are kept). Two fits of the same data
and seed give the same head (deterministic algorithms, one thread).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

LEARNING_RATE = 1e-3  # Adam
WEIGHT_DECAY = 1e-4  # L2 on the weights, per step (Adam's)
BATCH = 256  # examples per step
MAX_EPOCHS = 500  # passes over the training examples, at most
PATIENCE = 25  # epochs without a better validation loss before stopping
DROPOUT = 0.2  # of the hidden layer's activations, while fitting only
MIN_STD = 1e-6  # an embedding dimension that does not vary is centred, not scaled


class TrainedHead(nn.Module):
    """Embedding [n, dim] -> probabilities [n, classes] (sigmoid). ``hidden``: None for a logistic
    regression, else the width of its one hidden layer."""

    def __init__(self, dim: int, classes: int, hidden: int | None = None) -> None:
        super().__init__()
        self.hidden = hidden
        if hidden:
            self.net = nn.Sequential(nn.Linear(dim, hidden), nn.ReLU(), nn.Dropout(DROPOUT), nn.Linear(hidden, classes))
        else:
            self.net = nn.Sequential(nn.Linear(dim, classes))

    def logits(self, emb: torch.Tensor) -> torch.Tensor:
        return self.net(emb)

    def forward(self, emb: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.net(emb))

    def fold_standardisation(self, mean: np.ndarray, std: np.ndarray) -> TrainedHead:
        """The head that takes raw embeddings e and computes what this one computes on (e - mean) / std."""
        out = copy.deepcopy(self).eval()
        first = out.net[0]
        with torch.no_grad():
            w = first.weight.double() / torch.from_numpy(std).double()
            first.bias.copy_((first.bias.double() - w @ torch.from_numpy(mean).double()).float())
            first.weight.copy_(w.float())
        for p in out.parameters():
            p.requires_grad_(False)
            p.data = p.data.contiguous()  # litert-torch #1238: every constant contiguous
        return out

    def numpy(self, emb: np.ndarray) -> np.ndarray:
        """Probabilities of float embeddings [n, dim] (float64 math), eval mode."""
        with torch.inference_mode():
            layers = [m for m in self.net if isinstance(m, nn.Linear)]
            x = torch.from_numpy(np.asarray(emb, np.float64))
            x = F.linear(x, layers[0].weight.double(), layers[0].bias.double())
            if len(layers) == 2:
                x = F.linear(F.relu(x), layers[1].weight.double(), layers[1].bias.double())
            return torch.sigmoid(x).numpy()


class WithClassifier(nn.Module):
    """The body's own probabilities (its classifier on the embedding: AudioSet's 527), then the trained
    head's: `soundtag train --append`."""

    def __init__(self, classify, head: TrainedHead) -> None:
        super().__init__()
        self.classify, self.head = classify, head

    def forward(self, emb: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.classify(emb), self.head(emb)], dim=1)


@dataclass(frozen=True)
class Fit:
    head: TrainedHead  # on raw embeddings (the standardisation folded in), eval mode
    best_epoch: int
    epochs: int
    train_loss: float  # weighted BCE at the best epoch (with the positives' weights)
    val_loss: float
    history: list = field(default_factory=list, repr=False)  # (epoch, train loss, validation loss)


def fit_head(x: np.ndarray, y: np.ndarray, w: np.ndarray, x_val: np.ndarray, y_val: np.ndarray, w_val: np.ndarray,
             hidden: int | None = None, seed: int = 0, max_epochs: int = MAX_EPOCHS, patience: int = PATIENCE) -> Fit:
    """Fit a TrainedHead on embeddings ``x`` [n, dim] with 0/1 labels ``y`` [n, classes] and example
    weights ``w`` [n]; early stopping on the weighted validation loss. Deterministic for a seed."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    deterministic = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        return _fit(x, y, w, x_val, y_val, w_val, hidden, seed, max_epochs, patience)
    finally:
        torch.use_deterministic_algorithms(deterministic)
        torch.set_num_threads(threads)


def _fit(x, y, w, x_val, y_val, w_val, hidden, seed, max_epochs, patience) -> Fit:
    mean = x.astype(np.float64).mean(axis=0)
    std = x.astype(np.float64).std(axis=0)
    std = np.where(std < MIN_STD, 1.0, std)
    X = torch.from_numpy(((x - mean) / std).astype(np.float32))
    Xv = torch.from_numpy(((x_val - mean) / std).astype(np.float32))
    Y, Yv = torch.from_numpy(y.astype(np.float32)), torch.from_numpy(y_val.astype(np.float32))
    W, Wv = torch.from_numpy(w.astype(np.float32)), torch.from_numpy(w_val.astype(np.float32))
    pos = (W[:, None] * Y).sum(0)
    neg = (W[:, None] * (1 - Y)).sum(0)
    pos_weight = torch.where(pos > 0, neg / pos.clamp_min(1e-12), torch.ones_like(pos))

    def loss(head: TrainedHead, xs, ys, ws) -> torch.Tensor:
        per = F.binary_cross_entropy_with_logits(head.logits(xs), ys, pos_weight=pos_weight, reduction="none")
        return (per.mean(1) * ws).sum() / ws.sum()

    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    head = TrainedHead(x.shape[1], y.shape[1], hidden)
    opt = torch.optim.Adam(head.parameters(), lr=LEARNING_RATE, weight_decay=WEIGHT_DECAY)
    best, best_state, best_epoch, history = float("inf"), None, 0, []
    for epoch in range(1, max_epochs + 1):
        head.train()
        order = torch.randperm(len(X), generator=gen)
        for start in range(0, len(X), BATCH):
            idx = order[start : start + BATCH]
            opt.zero_grad()
            loss(head, X[idx], Y[idx], W[idx]).backward()
            opt.step()
        head.eval()
        with torch.no_grad():
            tl, vl = float(loss(head, X, Y, W)), float(loss(head, Xv, Yv, Wv))
        history.append((epoch, tl, vl))
        if vl < best - 1e-7:
            best, best_state, best_epoch = vl, copy.deepcopy(head.state_dict()), epoch
        elif epoch - best_epoch >= patience:
            break
    head.load_state_dict(best_state)
    head.eval()
    return Fit(head.fold_standardisation(mean, std), best_epoch, len(history), history[best_epoch - 1][1], best, history)
