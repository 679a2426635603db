"""The output convention: ModelOutput/dict/tuple reduction, masks, output_fn, default losses, perplexity."""

import math

import pytest
import torch
from torch import nn

from mpsearch.core import MpsearchError
from mpsearch.outputs import (
    Objective,
    kl_div,
    nll_sum,
    perplexity,
    raw_call,
    reduce_output,
    resolve_objective,
)
from mpsearch.testing import tiny_transformers


def test_reduction_of_model_outputs_dicts_and_tuples():
    from transformers.modeling_outputs import BaseModelOutput, CausalLMOutputWithPast

    logits = torch.randn(2, 5, 7)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    batch = {"input_ids": torch.zeros(2, 5, dtype=torch.long), "attention_mask": mask}
    rows = reduce_output(CausalLMOutputWithPast(logits=logits), batch)
    assert rows.shape == (8, 7)  # 3 + 5 real tokens, padding dropped
    torch.testing.assert_close(rows[:3], logits[0, :3])
    assert reduce_output((logits[:, 0], "extra"), torch.zeros(2, 3)).shape == (2, 7)  # tuples: element 0
    assert reduce_output(logits, torch.zeros(2, 5, 3)).shape == (10, 7)  # no mask: every token counts
    hidden = torch.randn(2, 5, 4)
    pooled = reduce_output(BaseModelOutput(last_hidden_state=hidden), batch)
    torch.testing.assert_close(pooled[0], hidden[0, :3].mean(0))  # mean over real tokens only
    torch.testing.assert_close(pooled[1], hidden[1].mean(0))
    emb = torch.randn(2, 4)
    assert reduce_output({"sentence_embedding": emb, "token_embeddings": hidden}, batch) is emb
    custom = reduce_output(CausalLMOutputWithPast(logits=logits), batch, output_fn=lambda out, b: out.logits[:, -1])
    torch.testing.assert_close(custom, logits[:, -1])


def test_outputs_the_convention_cannot_reduce_get_one_line_errors():
    with pytest.raises(
        MpsearchError, match=r"cannot reduce a model output of type dict \(keys \['scores'\]\).*output_fn"
    ):
        reduce_output({"scores": torch.zeros(2)}, torch.zeros(2))
    with pytest.raises(MpsearchError, match="output_fn returned a str"):
        reduce_output(torch.zeros(2), torch.zeros(2), output_fn=lambda out, batch: "no")
    with pytest.raises(MpsearchError, match="cannot call the model on a batch of type str"):
        raw_call(nn.Linear(2, 2), "text")


def test_token_kl_ignores_padding():
    model = nn.Linear(3, 5)

    class Seq(nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = model

        def forward(self, x, attention_mask):
            return self.proj(x)

    seq = Seq()
    x = torch.randn(2, 4, 3)
    mask = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1]])
    objective = Objective(kl_div, "kl")
    ref = objective.references(seq, [{"x": x, "attention_mask": mask}])[0]
    assert ref.shape == (6, 5)
    noisy = x.clone()
    noisy[0, 2:] += 50.0  # only padded positions change
    assert objective.mean(seq, [{"x": noisy, "attention_mask": mask}], [ref]) == pytest.approx(0.0, abs=1e-7)
    noisy[1, 0] += 1.0
    assert objective.mean(seq, [{"x": noisy, "attention_mask": mask}], [ref]) > 1e-4


def test_default_loss_follows_the_output_kind():
    models = tiny_transformers()
    bert, bert_data = models["bert"]()
    llama, llama_data = models["llama"]()
    assert resolve_objective(None, None, bert, bert_data[0]).name == "cosine"
    assert resolve_objective(None, None, llama, llama_data[0]).name == "kl"
    with pytest.raises(MpsearchError, match="unknown loss 'mse2'"):
        resolve_objective("mse2", None)


def test_perplexity_against_a_hand_computed_oracle():
    vocab = 6

    class Table(nn.Module):
        """logits depend on the current token only: a bigram table."""

        def __init__(self):
            super().__init__()
            self.logits = nn.Embedding(vocab, vocab)

        def forward(self, input_ids, attention_mask):
            return {"logits": self.logits(input_ids)}

    torch.manual_seed(0)
    model = Table()
    ids = torch.tensor([[1, 2, 3, 4], [5, 0, 2, 2]])
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 1, 0]])
    logp = torch.log_softmax(model.logits.weight.detach().double(), -1)
    pairs = [(1, 2), (2, 3), (3, 4), (5, 0), (0, 2)]  # next-token pairs inside the mask
    nll = -sum(float(logp[a, b]) for a, b in pairs)
    batch = {"input_ids": ids, "attention_mask": mask}
    total, count = nll_sum(raw_call(model, batch), batch)
    assert count == 5 and total == pytest.approx(nll, rel=1e-6)
    assert perplexity(model, [{"input_ids": ids, "attention_mask": mask}]) == pytest.approx(math.exp(nll / 5))
    with torch.no_grad():
        model.logits.weight.zero_()  # uniform prediction: perplexity is the vocabulary size
    assert perplexity(model, [{"input_ids": ids, "attention_mask": mask}]) == pytest.approx(vocab)
