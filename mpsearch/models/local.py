"""Your model and your text (issue 24, first part): a local transformers directory, a GGUF file or
``module:function``, with calibration and evaluation text files, as a ``ZooModel`` the CLI searches like a zoo
model. Offline always: hub ids are looked up in the local cache only (``local_files_only``).

Text files are plain text or JSONL with a ``text`` field; they are tokenized with the model's own tokenizer
(from its directory or GGUF) and cut into full sequences of ``seq_len`` tokens (no padding). Without an
evaluation file, the last ``eval_split`` of the calibration file's tokens is held out, so the two never share
a token.
"""

from __future__ import annotations

import importlib
import json
from dataclasses import dataclass
from pathlib import Path

from mpsearch.core import MpsearchError

DTYPES = ("auto", "bfloat16", "float16", "float32")


@dataclass(frozen=True)
class TextSpec:
    """How calibration and evaluation text become batches."""

    calib: str
    eval: str | None = None
    seq_len: int = 512
    n_calib: int = 32
    n_eval: int = 32
    batch_size: int = 4
    eval_split: float = 0.2

    def check(self) -> None:
        for name in ("seq_len", "n_calib", "n_eval", "batch_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise MpsearchError(f"--{name.replace('_', '-')} {value!r} must be a whole number >= 1", "pass one")
        if not 0 < self.eval_split < 1:
            raise MpsearchError(f"--eval-split {self.eval_split!r} must be in (0, 1)", "pass e.g. --eval-split 0.2")


def is_local(spec: str) -> bool:
    """Whether ``spec`` names a model of the user's (a path, a GGUF file, module:function), not a zoo name."""
    return spec.endswith(".gguf") or Path(spec).exists() or ":" in spec or "/" in spec


def load_local(spec: str | Path, text: TextSpec | None, dtype: str = "auto", device: str | None = None):
    """(ZooModel of ``spec`` with batches from ``text``) on ``device``; ``text`` None: no data (evaluate needs
    some). Every mistake is one line naming the fix."""
    from mpsearch.models import ZooModel, resolve_device

    spec = str(spec)  # a pathlib.Path names a file as its string does

    if dtype not in DTYPES:
        raise MpsearchError(f"--dtype {dtype!r} is not one of {DTYPES}", "pass --dtype auto (the checkpoint's)")
    if text is not None:
        text.check()
    dev = resolve_device(device)
    model, tokenizer, loss = _model_and_tokenizer(spec, dtype)
    model.to(dev).eval()
    calibration, evaluation = ([], []) if text is None else text_batches(text, tokenizer)
    from mpsearch.core import DEFAULT_OPTIONS

    kind, source, kwargs = source_of(spec)
    path = str(Path(source) / kwargs["gguf_file"]) if kind == "gguf" else source if kind == "folder" else None
    return ZooModel(spec, model, calibration, evaluation, loss, DEFAULT_OPTIONS, path)


def source_of(spec: str) -> tuple[str, str, dict]:
    """(kind, where from_pretrained reads, its keyword arguments) of a model spec, checked before any load:
    kind "function", "gguf", "folder" or "hub" (the local cache only)."""
    path = Path(spec)
    if ":" in spec and not path.exists() and not spec.endswith(".gguf"):
        return "function", spec, {}
    if spec.endswith(".gguf"):
        if not path.is_file():
            raise MpsearchError(f"GGUF file {spec} does not exist", "pass the path of a .gguf file")
        return "gguf", str(path.parent), {"gguf_file": path.name}
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise MpsearchError(
                f"{spec} is a folder without config.json, not a transformers checkpoint",
                "pass a folder saved with save_pretrained (config.json + safetensors), a .gguf file or a zoo name",
            )
        return "folder", str(path), {}
    if path.exists():
        raise MpsearchError(
            f"{spec} is a file but not a .gguf",
            "pass a transformers folder, a .gguf file, module:function or a zoo name",
        )
    return "hub", spec, {"local_files_only": True}


def _model_and_tokenizer(spec: str, dtype: str):
    import torch

    from mpsearch.models import quiet_transformers

    torch_dtype = "auto" if dtype == "auto" else getattr(torch, dtype)
    kind, source, kwargs = source_of(spec)
    if kind == "function":
        return _from_function(spec), None, "kl"
    from transformers import AutoConfig, AutoTokenizer

    try:
        with quiet_transformers():
            auto = model_class(AutoConfig.from_pretrained(source, **kwargs))
            loss = "cosine" if auto.__name__ == "AutoModel" else "kl"  # embeddings: cosine; logits: KL
            model = auto.from_pretrained(source, torch_dtype=torch_dtype, **kwargs)
            tokenizer = AutoTokenizer.from_pretrained(source, **kwargs)
    except OSError as err:
        if kwargs.get("local_files_only"):
            raise MpsearchError(
                f"model {spec!r} is neither a zoo name, a local path nor in the local Hugging Face cache (nothing is "
                "downloaded)",
                "pass a local folder or .gguf file, or a zoo name",
            ) from None
        raise MpsearchError(f"cannot load {spec}: {str(err).splitlines()[0]}", "check the checkpoint's files") from None
    except ValueError as err:  # transformers: an architecture it cannot read from GGUF, a config it does not know
        raise MpsearchError(
            f"transformers cannot load {spec}: {str(err).splitlines()[0][:300]}",
            "convert it to a transformers folder, or use a GGUF of an architecture transformers reads "
            f"({', '.join(_gguf_architectures())})",
        ) from None
    return model, tokenizer, loss


def model_class(config):
    """The transformers Auto class a checkpoint is loaded with, from its ``architectures``: a causal LM (logits,
    perplexity), a sequence classifier (logits) or, for encoders (``BertModel``, a sentence-transformers
    folder, ``...ForMaskedLM``), the bare model (``last_hidden_state``, mean-pooled: cosine)."""
    import transformers

    archs = getattr(config, "architectures", None) or []
    if any(a.endswith(("ForCausalLM", "LMHeadModel", "ForConditionalGeneration")) for a in archs):
        return transformers.AutoModelForCausalLM
    if any(a.endswith("ForSequenceClassification") for a in archs):
        return transformers.AutoModelForSequenceClassification
    if archs:
        return transformers.AutoModel
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

    return transformers.AutoModelForCausalLM if type(config) in MODEL_FOR_CAUSAL_LM_MAPPING else transformers.AutoModel


def _gguf_architectures() -> list[str]:
    try:
        from transformers.integrations.ggml import GGUF_CONFIG_MAPPING

        return sorted(set(GGUF_CONFIG_MAPPING) - {"general", "tokenizer"})  # those two are not architectures
    except ImportError:  # an older transformers: the list is not exposed
        return ["llama", "mistral", "qwen2", "..."]


def _from_function(spec: str):
    from torch import nn

    module_name, _, function = spec.partition(":")
    try:
        fn = getattr(importlib.import_module(module_name), function)
    except (ImportError, AttributeError) as err:
        raise MpsearchError(f"cannot import {spec} ({err})", "pass module:function of an importable module") from None
    model = fn()
    if not isinstance(model, nn.Module):
        raise MpsearchError(f"{spec}() returned a {type(model).__name__}, not an nn.Module", "return the model")
    return model


def read_text(path: str) -> str:
    """A text file's text: plain text, or JSONL whose lines hold a ``text`` field (joined by newlines)."""
    file = Path(path)
    if not file.is_file():
        raise MpsearchError(f"text file {path} does not exist", "pass a plain-text or JSONL file")
    try:
        raw = file.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise MpsearchError(f"text file {path} is not UTF-8 text", "pass a plain-text or JSONL file") from None
    if file.suffix == ".jsonl":
        texts = []
        for n, line in enumerate(raw.splitlines(), 1):
            if not line.strip():
                continue
            try:
                texts.append(json.loads(line)["text"])
            except (json.JSONDecodeError, KeyError, TypeError):
                raise MpsearchError(f"{path} line {n} is not a JSON object with a 'text' field", "fix it") from None
        return "\n".join(texts)
    return raw


PASSAGE = 32  # tokens: a passage found in both texts means they share text
OVERLAP_LIMIT = 0.01  # share of the evaluation's passages allowed in the calibration text (boilerplate repeats)


def overlap(calib: list[int], evaluation: list[int]) -> float:
    """Share of the evaluation tokens' ``PASSAGE``-token windows that occur anywhere in the calibration tokens."""
    seen = {tuple(calib[i : i + PASSAGE]) for i in range(len(calib) - PASSAGE + 1)}
    windows = [tuple(evaluation[i : i + PASSAGE]) for i in range(len(evaluation) - PASSAGE + 1)]
    return sum(w in seen for w in windows) / len(windows) if windows else 0.0


def text_batches(text: TextSpec, tokenizer) -> tuple[list[dict], list[dict]]:
    """(calibration, evaluation) batches of full ``seq_len``-token sequences, never sharing a token."""
    import torch

    if tokenizer is None:
        raise MpsearchError(
            "text needs the model's tokenizer, and module:function models come without one",
            "pass a transformers folder or .gguf file, or build batches in Python (mpsearch.search)",
        )

    def ids(path: str) -> list[int]:
        return tokenizer(read_text(path), add_special_tokens=False)["input_ids"]

    calib_ids = ids(text.calib)
    if text.eval is not None:
        eval_ids = ids(text.eval)
        if Path(text.eval).resolve() == Path(text.calib).resolve():
            raise MpsearchError("--eval is the --calib file", "pass another file, or leave --eval out (--eval-split)")
    else:
        cut = int(len(calib_ids) * (1 - text.eval_split))
        calib_ids, eval_ids = calib_ids[:cut], calib_ids[cut:]
    used = {label: ids[: min(n, len(ids) // text.seq_len) * text.seq_len] for label, ids, n in (
        ("calibration", calib_ids, text.n_calib), ("evaluation", eval_ids, text.n_eval))}  # fmt: skip
    shared = overlap(used["calibration"], used["evaluation"])
    if shared > OVERLAP_LIMIT:
        raise MpsearchError(
            f"--eval shares text with --calib: {shared:.0%} of its {PASSAGE}-token passages are in the calibration "
            "text, so the evaluation would not be held out",
            "pass an --eval file with other text, or leave --eval out (--eval-split holds out the end of --calib)",
        )
    out = []
    for label, tokens, n in (("calibration", calib_ids, text.n_calib), ("evaluation", eval_ids, text.n_eval)):
        count = min(n, len(tokens) // text.seq_len)
        if count < 1:
            raise MpsearchError(
                f"the {label} text holds {len(tokens)} tokens, fewer than one sequence of {text.seq_len}",
                "pass more text or a smaller --seq-len",
            )
        seqs = torch.tensor(tokens[: count * text.seq_len]).reshape(count, text.seq_len)
        out.append(
            [
                {
                    "input_ids": seqs[i : i + text.batch_size],
                    "attention_mask": torch.ones_like(seqs[i : i + text.batch_size]),
                }
                for i in range(0, count, text.batch_size)
            ]
        )
    return out[0], out[1]
