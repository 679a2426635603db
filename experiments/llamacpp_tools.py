"""What check_llamacpp.py and bench_llamacpp.py share: running the real llama.cpp tools, and llama-perplexity's
and llama-imatrix's way of cutting a text into chunks, so mpsearch measures on the very tokens they do.

llama-perplexity (tools/perplexity/perplexity.cpp): the whole text tokenized once (a BOS first when the GGUF's
``tokenizer.ggml.add_bos_token`` says so), cut into chunks of ``ctx`` tokens, the first token of each chunk
replaced by BOS under the same rule, and only the second half of each chunk scored (the logits at positions
ctx/2 ... ctx-2 predicting the next token). llama-imatrix cuts chunks the same way and sums every token.
"""

from __future__ import annotations

import json
import math
import re
import subprocess
import sys
from pathlib import Path

import torch


def emit(**row) -> None:
    print(json.dumps(row), flush=True)


def run(cmd: list[str]) -> str:
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode:
        sys.exit(
            f"llama.cpp: {' '.join(Path(c).name for c in cmd[:2])} failed ({done.returncode}):\n{done.stderr[-2000:]}"
        )
    return done.stdout + done.stderr


def llama_build(binary: Path) -> str:
    """A short fingerprint of the llama.cpp tools in ``binary`` (their bytes): results of one build only are
    compared with each other."""
    import hashlib

    digest = hashlib.sha256()
    for tool in ("llama-quantize", "llama-perplexity", "llama-imatrix"):
        digest.update((binary / tool).read_bytes())
    return digest.hexdigest()[:12]


def perplexity(binary: Path, gguf: Path, text: Path, ctx: int, chunks: int) -> float:
    out = run([str(binary / "llama-perplexity"), "-m", str(gguf), "-f", str(text), "-c", str(ctx),
               "--chunks", str(chunks), "-t", "2"])  # fmt: skip
    return float(re.search(r"Final estimate: PPL = ([0-9.]+)", out).group(1))


def imatrix(binary: Path, gguf: Path, text: Path, ctx: int, chunks: int, out: Path) -> Path:
    run([str(binary / "llama-imatrix"), "-m", str(gguf), "-f", str(text), "-c", str(ctx), "--chunks", str(chunks),
         "-o", str(out), "-t", "2", "--no-ppl"])  # fmt: skip
    return out


def f32_copy(binary: Path, source: Path, out: Path) -> Path:
    """The source GGUF requantized to f32 (its dequantized weights): the full-precision baseline."""
    if not out.exists():
        run([str(binary / "llama-quantize"), "--allow-requantize", str(source), str(out), "f32", "2"])
    return out


def tensors(path: Path) -> dict:
    import gguf

    return {t.name: t for t in gguf.GGUFReader(str(path)).tensors}


def _bos(source: Path) -> tuple[bool, int | None]:
    import gguf

    fields = gguf.GGUFReader(str(source)).fields

    def value(key):
        f = fields.get(key)
        return None if f is None else f.parts[f.data[0]][0]

    return bool(value("tokenizer.ggml.add_bos_token")), value("tokenizer.ggml.bos_token_id")


def llama_chunks(source: Path, text: str, ctx: int, chunks: int) -> torch.Tensor:
    """(chunks, ctx) token ids as llama-perplexity and llama-imatrix cut ``text`` for the GGUF ``source``
    (tokenized by transformers' reading of the GGUF's own tokenizer)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(source.parent), gguf_file=source.name)
    add_bos, bos = _bos(source)
    ids = tok(text, add_special_tokens=False)["input_ids"]
    if add_bos:
        ids = [bos, *ids]
    n = min(chunks, len(ids) // ctx)
    if n < 1:
        sys.exit(f"llama.cpp: the text has {len(ids)} tokens, fewer than one chunk of {ctx}")
    out = torch.tensor(ids[: n * ctx]).reshape(n, ctx)
    if add_bos:
        out[:, 0] = bos
    return out


@torch.no_grad()
def second_half_perplexity(model, chunks: torch.Tensor) -> float:
    """llama-perplexity's score of ``model`` (as it is: wrap the call in ``mpsearch.quant.swapped`` to score a
    plan) on ``chunks``: exp(mean NLL of the tokens after position ctx/2)."""
    ctx = chunks.shape[1]
    first = ctx // 2
    total, count = 0.0, 0
    device = next(model.parameters()).device
    for row in chunks:
        logits = model(row[None].to(device)).logits[0].float()
        logp = torch.log_softmax(logits[first : ctx - 1], -1)
        target = row[first + 1 :].to(device)
        total += float(-logp.gather(-1, target[:, None]).double().sum())
        count += target.numel()
    return math.exp(total / count)
