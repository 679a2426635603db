"""Your model, your text (issue 24, first part): the CLI searches and evaluates a local transformers folder or
a GGUF file with calibration text from a file, offline, and refuses bad input in one line."""

import json

import pytest

from mpsearch.cli import main

TEXT_ARGS = ["--seq-len", "64", "--n-calib", "4", "--n-eval", "2", "--batch-size", "2"]
SEARCH_ARGS = ["--estimator", "sqnr", "--options", "int4_g32_asym,int8", "--avg-bits", "6", "--refine", "2"]


def _json_line(out: str) -> dict:
    return json.loads([line for line in out.splitlines() if line.startswith("{")][-1])


@pytest.mark.parametrize("source", ["folder", "gguf"])
def test_search_then_evaluate_your_own_model_with_a_text_file(source, llama_dir, tiny_gguf, text, tmp_path, capsys):
    """A folder, and a GGUF written by a test (SmolLM2's first two blocks: conftest ``tiny_gguf``)."""
    model = str(llama_dir) if source == "folder" else str(tiny_gguf)
    plan = tmp_path / "plan.json"
    args = ["--model", model, "--calib", str(text), *TEXT_ARGS]
    assert main(["search", *args, *SEARCH_ARGS, "--out", str(plan)]) == 0
    searched = _json_line(capsys.readouterr().out)
    assert searched["model"] == model and searched["avg_bits"] <= 6 + 1e-9
    assert json.loads(plan.read_text())["provenance"]["model"] == model
    assert main(["evaluate", *args, "--plan", str(plan)]) == 0
    measured = _json_line(capsys.readouterr().out)
    assert measured["metric_name"] == "perplexity" and measured["metric"] > 1 and measured["perplexity_fp"] > 1
    assert measured["uniform_option"] in ("int4_g32_asym", "int8")


BAD = {
    "not a model": (lambda d, t, p: [str(t)], "is a file but not a .gguf"),
    "a folder without config.json": (lambda d, t, p: [str(p)], "without config.json"),
    "no such hub id": (
        lambda d, t, p: ["nobody/no-such-model-xyz", "--calib", str(t)],
        "nor in the local Hugging Face cache",
    ),
    "no text": (lambda d, t, p: [str(d)], "needs calibration text"),
    "too little text": (lambda d, t, p: [str(d), "--calib", str(p / "short.txt")], "fewer than one sequence"),
    "eval is calib": (lambda d, t, p: [str(d), "--calib", str(t), "--eval", str(t)], "--eval is the --calib file"),
    "eval overlaps calib": (
        lambda d, t, p: [str(d), "--calib", str(t), "--eval", str(p / "part.txt")],
        "--eval shares text with --calib",
    ),
    "GGUF transformers cannot read": (
        lambda d, t, p: [str(p / "rwkv.gguf"), "--calib", str(t)],
        "rwkv7 is not supported",
    ),
    "bad dtype": (lambda d, t, p: [str(d), "--calib", str(t), "--dtype", "int8"], "--dtype 'int8'"),
    "not JSONL": (lambda d, t, p: [str(d), "--calib", str(p / "bad.jsonl")], "line 1 is not a JSON object"),
}


def _gguf_of_another_architecture(path):
    """A GGUF whose architecture llama.cpp knows and transformers does not read (rwkv7)."""
    import gguf

    from mpsearch.artifacts.gguf_file import copy_metadata
    from mpsearch.models.smollm2 import gguf_path

    reader = gguf.GGUFReader(str(gguf_path()))
    writer = gguf.GGUFWriter(str(path), arch="rwkv7", endianess=reader.endianess)
    copy_metadata(reader, writer, rename=lambda key: key.replace("llama.", "rwkv7."))
    norm = next(t for t in reader.tensors if t.name == "output_norm.weight")
    writer.add_tensor_info(norm.name, norm.data.shape, norm.data.dtype, norm.data.nbytes, norm.tensor_type)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    writer.write_tensor_data(norm.data)
    writer.close()


@pytest.mark.parametrize("case", list(BAD))
def test_bad_models_and_text_are_one_line(case, llama_dir, text, tmp_path, capsys):
    (tmp_path / "short.txt").write_text("too short")
    (tmp_path / "bad.jsonl").write_text("{not json\n")
    (tmp_path / "part.txt").write_text(text.read_text()[:8000])  # the calibration text's start
    if case.startswith("GGUF"):
        _gguf_of_another_architecture(tmp_path / "rwkv.gguf")
    build, message = BAD[case]
    args = build(llama_dir, text, tmp_path)
    code = main(["search", "--model", args[0], *args[1:], *TEXT_ARGS, *SEARCH_ARGS])
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("mpsearch: error:")]
    assert code == 2 and len(errors) == 1 and message in errors[0], err


def test_an_encoder_folder_is_searched_on_its_embeddings(text, tmp_path, capsys):
    """A sentence-embedding checkpoint (BertModel: no LM head) loads as the bare model and is measured by the
    cosine similarity of its mean-pooled embeddings, as the output convention says."""
    from mpsearch.models.minilm import model_dir

    plan = tmp_path / "plan.json"
    args = ["--model", str(model_dir()), "--calib", str(text), *TEXT_ARGS]
    assert main(["search", *args, *SEARCH_ARGS, "--out", str(plan)]) == 0
    assert _json_line(capsys.readouterr().out)["avg_bits"] <= 6 + 1e-9
    assert main(["evaluate", *args, "--plan", str(plan)]) == 0
    measured = _json_line(capsys.readouterr().out)
    assert measured["metric_name"] == "cosine" and 0.5 < measured["metric"] <= 1 and measured["higher_is_better"]
