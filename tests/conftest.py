import os
import tempfile

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TQDM_DISABLE", "1")
# a private cache per test session: cached tables and the trained digits model never leak between runs
os.environ["MPSEARCH_CACHE"] = tempfile.mkdtemp(prefix="mpsearch-test-cache-")


@pytest.fixture(scope="session")
def digits():
    from mpsearch.models import load

    return load("digits-cnn")


@pytest.fixture(scope="session")
def minilm():
    from mpsearch.models import load

    return load("minilm-l6")


@pytest.fixture(scope="session")
def effnet():
    from mpsearch.models import load

    return load("efficientnet-lite0")


@pytest.fixture(scope="session")
def text(tmp_path_factory):
    """A calibration text file of real English (the zoo's corpus), as a user brings one."""
    from mpsearch.models.sources import corpus_sentences

    path = tmp_path_factory.mktemp("text") / "calib.txt"
    path.write_text("\n".join(corpus_sentences()[:400]))
    return path


@pytest.fixture(scope="session")
def llama_dir(tmp_path_factory):
    """A random-init Llama saved with save_pretrained, with SmolLM2's tokenizer beside it: a user's folder."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from mpsearch.models.smollm2 import load_tokenizer

    tok = load_tokenizer()
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, tie_word_embeddings=True,
    )  # fmt: skip
    folder = tmp_path_factory.mktemp("model")
    LlamaForCausalLM(cfg).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_gguf(tmp_path_factory):
    """A GGUF written here: SmolLM2's first two blocks (its metadata, tokenizer and tensors as stored), a
    valid llama GGUF that transformers and llama.cpp load."""
    import gguf

    from mpsearch.artifacts.gguf_file import copy_metadata
    from mpsearch.models.smollm2 import gguf_path

    reader = gguf.GGUFReader(str(gguf_path()))
    path = tmp_path_factory.mktemp("gguf") / "tiny.gguf"
    writer = gguf.GGUFWriter(str(path), arch="llama", endianess=reader.endianess)
    copy_metadata(reader, writer, values={"llama.block_count": 2})
    kept = [t for t in reader.tensors if not t.name.startswith("blk.") or int(t.name.split(".")[1]) < 2]
    for t in kept:
        writer.add_tensor_info(t.name, t.data.shape, t.data.dtype, t.data.nbytes, t.tensor_type)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    for t in kept:
        writer.write_tensor_data(t.data)
    writer.close()
    return path


@pytest.fixture(scope="session")
def tiny(tiny_gguf):
    """``tiny_gguf`` loaded as transformers loads a user's GGUF (once: its tokenizer conversion is slow); tests
    that change its weights put them back."""
    from mpsearch.models.local import load_local

    return load_local(str(tiny_gguf), None)
