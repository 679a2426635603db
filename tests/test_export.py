"""Exporters: a target writes exactly the options searched for it, checked with the runtime's own package
where it installs here (torchao, gguf, hqq)."""

import copy
import json
import re

import pytest
import torch

import mpsearch
from mpsearch.cli import main
from mpsearch.core import BitPlan, MpsearchError
from mpsearch.export import TARGETS, export, get_target, gptqmodel_dynamic, hqq_dynamic_config
from mpsearch.outputs import Objective, cosine_distance


@pytest.fixture(scope="module")
def minilm_layers(minilm):
    return [i.name for i in mpsearch.discover(minilm.model)[0]]


def test_torchao_config_applies_and_quantizes_as_searched(minilm, minilm_layers):
    from torchao.core.config import config_from_dict
    from torchao.quantization import quantize_

    options = ["torchao:int4_g32", "torchao:int8", "torchao:int3_g64_asym", "torchao:int4"]
    plan = BitPlan({name: options[i % 4] for i, name in enumerate(minilm_layers)})
    config = config_from_dict(json.loads(export(plan, "torchao")))
    model = copy.deepcopy(minilm.model)
    quantize_(model, config, filter_fn=None)
    for layer, option in plan.items():
        weight = model.get_submodule(layer).weight
        opt = mpsearch.parse_option(option)
        assert weight.target_dtype == getattr(torch, f"int{opt.bits}"), layer
        assert tuple(weight.block_size) == (1, opt.group_size or weight.shape[1]), layer
        # the exported model computes with exactly the tensors the search predicted
        predicted = mpsearch.quantize_weight(minilm.model.get_submodule(layer).weight, option)
        assert torch.equal(weight.dequantize(), predicted), layer
    batch = minilm.calibration[0]
    objective = Objective(cosine_distance, "cosine")
    assert 1 - objective(model, batch, objective.references(minilm.model, [batch])[0]) > 0.8


def test_llama_cpp_file_uses_gguf_names_and_exactly_the_searched_types(minilm_layers):
    import gguf

    options = ["q4_0", "q8_0", "q5_1", "q4_1"]
    plan = BitPlan({name: options[i % 4] for i, name in enumerate(minilm_layers)})
    lines = export(plan, "llama.cpp", arch="bert").strip().splitlines()
    assert len(lines) == 36
    for line, option in zip(lines, plan.assignments.values()):
        pattern, qtype = line.split("=")
        assert qtype == option and gguf.GGMLQuantizationType[qtype.upper()]
    assert re.fullmatch(lines[0].split("=")[0], "blk.0.attn_q.weight")


@pytest.mark.parametrize(
    ("target", "plan", "message"),
    [
        ("llama.cpp", {"a.0.q": "q4_k", "a.0.k": "int4"}, "layer 'a.0.k' has option 'int4', which llama.cpp cannot"),
        ("torchao", {"a.0.q": "q4_k"}, "layer 'a.0.q' has option 'q4_k', which torchao cannot store as searched"),
        ("gptqmodel", {"a.0.q": "torchao:int4"}, "options: gptq:int<2|3|4|8>"),
        ("hqq", {"a.0.q": "int4_g64"}, r"search with --target hqq \(options: hqq:int<1\|2\|3\|4\|8>_g<group>\)"),
        ("mpsearch", {"a.0.q": "hqq:int4_g64"}, "which mpsearch cannot store"),
    ],
)
def test_an_export_target_other_than_the_search_target_names_the_layer(target, plan, message):
    with pytest.raises(MpsearchError, match=message):
        export(BitPlan(plan), target)


def test_gptqmodel_and_hqq_dicts():
    ok = BitPlan(
        {"encoder.layer.0.attention.self.query": "gptq:int4_g128", "encoder.layer.1.attention.self.query": "gptq:int8"}
    )
    dyn = json.loads(export(ok, "gptqmodel"))
    assert dyn == gptqmodel_dynamic(ok)
    assert dyn["+:^encoder\\.layer\\.0\\.attention\\.self\\.query$"] == {"bits": 4, "group_size": 128, "sym": True}
    assert dyn["+:^encoder\\.layer\\.1\\.attention\\.self\\.query$"]["group_size"] == -1
    mixed = BitPlan({"m.0.attention.q": "hqq:int4_g64", "m.1.attention.q": "hqq:int2_g64"})
    with pytest.raises(MpsearchError, match="same HQQ tag 'attention.q'"):
        hqq_dynamic_config(mixed)
    tied = BitPlan({"m.0.attention.q": "hqq:int4_g64", "m.1.attention.q": "hqq:int4_g64"})
    assert json.loads(export(tied, "hqq")) == {"attention.q": {"nbits": 4, "group_size": 64}}


def test_targets_resolve_bare_names_into_their_family_and_refuse_others():
    assert get_target("torchao").resolve(["int4_g32", "int8"]) == ["torchao:int4_g32", "torchao:int8"]
    assert get_target("llama.cpp").resolve(None) == list(TARGETS["llama.cpp"].default_options)
    with pytest.raises(MpsearchError, match="option .int4. is not a llama.cpp option; llama.cpp stores f16, q8_0"):
        get_target("llama.cpp").resolve(["int4"])
    with pytest.raises(MpsearchError, match="gptq has no 5-bit weights"):
        get_target("gptqmodel").resolve(["int5_g128"])
    with pytest.raises(MpsearchError, match="unknown target 'onnx'"):
        get_target("onnx")


def test_cli_export(tmp_path, capsys, minilm_layers):
    plan = BitPlan({name: "gptq:int4_g128" for name in minilm_layers}, {"model": "minilm-l6"})
    path = tmp_path / "plan.json"
    plan.save(path)
    assert main(["export", str(path), "--target", "gptqmodel", "--out", str(tmp_path / "g.json")]) == 0
    assert len(json.loads((tmp_path / "g.json").read_text())) == 36
    capsys.readouterr()
    assert main(["export", str(path), "--target", "llama.cpp"]) == 2
    err = capsys.readouterr().err
    assert "layer 'encoder.layer.0.attention.self.query' has option 'gptq:int4_g128', which llama.cpp" in err
    assert main(["export", str(path), "--format", "json"]) == 0  # --format: the old name
    assert BitPlan.from_json(capsys.readouterr().out) == plan
    assert main(["export", str(path), "--target", "onnx"]) == 2
    assert "unknown target 'onnx'" in capsys.readouterr().err
    assert main(["export", str(path)]) == 2
    assert "export needs --target" in capsys.readouterr().err


def test_a_search_for_hqq_ties_the_layers_of_a_tag_so_the_plan_always_exports():
    # HQQ takes one config per tag (mlp.up_proj of every block): search --target hqq must not return a plan
    # that gives two blocks' up_proj different options, which HQQ could not express
    import mpsearch
    from mpsearch.runtimes.hqq import hqq_tag
    from mpsearch.testing import tiny_transformers

    model, batches = tiny_transformers()["llama"]()
    options = ["int2_g16", "int4_g16", "int8_g16"]  # rows of 48 weights: groups of 16
    budget = mpsearch.Budget(avg_bits=4.6)
    result = mpsearch.search(model, batches, budget, "sqnr", options=options, target="hqq", safe=False)
    by_tag: dict[str, set] = {}
    for layer, option in result.plan.items():
        by_tag.setdefault(hqq_tag(layer), set()).add(option)
    assert all(len(options) == 1 for options in by_tag.values())
    assert len({o for s in by_tag.values() for o in s}) > 1  # still a mixed plan, across tags
    config = json.loads(export(result.plan, "hqq"))
    assert set(config) == set(by_tag)


def test_a_pareto_front_for_hqq_has_one_option_per_tag_at_every_point():
    import mpsearch
    from mpsearch.runtimes.hqq import hqq_tag
    from mpsearch.testing import tiny_transformers

    model, batches = tiny_transformers()["llama"]()
    options = ["int2_g16", "int4_g16", "int8_g16"]
    front = mpsearch.pareto(model, batches, "sqnr", options, loss_fn="kl", target="hqq")
    frame = front.to_frame()
    assert len(frame) > 2
    for i in range(len(frame)):
        plan = front.plan_at(size_bytes=float(frame.iloc[i]["size_bytes"]))
        tags: dict[str, set] = {}
        for layer, option in plan.items():
            tags.setdefault(hqq_tag(layer), set()).add(option)
        assert all(len(s) == 1 for s in tags.values())
        export(plan, "hqq")  # never refused


def test_the_table_and_plan_record_their_runtime_and_export_defaults_to_it(tmp_path, capsys):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.ReLU(), torch.nn.Linear(64, 32))
    data = [torch.randn(8, 64)]
    result = mpsearch.search(model, data, mpsearch.Budget(avg_bits=8.0), "sqnr", target="gptqmodel", safe=False)
    assert result.extra["table"].meta["runtime"] == "gptqmodel" == result.plan.provenance["runtime"]
    plain = mpsearch.estimate(model, data, "sqnr", ["int4", "int8"], cache=False)
    assert plain.meta["runtime"] == "mpsearch"  # every option is mpsearch's own
    path = tmp_path / "plan.json"
    result.plan.save(path)
    assert main(["export", str(path)]) == 0  # no --target: the runtime the plan was searched for
    assert capsys.readouterr().out == export(result.plan, "gptqmodel")


def test_an_hqq_table_keeps_its_ties_in_every_solve_and_front_without_naming_the_target():
    # the CLI's pareto --target hqq estimated hqq: options and solved the table with no target: its front
    # mixed options within one HQQ tag. The table now records its runtime's ties, so every consumer keeps them
    from mpsearch.runtimes.hqq import hqq_tag
    from mpsearch.testing import tiny_transformers

    model, batches = tiny_transformers()["llama"]()
    options = ["hqq:int2_g16", "hqq:int4_g16", "hqq:int8_g16"]
    table = mpsearch.estimate(model, batches, "sqnr", options, loss_fn="kl")  # no target=: as the CLI does
    assert table.meta["runtime"] == "hqq" and any("model.layers.1.mlp.up_proj" in g for g in table.meta["ties"])
    front = mpsearch.pareto(model, table=table)
    plans = [front.plan_at(size_bytes=float(s)) for s in front.to_frame()["size_bytes"]]
    plans.append(mpsearch.solve(table, mpsearch.Budget(avg_bits=4.6)).plan)
    assert len(plans) > 3
    for plan in plans:
        tags: dict[str, set] = {}
        for layer, option in plan.items():
            tags.setdefault(hqq_tag(layer), set()).add(option)
        assert all(len(s) == 1 for s in tags.values())
        export(plan, "hqq")  # never refused
