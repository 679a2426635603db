"""mpsearch's torch ports of llama.cpp's quantizers against independent oracles: the ``gguf`` package's numpy
reference quantizers (Q4_0 ... Q8_0) and dequantizers (every type), the numpy k-quant port checked byte for
byte against llama-quantize (tests/helpers/kquants_numpy.py), brute force for the nearest-level search, and
what an importance matrix is for (lower importance-weighted error). The real llama.cpp (llama-quantize with
and without --imatrix, every type) is checked in the CI job `llama.cpp` (experiments/check_llamacpp.py)."""

import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from mpsearch.core import MpsearchError, parse_option
from mpsearch.quant.ggml_math import best_index, sqrt
from mpsearch.quant.iquants import KVALUES
from mpsearch.quant.iquants_grid import NEEDS_IMATRIX
from mpsearch.quant.llama_cpp import QUANTIZERS, ggml_type, quantize_rows

sys.path.insert(0, str(Path(__file__).parent / "helpers"))
import kquants_numpy  # noqa: E402


def _rows(seed: int, n: int = 12, length: int = 512) -> torch.Tensor:
    """Heavy-tailed rows plus the blocks quantizers get wrong: zero, constant, one-signed, tiny, an outlier."""
    rng = np.random.default_rng(seed)
    x = (rng.standard_t(4, size=(n, length)) * 0.02).astype(np.float32)
    x[1] = 0
    x[2, :32] = 1e-3
    x[3, :256] = np.abs(x[3, :256])
    x[4] *= 1e-6
    x[5, 7] = 0.7
    return torch.from_numpy(x)


def _importance(seed: int, length: int = 512) -> torch.Tensor:
    rng = np.random.default_rng(seed)
    qw = (rng.gamma(0.5, size=length) * 0.3).astype(np.float32)
    qw[3] = 0
    return torch.from_numpy(qw)


@pytest.mark.parametrize("name", ["q4_0", "q4_1", "q5_0", "q5_1", "q8_0"])
def test_legacy_reference_is_ggufs_own_quantizer_byte_for_byte(name):
    import gguf

    rows = _rows(0)
    packed, _ = quantize_rows(rows, parse_option(name))
    assert np.array_equal(packed.numpy(), gguf.quants.quantize(rows.numpy(), ggml_type(parse_option(name))))


@pytest.mark.parametrize("name", sorted(kquants_numpy.QUANTIZERS))
def test_k_quant_reference_is_the_llama_quantize_checked_port_byte_for_byte(name):
    rows = _rows(1)
    packed, values = quantize_rows(rows, parse_option(name))
    old_packed, old_values = kquants_numpy.QUANTIZERS[name](rows.numpy().reshape(-1, 256))
    assert np.array_equal(packed.numpy(), old_packed.reshape(rows.shape[0], -1))
    assert np.array_equal(values.numpy(), old_values.reshape(rows.shape))


@pytest.mark.parametrize("name", sorted(QUANTIZERS))
@pytest.mark.parametrize("weighted", [False, True])
def test_every_type_decodes_to_its_values_with_and_without_an_imatrix(name, weighted):
    import gguf

    option = parse_option(name)
    rows = _rows(2)
    if name in NEEDS_IMATRIX and not weighted:  # ggml asserts an imatrix for iq2_xs: a clear error here
        with pytest.raises(MpsearchError, match="needs an importance matrix.*--quantizer imatrix"):
            quantize_rows(rows, option)
        return
    packed, values = quantize_rows(rows, option, _importance(2) if weighted else None)
    block, nbytes = gguf.GGML_QUANT_SIZES[ggml_type(option)]
    assert packed.dtype == torch.uint8 and packed.shape == (rows.shape[0], rows.shape[1] // block * nbytes)
    assert np.array_equal(gguf.quants.dequantize(packed.numpy(), ggml_type(option)), values.numpy())
    assert torch.all(values[1] == 0) and torch.isfinite(values).all()


@pytest.mark.parametrize("name", sorted(set(QUANTIZERS) - NEEDS_IMATRIX))
def test_an_imatrix_lowers_the_importance_weighted_error(name):
    # what llama-quantize's quant_weights paths are for: error where the inputs are large costs more. Q8_0
    # and F16 have no such path (llama.cpp ignores the imatrix for them): their values must not change at all
    torch.manual_seed(0)
    rows = torch.randn(64, 1024) * 0.02
    qw = torch.exp(torch.randn(1024) * 1.5)
    plain = quantize_rows(rows, parse_option(name))[1]
    weighted = quantize_rows(rows, parse_option(name), qw)[1]
    if name in ("q8_0", "f16"):
        assert torch.equal(plain, weighted)
        return
    err = [float(((v - rows) ** 2 * qw).sum()) for v in (plain, weighted)]
    assert err[1] < 0.97 * err[0], (name, err)


def test_rows_cut_into_chunks_give_the_whole_tensors_bytes(monkeypatch):
    from mpsearch.quant import llama_cpp

    rows, qw = _rows(3, n=9), _importance(3)
    whole = {n: quantize_rows(rows, parse_option(n), qw)[0] for n in ("q4_0", "q4_k", "iq4_xs")}
    monkeypatch.setattr(llama_cpp, "CPU_CHUNK", {}, raising=True)
    monkeypatch.setattr(llama_cpp, "CPU_CHUNK_DEFAULT", (512, 1024), raising=True)  # one or two rows a chunk
    for name, packed in whole.items():
        assert torch.equal(quantize_rows(rows, parse_option(name), qw)[0], packed), name


def test_nearest_level_search_is_ggmls_binary_search():
    mids = [(a + b) / 2 for a, b in zip(KVALUES, KVALUES[1:])]
    probes = [np.nextafter(np.float32(m), np.float32(d)) for m in mids for d in (-1e9, 1e9)] + mids
    x = torch.tensor(probes + [-1e4, 1e4, -np.inf, np.inf, -127, 113, 0.0, -0.0], dtype=torch.float32)
    x = torch.cat([x, torch.randn(2000) * 90])

    def c_search(v: float) -> int:  # best_index_int8, line by line
        if v <= KVALUES[0]:
            return 0
        if v >= KVALUES[-1]:
            return len(KVALUES) - 1
        lo, hi = 0, len(KVALUES) - 1
        while hi - lo > 1:
            mid = (lo + hi) // 2
            if v < KVALUES[mid]:
                hi = mid
            else:
                lo = mid
        return hi - 1 if np.float32(v) - np.float32(KVALUES[hi - 1]) < np.float32(KVALUES[hi]) - np.float32(v) else hi

    assert best_index(KVALUES, x).tolist() == [c_search(float(v)) for v in x]


def test_ggmls_nearest_level_choice_switches_exactly_at_each_midpoint():
    """The premise of ``best_index``: over every float32 x of a bracket [a, b] of kvalues_iq4nl, C's
    ``(x - a) < (b - x)`` holds below the midpoint and fails from it on (bisection over the ordered floats;
    the predicate is monotone because float32 subtraction rounds monotonically)."""

    def key(v: np.float32) -> int:  # float32 -> an integer of the same order
        i = int(np.float32(v).view(np.int32))
        return i if i >= 0 else -(i & 0x7FFFFFFF)

    def value(k: int) -> np.float32:
        return np.array([k if k >= 0 else (-k) | -0x80000000], dtype=np.int32).view(np.float32)[0]

    for a, b in zip(KVALUES, KVALUES[1:]):
        a32, b32 = np.float32(a), np.float32(b)

        def upper(x: np.float32, a32: np.float32 = a32, b32: np.float32 = b32) -> bool:
            return not (np.float32(x - a32) < np.float32(b32 - x))

        lo, hi = key(a32), key(b32)
        assert not upper(value(lo)) and upper(value(hi))
        while hi - lo > 1:
            mid = (lo + hi) // 2
            lo, hi = (lo, mid) if upper(value(mid)) else (mid, hi)
        assert float(value(hi)) == (a + b) / 2, (a, b)


def test_sqrt_is_correctly_rounded():
    x = torch.rand(100000) * 10
    exact = torch.sqrt(x.double())
    got = sqrt(x)
    err = (got.double() - exact).abs()
    for direction in (-1.0, 1e9):  # no neighbouring float32 is nearer the exact root
        neighbour = torch.nextafter(got, torch.tensor(direction)).double()
        assert torch.all(err <= (neighbour - exact).abs())


@pytest.mark.parametrize("name,bits", [("iq4_nl", 4.5), ("iq4_xs", 4.25)])
def test_i_quants_beat_the_same_size_legacy_type(name, bits):
    from mpsearch.quant.formats import sqnr_db

    torch.manual_seed(1)
    rows = torch.randn(32, 1024) * 0.02
    snr = sqnr_db(rows, quantize_rows(rows, parse_option(name))[1])
    legacy = sqnr_db(rows, quantize_rows(rows, parse_option("q4_0"))[1])  # 4.5 bpw, uniform levels
    assert 6.02 * 4 - 6 < snr < 6.02 * 4 + 6 and snr > legacy - (4.5 - bits) * 6.02, (snr, legacy)
    assert parse_option(name).storage_bits((1, 256)) / 256 == bits


# the five searches ggml runs (n, nmax, rmin, rdelta, nstep, use_mad): Q4_1/Q5_1/Q4_K/Q5_K/Q2_K with an imatrix,
# Q4_K and Q5_K without one, Q2_K without one
QKX_CALLS = [(32, 15, -0.9, 0.05, 36, False), (32, 31, -0.9, 0.05, 36, False), (16, 3, -0.9, 0.05, 36, False),
             (32, 15, -1.0, 0.1, 20, False), (32, 31, -0.5, 0.1, 15, False), (16, 3, -0.5, 0.1, 15, True)]  # fmt: skip


@pytest.mark.parametrize("call", QKX_CALLS)
def test_the_compiled_min_scale_search_is_the_torch_port(call):
    from mpsearch.quant import ggml_numba
    from mpsearch.quant.ggml_math import make_qkx_quants_torch

    if not ggml_numba.available():
        pytest.skip("numba is not installed: CPUs run the torch port")
    n, *args = call
    x = _rows(7, n=13, length=n * 75).reshape(13, -1, n)  # 975 blocks: not whole groups of 64 lanes
    x[6] = torch.round(x[6] * 400) / 400  # on a grid: levels tie and candidates give equal errors
    w = torch.cat([_importance(8, n * 75)] * 13).reshape(x.shape)
    w[7] = 0  # no weight at all: D = 0, no candidate is taken
    for weights in (w, x.abs(), x * x):
        got = ggml_numba.make_qkx_quants(x, weights, *args)
        want = make_qkx_quants_torch(x, weights, *args)
        for g, t, what in zip(got, want, ("scale", "min", "levels")):
            assert g.dtype == t.dtype and torch.equal(g, t), what


def test_numba_can_be_switched_off_and_cpus_then_run_the_torch_port(monkeypatch):
    from mpsearch.quant import ggml_math, ggml_numba

    calls = []
    monkeypatch.setattr(ggml_math, "make_qkx_quants_torch", lambda *a: calls.append(a) or "torch")
    monkeypatch.setenv("MPSEARCH_NUMBA", "0")
    ggml_numba.jit.cache_clear()
    try:
        x = _rows(1, length=64).reshape(12, -1, 32)
        assert not ggml_numba.available()
        assert ggml_math.make_qkx_quants(x, x.abs(), 15, -1.0, 0.1, 20) == "torch" and len(calls) == 1
    finally:
        monkeypatch.delenv("MPSEARCH_NUMBA")
        ggml_numba.jit.cache_clear()


def test_the_compiled_iq4_scale_search_is_the_torch_port():
    from mpsearch.quant import ggml_numba, iquants, iquants_numba

    if not ggml_numba.available():
        pytest.skip("numba is not installed: CPUs run the torch port")
    x = _rows(11, length=32 * 75).reshape(12, -1, 32)  # 900 blocks: not whole groups of 64 lanes
    x[6] = torch.round(x[6] * 400) / 400  # levels on a grid: ties at the nearest-level midpoints
    x[7, :3] = 1e-16  # below the eps: scale 0
    for weight in (x * x, _importance(12, 32).expand_as(x) * (x.abs() + 0.01)):
        got = iquants_numba.iq4_block_scales(x, weight, iquants.KVALUES, iquants.NTRY)
        want = iquants._block_scales_torch(x, weight)
        assert torch.equal(got, want) and bool((got[7, :3] == 0).all())


@pytest.mark.parametrize("n, nmax", [(16, 32), (16, 4), (32, 8), (32, 16)])  # Q6_K, Q3_K, Q4_0, Q5_0 (+imatrix)
def test_the_compiled_qx_scale_search_is_the_torch_port(n, nmax):
    from mpsearch.quant import ggml_math, ggml_numba

    if not ggml_numba.available():
        pytest.skip("numba is not installed: CPUs run the torch port")
    x = _rows(13, length=n * 75).reshape(12, -1, n)  # 900 blocks: not whole groups of 64 lanes
    x[6] = torch.round(x[6] * 400) / 400  # ties between candidate scales
    numerators = ggml_math.qx_numerators(nmax)
    for w in (x * x, _importance(14, n).expand_as(x)):
        got = ggml_numba.make_qx_quants(x, w, nmax, numerators)
        want = ggml_math.make_qx_quants_torch(x, nmax, w, numerators)
        assert all(g.dtype == t.dtype and torch.equal(g, t) for g, t in zip(got, want))
