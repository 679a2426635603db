"""Real data shipped with installed packages: English sentences and photos. Nothing is downloaded."""

from __future__ import annotations

import hashlib
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch

from mpsearch.core import MpsearchError

CORPUS = Path(__file__).with_name("data") / "corpus.txt"
CORPUS_SHA256 = "a1d92630a098a23cd7095e3692be6e4ea1ef8e29d0056f7a3dfca3dd76bd5242"


@lru_cache(maxsize=1)
def corpus_sentences() -> tuple[str, ...]:
    """The pinned English corpus (experiments/make_corpus.py): 2689 prose sentences from CPython's own
    documentation, one per line, identical on every Python (checked against ``CORPUS_SHA256``)."""
    raw = CORPUS.read_bytes()
    if hashlib.sha256(raw).hexdigest() != CORPUS_SHA256:
        raise MpsearchError(f"the text corpus {CORPUS} was modified", "restore it (git checkout) or reinstall mpsearch")
    return tuple(raw.decode().splitlines())


def split_sentences(n_calib: int, n_eval: int, seed: int = 0) -> tuple[list[str], list[str]]:
    """Disjoint calibration and evaluation sentences, shuffled with ``seed``."""
    sentences = corpus_sentences()
    if len(sentences) < n_calib + n_eval:
        raise MpsearchError(
            f"only {len(sentences)} sentences available, {n_calib + n_eval} requested", "ask for fewer samples"
        )
    order = np.random.default_rng(seed).permutation(len(sentences))
    chosen = [sentences[i] for i in order[: n_calib + n_eval]]
    return chosen[:n_calib], chosen[n_calib:]


def photos() -> dict[str, np.ndarray]:
    """Real RGB photos bundled with scikit-image and scikit-learn (uint8, HxWx3)."""
    import skimage.data
    from sklearn.datasets import load_sample_images

    out = {}
    for name in ("astronaut", "coffee", "chelsea", "rocket", "immunohistochemistry", "hubble_deep_field"):
        out[name] = np.asarray(getattr(skimage.data, name)())
    for fname, img in zip(("china", "flower"), load_sample_images().images):
        out[fname] = np.asarray(img)
    return out


def crops(images: list[np.ndarray], n: int, size: int, seed: int) -> torch.Tensor:
    """``n`` random square crops (30-100% of the short side), resized to ``size``, half flipped. uint8->float."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        img = images[i % len(images)]
        h, w = img.shape[:2]
        side = int(min(h, w) * rng.uniform(0.3, 1.0))
        y, x = rng.integers(0, h - side + 1), rng.integers(0, w - side + 1)
        patch = torch.from_numpy(np.ascontiguousarray(img[y : y + side, x : x + side])).permute(2, 0, 1)
        patch = patch[None].float()
        patch = torch.nn.functional.interpolate(patch, size=(size, size), mode="bilinear", antialias=True)[0]
        if rng.random() < 0.5:
            patch = patch.flip(-1)
        out.append(patch)
    return torch.stack(out)
