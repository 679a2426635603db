"""Model zoo: real models with real calibration/evaluation data and a label-free quality metric."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from torch import nn

from mpsearch.core import UnknownModelError


@dataclass
class ZooModel:
    """A model with calibration data, held-out evaluation data and its quality measure.

    ``loss`` names the label-free loss against the full-precision output ("kl" for logits, "cosine" for
    embeddings); the metric derived from it is higher-is-better ("neg_kl" or "cosine").
    """

    name: str
    model: nn.Module
    calibration: list
    evaluation: list
    loss: str

    @property
    def metric_name(self) -> str:
        return "neg_kl" if self.loss == "kl" else "cosine"


def _digits(n_calib: int, n_eval: int) -> ZooModel:
    from mpsearch.models.digits import digits_batches, load_digits_cnn

    calib, evaluation = digits_batches("calibration", n_calib), digits_batches("evaluation", n_eval)
    return ZooModel("digits-cnn", load_digits_cnn(), calib, evaluation, "kl")


def _minilm(n_calib: int, n_eval: int) -> ZooModel:
    from mpsearch.models.minilm import load_minilm, tokenize
    from mpsearch.models.sources import split_sentences

    calib, evaluation = split_sentences(n_calib, n_eval)
    return ZooModel("minilm-l6", load_minilm(), tokenize(calib), tokenize(evaluation), "cosine")


def _efficientnet(n_calib: int, n_eval: int) -> ZooModel:
    from mpsearch.models.efficientnet import image_batches, load_efficientnet_lite0

    calib, evaluation = image_batches("calibration", n_calib), image_batches("evaluation", n_eval)
    return ZooModel("efficientnet-lite0", load_efficientnet_lite0(), calib, evaluation, "kl")


# name -> (loader, default calibration samples, default evaluation samples)
ZOO: dict[str, tuple[Callable[[int, int], ZooModel], int, int]] = {
    "digits-cnn": (_digits, 256, 397),
    "minilm-l6": (_minilm, 32, 128),
    "efficientnet-lite0": (_efficientnet, 16, 32),
}


def load(name: str, n_calib: int | None = None, n_eval: int | None = None) -> ZooModel:
    """Load a zoo model by name (offline)."""
    if name not in ZOO:
        raise UnknownModelError(f"unknown model {name!r}", f"choose one of {sorted(ZOO)}")
    loader, calib, evaluation = ZOO[name]
    return loader(n_calib or calib, n_eval or evaluation)
