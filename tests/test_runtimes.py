"""Runtime option families: each runtime's own sizes and quantization math, checked against the runtime's
own code (gguf's dequantizers and llama.cpp-written tensors, torchao, HQQ) and through a real GGUF file."""

import math

import numpy as np
import pytest
import torch
from helpers.tiny_llama import tiny_llama

import mpsearch
from mpsearch.core import BitPlan, InvalidOptionError, LayerInfo, cost_rows, parse_option, parse_options
from mpsearch.export import export
from mpsearch.quant.formats import quantize_weight, sqnr_db
from mpsearch.quant.iquants_grid import NEEDS_IMATRIX
from mpsearch.quant.kquants import QUANTIZERS
from mpsearch.quant.llama_cpp import ggml_type, quantize_rows
from mpsearch.runtimes import get_runtime
from mpsearch.runtimes.llama_cpp import (
    GGUF_TYPES,
    IMATRIX_ONLY,
    bits_per_weight,
    gguf_name,
    tensor_bytes,
    tensor_types,
)


def _importance(name: str, columns: int):
    """An importance matrix entry for the types ggml makes only with one (iq2_xs), else None."""
    return torch.linspace(0.5, 2.0, columns) if name in NEEDS_IMATRIX else None


def _hard_rows(seed: int = 0) -> np.ndarray:
    """Gaussian rows plus the blocks quantizers get wrong: all zero, constant, one-signed, tiny, one outlier."""
    rng = np.random.default_rng(seed)
    x = (rng.standard_normal((24, 512)) * 0.02).astype(np.float32)
    x[1] = 0
    x[2, :16] = 0
    x[3] = 0.5
    x[4] = np.abs(x[4])
    x[5] *= 1e-6
    x[6, 7] = 3.0
    x[7] = -np.abs(x[7])
    return x


def test_gguf_block_sizes_are_ggmls():
    import gguf

    for name, (_, block, nbytes) in GGUF_TYPES.items():
        assert gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[name.upper()]] == (block, nbytes), name
        assert tensor_bytes((3, 2 * block), name) == parse_option(name).storage_bits((3, 2 * block)) / 8


@pytest.mark.parametrize("name", list(GGUF_TYPES))
def test_every_gguf_type_decodes_to_its_fake_quant_bit_for_bit(name):
    import gguf

    rows = _hard_rows()
    imatrix = _importance(name, rows.shape[1])
    packed, values = (t.numpy() for t in quantize_rows(rows, parse_option(name), imatrix))
    assert packed.dtype == np.uint8 and packed.shape == (24, 512 // GGUF_TYPES[name][1] * GGUF_TYPES[name][2])
    decoded = gguf.quants.dequantize(packed, ggml_type(parse_option(name)))
    assert np.array_equal(decoded, values)
    rows_t = torch.from_numpy(rows)
    if imatrix is None:
        got = quantize_weight(rows_t, name).numpy()
    else:
        got = get_runtime("llama.cpp").quantize(rows_t, parse_option(name), imatrix=imatrix).numpy()
    assert np.array_equal(got, values)
    assert np.all(np.isfinite(values)) and np.all(values[1] == 0)


def _smollm2_tensor(name: str) -> np.ndarray:
    import gguf
    from gguf import GGUFReader

    from mpsearch.models.smollm2 import gguf_path

    tensor = next(t for t in GGUFReader(gguf_path()).tensors if t.name == name)
    return tensor, gguf.quants.dequantize(tensor.data, tensor.tensor_type)


@pytest.mark.parametrize("name", ["blk.0.attn_q.weight", "blk.5.ffn_down.weight", "token_embd.weight"])
def test_llama_cpp_written_tensors_are_reproduced_byte_for_byte(name):
    # SmolLM2's GGUF was written by llama.cpp (Q4_1 blocks, Q8_0 embeddings): quantizing its values again
    # with mpsearch's llama.cpp path must give llama.cpp's bytes
    tensor, values = _smollm2_tensor(name)
    packed, again = (t.numpy() for t in quantize_rows(values, parse_option(tensor.tensor_type.name.lower())))
    assert np.array_equal(packed, tensor.data) and np.array_equal(again, values)


@pytest.mark.parametrize("name", sorted(QUANTIZERS))
def test_k_quants_on_real_weights_decode_exactly_and_gain_about_6db_per_bit(name):
    import gguf

    # SmolLM2's embedding matrix (stored Q8_0 by llama.cpp: close to its float weights), as 256-blocks
    _, weights = _smollm2_tensor("token_embd.weight")
    weights = weights[:2048].reshape(-1, 256)
    packed, values = (t.numpy() for t in QUANTIZERS[name](torch.from_numpy(weights.copy())))
    assert np.array_equal(gguf.quants.dequantize(packed, ggml_type(parse_option(name))), values)
    snr = sqnr_db(torch.from_numpy(weights), torch.from_numpy(values))
    bits = GGUF_TYPES[name][0]
    assert 6.02 * bits - 8 < snr < 6.02 * bits + 6, (name, snr)


def test_k_quant_sqnr_rises_with_bits():
    w = torch.from_numpy(_hard_rows(1)[8:])
    snr = [sqnr_db(w, quantize_weight(w, n)) for n in ("q2_k", "q3_k", "q4_k", "q5_k", "q6_k")]
    assert all(b - a > 4 for a, b in zip(snr, snr[1:])), snr


def test_torchao_and_hqq_options_are_the_runtimes_own_tensors():
    from hqq.core.quantize import BaseQuantizeConfig, HQQLinear
    from torchao.quantization import quantize_

    from mpsearch.runtimes.torchao import torchao_config

    torch.manual_seed(0)
    lin = torch.nn.Linear(128, 16, bias=False)
    for bits in (1, 2, 3, 4, 8):
        hqq = HQQLinear(
            torch.nn.Linear(128, 16, bias=False).requires_grad_(False),
            BaseQuantizeConfig(nbits=bits, group_size=64),
            compute_dtype=torch.float16,
            device="cpu",
            initialize=False,
        )
        hqq.linear_layer.weight.copy_(lin.weight)
        hqq.initialize()
        assert torch.equal(hqq.dequantize().float(), quantize_weight(lin.weight.detach(), f"hqq:int{bits}_g64"))
    for option in ("torchao:int4_g32", "torchao:int3_g64_asym", "torchao:int8", "torchao:int2_asym"):
        model = torch.nn.Sequential(torch.nn.Linear(128, 16, bias=False))
        model[0].weight.data.copy_(lin.weight)
        quantize_(model, torchao_config(BitPlan({"0": option})), filter_fn=None)
        assert torch.equal(model[0].weight.dequantize(), quantize_weight(lin.weight.detach(), option)), option


def test_gptq_grid_is_round_to_nearest_on_fp16_scaled_levels():
    torch.manual_seed(0)
    w = torch.randn(8, 256)
    for name in ("gptq:int4_g128", "gptq:int3_g32_asym", "gptq:int8", "gptq:int2_g64"):
        opt = parse_option(name)
        q = quantize_weight(w, name).reshape(8, -1, opt.group_size or 256)
        x = w.reshape(q.shape)
        for row, orig in zip(q.reshape(-1, q.shape[-1]), x.reshape(-1, q.shape[-1])):
            levels = torch.unique(row)
            assert len(levels) <= 2**opt.bits
            # every value is the grid point nearest to its weight (up to the fp16 rounding of the scale)
            step = (levels[1:] - levels[:-1]).min() if len(levels) > 1 else 1.0
            inside = (orig >= levels.min()) & (orig <= levels.max())
            assert torch.all((row - orig)[inside].abs() <= step / 2 * 1.01)


def test_layers_a_runtime_cannot_store_get_no_row_and_a_clear_error_when_nothing_fits():
    layers = [LayerInfo("a", (8, 512), "linear"), LayerInfo("b", (8, 576), "linear")]
    frame = cost_rows(layers, parse_options(["q4_k", "q4_0"]))
    assert set(zip(frame.layer, frame.option)) == {("a", "q4_k"), ("a", "q4_0"), ("b", "q4_0")}
    assert frame.set_index(["layer", "option"]).loc[("a", "q4_k"), "bits"] == 4.5
    with pytest.raises(InvalidOptionError, match=r"layer 'b' \(rows of 576 weights\) fits none of the options"):
        cost_rows(layers, parse_options(["q4_k", "q6_k"]))
    assert not parse_option("torchao:int4_g128").fits((4, 576)) and parse_option("int4_g128").fits((4, 576))


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gpt2", "bert"])
def test_name_maps_cover_every_layer_of_each_architecture(arch):
    import gguf

    from mpsearch.testing import tiny_transformers

    model = tiny_transformers()[arch]()[0]
    layers, _ = mpsearch.discover(model)
    names = {gguf_name(info.name, model.config.model_type) for info in layers}
    known = set(gguf.TENSOR_NAMES.values())
    patterns = {n.replace("{bid}", "0").replace(".0.", f".{i}.") for n in known for i in range(2)}
    assert names <= {p + ".weight" for p in patterns}, names - {p + ".weight" for p in patterns}
    assert len(names) == len(layers)
    assert {"blk.0.attn_q.weight", "blk.1.ffn_down.weight"} <= names or {"blk.0.attn_qkv.weight"} <= names


def _llama(hidden: int, intermediate: int, vocab: int, tied: bool, layers: int = 2):
    return tiny_llama(hidden, intermediate, vocab, tied, layers)


def test_a_tied_head_is_exported_as_the_embedding_tensor():
    model = _llama(64, 128, 96, tied=True)
    batches = [{"input_ids": torch.randint(0, 96, (2, 8), generator=torch.Generator().manual_seed(0))}]
    table = mpsearch.estimate(model, batches, "sqnr", ["q8_0", "q4_0"], target="llama.cpp", cache=False)
    plan = mpsearch.solve(table, mpsearch.Budget(avg_bits=8.5)).plan
    assert plan.provenance["aliases"] == {"lm_head": ["model.embed_tokens"]}
    assert plan.provenance["architecture"] == "llama"
    types = tensor_types(plan)
    assert types["token_embd.weight"] == plan["lm_head"] and "output.weight" not in types
    assert f"^token_embd\\.weight$={plan['lm_head']}" in export(plan, "llama.cpp")
    with pytest.raises(mpsearch.MpsearchError, match="the plan was made for a 'llama' model, not 'bert'"):
        export(plan, "llama.cpp", arch="bert")


def test_gguf_file_round_trip_matches_fake_quant_and_predicted_size(tmp_path):
    import gguf

    model = _llama(256, 512, 64, tied=False, layers=3)  # 22 tensors: every type at least once
    layers, _ = mpsearch.discover(model)
    types = list(GGUF_TYPES)
    plan = BitPlan({info.name: types[i % len(types)] for i, info in enumerate(layers)})
    assert set(plan.assignments.values()) == set(types)
    writer = gguf.GGUFWriter(tmp_path / "tiny.gguf", "llama")
    expected = {}
    for info in layers:
        weight = model.get_submodule(info.name).weight.detach()
        opt = parse_option(plan[info.name])
        imatrix = _importance(opt.name, weight.shape[1])
        packed = quantize_rows(weight.numpy(), opt, imatrix)[0].numpy()
        name = gguf_name(info.name)
        writer.add_tensor(name, packed, raw_dtype=ggml_type(opt))
        expected[name] = get_runtime("llama.cpp").quantize(weight, opt, imatrix=imatrix).numpy()
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    tensors = {t.name: t for t in gguf.GGUFReader(tmp_path / "tiny.gguf").tensors}
    assert set(tensors) == set(expected)
    for name, values in expected.items():
        t = tensors[name]
        assert t.tensor_type.name.lower() == tensor_types(plan)[name]
        assert np.array_equal(gguf.quants.dequantize(t.data, t.tensor_type), values), name
    file_bytes = sum(int(t.n_bytes) for t in tensors.values())
    assert file_bytes == mpsearch.plan_size(model, plan)["size_bytes"]
    shapes = {info.name: info.shape for info in layers}
    total = sum(math.prod(s) for s in shapes.values())
    assert bits_per_weight(plan, shapes) == pytest.approx(8 * file_bytes / total, rel=1e-12)


def test_searched_plan_size_equals_the_runtime_size_of_its_export():
    model = _llama(256, 512, 64, tied=False)
    gen = torch.Generator().manual_seed(0)
    batches = [{"input_ids": torch.randint(0, 64, (2, 16), generator=gen)}]
    result = mpsearch.search(model, batches, mpsearch.Budget(avg_bits=4.5), "sqnr", target="llama.cpp")
    plan, table = result.plan, result.extra["table"]
    shapes = {info.name: info.shape for info in mpsearch.discover(model)[0]}
    exported = dict(line.split("=") for line in export(plan, "llama.cpp").strip().splitlines())
    assert sorted(exported.values()) == sorted(plan.assignments.values())
    assert bits_per_weight(plan, shapes) == pytest.approx(
        table.frame.pipe(lambda f: f.merge(plan.to_frame(), on=["layer", "option"])).eval("bits * n_params").sum()
        / table.total_params(),
        rel=1e-12,
    )
    assert bits_per_weight(plan, shapes) <= 4.5 + 1e-9
    # round to nearest searches the types llama-quantize makes without an importance matrix
    assert set(table.options) == set(GGUF_TYPES) - IMATRIX_ONLY


@pytest.mark.parametrize("estimator", ["sqnr", "fisher", "hessian", "entropy", "relevance", "measured"])
def test_estimators_skip_the_layers_a_runtime_cannot_store(estimator, monkeypatch):
    from mpsearch.runtimes.llama_cpp import LlamaCpp

    real, calls = LlamaCpp.quantize, []

    def spy(self, w, opt):
        calls.append((tuple(w.shape), opt.name))
        return real(self, w, opt)

    monkeypatch.setattr(LlamaCpp, "quantize", spy)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(256, 64), torch.nn.ReLU(), torch.nn.Linear(64, 10))
    data = [torch.randn(8, 256)]
    params = {"hessian": {"min_probes": 2, "max_probes": 2}, "fisher": {"max_samples": 4}}.get(estimator, {})
    table = mpsearch.estimate(model, data, estimator, ["q4_k", "q8_0"], estimator_params=params, cache=False)
    assert set(zip(table.frame.layer, table.frame.option)) == {("0", "q4_k"), ("0", "q8_0"), ("2", "q8_0")}
    assert table.frame["damage"].notna().all()
    assert ((10, 64), "q4_k") not in calls  # never quantized with a type that cannot store it
    assert table.uniform_options() == ["q8_0"]
