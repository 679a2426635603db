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

from mpsearch.quant.ggml_math import div, div0, f16


def emit(**row) -> None:
    print(json.dumps(row), flush=True)


def run(cmd: list[str]) -> str:
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode:
        sys.exit(
            f"llama.cpp: {' '.join(Path(c).name for c in cmd[:2])} failed ({done.returncode}):\n{done.stderr[-2000:]}"
        )
    return done.stdout + done.stderr


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


# llama.cpp's CPU backend multiplies a quantized weight with its input rounded to 8 bits first: the input takes
# the type's ``vec_dot_type`` (ggml-cpu's type traits), Q8_0 (blocks of 32) for the legacy types and IQ4_NL, Q8_K
# (blocks of 256) for the k-quants and the other i-quants; f32 weights multiply the f32 input as it is
VEC_DOT_BLOCK = {"q4_0": 32, "q4_1": 32, "q5_0": 32, "q5_1": 32, "q8_0": 32, "iq4_nl": 32}


def _q8(x: torch.Tensor, block: int) -> torch.Tensor:
    """quantize_row_q8_0 (block 32: fp16 d = max|x| / 127, round) or quantize_row_q8_K (block 256: the scale from the
    signed extreme, -127 / max, clamped to 127), decoded back to float32, over the last axis."""
    shape = x.shape
    b = x.float().reshape(-1, block)
    idx = b.abs().argmax(-1, keepdim=True)
    vmax = b.gather(-1, idx)
    if block == 32:  # the AVX2 path: id = 127 / max, rounded to nearest even
        amax = vmax.abs()
        q = torch.round(b * div0(torch.full_like(amax, 127.0), amax))
        return (q * f16(div(amax, 127))).reshape(shape).to(x.dtype)  # block_q8_0 keeps d as fp16
    iscale = div0(torch.full_like(vmax, -127.0), vmax)
    q = torch.clamp(torch.round(iscale * b), max=127)
    return (q * div0(torch.ones_like(iscale), iscale)).reshape(shape).to(x.dtype)


def rounded_inputs(model, plan):
    """Forward pre-hooks (a context manager) that round each planned layer's input as llama.cpp's CPU backend
    does before its quantized matmul: the part of llama-perplexity's result that is not the weights' math."""
    from mpsearch.outputs import hooked

    def hook(block):
        return lambda module, args: (_q8(args[0], block), *args[1:])

    aliases = plan.provenance.get("aliases") or {}

    def registrations():  # a tied head multiplies with the embedding's type
        for layer, option in plan.assignments.items():
            block = VEC_DOT_BLOCK.get(option, 256)
            for name in (layer, *aliases.get(layer, [])):
                module = model.get_submodule(name)
                if isinstance(module, torch.nn.Linear) and module.in_features % block == 0:
                    yield module.register_forward_pre_hook(hook(block))

    return hooked(registrations())
