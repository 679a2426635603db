"""Model zoo: real models with real calibration/evaluation data and a label-free quality metric."""

from __future__ import annotations

from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass

from torch import nn

from mpsearch.core import DEFAULT_OPTIONS, MpsearchError, UnknownModelError


@dataclass
class ZooModel:
    """A model with calibration data, held-out evaluation data and its quality measure.

    ``loss`` names the label-free loss against the full-precision output ("kl" for logits, "cosine" for
    embeddings); the metric is ``perplexity`` for causal LMs (lower is better), else derived from the loss
    ("neg_kl" or "cosine", higher is better). ``options``: what a search over this model considers by
    default.
    """

    name: str
    model: nn.Module
    calibration: list
    evaluation: list
    loss: str
    options: tuple[str, ...] = DEFAULT_OPTIONS
    path: str | None = None  # the file or folder it was loaded from (what `mpsearch quantize` writes from)

    @property
    def metric_name(self) -> str:
        from mpsearch.outputs import metric_of

        return metric_of(self.model, self.loss)[0]


@contextmanager
def quiet_transformers():
    """transformers' load reports and progress bars off while a zoo model loads."""
    from transformers.utils import logging

    verbosity, bars = logging.get_verbosity(), logging.is_progress_bar_enabled()
    logging.set_verbosity_error()
    logging.disable_progress_bar()
    try:
        yield
    finally:
        logging.set_verbosity(verbosity)
        if bars:
            logging.enable_progress_bar()


def _digits(n_calib: int, n_eval: int) -> ZooModel:
    from mpsearch.models.digits import digits_batches, load_digits_cnn

    calib, evaluation = digits_batches("calibration", n_calib), digits_batches("evaluation", n_eval)
    return ZooModel("digits-cnn", load_digits_cnn(), calib, evaluation, "kl")


def _minilm(n_calib: int, n_eval: int) -> ZooModel:
    from mpsearch.models.minilm import load_minilm, tokenize
    from mpsearch.models.sources import split_sentences

    calib, evaluation = split_sentences(n_calib, n_eval)
    return ZooModel("minilm-l6", load_minilm(), tokenize(calib), tokenize(evaluation), "cosine")


def _smollm2(n_calib: int, n_eval: int) -> ZooModel:
    from mpsearch.models.smollm2 import OPTIONS, gguf_path, load_smollm2, text_batches

    calib, evaluation = text_batches(n_calib, n_eval)
    return ZooModel("smollm2-135m", load_smollm2(), calib, evaluation, "kl", OPTIONS, str(gguf_path()))


def _efficientnet(n_calib: int, n_eval: int) -> ZooModel:
    from mpsearch.models.efficientnet import image_batches, load_efficientnet_lite0

    calib, evaluation = image_batches("calibration", n_calib), image_batches("evaluation", n_eval)
    return ZooModel("efficientnet-lite0", load_efficientnet_lite0(), calib, evaluation, "kl")


# name -> (loader, default calibration samples, default evaluation samples)
ZOO: dict[str, tuple[Callable[[int, int], ZooModel], int, int]] = {
    "digits-cnn": (_digits, 256, 397),
    "minilm-l6": (_minilm, 32, 128),
    "efficientnet-lite0": (_efficientnet, 16, 32),
    "smollm2-135m": (_smollm2, 16, 64),  # sequences of 256 tokens
}


def resolve_device(device: str | None = None):
    """A torch.device from "cpu", "cuda", "cuda:1", "mps"...; None or "auto": CUDA when available, then MPS,
    then the CPU. A device this machine does not have is an error, not a silent fallback."""
    import torch

    if device is None or device == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        return torch.device("mps" if torch.backends.mps.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as err:
        raise MpsearchError(f"unknown device {device!r}", "use auto, cpu, cuda, cuda:N or mps") from err
    if dev.type not in ("cpu", "cuda", "mps"):  # meta, xpu...: no data can be computed there by mpsearch
        raise MpsearchError(f"device {device!r} cannot run a search", "use auto, cpu, cuda, cuda:N or mps")
    available = {"cuda": torch.cuda.is_available, "mps": torch.backends.mps.is_available}
    if dev.type in available and not available[dev.type]():
        raise MpsearchError(f"device {device!r} is not available on this machine", "use --device cpu (or auto)")
    return dev


def load(name: str, n_calib: int | None = None, n_eval: int | None = None, device: str | None = None) -> ZooModel:
    """Load a zoo model by name (offline) onto ``device`` (default: CUDA when available, else the CPU; see
    ``resolve_device``). Its batches stay on the CPU: every call moves a batch to the model's device."""
    if name not in ZOO:
        raise UnknownModelError(f"unknown model {name!r}", f"choose one of {sorted(ZOO)}")
    dev = resolve_device(device)
    loader, calib, evaluation = ZOO[name]
    zoo = loader(n_calib or calib, n_eval or evaluation)
    zoo.model.to(dev)
    return zoo
