"""Models as their libraries give them (issue 24): a sentence-transformers ``SentenceTransformer`` as it comes
(its forward takes one dict), lists of strings with ``tokenizer=``, and ``evaluate`` reporting the best
uniform option of no larger size as the CLI does."""

import pytest
import torch

import mpsearch
from mpsearch.core import Budget, MpsearchError
from mpsearch.data import take
from mpsearch.models.sources import corpus_sentences

OPTIONS = ["int4_g32_asym", "int8"]


@pytest.fixture(scope="module")
def st():
    from sentence_transformers import SentenceTransformer

    from mpsearch.models.minilm import model_dir

    return SentenceTransformer(str(model_dir()), device="cpu")


def test_a_sentence_transformer_as_it_comes_with_strings(st):
    before = {k: v.clone() for k, v in st.state_dict().items()}
    training = st.training
    texts = corpus_sentences()[:48]
    result = mpsearch.search(st, texts, Budget(avg_bits=6), "sqnr", options=OPTIONS, tokenizer=st.preprocess, refine=2)
    assert result.plan.assignments and result.summary()["avg_bits"] <= 6 + 1e-9
    assert st.training == training and all(torch.equal(v, st.state_dict()[k]) for k, v in before.items())
    held_out = corpus_sentences()[48:80]
    measured = mpsearch.evaluate(st, result.plan, held_out, tokenizer=st.preprocess)
    assert measured["metric_name"] == "cosine" and 0 < measured["metric"] <= 1
    # the fair baseline, as the CLI reports it: the best uniform option of no larger size
    assert measured["uniform_option"] == "int4_g32_asym" and measured["uniform_avg_bits"] <= measured["avg_bits"]
    uniform = mpsearch.evaluate(st, mpsearch.uniform_plan(st, "int4_g32_asym"), held_out, tokenizer=st.preprocess)
    assert uniform["metric"] == pytest.approx(measured["uniform_metric"], rel=1e-6)
    assert "uniform_option" not in uniform  # a uniform plan is its own baseline
    assert "uniform_option" not in mpsearch.evaluate(st, result.plan, held_out, tokenizer=st.preprocess, uniform=False)


def test_dict_and_tuple_of_dict_batches_give_one_table(st):
    texts = corpus_sentences()[:32]
    dicts = [dict(st.preprocess(texts[i : i + 8])) for i in range(0, 32, 8)]
    tables = [
        mpsearch.estimate(st, batches, "sqnr", OPTIONS, cache=False).frame for batches in (dicts, [(b,) for b in dicts])
    ]
    assert tables[0]["damage"].tolist() == pytest.approx(tables[1]["damage"].tolist(), rel=1e-6)


def test_take_cuts_a_dict_inside_a_tuple():
    batch = ({"input_ids": torch.arange(12).reshape(4, 3), "name": "x"},)
    part = take(batch, 1, 2)
    assert torch.equal(part[0]["input_ids"], torch.arange(3, 9).reshape(2, 3)) and part[0]["name"] == "x"


def test_strings_need_a_tokenizer_and_a_tokenizer_needs_strings(st):
    with pytest.raises(MpsearchError, match="pass tokenizer="):
        mpsearch.search(st, ["hello world", "more words"], Budget(avg_bits=6), "sqnr", options=OPTIONS)
    with pytest.raises(MpsearchError, match="item 0 of the data is a Tensor, not a string"):
        mpsearch.estimate(st, [torch.ones(2, 3)], "sqnr", OPTIONS, tokenizer=st.preprocess)
    with pytest.raises(MpsearchError, match="not a dict of tensors"):
        mpsearch.estimate(st, ["a", "b"], "sqnr", OPTIONS, tokenizer=lambda texts: texts)
