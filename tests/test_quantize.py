"""``mpsearch quantize`` (issue 24): the runtime's own file, holding exactly the math that was searched.

Oracles: the runtime's own reader of the written file (gguf's reader and dequantizer, transformers'
``from_pretrained``, HQQ's ``from_quantized``) against mpsearch's fake quantization of the same weights, and
ggml's row sizes against the bytes the search charged."""

import json

import numpy as np
import pytest
import torch

import mpsearch
from mpsearch.cli import main
from mpsearch.core import BitPlan, MpsearchError
from mpsearch.quant import quantized


def _plan(model, runtime: str, pick) -> BitPlan:
    """Every unit of ``model`` gets ``pick(index, unit info)``; provenance as a search records it."""
    infos, _ = mpsearch.discover(model)
    return BitPlan(
        {info.name: pick(i, info) for i, info in enumerate(infos)},
        provenance={"runtime": runtime, "aliases": {i.name: list(i.aliases) for i in infos if i.aliases}},
    )


def _assert_reloads_as_planned(reloaded, model, plan) -> None:
    """The reloaded file computes exactly what mpsearch's fake-quantized ``model`` computes."""
    x = torch.randint(0, 1000, (2, 12))
    with torch.no_grad(), quantized(model, plan) as fake:
        expected = fake(x).logits
    with torch.no_grad():
        assert torch.equal(reloaded(x).logits, expected)


def _gguf_types(i, info):
    """A mix of legacy and k-quant types, k-quants where rows are whole 256-blocks."""
    if info.shape[1] % 256 == 0:
        return ("q4_k", "q6_k", "q3_k")[i % 3]
    return ("q4_0", "q5_1", "q8_0")[i % 3]


def test_gguf_holds_the_planned_types_bytes_and_exact_math(tiny, tiny_gguf, tmp_path):
    import gguf

    from mpsearch.artifacts.gguf_file import row_order
    from mpsearch.export import export
    from mpsearch.layers import unit_map
    from mpsearch.models.local import load_local
    from mpsearch.quant import quantize_weight
    from mpsearch.runtimes.llama_cpp import tensor_bytes, tensors_of

    model = tiny.model
    plan = _plan(model, "llama.cpp", _gguf_types)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    out = tmp_path / "mixed.gguf"
    info = mpsearch.quantize(model, plan, out, source=tiny_gguf, progress=False)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())  # the model is untouched
    assert info["tensor_bytes"] == info["charged_bytes"] and info["bits_per_weight"] == info["charged_bits_per_weight"]
    assert info["file_bytes"] == out.stat().st_size
    assert (tmp_path / "mixed.tensor-types.txt").read_text() == export(plan, "llama.cpp")
    written = {t.name: t for t in gguf.GGUFReader(str(out)).tensors}
    source = {t.name: t for t in gguf.GGUFReader(str(tiny_gguf)).tensors}
    assert list(written) == list(source)
    units = unit_map(model)
    planned = tensors_of(plan)
    assert len(set(planned.values())) == len(plan.assignments)
    for layer, name in planned.items():
        t, option = written[name], mpsearch.parse_option(plan[layer])
        w = units[layer].weight
        assert t.tensor_type.name.lower() == plan[layer]
        assert t.n_bytes == tensor_bytes(tuple(w.shape), plan[layer])
        perm = row_order(model, name, "llama", w.shape[0])
        decoded = gguf.quants.dequantize(t.data, t.tensor_type).reshape(w.shape[0], -1)[perm]
        mine = quantize_weight(w, option)
        assert torch.equal(torch.from_numpy(np.ascontiguousarray(decoded)), mine.reshape(w.shape[0], -1)), layer
    for name in set(source) - set(planned.values()):  # norms: as the source holds them
        assert source[name].tensor_type == written[name].tensor_type
        assert np.array_equal(np.asarray(source[name].data), np.asarray(written[name].data)), name
    # transformers reloads the file as the model mpsearch's fake quantization makes
    _assert_reloads_as_planned(load_local(str(out), None).model, model, plan)


def test_gguf_refuses_another_model_and_leaves_nothing(tiny, tiny_gguf, tmp_path):
    plan = _plan(tiny.model, "llama.cpp", _gguf_types)
    layer = "model.layers.1.mlp.down_proj"
    weight = tiny.model.get_submodule(layer).weight
    saved = weight.detach().clone()
    try:
        with torch.no_grad():
            weight.mul_(1.5)  # no longer the GGUF's tensor
        with pytest.raises(MpsearchError, match="is not tensor 'blk.1.ffn_down.weight' of the GGUF"):
            mpsearch.quantize(tiny.model, plan, tmp_path / "x.gguf", source=tiny_gguf, progress=False)
    finally:
        with torch.no_grad():
            weight.copy_(saved)
    assert list(tmp_path.iterdir()) == []  # nothing half-written
    bigger = BitPlan({**plan.assignments, "model.layers.7.mlp.up_proj": "q8_0"}, provenance=plan.provenance)
    with pytest.raises(MpsearchError, match="model.layers.7.mlp.up_proj"):
        mpsearch.quantize(tiny.model, bigger, tmp_path / "x.gguf", source=tiny_gguf, progress=False)
    with pytest.raises(MpsearchError, match="and none is given; pass source="):
        mpsearch.quantize(tiny.model, plan, tmp_path / "x.gguf", progress=False)
    with pytest.raises(MpsearchError, match="must end in .gguf"):
        mpsearch.quantize(tiny.model, plan, tmp_path / "x.bin", source=tiny_gguf, progress=False)
    with pytest.raises(MpsearchError, match="is not a writable folder"):
        mpsearch.quantize(tiny.model, plan, tmp_path / "no" / "x.gguf", source=tiny_gguf, progress=False)


@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_torchao_folder_reloads_with_transformers_as_the_fake_quantized_model(dtype, llama_dir, tmp_path):
    """bf16 (as torchao models run): the bytes are the charge; float32: torchao keeps fp32 scales, 2 bytes more
    each than charged, and says so."""
    from transformers import AutoModelForCausalLM

    from mpsearch.models.local import load_local

    model = load_local(str(llama_dir), None, dtype).model
    options = ("torchao:int4_g32", "torchao:int8", "torchao:int3_g32_asym")
    plan = _plan(model, "torchao", lambda i, info: options[i % 3])
    with pytest.raises(MpsearchError, match="cannot store 'lm_head' as searched: it is tied"):
        mpsearch.quantize(str(llama_dir), plan, tmp_path / "tied", progress=False)
    assert list(tmp_path.iterdir()) == []
    plan = BitPlan({k: v for k, v in plan.items() if k != "lm_head"}, provenance=plan.provenance)
    out = tmp_path / "saved"
    info = mpsearch.quantize(str(llama_dir), plan, out, dtype=dtype, progress=False)
    scales = sum(mpsearch.parse_option(o).n_scales(tuple(model.get_submodule(k).weight.shape)) for k, o in plan.items())
    extra = 0 if dtype == "bfloat16" else 2 * scales
    assert info["tensor_bytes"] == info["charged_bytes"] + extra and info["file_bytes"] > 0
    assert ("note" in info) == (dtype == "float32")
    _assert_reloads_as_planned(AutoModelForCausalLM.from_pretrained(out), model, plan)


def test_hqq_folder_reloads_with_hqq_holding_the_fake_quantized_weights(llama_dir, tmp_path):
    pytest.importorskip("hqq")
    from hqq.models.hf.base import AutoHQQHFModel

    from mpsearch.models.local import load_local
    from mpsearch.quant.apply import quantized_weights
    from mpsearch.quant.quantizer import RTN

    model = load_local(str(llama_dir), None).model
    options = {"q_proj": "hqq:int4_g64", "k_proj": "hqq:int2_g32", "down_proj": "hqq:int3_g64"}
    plan = _plan(model, "hqq", lambda i, info: next((o for k, o in options.items() if k in info.name), "hqq:int8_g64"))
    with pytest.raises(MpsearchError, match="HQQ cannot store 'lm_head' as searched: it is tied"):
        mpsearch.quantize(model, plan, tmp_path / "tied", source=llama_dir, progress=False)
    plan = BitPlan({k: v for k, v in plan.items() if k != "lm_head"}, provenance=plan.provenance)
    out = tmp_path / "saved"
    info = mpsearch.quantize(model, plan, out, source=llama_dir, progress=False)
    assert info["tensor_bytes"] == info["charged_bytes"]
    reloaded = AutoHQQHFModel.from_quantized(str(out), compute_dtype=torch.float16, device="cpu")
    expected = {u.name: w for u, w in quantized_weights(model, plan, RTN()).items()}
    for layer, w in expected.items():
        assert torch.equal(reloaded.get_submodule(layer).dequantize().float(), w.float()), layer


def _last_json(out: str) -> dict:
    return json.loads([line for line in out.splitlines() if line.startswith("{")][-1])


QUANTIZE_BAD = {
    "folder for llama.cpp": ("llama.cpp", "folder", "out.gguf", "convert_hf_to_gguf.py"),
    "gguf for torchao": ("torchao", "gguf", "saved", "written from a transformers folder"),
    "not .gguf": ("llama.cpp", "gguf", "out.bin", "must end in .gguf"),
    "another model": ("llama.cpp", "other", "out.gguf", "was made for model"),
    "no runtime file": ("mpsearch", "gguf", "out.gguf", "has no file writer"),
    "existing folder": ("torchao", "folder", "full", "is not an empty folder"),
}


@pytest.mark.parametrize("case", list(QUANTIZE_BAD))
def test_cli_quantize_bad_input_is_one_line(case, tiny, tiny_gguf, llama_dir, tmp_path, capsys):
    runtime, source, out, message = QUANTIZE_BAD[case]
    model = {"folder": str(llama_dir), "gguf": str(tiny_gguf), "other": str(tiny_gguf)}[source]
    option = {"llama.cpp": "q8_0", "torchao": "torchao:int8", "mpsearch": "int8"}[runtime]
    plan = BitPlan(
        {"model.layers.0.mlp.down_proj": option},
        provenance={"runtime": runtime, "model": "elsewhere.gguf" if source == "other" else model},
    )
    plan.save(tmp_path / "plan.json")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("x")
    code = main(["quantize", str(tmp_path / "plan.json"), "--model", model, "--out", str(tmp_path / out)])
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("mpsearch: error:")]
    assert code == 2 and len(errors) == 1 and message in errors[0], errors


TEXT = ["--seq-len", "64", "--n-calib", "4", "--n-eval", "2", "--batch-size", "2"]


# the GGUF source: ~80 s on 2 cores, in CI's job "slow" (the default run stays under ~10 min)
@pytest.mark.parametrize("source", [pytest.param("gguf", marks=pytest.mark.slow), "folder"])
def test_search_quantize_evaluate_on_your_own_model(source, tiny, tiny_gguf, llama_dir, text, tmp_path, capsys):
    """The README's flow: search for a runtime, write its file, evaluate the plan; the file reloads as the
    searched model (a GGUF written by a test for llama.cpp, a random-init Llama folder for torchao)."""
    from mpsearch.models.local import load_local

    model = str(tiny_gguf if source == "gguf" else llama_dir)
    data = ["--model", model, "--calib", str(text), *TEXT]
    target = (
        ["--target", "llama.cpp", "--options", "q4_0,q5_1,q8_0,q4_k", "--avg-bits", "5.5", "--exclude", "lm_head"]
        if source == "gguf"
        else ["--target", "torchao", "--avg-bits", "8.5", "--exclude", "lm_head"]
    )
    plan_path = tmp_path / "plan.json"
    search = ["search", *data, *target, "--estimator", "sqnr", "--refine", "2", "--out", str(plan_path)]
    assert main(search) == 0
    searched = _last_json(capsys.readouterr().out)
    out = tmp_path / ("mixed.gguf" if source == "gguf" else "saved")
    assert main(["quantize", str(plan_path), "--model", model, "--out", str(out)]) == 0
    written = _last_json(capsys.readouterr().out)
    assert written["charged_bits_per_weight"] == pytest.approx(searched["avg_bits"], rel=1e-12)
    if source == "gguf":  # bytes as charged (a float32 torchao model keeps fp32 scales: see the torchao test)
        assert written["tensor_bytes"] == written["charged_bytes"]
    assert main(["evaluate", *data, "--plan", str(plan_path)]) == 0
    measured = _last_json(capsys.readouterr().out)
    assert measured["avg_bits"] == pytest.approx(searched["avg_bits"]) and measured["uniform_option"] is not None
    plan = BitPlan.load(plan_path)
    if source == "gguf":  # the tiny GGUF is loaded once per module (tokenizer conversion is slow)
        _assert_reloads_as_planned(load_local(str(out), None).model, tiny.model, plan)
    else:
        from transformers import AutoModelForCausalLM

        original = load_local(model, None).model
        _assert_reloads_as_planned(AutoModelForCausalLM.from_pretrained(out), original, plan)


def test_cli_quantize_a_transformers_folder_with_its_gguf(tiny, tiny_gguf, tmp_path, capsys):
    """A folder's llama.cpp file is written from its F16 GGUF (--gguf): the same bytes as from the GGUF model."""
    from transformers import AutoTokenizer

    folder = tmp_path / "folder"
    config = type(tiny.model.config).from_dict(
        {k: v for k, v in tiny.model.config.to_dict().items() if k != "quantization_config"}
    )  # a GGUF-loaded model refuses save_pretrained: the same weights in a plain one
    plain = type(tiny.model)(config)
    plain.load_state_dict(tiny.model.state_dict())
    plain.save_pretrained(folder)
    AutoTokenizer.from_pretrained(str(tiny_gguf.parent), gguf_file=tiny_gguf.name).save_pretrained(folder)
    plan = _plan(tiny.model, "llama.cpp", _gguf_types)
    plan = BitPlan(
        {k: v for k, v in plan.items() if k != "lm_head"}, provenance={**plan.provenance, "model": str(folder)}
    )
    plan.save(tmp_path / "plan.json")
    argv = ["quantize", str(tmp_path / "plan.json"), "--model", str(folder), "--out", str(tmp_path / "a.gguf")]
    assert main([*argv, "--gguf", str(tiny_gguf)]) == 0
    cap = capsys.readouterr()
    line = _last_json(cap.out)
    assert line["path"] == str(tmp_path / "a.gguf") and line["tensor_bytes"] == line["charged_bytes"]
    assert f"{line['bits_per_weight']:.4f} bits per weight (the search charged" in cap.err
    mpsearch.quantize(tiny.model, plan, tmp_path / "b.gguf", source=tiny_gguf, progress=False)
    assert (tmp_path / "a.gguf").read_bytes() == (tmp_path / "b.gguf").read_bytes()
    assert main(argv) == 2 and "convert_hf_to_gguf.py" in capsys.readouterr().err  # without --gguf: how to make it


def test_runtime_files_refuse_a_plan_searched_with_other_math():
    from mpsearch.artifacts import require_rtn
    from mpsearch.quant.quantizer import RTN, Quantizer

    class Other(Quantizer):  # any Quantizer that is not round to nearest (GPTQ, say)
        def quantize(self, unit, option):
            raise AssertionError("never called")

        def label(self):
            return "gptq (damp 0.01)"

    require_rtn(RTN(), "llama.cpp")  # the searched math: accepted
    with pytest.raises(MpsearchError, match=r"searched with gptq \(damp 0.01\); search the plan with --quantizer rtn"):
        require_rtn(Other(), "llama.cpp")
