"""Exporters, each checked with the runtime's own package where it installs here (torchao, gguf)."""

import copy
import json
import re

import pytest
import torch

import mpsearch
from mpsearch.cli import main
from mpsearch.core import BitPlan, MpsearchError
from mpsearch.export import export, gptqmodel_dynamic, hqq_dynamic_config, to_llama_cpp
from mpsearch.outputs import Objective, cosine_distance


@pytest.fixture(scope="module")
def mixed_plan(minilm):
    layers = [i.name for i in mpsearch.discover(minilm.model)[0]]
    options = ["int4_g32", "int8", "int3_asym", "int4"]
    return BitPlan({name: options[i % 4] for i, name in enumerate(layers)}, {"model": "minilm-l6"})


def test_torchao_config_applies_with_torchao(minilm, mixed_plan):
    from torchao.core.config import config_from_dict
    from torchao.quantization import quantize_

    config = config_from_dict(json.loads(export(mixed_plan, "torchao")))
    model = copy.deepcopy(minilm.model)
    quantize_(model, config, filter_fn=None)
    for layer, option in mixed_plan.items():
        weight = model.get_submodule(layer).weight
        opt = mpsearch.parse_option(option)
        assert weight.target_dtype == getattr(torch, f"int{opt.bits}"), layer
        in_features = weight.shape[1]
        assert tuple(weight.block_size) == (1, opt.group_size or in_features), layer
    batch = minilm.calibration[0]
    objective = Objective(cosine_distance, "cosine")
    cos = 1 - objective(model, batch, objective.references(minilm.model, [batch])[0])
    assert cos > 0.8  # torchao's quantized model still computes the same embedding, roughly


def test_llama_cpp_file_uses_gguf_names_and_types(mixed_plan):
    import gguf

    plan = BitPlan({k: ("int3" if v == "int3_asym" else v) for k, v in mixed_plan.items()})
    text = to_llama_cpp(plan, arch="bert")
    lines = text.strip().splitlines()
    assert len(lines) == 36
    types = {t.name.lower() for t in gguf.GGMLQuantizationType}
    for line in lines:
        pattern, qtype = line.split("=")
        assert qtype in types
    assert re.fullmatch(lines[0].split("=")[0], "blk.0.attn_q.weight")
    assert "^blk\\.5\\.ffn_down\\.weight$=" in text
    with pytest.raises(MpsearchError, match="layer 'x.0.fc' has option 'fp8_e4m3', which llama.cpp has no type"):
        to_llama_cpp(BitPlan({"x.0.fc": "fp8_e4m3"}))


def test_gptqmodel_and_hqq_dicts(mixed_plan):
    with pytest.raises(MpsearchError, match="which GPTQModel has no type"):
        gptqmodel_dynamic(BitPlan({"a.0.b": "int5"}))
    ok = BitPlan({"encoder.layer.0.attention.self.query": "int4_g128", "encoder.layer.1.attention.self.query": "int8"})
    dyn = gptqmodel_dynamic(ok)
    assert dyn["+:^encoder\\.layer\\.0\\.attention\\.self\\.query$"] == {"bits": 4, "group_size": 128, "sym": True}
    assert dyn["+:^encoder\\.layer\\.1\\.attention\\.self\\.query$"]["group_size"] == -1
    with pytest.raises(MpsearchError, match="same HQQ tag 'attention.self.query'"):
        hqq_dynamic_config(ok)
    tied = BitPlan(
        {"encoder.layer.0.attention.self.query": "int4_g64", "encoder.layer.1.attention.self.query": "int4_g64"}
    )
    assert hqq_dynamic_config(tied) == {"attention.self.query": {"nbits": 4, "group_size": 64}}


def test_cli_export(mixed_plan, tmp_path, capsys):
    path = tmp_path / "plan.json"
    mixed_plan.save(path)
    assert main(["export", str(path), "--format", "gptqmodel", "--out", str(tmp_path / "g.json")]) == 0
    assert len(json.loads((tmp_path / "g.json").read_text())) == 36
    capsys.readouterr()
    assert main(["export", str(path), "--format", "llama.cpp"]) == 2  # int3_asym has no GGUF type
    assert "has option 'int3_asym', which llama.cpp has no type for" in capsys.readouterr().err
    assert main(["export", str(path), "--format", "json"]) == 0
    assert BitPlan.from_json(capsys.readouterr().out) == mixed_plan
    assert main(["export", str(path), "--format", "onnx"]) == 2
    assert "unknown export format 'onnx'" in capsys.readouterr().err
