"""GPTQ against oracles: no correlation = round to nearest; brute force bounds it below; RTN above."""

import itertools

import numpy as np
import pytest
import torch
from torch import nn

import mpsearch
from mpsearch.core import parse_option
from mpsearch.data import data_fingerprint
from mpsearch.layers import unit_map
from mpsearch.quant.formats import quantize_weight
from mpsearch.quant.gptq import GPTQ, damped, factor, gptq_quantize, reconstruction_error, sample_ids
from mpsearch.quant.gptq_shrink import Moments, shrink

OPTIONS = ["int4", "int3_asym", "int4_g32", "int3_g32_asym", "gptq:int4_g32", "gptq:int3_asym"]


def _correlated_inputs(n: int, d: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(d, d, generator=g) / d**0.5 + torch.eye(d)
    return torch.randn(n, d, generator=g) @ mix


@pytest.mark.parametrize("name", OPTIONS)
def test_without_correlation_gptq_is_round_to_nearest_on_the_same_grid(name):
    w = torch.randn(16, 64, generator=torch.Generator().manual_seed(1))
    q = gptq_quantize(w, torch.eye(64), parse_option(name), block_size=16)
    assert torch.equal(q, quantize_weight(w, name))


@pytest.mark.parametrize("name", OPTIONS)
@pytest.mark.parametrize("act_order", [False, True])
def test_gptq_reconstructs_correlated_inputs_better_than_rtn(name, act_order):
    x = _correlated_inputs(512, 96)
    h = x.T @ x / len(x)
    w = torch.randn(24, 96, generator=torch.Generator().manual_seed(2)) * 0.05
    q = gptq_quantize(w, h, parse_option(name), block_size=32, act_order=act_order)
    rtn = quantize_weight(w, name)
    assert reconstruction_error(w, h, q) < 0.9 * reconstruction_error(w, h, rtn)
    levels = parse_option(name).bits
    for row in q.reshape(24, -1, parse_option(name).group_size or 96):  # still on a 2^b-level grid per group
        assert all(len(torch.unique(g)) <= 2**levels for g in row)


def test_real_weights_and_brute_force_bound_gptq():
    import gguf
    from gguf import GGUFReader

    from mpsearch.models.smollm2 import gguf_path

    t = next(t for t in GGUFReader(gguf_path()).tensors if t.name == "blk.2.attn_v.weight")
    w = torch.from_numpy(gguf.quants.dequantize(t.data, t.tensor_type)[:8, :6].copy())  # 8 rows of 6 inputs
    x = _correlated_inputs(256, 6, seed=3)
    h = x.T @ x / len(x)
    opt = parse_option("int2")  # per channel: the grid (each row's scale) is fixed, only levels are chosen
    q = gptq_quantize(w, h, opt, damp=0.0, act_order=False)  # the paper's column order
    q_act = gptq_quantize(w, h, opt, damp=0.0, act_order=True)
    rtn = quantize_weight(w, opt)
    scale = (w.abs().amax(1, keepdim=True) / 1).half().float()
    best = 0.0
    for r in range(w.shape[0]):  # brute force: every level of every input, per row
        combos = torch.tensor(list(itertools.product([-2, -1, 0, 1], repeat=6)), dtype=torch.float32)
        d = combos * scale[r] - w[r]
        best += float(torch.einsum("ki,ij,kj->k", d.double(), h.double(), d.double()).min())
    err_q, err_rtn = reconstruction_error(w, h, q), reconstruction_error(w, h, rtn)
    assert best - 1e-9 <= err_q <= err_rtn
    assert best - 1e-9 <= reconstruction_error(w, h, q_act)  # any order: no better than the optimum
    assert err_q < err_rtn  # on this layer the error feedback finds a strictly better rounding


def test_gptq_quantizer_collects_hessians_keyed_by_unit_name_and_quantizes_units(digits):
    model = digits.model
    quantizer = GPTQ(model, digits.calibration, shrink=False)  # the reference's sample Hessian
    linear = dict(model.named_modules())["classifier.0"]
    x = []
    handle = linear.register_forward_hook(lambda m, i, o: x.append(i[0].reshape(-1, i[0].shape[-1])))
    with torch.no_grad():
        for b in digits.calibration:
            model(b)
    handle.remove()
    x = torch.cat(x)
    h = x.T @ x / len(x)
    expected = factor(h, 0.01, True).hinv  # the Cholesky factor of a near-singular H: compared to its scale
    unit = unit_map(model)["classifier.0"]
    got = quantizer.factors["classifier.0"].hinv
    torch.testing.assert_close(got, expected, rtol=1e-3, atol=1e-3 * float(expected.abs().max()))
    assert (torch.diag(h) == 0).any()  # inputs ReLU never lets through: their rows and columns stay zero
    torch.testing.assert_close(quantizer.hessian(unit, shrunk=False), h, rtol=1e-3, atol=1e-4 * float(h.abs().max()))
    shrinking = GPTQ(model, digits.calibration)  # the default: H shrunk as far as cross-validation says
    f = shrinking.factors["classifier.0"]
    assert 0 < f.rho < 1 and f.rho == quantizer.factors["classifier.0"].rho
    assert f.solved in (0.0, f.rho / 2, f.rho) and quantizer.factors["classifier.0"].solved == 0
    expected = factor(shrink(h.clone(), f.solved), 0.01, True).hinv
    torch.testing.assert_close(f.hinv, expected, rtol=1e-3, atol=1e-3 * float(expected.abs().max()))
    for q in (quantizer, shrinking):  # either factor gives back the sample H and the population estimate
        for shrunk, want in ((False, h), (True, shrink(h.clone(), f.rho))):
            got = q.hessian(unit, shrunk=shrunk)
            torch.testing.assert_close(got, want, rtol=1e-3, atol=1e-4 * float(h.abs().max()))
    q = quantizer.quantize(unit, "int3")
    conv = quantizer.quantize(unit_map(model)["features.0"], "int3")
    assert not torch.equal(q, quantize_weight(linear.weight, "int3"))
    assert torch.equal(conv, quantize_weight(dict(model.named_modules())["features.0"].weight, "int3"))  # RTN
    assert quantizer.spec()["other_layers"] == "rtn"  # convolutions: round to nearest, by definition
    with pytest.raises(mpsearch.MpsearchError, match="quantizer 'gptq' has no grid for option 'q4_k'"):
        gptq_quantize(linear.weight, h, parse_option("q4_k"))


def test_search_and_evaluate_with_gptq_use_it_end_to_end(digits):
    options = ["int2", "int3", "int4", "int8"]
    budget = mpsearch.Budget(avg_bits=3.0)
    rtn = mpsearch.search(digits.model, digits.calibration, budget, "sqnr", options=options, loss_fn="kl", safe=False)
    gptq = mpsearch.search(
        digits.model, digits.calibration, budget, "sqnr", options=options, loss_fn="kl", safe=False, quantizer="gptq"
    )
    spec = gptq.plan.provenance["quantizer"]
    params = {"block_size": 128, "damp": 0.01, "act_order": True, "shrink": True}
    assert spec == {
        "name": "gptq",
        "params": params,
        "calibration": data_fingerprint(digits.calibration),
        "other_layers": "rtn",
    }
    assert rtn.plan.provenance["quantizer"] == {"name": "rtn", "params": {}, "calibration": None}
    assert gptq.extra["table"].meta["quantizer"] == spec
    same = mpsearch.BitPlan(dict(gptq.plan.assignments))  # the same assignments, no provenance: round to nearest
    m_rtn = mpsearch.evaluate(digits.model, same, digits.evaluation, "kl")
    m_gptq = mpsearch.evaluate(digits.model, gptq.plan, digits.evaluation, "kl", calibration=digits.calibration)
    assert m_gptq["loss"] < m_rtn["loss"]  # the same plan, GPTQ'd linear layers: lower held-out KL
    assert np.isfinite(m_gptq["loss"])


def test_gptq_covers_transformers_conv1d_through_its_transposed_view():
    # GPT-2 stores c_attn/c_proj/c_fc as Conv1D [in, out]; the unit's weight is a fresh transposed view per
    # access, and the Hessian must still be found for it
    from mpsearch.layers import find_units
    from mpsearch.testing import tiny_transformers

    model, batches = tiny_transformers()["gpt2"]()
    quantizer = GPTQ(model, batches, shrink=False)
    conv1d = [u for u in find_units(model) if u.type.transposed]
    assert conv1d and all(u.name in quantizer.factors for u in conv1d)
    for unit in conv1d:
        h = _input_hessian(model, unit.module, batches)
        got = quantizer.hessian(unit, shrunk=False)  # in the unit's (out, in) layout, via the transposed view
        torch.testing.assert_close(got, h, rtol=1e-3, atol=1e-4 * float(h.abs().max()))
        q = quantizer.quantize(unit, "int3")
        rtn = quantize_weight(unit.weight, "int3")
        assert reconstruction_error(unit.weight, h, q) < reconstruction_error(unit.weight, h, rtn), unit.name


def _input_hessian(model, module, batches) -> torch.Tensor:
    """X^T X / tokens of ``module``'s inputs, a padded token batch run one sequence at a time cut to its real
    tokens (right padding), so no padding can enter: the oracle for GPTQ's masked collection."""
    xs = []
    handle = module.register_forward_hook(lambda m, i, o: xs.append(i[0].reshape(-1, i[0].shape[-1]).float()))
    with torch.no_grad():
        for b in batches:
            if not isinstance(b, dict):
                model(b)
                continue
            for ids, mask in zip(b["input_ids"], b["attention_mask"]):
                n = int(mask.sum())
                model(input_ids=ids[None, :n], attention_mask=mask[None, :n])
    handle.remove()
    x = torch.cat(xs)
    return x.T @ x / len(x)


def test_layers_fed_the_same_input_share_one_factor_equal_to_their_own_hessians():
    from mpsearch.layers import find_units
    from mpsearch.testing import tiny_transformers

    model, batches = tiny_transformers()["llama"]()
    quantizer = GPTQ(model, batches, shrink=False)
    units = {u.name: u for u in find_units(model)}
    q, k, v, o = (units[f"model.layers.0.self_attn.{p}_proj"] for p in "qkvo")
    fq, fk, fv, fo = (quantizer.factors[u.name] for u in (q, k, v, o))
    assert fq is fk is fv and fo is not fq  # q/k/v read one tensor; o_proj reads the attention output
    assert int(batches[0]["attention_mask"].sum()) < batches[0]["attention_mask"].numel()  # padding to leave out
    for unit in (k, o):
        expected = factor(_input_hessian(model, unit.module, batches), 0.01, True).hinv
        got = quantizer.factors[unit.name].hinv
        torch.testing.assert_close(got, expected, rtol=1e-3, atol=1e-3 * float(expected.abs().max()))


def test_hessians_collected_in_memory_windows_equal_one_pass_and_offloaded_factors_give_the_same_weights():
    # large models: Hessian sums gathered a few layers per calibration pass (max_bytes) must give the very
    # factors of one pass; factors kept in CPU memory (offload) must quantize exactly as resident ones
    from mpsearch.layers import find_units
    from mpsearch.testing import tiny_transformers

    model, batches = tiny_transformers()["llama"]()
    whole = GPTQ(model, batches, max_bytes=None, offload=False)
    one_layer = max(4 * u.weight.shape[-1] ** 2 for u in find_units(model))
    windowed = GPTQ(model, batches, max_bytes=one_layer, offload=True)
    linears = [u for u in find_units(model) if isinstance(u.module, torch.nn.Linear)]
    assert whole.passes == 1 and 1 < windowed.passes <= len(linears)  # windows of at most one big layer
    assert whole.factors.keys() == windowed.factors.keys()
    for key, f in whole.factors.items():
        assert torch.equal(f.hinv, windowed.factors[key].hinv) and windowed.factors[key].hinv.device.type == "cpu"
    unit = linears[3]
    a = whole.quantize(unit, "int3_g16")
    b = windowed.quantize(unit, "int3_g16")
    assert torch.equal(a, b)
    for bad in ({"max_bytes": 0}, {"max_bytes": "lots"}, {"offload": "yes"}, {"damp": -1}, {"block_size": 0}):
        with pytest.raises(mpsearch.MpsearchError, match=f"parameter '{next(iter(bad))}' must be"):
            GPTQ(model, batches, **bad)


def test_gptq_says_which_hessians_have_fewer_real_tokens_than_inputs(caplog):
    # the tiny llama's batch has 42 real tokens (one sequence half padding): fewer than down_proj's 48 inputs,
    # more than the 32 of every other layer; three copies of it are enough for every layer
    from mpsearch.testing import tiny_transformers

    model, batches = tiny_transformers()["llama"]()
    assert int(batches[0]["attention_mask"].sum()) == 42
    with caplog.at_level("WARNING", logger="mpsearch"):
        GPTQ(model, batches)
    said = [r.getMessage() for r in caplog.records if "fewer calibration tokens" in r.getMessage()]
    assert len(said) == 1 and "of 2 layer(s)" in said[0] and "mlp.down_proj: 42 tokens for 48 inputs" in said[0]
    caplog.clear()
    with caplog.at_level("WARNING", logger="mpsearch"):
        GPTQ(model, batches * 3)
    assert not [r for r in caplog.records if "fewer calibration tokens" in r.getMessage()]


def _classifier(d_in: int, seed: int):
    """A softmax classifier y = W x and a source of its correlated inputs."""
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(d_in, d_in, generator=g) / d_in**0.5 + torch.eye(d_in)
    model = nn.Sequential(nn.Linear(d_in, 10, bias=False))
    with torch.no_grad():
        model[0].weight.copy_(torch.randn(10, d_in, generator=g) * 0.3)
    return model, lambda n: torch.randn(n, d_in, generator=g) @ mix


def _second_order_kl(model, x: torch.Tensor, d: torch.Tensor) -> float:
    """1/2 E[(d x)^T (diag p - p p^T) (d x)]: the KL a weight error d of y = W x costs, to second order (the
    Fisher of a softmax classifier is E[(diag p - p p^T) (x) x x^T])."""
    with torch.no_grad():
        p = torch.softmax(model(x), -1)
    dx = x @ d.T
    return 0.5 * float(((dx**2 * p).sum(1) - (dx * p).sum(1) ** 2).mean())


@pytest.mark.parametrize("shrink", [False, True])
@pytest.mark.parametrize("tokens", [16, 512])
def test_fisher_damage_of_gptq_errors_counts_their_cross_terms_as_held_out_inputs_see_them(tokens, shrink):
    # GPTQ's errors cancel across correlated inputs, which the Fisher diagonal alone cannot see (it overrates
    # them several times over); but they cancel on the calibration tokens GPTQ fitted, and with fewer tokens
    # than inputs far less on held-out ones (most of all when GPTQ solves against the sample Hessian). The
    # damage must follow the held-out KL in every regime (16 tokens for 32 inputs: the warning about too few
    # tokens is expected)
    from sensitivity import Fisher

    model, inputs = _classifier(32, seed=5)
    x, held_out = inputs(tokens), inputs(20000)
    batches = [x[i : i + 16] for i in range(0, tokens, 16)]
    quantizer = GPTQ(model, batches, shrink=shrink)
    fisher = Fisher(max_samples=tokens, progress=False)
    table = fisher.estimate(model, batches, ["int3", "int4"], loss_fn="kl", quantizer=quantizer)
    damage = table.frame.set_index("option")["damage"]
    diagonal_only = Fisher(max_samples=tokens, cross_terms=False, progress=False)
    alone = diagonal_only.estimate(model, batches, ["int3", "int4"], loss_fn="kl", quantizer=quantizer)
    alone = alone.frame.set_index("option")["damage"]
    with torch.no_grad():
        p = torch.softmax(model(x), -1)
    for name in ("int3", "int4"):
        with torch.no_grad():
            d = quantizer.error(unit_map(model)["0"], name)
        truth = _second_order_kl(model, held_out, d)
        diagonal = 0.5 * float(((p * (1 - p)).T @ x**2 / len(x) * d**2).sum())
        in_sample = _second_order_kl(model, x, d)  # what the cross terms of the calibration tokens alone say
        assert 0.7 * truth < damage[name] < 1.5 * truth
        assert alone[name] == pytest.approx(diagonal, rel=1e-3)  # cross_terms=False: the diagonal, as before
        if tokens > 32:  # enough tokens: the diagonal is what is far off
            assert diagonal > 2 * truth
        elif not shrink:  # too few, and GPTQ fitted them: the calibration tokens' own cross terms are
            assert in_sample < 0.3 * truth


def test_shrinkage_follows_how_well_the_tokens_determine_the_off_diagonal():
    g = torch.Generator().manual_seed(0)
    model = nn.Sequential(nn.Linear(24, 4))
    white = [torch.randn(256, 24, generator=g) for _ in range(4)]  # population off-diagonal: zero
    mix = torch.randn(24, 24, generator=g) + 3 * torch.ones(24, 24)
    many = [torch.randn(256, 24, generator=g) @ mix for _ in range(16)]  # strong correlation, 4096 tokens
    few = [many[0][:12]]  # the same population, half as many tokens as inputs
    rho = {k: GPTQ(model, b).factors["0"].rho for k, b in (("white", white), ("many", many))}
    rho["few"] = GPTQ(model, few).factors["0"].rho
    assert rho["white"] > 0.8 and rho["many"] < 0.05 and rho["few"] > 3 * rho["many"]
    one = GPTQ(model, [many[0][:1]])  # one token: nothing is known off the diagonal, GPTQ solves with it alone
    f = one.factors["0"]
    assert f.rho == f.solved == 1
    h = one.hessian(unit_map(model)["0"])
    assert h.diagonal().min() > 0 and torch.count_nonzero(h - torch.diag(h.diagonal())) == 0
    with pytest.raises(mpsearch.MpsearchError, match="sample Hessian cannot be recovered.*shrink=False"):
        one.hessian(unit_map(model)["0"], shrunk=False)


def _population_errors(tokens: int, seed: int, name: str = "int3") -> dict:
    """Errors tr(D S D^T) on the population second moment S of correlated inputs x = z M (S = M^T M, known),
    of GPTQ fitted to ``tokens`` of them: against the sample H, the cross-validated shrinkage (the default),
    the Schaefer-Strimmer shrinkage alone, and round to nearest."""
    d_in = 48
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(d_in, d_in, generator=g) / d_in**0.5 + torch.eye(d_in)
    model = nn.Sequential(nn.Linear(d_in, 32, bias=False))
    with torch.no_grad():
        model[0].weight.copy_(torch.randn(32, d_in, generator=g) * 0.1)
    w, population = model[0].weight.detach(), mix.T @ mix
    batches = [torch.randn(tokens // 4, d_in, generator=g) @ mix for _ in range(4)]
    errors = {}
    for shrinks in (False, True):
        quantizer = GPTQ(model, batches, shrink=shrinks)
        q = quantizer.quantize(unit_map(model)["0"], name)
        errors["cv" if shrinks else "sample"] = reconstruction_error(w, population, q)
    rho = quantizer.factors["0"].rho
    h = quantizer.hessian(unit_map(model)["0"], shrunk=False)
    errors["rho"] = reconstruction_error(w, population, gptq_quantize(w, shrink(h, rho), parse_option(name)))
    errors["rtn"] = reconstruction_error(w, population, quantize_weight(w, name))
    return errors


def test_with_fewer_tokens_than_inputs_the_shrunk_hessian_halves_gptqs_error_on_fresh_inputs():
    # half as many tokens as inputs: the sample H is singular and GPTQ fitted to it errs twice as much as round
    # to nearest on fresh inputs; shrunk (cross-validation keeps the full estimate here) it beats both
    runs = [_population_errors(24, seed) for seed in range(4)]
    mean = {k: np.mean([r[k] for r in runs]) for k in runs[0]}
    assert mean["sample"] > 1.5 * mean["rtn"]
    assert mean["cv"] < 0.6 * mean["sample"] and mean["cv"] < mean["rtn"]


def test_cross_validation_keeps_the_shrinkage_from_costing_gptq_where_tokens_are_plenty():
    # 8x as many tokens as inputs: the Schaefer-Strimmer weight alone over-shrinks for GPTQ's purpose; the
    # cross-validated choice must stay with the sample H's error, well below round to nearest
    runs = [_population_errors(384, seed) for seed in range(6)]
    mean = {k: np.mean([r[k] for r in runs]) for k in runs[0]}
    assert mean["rho"] > 1.05 * mean["sample"]
    assert mean["cv"] < 1.02 * mean["sample"] and mean["cv"] < 0.7 * mean["rtn"]


def test_calibration_samples_alternate_between_the_folds_and_the_folds_sum_to_the_hessian():
    mask = torch.tensor([[1, 1, 1, 0], [1, 0, 0, 0], [1, 1, 0, 0]])
    x = torch.randn(3, 4, 5)
    ids, batch = sample_ids(x, mask)
    assert ids.tolist() == [0, 0, 0, 1, 2, 2] and batch == 3  # the real tokens' sequences, padding left out
    assert sample_ids(x[:, 0], None)[0].tolist() == [0, 1, 2]
    assert sample_ids(x, None)[0].tolist() == [0] * 4 + [1] * 4 + [2] * 4
    m = Moments()
    rows = x[mask.bool()]
    m.add(rows, ids, 3)
    m.add(rows, ids, 3)  # the second batch starts at sample 3: its first sequence goes to the odd fold
    assert m.tokens == [3 + 2 + 1, 1 + 3 + 2]  # even: sequences 0, 2 of the first batch, 1 of the second
    torch.testing.assert_close(m.hessian(), torch.cat([rows, rows]).T @ torch.cat([rows, rows]) / 12)
    even = torch.cat([rows[:3], rows[4:], rows[3:4]])
    torch.testing.assert_close(m.hessian(0), even.T @ even / 6)


def test_expected_error_is_gptqs_error_on_other_inputs_per_unit_of_rounding_noise():
    # the closed form cross-validation scores candidates with: rounding errors of a fine grid are independent
    # and uniform (variance scale^2 / 12), and GPTQ's error on inputs with another Hessian must average to it
    from mpsearch.quant.gptq_shrink import expected_error

    x_fit, x_test = _correlated_inputs(64, 32, seed=4), _correlated_inputs(4096, 32, seed=5)
    h_fit, h_test = x_fit.T @ x_fit / 64, x_test.T @ x_test / 4096
    H, perm, _ = damped(h_fit, 0.01, True)
    w = torch.randn(4000, 32, generator=torch.Generator().manual_seed(6))
    d = (gptq_quantize(w, h_fit, parse_option("int8")) - w).double()
    scale = (w.abs().amax(1) / 127).half().double()
    measured = float(((d @ h_test.double()) * d).sum())
    assert measured == pytest.approx(float((scale**2 / 12).sum()) * expected_error(H, perm, h_test), rel=0.05)
    in_sample = float((1 / factor(h_fit, 0.01, True).hinv.double().diagonal().square()).sum())  # U H U^T = I
    assert expected_error(H, perm, H[perm.argsort()][:, perm.argsort()]) == pytest.approx(in_sample, rel=1e-4)


def test_a_factor_solved_with_the_shrunk_hessian_gives_back_the_sample_and_the_shrunk_one():
    # few correlated tokens: cross-validation keeps a shrinkage in the factor, and hessian() must undo it for the
    # sample H and rescale it to the Schaefer-Strimmer estimate, as a GPTQ that kept the sample H gives them
    model, inputs = _classifier(32, seed=9)
    batches = [inputs(12) for _ in range(4)]
    shrinking, sample = GPTQ(model, batches), GPTQ(model, batches, shrink=False)
    f = shrinking.factors["0"]
    assert 0 < f.solved < 1 and f.rho == sample.factors["0"].rho
    unit = unit_map(model)["0"]
    for shrunk in (False, True):
        want = sample.hessian(unit, shrunk=shrunk)
        torch.testing.assert_close(
            shrinking.hessian(unit, shrunk=shrunk), want, rtol=1e-3, atol=1e-4 * float(want.max())
        )
