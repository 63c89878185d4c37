"""onnx_state_dict and initializers with external data: read from the model's folder (a path, or
base_dir for a ModelProto), refused when the folder is unknown, never read from the current
directory."""

import os

import numpy as np
import pytest
import torch

onnx = pytest.importorskip("onnx")
from onnx import TensorProto, helper, numpy_helper  # noqa: E402

from mmkernels.models import onnx_state_dict  # noqa: E402

W = np.arange(12, dtype=np.float32).reshape(3, 4)  # (in, out) as the exporter stores it
B = np.full(4, 0.5, dtype=np.float32)


def save_external(folder, location="weights.bin"):
    """A one-MatMul model whose initializers live in ``folder/location``."""
    graph = helper.make_graph(
        [
            helper.make_node("MatMul", ["x", "onnx::MatMul_7"], ["h"], name="/fc/MatMul"),
            helper.make_node("Add", ["h", "fc.bias"], ["y"], name="/fc/Add"),
        ],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])],
        initializer=[numpy_helper.from_array(W, "onnx::MatMul_7"), numpy_helper.from_array(B, "fc.bias")],
    )
    model = helper.make_model(graph)
    path = os.path.join(folder, "model.onnx")
    onnx.save_model(
        model, path, save_as_external_data=True, all_tensors_to_one_file=True, location=location, size_threshold=0
    )
    return path


@pytest.fixture
def model_path(tmp_path, monkeypatch):
    """The saved model's path; the test then runs from another folder holding a decoy
    ``weights.bin`` with other bytes (saved first: onnx.save_model looks for the location in the
    current directory)."""
    folder = tmp_path / "m"
    folder.mkdir()
    path = save_external(str(folder))
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    (cwd / "weights.bin").write_bytes(np.full(64, 99.0, dtype=np.float32).tobytes())
    monkeypatch.chdir(cwd)
    return path


def test_path_reads_external_data_from_its_folder(model_path):
    state = onnx_state_dict(model_path)
    assert torch.equal(state["fc.weight"], torch.from_numpy(W.T.copy()))
    assert torch.equal(state["fc.bias"], torch.from_numpy(B))


def test_model_proto_with_unloaded_external_data(model_path):
    proto = onnx.load(model_path, load_external_data=False)
    assert proto.graph.initializer[0].data_location == TensorProto.EXTERNAL
    with pytest.raises(
        ValueError,
        match=r"initializer 'onnx::MatMul_7' keeps its data in the "
        r"external file 'weights.bin'.*pass base_dir=",
    ):
        onnx_state_dict(proto)  # never the decoy in the current directory
    state = onnx_state_dict(proto, base_dir=os.path.dirname(model_path))
    assert torch.equal(state["fc.weight"], torch.from_numpy(W.T.copy()))
    assert torch.equal(state["fc.bias"], torch.from_numpy(B))


def test_external_location_outside_the_folder_is_refused(model_path):
    proto = onnx.load(model_path, load_external_data=False)
    for init in proto.graph.initializer:
        for entry in init.external_data:
            if entry.key == "location":
                entry.value = "../cwd/weights.bin"
    with pytest.raises(
        ValueError,
        match=r"location '../cwd/weights.bin' resolves to .*, "
        r"outside the model's folder",
    ):
        onnx_state_dict(proto, base_dir=os.path.dirname(model_path))
