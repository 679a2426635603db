"""digits-cnn: a small CNN trained on scikit-learn's real 8x8 handwritten digits (deterministic, cached)."""

from __future__ import annotations

import logging

import numpy as np
import torch
from torch import nn

from mpsearch.data import cache_root, store_in_cache

VERSION = 1
N_TRAIN = 1400  # the remaining 397 digits are held out for evaluation


class DigitsCNN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 16, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(16, 32, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 3, padding=1),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
        )
        self.classifier = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


def digits_arrays() -> tuple[torch.Tensor, torch.Tensor]:
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.tensor(d.images, dtype=torch.float32)[:, None] / 16.0
    return x, torch.tensor(d.target)


def train_digits(epochs: int = 40, seed: int = 0) -> DigitsCNN:
    x, y = digits_arrays()
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = DigitsCNN()
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    xt, yt = x[:N_TRAIN], y[:N_TRAIN]
    from tqdm.auto import tqdm

    for _ in tqdm(range(epochs), desc="training digits-cnn (first use, then cached)", leave=False):
        perm = torch.randperm(N_TRAIN, generator=gen)
        for i in range(0, N_TRAIN, 64):
            idx = perm[i : i + 64]
            loss = nn.functional.cross_entropy(model(xt[idx]), yt[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    return model.eval()


def load_digits_cnn() -> DigitsCNN:
    """Train once (a few seconds), then load from the cache."""
    path = cache_root() / f"digits-cnn-v{VERSION}.pt"
    model = DigitsCNN()
    if path.exists():
        try:
            model.load_state_dict(torch.load(path, weights_only=True))  # tensors only: never a pickle's code
            return model.eval()
        except Exception as err:  # truncated, garbage or foreign file: rebuild the entry, and say so
            logging.getLogger("mpsearch").warning(
                "mpsearch: cached weights %s are unreadable (%s); training digits-cnn again", path, type(err).__name__
            )
            path.unlink(missing_ok=True)
    model = train_digits()
    state = model.state_dict()
    store_in_cache(path, lambda tmp: torch.save(state, tmp))  # atomic; an unwritable cache is said once
    return model


def accuracy(model: nn.Module) -> float:
    x, y = digits_arrays()
    with torch.no_grad():
        pred = model(x[N_TRAIN:]).argmax(-1)
    return float((pred == y[N_TRAIN:]).float().mean())


def digits_batches(split: str, n: int, batch_size: int = 64) -> list[torch.Tensor]:
    x, _ = digits_arrays()
    pool = x[:N_TRAIN] if split == "calibration" else x[N_TRAIN:]
    pool = pool[np.random.default_rng(1).permutation(len(pool))[:n]]
    return [pool[i : i + batch_size] for i in range(0, len(pool), batch_size)]
