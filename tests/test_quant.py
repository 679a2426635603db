import numpy as np
import pytest
import torch
from torch import nn

from mpsearch.core import BitPlan, InvalidPlanError, parse_option
from mpsearch.quant import apply_plan, minifloat_max, quantize_weight, round_minifloat, sqnr_db


@pytest.fixture
def gaussian():
    return torch.randn(256, 1024, generator=torch.Generator().manual_seed(0))


def test_int_sqnr_rises_about_6db_per_bit(gaussian):
    bits = np.arange(3, 9)
    sqnr = np.array([sqnr_db(gaussian, quantize_weight(gaussian, f"int{b}")) for b in bits])
    slope = np.polyfit(bits, sqnr, 1)[0]
    assert 5.8 < slope < 6.8, f"{slope:.2f} dB/bit"
    # uniform-noise oracle: the step is amax / (2^(b-1) - 1), noise power step^2 / 12, so each extra bit
    # adds 20 log10 of the ratio of level counts (6.02 dB in the limit)
    qmax = 2.0 ** (bits - 1) - 1
    expected = 20 * np.log10(qmax[1:] / qmax[:-1])
    np.testing.assert_allclose(np.diff(sqnr)[1:], expected[1:], atol=0.25)
    noise = gaussian.var() * 10 ** (-sqnr[-1] / 10)
    step = gaussian.abs().amax(1).pow(2).mean() / 127**2
    assert float(noise) == pytest.approx(float(step) / 12, rel=0.05)


def test_int8_round_trip_error_within_half_a_step(gaussian):
    q = quantize_weight(gaussian, "int8")
    step = (gaussian.abs().amax(1, keepdim=True) / 127).half().float()
    assert torch.all((q - gaussian).abs() <= step / 2 + 1e-7)
    assert not torch.equal(q, gaussian)
    # a second pass with the same option changes nothing (the grid is reproduced)
    assert torch.allclose(quantize_weight(q, "int8"), q, atol=1e-7)


def test_int_levels_count(gaussian):
    for b in (2, 3, 4):
        q = quantize_weight(gaussian[:1], f"int{b}")
        assert len(torch.unique(q)) <= 2**b
        qa = quantize_weight(gaussian[:1], f"int{b}_asym")
        assert len(torch.unique(qa)) <= 2**b


def test_asymmetric_beats_symmetric_on_shifted_weights(gaussian):
    shifted = gaussian.abs() + 0.5
    assert (
        sqnr_db(shifted, quantize_weight(shifted, "int4_asym")) > sqnr_db(shifted, quantize_weight(shifted, "int4")) + 3
    )


def test_groupwise_beats_per_channel_on_outliers(gaussian):
    w = gaussian.clone()
    w[:, ::256] *= 20  # one outlier per 256 inputs hurts a per-channel scale more than 128-groups
    assert sqnr_db(w, quantize_weight(w, "int4_g64")) > sqnr_db(w, quantize_weight(w, "int4")) + 1


def test_groupwise_handles_rows_that_do_not_divide(gaussian):
    w = gaussian[:, :200]
    q = quantize_weight(w, "int4_g128")
    assert q.shape == w.shape
    # the first 128 columns of each row share one scale: at most 16 levels there
    assert len(torch.unique(q[0, :128])) <= 16


@pytest.mark.parametrize("fmt, dtype", [((4, 3), torch.float8_e4m3fn), ((5, 2), torch.float8_e5m2)])
def test_minifloat_rounding_matches_torch_float8(fmt, dtype):
    fmax = minifloat_max(*fmt)
    assert fmax == float(torch.finfo(dtype).max)
    g = torch.Generator().manual_seed(1)
    x = torch.cat(
        [
            torch.randn(20000, generator=g) * fmax / 8,
            torch.randn(20000, generator=g) * float(torch.finfo(dtype).tiny) * 4,  # subnormals
            torch.tensor([0.0, fmax, -fmax]),
        ]
    )
    x = x.clamp(-fmax, fmax)
    assert torch.equal(round_minifloat(x, *fmt), x.to(dtype).float())


def test_fp8_option_equals_scaled_torch_cast(gaussian):
    q = quantize_weight(gaussian, "fp8_e4m3")
    scale = (gaussian.abs().amax(1, keepdim=True) / 448).half().float()
    assert torch.equal(q, (gaussian / scale).to(torch.float8_e4m3fn).float() * scale)
    assert 25 < sqnr_db(gaussian, q) < 40  # 3 mantissa bits: ~31 dB on Gaussians
    assert sqnr_db(gaussian, quantize_weight(gaussian, "fp8_e5m2")) < sqnr_db(gaussian, q)


def test_fp4_values_are_e2m1_grid_times_group_scale(gaussian):
    w = gaussian[:4, :64]
    q = quantize_weight(w, "fp4_e2m1")  # group 32
    grid = torch.tensor([0, 0.5, 1, 1.5, 2, 3, 4, 6])
    groups = w.reshape(4, 2, 32)
    scale = (groups.abs().amax(-1, keepdim=True) / 6).half().float()
    normalized = (q.reshape(4, 2, 32) / scale).abs()
    assert torch.all((normalized[..., None] - grid).abs().min(-1).values < 1e-5)
    # nearest-value rounding: no grid point is closer to the input than the chosen one
    x = (groups / scale).abs()
    best = grid[(x[..., None] - grid).abs().argmin(-1)]
    assert torch.all((best - normalized).abs() <= 1e-5 + ((x - best).abs() - (x - normalized).abs()).abs())


class TwoLayer(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(32, 32)
        self.b = nn.Linear(32, 32)
        self.c = nn.Linear(32, 8)

    def forward(self, x):
        return self.c(self.b(self.a(x)))


def test_apply_plan_returns_a_copy_and_leaves_caller_untouched():
    torch.manual_seed(0)
    model = TwoLayer().train()
    model.a.weight.requires_grad_(False)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    q = apply_plan(model, BitPlan({"a": "int2", "b": "int8"}))
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k])
    assert model.training and not model.a.weight.requires_grad
    assert not torch.equal(q.a.weight, model.a.weight)
    assert torch.equal(q.c.weight, model.c.weight)  # unplanned layers stay in full precision
    assert torch.equal(q.a.weight, quantize_weight(model.a.weight, parse_option("int2")))


def test_apply_plan_rejects_unknown_layers_and_conflicting_shared_weights():
    model = TwoLayer()
    with pytest.raises(InvalidPlanError, match="'zz' is not a quantizable layer"):
        apply_plan(model, {"a": "int4", "zz": "int4"})
    model.b.weight = model.a.weight
    with pytest.raises(InvalidPlanError, match="shares its weight"):
        apply_plan(model, {"a": "int4", "b": "int8"})
    q = apply_plan(model, {"a": "int4", "b": "int4"})
    assert q.a.weight is q.b.weight and torch.equal(q.a.weight, quantize_weight(model.a.weight, "int4"))


def test_apply_plan_inplace_quantizes_the_model_itself_like_the_copy():
    torch.manual_seed(0)
    model = TwoLayer()
    plan = BitPlan({"a": "int2", "b": "int8"})
    copied = apply_plan(model, plan)
    a_weight = model.a.weight
    assert apply_plan(model, plan, inplace=True) is model
    assert model.a.weight is a_weight  # the same Parameter, its values quantized
    for name, value in copied.state_dict().items():
        assert torch.equal(model.state_dict()[name], value)


def test_quantized_block_computes_with_the_plan_and_restores_the_very_same_weights():
    from mpsearch.quant import quantized

    torch.manual_seed(0)
    model = TwoLayer()
    model.b.weight = model.a.weight  # a shared weight: both users see the quantized tensor
    x = torch.randn(5, 32)
    plan = BitPlan({"a": "int3", "c": "int4"})
    expected = apply_plan(model, plan)(x)
    params = dict(model.named_parameters())
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with quantized(model, plan) as q:
        assert torch.equal(q(x), expected)
        assert q.b.weight is q.a.weight
    assert dict(model.named_parameters()) == params  # the original Parameter objects are back
    with pytest.raises(KeyError), quantized(model, plan) as q:
        raise KeyError(q(x).shape)
    assert dict(model.named_parameters()) == params
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k])
