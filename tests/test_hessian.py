"""Trace estimators against analytic oracles: explicit matrices, a diagonal Hessian, and linear regression."""

import pytest
import torch
from torch import nn

from sensitivity import HessianTrace
from sensitivity.hutchinson import hutchinson, hutchpp, matvec_quad, seeded_probes


def block_matvec(h: torch.Tensor, shapes):
    sizes = [int(torch.Size(s).numel()) for s in shapes]

    def matvec(vs):
        flat = torch.cat([v.reshape(-1).double() for v in vs])
        out = h @ flat
        return [x.reshape(s).float() for x, s in zip(out.split(sizes), shapes)]

    return matvec, sizes


def block_traces(h, sizes):
    idx = torch.arange(h.shape[0]).split(sizes)
    return torch.stack([h[i][:, i].trace() for i in idx])


@pytest.fixture
def psd():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(60, 60, generator=g, dtype=torch.float64)
    return a @ a.T / 60 + torch.diag(torch.rand(60, generator=g, dtype=torch.float64))


def test_hutchinson_block_traces_within_three_standard_errors(psd):
    shapes = [torch.Size([4, 5]), torch.Size([30]), torch.Size([10])]
    matvec, sizes = block_matvec(psd, shapes)
    est = hutchinson(matvec_quad(matvec, seeded_probes(shapes, 1)), min_probes=200, max_probes=200)
    truth = block_traces(psd, sizes)
    assert est.matvecs == 200
    assert torch.all((est.trace - truth).abs() <= 3 * est.stderr)
    assert torch.all(est.stderr < 0.2 * truth)


def test_rademacher_probes_are_exact_on_a_diagonal_hessian():
    d = torch.diag(torch.linspace(0.1, 5, 30, dtype=torch.float64))
    shapes = [torch.Size([10]), torch.Size([4, 5])]
    matvec, sizes = block_matvec(d, shapes)
    est = hutchinson(matvec_quad(matvec, seeded_probes(shapes, 0)), min_probes=3, max_probes=3)
    torch.testing.assert_close(est.trace, block_traces(d, sizes), rtol=1e-6, atol=1e-9)
    assert torch.all(est.stderr < 1e-6)


def test_adaptive_stopping_uses_fewer_probes_when_tolerance_is_loose(psd):
    shapes = [torch.Size([30]), torch.Size([30])]
    matvec, _ = block_matvec(psd, shapes)
    quad = matvec_quad(matvec, seeded_probes(shapes, 0))
    loose = hutchinson(quad, min_probes=4, max_probes=500, rtol=0.2)
    tight = hutchinson(quad, min_probes=4, max_probes=500, rtol=0.02)
    assert loose.matvecs < tight.matvecs
    assert torch.all(tight.stderr <= 0.02 * tight.trace.abs())


def test_hutchpp_is_sharper_on_low_rank_blocks():
    # low-rank layers with weak coupling between them: the regime Hutch++ is built for
    g = torch.Generator().manual_seed(3)
    blocks = []
    for _ in range(2):
        u = torch.randn(40, 3, generator=g, dtype=torch.float64)
        blocks.append(u @ torch.diag(torch.tensor([50.0, 20, 10], dtype=torch.float64)) @ u.T)
    h = torch.block_diag(*blocks) + 0.01 * torch.eye(80, dtype=torch.float64)
    shapes = [torch.Size([40]), torch.Size([40])]
    matvec, sizes = block_matvec(h, shapes)
    truth = block_traces(h, sizes)
    pp = hutchpp(matvec, shapes, torch.Generator().manual_seed(0), sketch=6, probes=14)
    plain = hutchinson(matvec_quad(matvec, seeded_probes(shapes, 0)), min_probes=32, max_probes=32)
    assert pp.matvecs == 32 == plain.matvecs
    assert torch.all((pp.trace - truth).abs() <= 3 * pp.stderr + 1e-3 * truth)
    assert torch.all((pp.trace - truth).abs() < 0.01 * truth)
    assert (pp.trace - truth).abs().sum() < 0.1 * (plain.trace - truth).abs().sum()


class TwoLinear(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(6, 5, bias=False)
        self.b = nn.Linear(5, 3, bias=False)

    def forward(self, x):
        return self.b(self.a(x))


def mse(output, reference):
    return (output - reference).pow(2).sum(-1).mean()


@pytest.mark.parametrize("method", ["hutchinson", "hutchpp"])
def test_hessian_trace_of_a_linear_network_matches_the_closed_form(method):
    # at the reference point the residual is zero, so H = 2/N sum_n J_n^T J_n exactly:
    # tr(H_a) = 2/N sum_n ||W_b||^2 ||x_n||^2, tr(H_b) = 2/N sum_n 3 ||W_a x_n||^2
    torch.manual_seed(0)
    model = TwoLinear()
    x = torch.randn(40, 6)
    est = HessianTrace(method=method, min_probes=64, max_probes=64, sketch=6, seed=0, progress=False)
    table = est.estimate(model, [x[:20], x[20:]], ["int4"], loss_fn=mse)
    with torch.no_grad():
        tr_a = 2 * model.b.weight.pow(2).sum() * x.pow(2).sum(1).mean()
        tr_b = 2 * 3 * model.a(x).pow(2).sum(1).mean()
    rows = table.frame.set_index("layer")
    for layer, truth in (("a", tr_a), ("b", tr_b)):
        got, std = rows.loc[layer, "hessian_trace"], rows.loc[layer, "hessian_trace_std"]
        assert abs(got - float(truth)) <= 3 * std + 1e-4 * float(truth), (layer, got, float(truth), std)
        d = rows.loc[layer, "perturbation"]
        n = model.get_submodule(layer).weight.numel()
        assert rows.loc[layer, "damage"] == pytest.approx(got / n * d)
    assert est.stats_["hvps"] == (64 if method == "hutchinson" else 3 * 6 + 64)


def _quads(model, batches, loss_fn, micro_batch):
    from mpsearch.layers import discover
    from mpsearch.outputs import resolve_objective
    from sensitivity.base import borrowed, trainable_weights
    from sensitivity.hessian import HessianVectorProduct

    layers, _ = discover(model)
    objective = resolve_objective(loss_fn, None, model, batches[0])
    with borrowed(model):
        params = trainable_weights(model, layers)
        hvp = HessianVectorProduct(model, batches, objective, params, micro_batch)
        probe = seeded_probes([p.shape for p in params], 0)
        return hvp.quad(probe, 0, 3), len(hvp.parts)


def test_micro_batches_give_the_whole_batch_products():
    # H v is linear in the loss: micro-batch losses weighted by their share of rows sum to the batch mean
    torch.manual_seed(0)
    model, x = TwoLinear(), torch.randn(10, 6)
    whole, parts = _quads(model, [x[:7], x[7:]], mse, None)
    assert parts == 2
    for size in (1, 3):
        split, parts = _quads(model, [x[:7], x[7:]], mse, size)
        assert parts == (10 if size == 1 else 4)
        torch.testing.assert_close(split, whole, rtol=1e-5, atol=1e-7)


def test_auto_micro_batches_split_token_outputs_into_sequences_with_padding():
    from mpsearch.testing import tiny_transformers

    model, batches = tiny_transformers()["llama"]()  # 4 sequences, one half padded
    whole, parts = _quads(model, batches, None, None)
    assert parts == 1
    auto, parts = _quads(model, batches, None, "auto")
    assert parts == 4
    torch.testing.assert_close(auto, whole, rtol=1e-4, atol=1e-8)
    assert whole.abs().sum() > 0
