"""llama.cpp's grid i-quants (IQ3_S, IQ3_XXS, IQ2_S, IQ2_XS): the neighbour lists and the neighbour search
against line-by-line ports of ggml's C loops (``iq2xs_init_impl``/``iq3xs_init_impl``,
``iq*_find_best_neighbour``), what the types are for (more signal per bit than the k-quants of their size,
weighted by the importance matrix), and who may make them (llama-quantize makes IQ3_XXS, IQ2_S and IQ2_XS only
with an imatrix; ggml cannot make IQ2_XS without one). Decoding equals gguf's own dequantizers in
tests/test_ggml_quants.py; bytes equal llama-quantize's in the CI job ``llama.cpp``."""

import numpy as np
import pytest
import torch
from helpers.tiny_llama import tiny_llama

from mpsearch.core import MpsearchError, parse_option, parse_options
from mpsearch.quant import iquants_grid
from mpsearch.quant.formats import sqnr_db
from mpsearch.quant.llama_cpp import quantize_rows
from mpsearch.quant.quantizer import RTN
from mpsearch.runtimes.llama_cpp import GGUF_TYPES, IMATRIX_ONLY

TYPES = sorted(iquants_grid.TYPES)


def _off_grid_codes(name: str, count: int, seed: int = 0) -> list[int]:
    t, g = iquants_grid.TYPES[name], iquants_grid.grid(name, "cpu")
    rng = np.random.default_rng(seed)
    codes = []
    while len(codes) < count:
        levels = rng.integers(0, t.kmax, t.group)
        code = int(sum(int(v) << (t.bits * i) for i, v in enumerate(levels)))
        if int(g.kmap[code]) < 0:
            codes.append(code)
    return codes


@pytest.mark.parametrize("name", TYPES)
def test_neighbour_lists_are_ggmls(name):
    t, g = iquants_grid.TYPES[name], iquants_grid.grid(name, "cpu")
    grid = [[2 * int(v) + 1 for v in row] for row in g.levels.tolist()]
    for code in _off_grid_codes(name, 60):
        pos = [2 * ((code >> (t.bits * k)) & ((1 << t.bits) - 1)) + 1 for k in range(t.group)]
        dist2 = sorted((sum((p - q) ** 2 for p, q in zip(point, pos)), j) for j, point in enumerate(grid))
        want, d2, nhave = [], dist2[0][0], 1  # the C loop, line by line
        for d, j in dist2:
            if d > d2:
                if nhave == t.nwant:
                    break
                d2, nhave = d, nhave + 1
            want.append(j)
        start, n = int(g.starts[code]), int(g.counts[code])
        assert g.flat[start : start + n].tolist() == want, code


@pytest.mark.parametrize("name", TYPES)
def test_the_padded_lists_the_search_reads_are_the_neighbour_lists(name):
    # _snap reads each code's list from a bucket padded to a power of two; padding must point at the +inf term
    t, g = iquants_grid.TYPES[name], iquants_grid.grid(name, "cpu")
    lists, bucket, rows = g.buckets
    listed = torch.nonzero(g.counts).squeeze(1)
    assert bool((bucket[listed] >= 0).all()) and bool((bucket[g.counts == 0] < 0).all())
    for code in listed.tolist():
        offsets, points = lists[int(bucket[code])]
        row, n, start = int(rows[code]), int(g.counts[code]), int(g.starts[code])
        assert points[row, :n].tolist() == g.flat[start : start + n].tolist()
        want = g.levels[g.flat[start : start + n]] + t.kmax * torch.arange(t.group)  # (n, group) term offsets
        assert torch.equal(offsets[row, :, :n].long(), want.T)
        assert bool((offsets[row, :, n:] == g.term_stride).all())


@pytest.mark.parametrize("name", TYPES)
def test_the_neighbour_search_is_find_best_neighbour(name):
    t, g = iquants_grid.TYPES[name], iquants_grid.grid(name, "cpu")
    rng = np.random.default_rng(1)
    codes = _off_grid_codes(name, 300, seed=2)
    x = rng.random((len(codes), t.group), dtype=np.float32) * 9
    w = rng.random((len(codes), t.group), dtype=np.float32)
    s = (rng.random(len(codes), dtype=np.float32) + 0.5).astype(np.float32)
    x[:20] = np.round(x[:20])  # integer inputs: ties between neighbours, the first must win
    levels = torch.tensor([[(c >> (t.bits * k)) & ((1 << t.bits) - 1) for k in range(t.group)] for c in codes])
    got, on = iquants_grid._snap(g, levels, torch.from_numpy(x), torch.from_numpy(w), torch.from_numpy(s))
    assert not on.any()
    grid = g.q.numpy()
    for k, code in enumerate(codes):
        start, n = int(g.starts[code]), int(g.counts[code])
        best, best_d2 = -1, np.float32(np.finfo(np.float32).max)
        for j in g.flat[start : start + n].tolist():
            d2 = np.float32(0)
            for i in range(t.group):
                diff = np.float32(s[k] * grid[j, i]) - x[k, i]
                d2 = np.float32(d2 + np.float32(np.float32(w[k, i] * diff) * diff))
            if d2 < best_d2:
                best, best_d2 = j, d2
        assert int(got[k]) == best, (k, code)


def _ffn_down():
    """A real weight with 256-divisible rows (SmolLM2's blk.3.ffn_down, stored Q4_1 by llama.cpp) and a
    heavy-tailed importance of its columns."""
    import gguf
    from gguf import GGUFReader

    from mpsearch.models.smollm2 import gguf_path

    tensor = next(t for t in GGUFReader(gguf_path()).tensors if t.name == "blk.3.ffn_down.weight")
    w = torch.from_numpy(gguf.quants.dequantize(tensor.data, tensor.tensor_type)[:96].copy())
    qw = torch.exp(torch.randn(w.shape[1], generator=torch.Generator().manual_seed(0)))
    return w, qw


@pytest.mark.parametrize("name", TYPES)
def test_the_compiled_block_search_is_the_torch_port(name):
    # on a CPU with numba the block search runs compiled (mpsearch.quant.iquants_numba); on other devices, torch
    from mpsearch.quant import ggml_numba

    if not ggml_numba.available():
        pytest.skip("numba is not installed: CPUs run the torch port")
    t, g = iquants_grid.TYPES[name], iquants_grid.grid(name, "cpu")
    w, qw = _ffn_down()
    w = w[:24].clone()
    w[1] = 0  # skipped blocks
    w[2, :256] = 1e-9  # below the types' eps
    w[3] = torch.round(w[3] * 300) / 300  # ties between trial scales and between neighbours
    for importance in (qw, None if not t.needs_imatrix else qw * 0 + 1):
        x = w.reshape(w.shape[0], -1, t.block)
        weight = iquants_grid._weights(t, x, importance)
        xval, _ = iquants_grid._signs(t, x, weight)
        scale, point, skipped = iquants_grid._block_scales(t, g, xval, weight)
        waux = iquants_grid.sqrt(weight)
        nums = iquants_grid._trial_numerators(t)
        want_scale, want_point = iquants_grid._block_scales_torch(t, g, xval, weight, waux, nums,
                                                                  xval.amax(-1), skipped)  # fmt: skip
        assert bool(skipped[1].all()) and torch.equal(scale, want_scale) and torch.equal(point, want_point)


def test_grid_i_quants_carry_more_weighted_signal_per_bit_than_the_k_quants():
    # what they are for: at the size of Q3_K (3.44 bpw) IQ3_S, and below Q2_K's size (2.63 bpw) IQ2_S, keep
    # more of the importance-weighted signal; every type within the ~6 dB per bit band of its size
    w, qw = _ffn_down()

    def weighted_snr(name):
        values = quantize_rows(w, parse_option(name), qw)[1]
        return float(10 * torch.log10((w**2 * qw).sum() / ((values - w) ** 2 * qw).sum()))

    snr = {name: weighted_snr(name) for name in ("q3_k", "q2_k", *TYPES)}
    assert snr["iq3_s"] > snr["q3_k"] and snr["iq2_s"] > snr["q2_k"], snr
    assert snr["iq3_s"] > snr["iq3_xxs"] > snr["iq2_s"] > snr["iq2_xs"], snr
    for name in TYPES:
        bpw = parse_option(name).storage_bits((1, 256)) / 256
        assert 6.02 * bpw - 12 < snr[name] < 6.02 * bpw + 4, (name, bpw, snr[name])
        assert sqnr_db(w, quantize_rows(w, parse_option(name), qw)[1]) > 0


def test_round_to_nearest_refuses_the_types_llama_quantize_makes_only_with_an_imatrix():
    assert IMATRIX_ONLY == {"iq3_xxs", "iq2_s", "iq2_xs"} and IMATRIX_ONLY <= set(GGUF_TYPES)
    with pytest.raises(MpsearchError, match="iq2_s, iq2_xs: llama.cpp makes these only with an importance matrix"):
        RTN.check_options(parse_options(["q4_k", "iq2_s", "iq2_xs"]))
    RTN.check_options(parse_options(["iq3_s", "iq4_xs"]))  # llama-quantize makes these without one


def _tiny_llama(tied: bool):
    return tiny_llama(hidden=256, intermediate=512, vocab=64, tied=tied)


def test_a_targets_defaults_are_what_the_quantizer_makes():
    from mpsearch.context import SearchContext

    model = _tiny_llama(tied=False)
    data = [{"input_ids": torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(0))}]
    rtn = SearchContext.resolve(model, data, target="llama.cpp")
    imatrix = SearchContext.resolve(model, data, target="llama.cpp", quantizer="imatrix")
    assert set(rtn.options) == {f"{t}" for t in GGUF_TYPES} - IMATRIX_ONLY
    assert set(imatrix.options) == set(GGUF_TYPES)
    with pytest.raises(MpsearchError, match="only with an importance matrix.*--quantizer imatrix"):
        SearchContext.resolve(model, data, options=["q4_k", "iq2_xs"], target="llama.cpp")


def test_a_unit_without_an_imatrix_entry_cannot_take_iq2_xs():
    # a tied embedding (llama.cpp's token_embd) has no imatrix entry: ggml cannot make iq2_xs of it, so its
    # table has no such row; the types llama.cpp makes from the reference path stay
    from mpsearch.layers import find_units
    from mpsearch.quant.imatrix import Imatrix

    model = _tiny_llama(tied=True)
    data = [{"input_ids": torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(0))}]
    im = Imatrix(model, data)
    units = {u.name: u for u in find_units(model)}
    embedding = next(u for name, u in units.items() if "embed" in name or "lm_head" in name)
    linear = units["model.layers.0.self_attn.q_proj"]
    assert im.importance(embedding) is None and im.importance(linear) is not None
    assert not im.takes(embedding, parse_option("iq2_xs"))
    assert im.takes(embedding, parse_option("iq2_s")) and im.takes(linear, parse_option("iq2_xs"))
    assert im.quantize(linear, "iq2_xs").shape == linear.weight.shape
