"""GPTQ on llama.cpp's GGUF types (``mpsearch.quant.gptq_gguf``): the bytes GGUF holds, decoded by the ``gguf``
package's own dequantizer, are exactly the values GPTQ searched with; with uncorrelated inputs (no error to
feed back) every weight takes the nearest level of llama-quantize's own block scales; with correlated inputs
the layer's output error is lower than llama-quantize's round to nearest; a written GGUF reloads as the GPTQ
model."""

import numpy as np
import pytest
import torch
from helpers.tiny_llama import tiny_llama

import mpsearch
from mpsearch.core import BitPlan, parse_option
from mpsearch.quant.gptq import GPTQ, factor, gptq_quantize, reconstruction_error
from mpsearch.quant.gptq_gguf import LAYOUTS, SUB, TYPES, BlockGrid, packed_with
from mpsearch.quant.llama_cpp import ggml_type, quantize_rows
from mpsearch.runtimes.llama_cpp import tensor_bytes


def _weights(seed: int, rows: int = 12, cols: int = 512) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, cols, generator=g) * torch.linspace(0.2, 2.0, cols)  # columns of different scales
    w[0, :40] = 0.0  # an all-zero block: scale 0
    w[1, 5] = 12.0  # an outlier
    return w


def _decoded(packed: torch.Tensor, option) -> torch.Tensor:
    import gguf

    values = gguf.quants.dequantize(packed.numpy(), ggml_type(option))
    return torch.from_numpy(np.ascontiguousarray(values)).reshape(packed.shape[0], -1)


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_without_feedback_each_weight_takes_the_nearest_level_of_llamacpps_own_scales(name):
    option = parse_option(name)
    w = _weights(0)
    h = torch.diag(torch.linspace(0.5, 2.0, w.shape[1]))  # uncorrelated inputs: GPTQ feeds no error forward
    packed, values = packed_with(w, factor(h, 0.01, True), option)
    assert packed.dtype == torch.uint8 and packed.numel() == tensor_bytes(tuple(w.shape), name)
    assert torch.equal(_decoded(packed, option), values)  # llama.cpp's decoder reads exactly what GPTQ chose
    assert torch.equal(gptq_quantize(w, h, option), values)  # the fake quantization searched is the same math
    grid = BlockGrid(option)
    reference, _ = quantize_rows(w, option)
    block = option.block_size
    head = grid.layout.head
    for b in range(w.shape[1] // block):
        fit = grid.fit(w[:, b * block : (b + 1) * block])
        nbytes = option.block_bytes
        # the block's scale fields are llama-quantize's own for these weights
        assert torch.equal(packed[:, b * nbytes : b * nbytes + head], reference[:, b * nbytes : b * nbytes + head])
        levels = torch.tensor(grid.layout.levels, dtype=torch.float32)
        sub = torch.arange(block) // SUB
        every = levels[None, None, :] * fit.scale[:, sub, None] + fit.offset[:, sub, None]  # (rows, block, levels)
        x = w[:, b * block : (b + 1) * block]
        nearest = (every - x[..., None]).abs().amin(-1)
        assert torch.equal((values[:, b * block : (b + 1) * block] - x).abs(), nearest), (name, b)


def test_f16_without_feedback_is_llamacpps_own_f16_and_with_feedback_other_fp16_values():
    option = parse_option("f16")
    w = _weights(0)
    reference, ref_values = quantize_rows(w, option)  # llama-quantize's F16: each weight's nearest fp16
    h = torch.diag(torch.linspace(0.5, 2.0, w.shape[1]))
    packed, values = packed_with(w, factor(h, 0.01, True), option)
    assert torch.equal(packed, reference) and torch.equal(values, ref_values)
    assert torch.equal(gptq_quantize(w, h, option), values)
    x = torch.randn(2048, w.shape[1], generator=torch.Generator().manual_seed(3))
    x[:, 1::2] = x[:, ::2] + 0.1 * x[:, 1::2]  # correlated neighbours: GPTQ moves weights off their nearest fp16
    h = x.T @ x / x.shape[0]
    packed, values = packed_with(w, factor(h, 0.01, True), option)
    assert not torch.equal(packed, reference)
    assert torch.equal(_decoded(packed, option), values)  # still plain fp16 bytes, decoded as searched
    assert torch.equal(values.half().float(), values)


@pytest.mark.parametrize("name", TYPES)
def test_with_correlated_inputs_gptq_beats_llamacpps_round_to_nearest_on_the_same_format(name):
    option = parse_option(name)
    g = torch.Generator().manual_seed(1)
    n = 512
    mix = torch.randn(n, n, generator=g) / n**0.5 + torch.eye(n)
    x = torch.randn(4 * n, n, generator=g) @ mix  # correlated input columns
    h = x.T @ x / x.shape[0]
    w = _weights(2, rows=16, cols=n)
    gptq = gptq_quantize(w, h, option)
    rtn = quantize_rows(w, option)[1]
    assert reconstruction_error(w, h, gptq) < 0.8 * reconstruction_error(w, h, rtn), name


def test_gptq_refuses_the_types_it_has_no_grid_for():
    w = _weights(0)
    for name in ("q4_k", "q6_k", "iq3_s", "iq2_xs"):
        with pytest.raises(mpsearch.MpsearchError, match=f"quantizer 'gptq' has no grid for option '{name}'"):
            gptq_quantize(w, torch.eye(w.shape[1]), parse_option(name))


def test_packed_gives_an_uncovered_embedding_llamacpps_reference_and_a_linear_its_gptq_bytes():
    from mpsearch.layers import unit_map

    model = tiny_llama(tied=False)
    batches = [{"input_ids": torch.randint(0, 96, (2, 40), generator=torch.Generator().manual_seed(i))} for i in
               range(3)]  # fmt: skip
    q = GPTQ(model, batches, progress=False)
    units = unit_map(model)
    embed, head = units["model.embed_tokens"], units["lm_head"]
    for option in ("q4_0", "iq4_nl"):
        packed, values = q.packed(embed, option)  # no Hessian: what llama-quantize writes, bit for bit
        ref_packed, ref_values = quantize_rows(embed.weight.detach(), parse_option(option))
        assert torch.equal(packed, ref_packed) and torch.equal(values, ref_values)
        assert torch.equal(q.quantize(embed, option).reshape(values.shape), values)
        packed, values = q.packed(head, option)  # GPTQ: other bytes than round to nearest, decoded as searched
        assert not torch.equal(packed, quantize_rows(head.weight.detach(), parse_option(option))[0])
        assert torch.equal(_decoded(packed, parse_option(option)), values)
        assert torch.equal(q.quantize(head, option).reshape(values.shape), values)


@pytest.mark.slow  # ~50 s on 2 cores (GPTQ of the tied 49152-row head, twice): CI's job "slow"
def test_a_gptq_gguf_reloads_as_the_searched_gptq_model(tiny, tiny_gguf, tmp_path):
    import gguf

    from mpsearch.artifacts.gguf_file import row_order
    from mpsearch.layers import unit_map
    from mpsearch.models.local import load_local
    from mpsearch.quant.apply import swapped
    from mpsearch.runtimes.llama_cpp import tensors_of

    model = tiny.model
    batches = [{"input_ids": torch.randint(0, 4000, (2, 48), generator=torch.Generator().manual_seed(i))} for i in
               range(4)]  # fmt: skip
    q = GPTQ(model, batches, progress=False)
    infos, _ = mpsearch.discover(model)
    small = ("q4_0", "iq4_nl", "q5_1", "q8_0", "q4_1", "q5_0")
    plan = BitPlan(
        {i.name: "iq4_xs" if i.shape[1] % 256 == 0 else small[k % len(small)] for k, i in enumerate(infos)},
        provenance={"runtime": "llama.cpp", "aliases": {i.name: list(i.aliases) for i in infos if i.aliases}},
    )
    out = tmp_path / "gptq.gguf"
    info = mpsearch.quantize(model, plan, out, source=tiny_gguf, quantizer=q, progress=False)
    assert info["tensor_bytes"] == info["charged_bytes"]
    assert [p.rsplit(".", 2)[-2:] for p in info["side_files"]] == [["tensor-types", "txt"]]  # no imatrix file
    written = {t.name: t for t in gguf.GGUFReader(str(out)).tensors}
    units = unit_map(model)
    searched = {}
    for layer, name in tensors_of(plan).items():
        t, w = written[name], units[layer].weight
        perm = row_order(model, name, "llama", w.shape[0])
        decoded = torch.from_numpy(np.ascontiguousarray(gguf.quants.dequantize(t.data, t.tensor_type)))
        mine = q.quantize(units[layer], plan[layer]).reshape(w.shape[0], -1)
        assert torch.equal(decoded.reshape(w.shape[0], -1)[perm], mine), layer
        searched[units[layer]] = mine.reshape(w.shape)
        if plan[layer] in ("q4_0", "iq4_nl", "iq4_xs"):  # not round to nearest (the model's weights are Q4_1's
            # grid, which q4_1, q5_1 and q8_0 may recover exactly either way)
            rtn = quantize_rows(w.reshape(w.shape[0], -1), parse_option(plan[layer]))[1]
            assert not torch.equal(mine, rtn), layer
    x = torch.randint(0, 1000, (2, 12))
    with torch.no_grad(), swapped(model, searched) as fake:
        expected = fake(x).logits
    with torch.no_grad():
        assert torch.equal(load_local(out, None).model(x).logits, expected)


@pytest.mark.slow  # ~75 s on 2 cores (three model loads, GPTQ twice): CI's job "slow"
def test_cli_gptq_search_then_quantize_rebuilds_it_from_calib(tiny, tiny_gguf, text, tmp_path, capsys, monkeypatch):
    """``search --target llama.cpp --quantizer gptq`` then ``quantize`` with the same ``--calib`` rebuilds the
    very GPTQ (the cache emptied first) and writes its values; with neither text nor cache it refuses in one
    line. By default the target searches the types GPTQ has a grid for."""
    import gguf

    from mpsearch.cli import main
    from mpsearch.context import SearchContext
    from mpsearch.layers import unit_map
    from mpsearch.quant.quantizer import for_plan
    from mpsearch.runtimes.llama_cpp import tensors_of

    data = ["--model", str(tiny_gguf), "--calib", str(text), "--seq-len", "64", "--n-calib", "4", "--n-eval", "2"]
    plan_path = tmp_path / "plan.json"
    argv = ["search", *data, "--target", "llama.cpp", "--quantizer", "gptq", "--options", "q4_0,iq4_xs,q8_0",
            "--avg-bits", "5.5", "--estimator", "sqnr", "--refine", "0", "--no-safe", "--exclude", "lm_head", "--out",
            str(plan_path)]  # fmt: skip
    assert main(argv) == 0
    capsys.readouterr()
    plan = BitPlan.load(plan_path)
    assert plan.provenance["quantizer"]["name"] == "gptq" and "iq4_xs" in plan.assignments.values()
    monkeypatch.setenv("MPSEARCH_CACHE", str(tmp_path / "empty-cache"))
    out = tmp_path / "gptq.gguf"
    with pytest.raises(mpsearch.MpsearchError, match="CLI: --calib with the text"):  # nothing cached, no text
        mpsearch.quantize(tiny.model, plan, out, source=tiny_gguf, progress=False)
    assert not out.exists()
    assert main(["quantize", str(plan_path), *data, "--out", str(out)]) == 0
    batches = [{"input_ids": torch.randint(0, 1000, (1, 16))}]
    context = SearchContext.resolve(tiny.model, batches, target="llama.cpp", quantizer="gptq", safe=False)
    assert sorted(context.options) == sorted(TYPES)  # the target's defaults GPTQ has a grid for
    q = for_plan(tiny.model, plan, None, None)  # the GPTQ quantize rebuilt, now cached under its spec
    assert q.spec() == plan.provenance["quantizer"]
    units = unit_map(tiny.model)
    written = {t.name: t for t in gguf.GGUFReader(str(out)).tensors}
    layer, name = next((k, v) for k, v in tensors_of(plan).items() if k == "model.layers.1.mlp.down_proj")
    decoded = gguf.quants.dequantize(written[name].data, written[name].tensor_type)
    assert torch.equal(torch.from_numpy(np.ascontiguousarray(decoded)), q.quantize(units[layer], plan[layer]))


def test_gptq_refuses_f16_for_weights_beyond_fp16s_range():
    w = _weights(0)
    w[3, 7] = 1e5
    with pytest.raises(mpsearch.MpsearchError, match="beyond fp16's range"):
        gptq_quantize(w, torch.eye(w.shape[1]), parse_option("f16"))
