"""Fisher, Entropy, Relevance against closed forms; the on-disk table cache."""

import time

import pytest
import torch
from torch import nn

from sensitivity import SQNR, Entropy, Fisher, Relevance
from sensitivity.entropy import histogram_entropy
from sensitivity.relevance import layer_relevance


def test_fisher_matches_closed_form_for_softmax_regression():
    # logits = W x: per-sample gradient of -log p(y|x) w.r.t. W is (softmax - onehot(y)) x^T
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 3, bias=False))
    x = torch.randn(24, 5)
    # the Fisher diagonal is E_x sum_c p_c(x) g_c(x)^2, exact here (3 classes <= exact_classes)
    est = Fisher(max_samples=24, seed=3, progress=False)
    table = est.estimate(model, [x[:12], x[12:]], ["int3"], loss_fn="kl", cache=False)
    fisher = torch.zeros(3, 5, dtype=torch.float64)
    with torch.no_grad():
        p = torch.softmax(model(x), -1).double()
        for c in range(3):
            g = (p - nn.functional.one_hot(torch.full((24,), c), 3))[:, :, None] * x[:, None, :].double()
            fisher += (p[:, c, None, None] * g.pow(2)).sum(0)
    fisher /= 24
    row = table.frame.iloc[0]
    assert row.fisher == pytest.approx(float(fisher.sum()), rel=1e-5)
    from mpsearch.quant import quantize_weight

    w = model[0].weight.detach()
    d = (quantize_weight(w, "int3") - w).double().pow(2)
    assert row.damage == pytest.approx(0.5 * float((fisher * d).sum()), rel=1e-5)
    # sampled classes (exact_classes=0) are an unbiased Monte Carlo estimate of the same quantity
    sampled = [
        Fisher(max_samples=24, n_targets=8, exact_classes=0, seed=s, progress=False)
        .estimate(model, [x], ["int3"], loss_fn="kl", cache=False)
        .frame.fisher.item()
        for s in range(10)
    ]
    assert sum(sampled) / 10 == pytest.approx(float(fisher.sum()), rel=0.1)


class TokenRegression(nn.Module):
    """logits (N, T, 3) = W x_t per token; called with a dict batch that carries an attention mask."""

    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(5, 3, bias=False)

    def forward(self, x, attention_mask):
        return self.proj(x)


def test_fisher_on_sequence_logits_is_unbiased_and_ignores_padding():
    # per sequence: the sampled-token gradient sums the tokens' scores; cross terms vanish in expectation,
    # so E[g^2] = sum over real tokens of sum_c p_c g_c^2 (padding excluded by the attention mask)
    torch.manual_seed(0)
    model = TokenRegression()
    x = torch.randn(6, 7, 5)
    mask = torch.ones(6, 7, dtype=torch.long)
    mask[0, 4:] = 0
    mask[3, 2:] = 0
    data = [{"x": x, "attention_mask": mask}]
    with torch.no_grad():
        p = torch.softmax(model.proj(x), -1).double()[mask.bool()]  # (real tokens, 3)
        xs = x[mask.bool()].double()
    truth = (
        sum(
            (
                p[:, c, None, None]
                * ((p - nn.functional.one_hot(torch.full((len(p),), c), 3))[:, :, None] * xs[:, None]).pow(2)
            ).sum(0)
            for c in range(3)
        )
        / 6
    )
    draws = [
        Fisher(n_targets=4, seed=s, progress=False).estimate(model, data, ["int3"], loss_fn="kl", cache=False)
        for s in range(40)
    ]
    mean = sum(t.frame.fisher.item() for t in draws) / len(draws)
    assert mean == pytest.approx(float(truth.sum()), rel=0.1)
    # padding changes nothing: the same sequences with garbage in the padded slots give the same draws
    noisy = x.clone()
    noisy[~mask.bool()] = 100.0
    again = Fisher(n_targets=4, seed=0, progress=False).estimate(
        model, [{"x": noisy, "attention_mask": mask}], ["int3"], loss_fn="kl", cache=False
    )
    assert again.frame.fisher.item() == pytest.approx(draws[0].frame.fisher.item(), rel=1e-6)


def test_histogram_entropy_oracles():
    assert histogram_entropy(torch.arange(256.0), 256) == pytest.approx(8.0)
    assert histogram_entropy(torch.tensor([0.0, 0.0, 1.0, 1.0]), 16) == pytest.approx(1.0)
    assert histogram_entropy(torch.ones(10), 16) == 0.0


def test_entropy_ranks_layers_by_activation_information():
    # same weights, same noise; one layer sees 2-valued inputs, the other Gaussian ones
    torch.manual_seed(0)

    class Two(nn.Module):
        def __init__(self):
            super().__init__()
            self.binary = nn.Linear(16, 4)
            self.rich = nn.Linear(16, 4)
            self.rich.weight.data.copy_(self.binary.weight.data)

        def forward(self, x):
            return self.binary(torch.sign(x)) + self.rich(x)

    table = Entropy(progress=False).estimate(Two(), [torch.randn(64, 16)], ["int4"], cache=False)
    rows = table.frame.set_index("layer")
    assert rows.loc["binary", "entropy"] == pytest.approx(1.0, abs=0.01)
    assert rows.loc["rich", "entropy"] > 5
    assert rows.loc["rich", "damage"] > rows.loc["binary", "damage"] * 10


def test_relevance_is_conserved_in_a_bias_free_relu_network():
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(10, 16, bias=False), nn.ReLU(), nn.Linear(16, 16, bias=False), nn.ReLU(), nn.Linear(16, 4, bias=False)
    )
    data = [torch.randn(32, 10)]
    rel = layer_relevance(
        model, data, ["0", "2", "4"], lambda out, ref: out.gather(-1, ref.argmax(-1, keepdim=True)).sum()
    )
    for layer in ("0", "2", "4"):
        assert rel["signed"][layer] == pytest.approx(rel["score"], rel=1e-5)
    est = Relevance(progress=False)
    table = est.estimate(model, data, ["int4", "int8"], cache=False)
    shares = table.frame.drop_duplicates("layer")["relevance"]
    assert shares.sum() == pytest.approx(1.0)
    assert all(v == pytest.approx(1.0, rel=1e-5) for v in est.conservation_.values())


def test_tables_are_cached_and_keyed_by_parameters(digits):
    first = SQNR(progress=False).estimate(digits.model, digits.calibration, ["int3", "int4"], loss_fn="kl")
    start = time.perf_counter()
    second = SQNR(progress=False).estimate(digits.model, digits.calibration, ["int3", "int4"], loss_fn="kl")
    assert time.perf_counter() - start < 1.0
    assert second.frame.equals(first.frame) and second.meta == first.meta
    other = SQNR(progress=False).estimate(digits.model, digits.calibration[:1], ["int3", "int4"], loss_fn="kl")
    assert not other.frame["damage"].equals(first.frame["damage"])  # different data: not served from cache
