"""Hardening of save_quantized / load_quantized: atomic load (a refused checkpoint leaves the
model as it was), atomic save (a refused or failed save leaves nothing behind), pathologically
nested JSON, and symlinks leading out of the checkpoint folder."""

import json
import os

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import mmkernels
from mmkernels.nn import OutlierSplitLinear, QuantLinear
from mmkernels.quant import quantize_weight
from mmkernels.compress.checkpoint import _io, mmkernels_format


class Net(nn.Module):
    def __init__(self, k=64, h=128, n=32):
        super().__init__()
        self.fc1 = nn.Linear(k, h)
        self.norm = nn.LayerNorm(h)
        self.fc2 = nn.Linear(h, n)

    def forward(self, x):
        return self.fc2(F.gelu(self.norm(self.fc1(x))))


def quantized_net(**kw):
    torch.manual_seed(0)
    m = Net()
    m.fc1 = QuantLinear.from_linear(m.fc1, bits=4, group_size=32, **kw)
    m.fc2 = QuantLinear.from_linear(m.fc2, bits=4, group_size=32, **kw)
    return m


def split_net():
    torch.manual_seed(0)
    m = Net()
    idx = torch.tensor([3, 17, 40])
    keep = torch.ones(64, dtype=torch.bool)
    keep[idx] = False
    w = m.fc1.weight.detach()
    main = QuantLinear.from_quantized(quantize_weight(w[:, keep], 8), m.fc1.bias.detach(), act_bits=8)
    outliers = QuantLinear.from_quantized(quantize_weight(w[:, idx], 8), act_bits=8)
    m.fc1 = OutlierSplitLinear(main, outliers, idx)
    m.fc2 = QuantLinear.from_linear(m.fc2, bits=8, act_bits=8)
    return m


def snapshot(model):
    """Everything a failed load must leave unchanged: module types and every tensor."""
    types = {name: type(m) for name, m in model.named_modules()}
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    return types, state


def assert_unchanged(model, snap):
    types, state = snap
    assert {name: type(m) for name, m in model.named_modules()} == types
    now = model.state_dict()
    assert list(now) == list(state)
    for k, v in state.items():
        assert now[k].dtype == v.dtype and torch.equal(now[k], v), k


def tree(folder):
    """Every path under ``folder`` (relative), with file contents, for before/after checks."""
    out = {}
    for root, dirs, files in os.walk(folder):
        for d in dirs:
            out[os.path.relpath(os.path.join(root, d), folder)] = None
        for f in files:
            p = os.path.join(root, f)
            with open(p, "rb") as fh:
                out[os.path.relpath(p, folder)] = fh.read()
    return out


# ---------------------------------------------------------------------------------------------
# 1. load_quantized is atomic
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["mmkernels", "gptq", "compressed-tensors"])
def test_second_layer_mismatch_leaves_model_unchanged(tmp_path, fmt):
    path = tmp_path / "ckpt"
    mmkernels.save_quantized(quantized_net(), path, format=fmt)
    model = Net(n=16)  # fc1 fits the checkpoint, fc2 does not
    snap = snapshot(model)
    with pytest.raises(
        ValueError,
        match=r"layer 'fc2' is 128 -> 32 in the checkpoint but "
        r"128 -> 16 in the model",
    ):
        mmkernels.load_quantized(path, model)
    assert_unchanged(model, snap)
    assert type(model.fc1) is nn.Linear


def test_float_tensor_shape_mismatch_leaves_model_unchanged(tmp_path):
    path = tmp_path / "ckpt"
    mmkernels.save_quantized(quantized_net(), path)
    model = Net()
    model.norm.weight = nn.Parameter(torch.ones(64))  # same key, another shape
    snap = snapshot(model)
    with pytest.raises(
        ValueError,
        match=r"do not fit the model: norm.weight: \[128\] in the "
        r"file, \[64\] in the model",
    ):
        mmkernels.load_quantized(path, model)
    assert_unchanged(model, snap)


def test_missing_tensor_leaves_model_unchanged(tmp_path):
    path = tmp_path / "ckpt"
    mmkernels.save_quantized(split_net(), path)
    model = Net()
    model.head = nn.Linear(32, 2)
    snap = snapshot(model)
    with pytest.raises(ValueError, match=r"missing from the file \['head.weight', 'head.bias'\]"):
        mmkernels.load_quantized(path, model)
    assert_unchanged(model, snap)
    # and the same checkpoint loads into the right model
    loaded = mmkernels.load_quantized(path, Net())
    assert isinstance(loaded.fc1, OutlierSplitLinear) and isinstance(loaded.fc2, QuantLinear)


def test_failure_while_applying_restores_the_modules(tmp_path):
    """A load that fails after validation (here: a module hook) puts the original modules back."""
    path = tmp_path / "ckpt"
    mmkernels.save_quantized(quantized_net(), path)
    model = Net()

    def refuse(*args):
        raise RuntimeError("hook refuses")

    model.norm.register_load_state_dict_pre_hook(refuse)
    with pytest.raises(ValueError, match="hook refuses"):
        mmkernels.load_quantized(path, model)
    assert type(model.fc1) is nn.Linear and type(model.fc2) is nn.Linear


# ---------------------------------------------------------------------------------------------
# 2. save_quantized is atomic
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["gptq", "compressed-tensors"])
def test_refused_save_leaves_no_directory(tmp_path, fmt):
    with pytest.raises(ValueError, match=f"format='{fmt}' cannot express OutlierSplitLinear"):
        mmkernels.save_quantized(split_net(), tmp_path / "out", format=fmt)
    with pytest.raises(ValueError, match="cannot express OutlierSplitLinear"):
        mmkernels.save_quantized(split_net(), tmp_path / "a" / "b" / "out", format=fmt)
    assert os.listdir(tmp_path) == []  # no target, no parents, no temporary folder


def test_failed_write_leaves_no_partial_directory(tmp_path, monkeypatch):
    def broken(model, directory):
        (open(os.path.join(directory, "model.safetensors"), "wb")).write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(mmkernels_format, "save", broken)
    with pytest.raises(OSError, match="disk full"):
        mmkernels.save_quantized(quantized_net(), tmp_path / "out")
    assert os.listdir(tmp_path) == []


def test_refused_save_into_existing_directory_changes_nothing(tmp_path):
    path = tmp_path / "ckpt"
    mmkernels.save_quantized(quantized_net(), path)
    (path / "tokenizer.json").write_text("{}")
    before = tree(tmp_path)
    with pytest.raises(ValueError, match="cannot express OutlierSplitLinear"):
        mmkernels.save_quantized(split_net(), path, format="gptq", overwrite=True)
    with pytest.raises(ValueError, match="already holds a checkpoint"):
        mmkernels.save_quantized(quantized_net(), path, format="gptq")
    assert tree(tmp_path) == before  # the old checkpoint is intact
    mmkernels.load_quantized(path, Net())


def test_overwrite_swaps_the_checkpoint_and_keeps_other_files(tmp_path):
    path = tmp_path / "ckpt"
    model = quantized_net()
    mmkernels.save_quantized(model, path)
    (path / "tokenizer.json").write_text("{}")
    mmkernels.save_quantized(model, path, format="gptq", overwrite=True)
    assert sorted(os.listdir(path)) == ["config.json", "model.safetensors", "quantize_config.json", "tokenizer.json"]
    assert os.listdir(tmp_path) == ["ckpt"]  # the temporary folder is gone
    assert mmkernels.load_quantized(path).format == "gptq"
    # an existing directory without a checkpoint is written into (its files kept)
    other = tmp_path / "other"
    other.mkdir()
    (other / "README.md").write_text("hi")
    mmkernels.save_quantized(model, other)
    assert sorted(os.listdir(other)) == ["README.md", "mmkernels.json", "model.safetensors"]


def test_new_directory_gets_normal_permissions(tmp_path):
    path = tmp_path / "ckpt"
    mmkernels.save_quantized(quantized_net(), str(path) + os.sep)  # trailing separator
    umask = os.umask(0)
    os.umask(umask)
    assert (os.stat(path).st_mode & 0o777) == (0o777 & ~umask)
    assert os.listdir(tmp_path) == ["ckpt"]


# ---------------------------------------------------------------------------------------------
# 3. pathologically nested JSON
# ---------------------------------------------------------------------------------------------

DEEP = "[" * 200_000 + "]" * 200_000


@pytest.mark.parametrize("text", [DEEP, '{"a": ' + DEEP + "}"])
def test_deeply_nested_json_is_a_value_error(tmp_path, text):
    f = tmp_path / "config.json"
    f.write_text(text)
    with pytest.raises(ValueError, match=r"config.json: not valid JSON \(nested too deeply"):
        _io.read_json(str(f))


def test_deeply_nested_checkpoint_metadata_is_refused(tmp_path):
    path = tmp_path / "ckpt"
    mmkernels.save_quantized(quantized_net(), path)
    (path / "mmkernels.json").write_text('{"format": ' + DEEP + "}")
    with pytest.raises(ValueError, match=r"mmkernels.json: not valid JSON \(nested too deeply"):
        mmkernels.load_quantized(path, Net())
    # config.json of a gptq / compressed-tensors checkpoint (read by detect_format)
    ct = tmp_path / "ct"
    mmkernels.save_quantized(quantized_net(), ct, format="compressed-tensors")
    (ct / "config.json").write_text('{"quantization_config": ' + DEEP + "}")
    with pytest.raises(ValueError, match=r"config.json: not valid JSON \(nested too deeply"):
        mmkernels.load_quantized(ct)


def test_deeply_nested_safetensors_header_is_refused(tmp_path):
    header = ('{"__metadata__": ' + DEEP + "}").encode()
    f = tmp_path / "model.safetensors"
    f.write_bytes(len(header).to_bytes(8, "little") + header)
    with pytest.raises(
        ValueError,
        match=r"model.safetensors: corrupt safetensors header "
        r"\(nested too deeply",
    ):
        _io.load_tensors(str(f))


# ---------------------------------------------------------------------------------------------
# 5. symlinks leading out of the checkpoint folder
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["model.safetensors", "mmkernels.json"])
def test_symlink_out_of_the_checkpoint_is_refused(tmp_path, name):
    path = tmp_path / "ckpt"
    mmkernels.save_quantized(quantized_net(), path)
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    os.replace(path / name, outside / name)
    os.symlink(outside / name, path / name)
    with pytest.raises(
        ValueError,
        match=rf"{name}: resolves to .*elsewhere.*, outside the "
        r"checkpoint folder",
    ):
        mmkernels.load_quantized(path, Net())


def test_symlinked_config_and_shard_out_of_the_checkpoint_are_refused(tmp_path):
    path = tmp_path / "ct"
    mmkernels.save_quantized(quantized_net(), path, format="compressed-tensors")
    secret = tmp_path / "secret.json"
    os.replace(path / "config.json", secret)
    os.symlink("../secret.json", path / "config.json")  # a relative link
    with pytest.raises(ValueError, match="config.json: resolves to .* outside the checkpoint"):
        mmkernels.load_quantized(path)
    os.remove(path / "config.json")
    os.replace(secret, path / "config.json")
    # a sharded checkpoint whose shard leads out
    os.replace(path / "model.safetensors", tmp_path / "shard-1.safetensors")
    os.symlink(tmp_path / "shard-1.safetensors", path / "model-00001-of-00001.safetensors")
    index = {
        "weight_map": {
            k: "model-00001-of-00001.safetensors" for k in _io.load_tensors(str(tmp_path / "shard-1.safetensors"))
        }
    }
    (path / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(ValueError, match="model-00001-of-00001.safetensors: resolves to .* outside the checkpoint"):
        mmkernels.load_quantized(path)


def test_symlinks_inside_the_checkpoint_and_hub_cache_layout_load(tmp_path):
    # a symlinked checkpoint folder, and a link between files of the same folder
    real = tmp_path / "real"
    mmkernels.save_quantized(quantized_net(), real)
    os.replace(real / "model.safetensors", real / "weights.bin")
    os.symlink("weights.bin", real / "model.safetensors")
    os.symlink(real, tmp_path / "link")
    mmkernels.load_quantized(tmp_path / "link", Net())
    # Hugging Face hub cache: snapshots/<rev>/<file> -> ../../blobs/<hash>
    repo = tmp_path / "models--org--name"
    snap = repo / "snapshots" / "abc123"
    blobs = repo / "blobs"
    snap.mkdir(parents=True)
    blobs.mkdir()
    for f in os.listdir(real):
        if f == "model.safetensors":
            continue
        target = "weights.bin" if f == "weights.bin" else f
        os.replace(real / target, blobs / f"h-{f}")
        os.symlink(f"../../blobs/h-{f}", snap / ("model.safetensors" if f == "weights.bin" else f))
    mmkernels.load_quantized(snap, Net())
