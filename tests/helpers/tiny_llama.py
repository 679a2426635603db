"""A randomly initialised LlamaForCausalLM small enough for unit tests (seeded: the same weights every call)."""

import torch


def tiny_llama(hidden: int = 64, intermediate: int = 256, vocab: int = 96, tied: bool = False, layers: int = 1):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=tied)  # fmt: skip
    return LlamaForCausalLM(cfg).eval()
