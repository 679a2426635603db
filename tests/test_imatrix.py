"""The imatrix quantizer: llama-imatrix's definition (mean squared input per column over real tokens), its
GGUF file both ways, and llama.cpp's rules for which tensors have an entry. That llama-quantize given the
file mpsearch writes produces exactly mpsearch's bytes is checked in the CI job `llama.cpp`."""

import pytest
import torch
from helpers.tiny_llama import tiny_llama

import mpsearch
from mpsearch.core import MpsearchError, parse_option
from mpsearch.layers import find_units
from mpsearch.quant.imatrix import Imatrix
from mpsearch.quant.llama_cpp import quantize_rows


def _llama(tied: bool):
    return tiny_llama(tied=tied, layers=2)


def _ids(rows: int, length: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 96, (rows, length), generator=torch.Generator().manual_seed(seed))


def test_importance_is_the_mean_squared_input_over_real_tokens_only():
    model = _llama(tied=False)
    ids = _ids(2, 12)
    # right padding with garbage tokens: a causal model's real tokens never see it, and the imatrix must not
    padded = torch.cat([ids, _ids(2, 5, seed=1)], 1)
    mask = torch.cat([torch.ones(2, 12), torch.zeros(2, 5)], 1).long()
    clean = Imatrix(model, [{"input_ids": ids}], progress=False)
    masked = Imatrix(model, [{"input_ids": padded, "attention_mask": mask}], progress=False)
    units = {u.name: u for u in find_units(model)}
    seen = {}
    hook = units["model.layers.1.mlp.down_proj"].module.register_forward_hook(
        lambda m, i, o: seen.update(x=i[0].detach().reshape(-1, i[0].shape[-1]))
    )
    with torch.no_grad():
        model(ids)
    hook.remove()
    oracle = (seen["x"].double() ** 2).mean(0).float()
    for q in (clean, masked):
        assert q.counts["model.layers.1.mlp.down_proj"] == 24
        torch.testing.assert_close(q.importance(units["model.layers.1.mlp.down_proj"]), oracle, rtol=1e-5, atol=0)
    assert set(clean.sums) == {n for n, u in units.items() if u.type.inputs == "matmul"}  # lm_head too (untied)


def test_a_tied_head_has_no_entry_as_llama_cpps_token_embd_has_none(tmp_path):
    import gguf

    model = _llama(tied=True)
    q = Imatrix(model, [{"input_ids": _ids(1, 8)}], progress=False)
    head = next(u for u in find_units(model) if u.name == "lm_head")
    assert q.importance(head) is None and "lm_head" not in q.sums
    q.save_gguf(tmp_path / "im.gguf", model)
    names = {t.name for t in gguf.GGUFReader(tmp_path / "im.gguf").tensors}
    assert "blk.0.attn_q.weight.in_sum2" in names and "blk.1.ffn_down.weight.counts" in names
    assert not any(n.startswith(("token_embd", "output.")) for n in names)


def test_two_units_naming_one_gguf_tensor_are_refused_not_dropped(tmp_path):
    model = _llama(tied=False)
    q = Imatrix(model, [{"input_ids": _ids(1, 8)}], progress=False)
    # another layout's name for the same GGUF tensor (blk.0.attn_q.weight): one entry would be lost
    q.sums["layers.0.self_attn.q_proj"] = q.sums["model.layers.0.self_attn.q_proj"] * 2
    q.counts["layers.0.self_attn.q_proj"] = q.counts["model.layers.0.self_attn.q_proj"]
    with pytest.raises(MpsearchError, match="both map to GGUF tensor 'blk.0.attn_q.weight'"):
        q.save_gguf(tmp_path / "im.gguf", model)


def test_the_imatrix_file_round_trips_and_reads_as_llama_quantize_reads_it(tmp_path):
    import gguf

    model = _llama(tied=False)
    q = Imatrix(model, [{"input_ids": _ids(2, 16)}], progress=False)
    q.save_gguf(tmp_path / "im.gguf", model)
    reader = gguf.GGUFReader(tmp_path / "im.gguf")
    assert bytes(reader.fields["general.type"].parts[-1]).decode() == "imatrix"
    assert int(reader.fields["imatrix.chunk_size"].parts[-1][0]) == 16
    back = Imatrix.from_gguf(tmp_path / "im.gguf", model)
    assert back.counts == q.counts and all(torch.equal(back.sums[k], q.sums[k]) for k in q.sums)
    assert back.spec()["params"]["file"].startswith("file:") and back.spec()["calibration"] is None
    # an entry missing from the file (llama-imatrix leaves output.weight out by default): no imatrix for it
    writer = gguf.GGUFWriter(tmp_path / "partial.gguf", arch="llama")
    for t in reader.tensors:
        if not t.name.startswith("output."):
            writer.add_tensor(t.name, t.data.reshape(tuple(reversed([int(d) for d in t.shape]))).copy())
    writer.write_header_to_file(), writer.write_kv_data_to_file(), writer.write_tensors_to_file(), writer.close()
    partial = Imatrix.from_gguf(tmp_path / "partial.gguf", model)
    head = next(u for u in find_units(model) if u.name == "lm_head")
    assert partial.importance(head) is None and "model.layers.0.self_attn.q_proj" in partial.sums


def test_the_quantizer_is_llama_quantizes_weighted_path_and_refuses_other_options():
    model = _llama(tied=False)
    q = Imatrix(model, [{"input_ids": _ids(2, 16)}], progress=False)
    unit = next(u for u in find_units(model) if u.name == "model.layers.0.mlp.down_proj")
    for name in ("q4_k", "iq4_xs", "q5_1"):
        want = quantize_rows(unit.weight.detach(), parse_option(name), q.importance(unit))[1]
        assert torch.equal(q.quantize(unit, name), want)
        assert not torch.equal(q.quantize(unit, name), quantize_rows(unit.weight.detach(), parse_option(name))[1])
    with pytest.raises(mpsearch.MpsearchError, match="quantizes llama.cpp types only, not int4"):
        q.quantize(unit, "int4")
    with pytest.raises(mpsearch.MpsearchError, match="no entry for layer .model.layers.0.mlp.down_proj."):
        Imatrix.from_state({**q.state(), "sums": {}, "counts": {}}).quantize(unit, "q4_k")


def test_a_plan_searched_with_an_imatrix_is_evaluated_with_the_same_one():
    from mpsearch.quant.quantizer import for_plan

    model = _llama(tied=False)
    data = [{"input_ids": _ids(2, 16, seed=s)} for s in range(4)]
    result = mpsearch.search(model, data, mpsearch.Budget(avg_bits=4.6), estimator="sqnr", target="llama.cpp",
                             options=["q8_0", "q4_k", "q4_0"], quantizer="imatrix", safe=False, cache=True)  # fmt: skip
    spec = result.plan.provenance["quantizer"]
    assert spec["name"] == "imatrix" and spec["calibration"]
    again = for_plan(model, result.plan, None, None, "evaluate")  # from the cache, by the spec
    assert isinstance(again, Imatrix) and again.spec() == spec
    assert all(torch.equal(again.sums[k], v) for k, v in result.extra["quantizer"].sums.items())


def test_an_imatrix_plan_is_rebuilt_from_its_calibration_and_refused_on_other_data(tmp_path, monkeypatch):
    """What ``mpsearch quantize --calib`` relies on: with an empty cache, the plan's imatrix is collected again
    from the very batches it was searched on (equal sums), and other batches are refused in one line."""
    from mpsearch.core import BitPlan
    from mpsearch.quant.quantizer import for_plan

    monkeypatch.setenv("MPSEARCH_CACHE", str(tmp_path / "empty-cache"))
    model = _llama(tied=False)
    batches = [{"input_ids": _ids(2, 16, seed=s)} for s in range(2)]
    q = Imatrix(model, batches, progress=False)
    plan = BitPlan({"model.layers.0.mlp.down_proj": "q4_k"}, provenance={"quantizer": q.spec()})
    rebuilt = for_plan(model, plan, None, batches)
    assert rebuilt is not q and rebuilt.spec() == q.spec()
    assert rebuilt.counts == q.counts and all(torch.equal(rebuilt.sums[k], q.sums[k]) for k in q.sums)
    with pytest.raises(MpsearchError, match="is not the data this plan's imatrix was built on"):
        for_plan(model, plan, None, [{"input_ids": _ids(2, 16, seed=9)}])
