"""Token reduction inside Hugging Face vision encoders: ``mmkernels.patch(model, reduce=...)``.

Every vision encoder of the model (a ``ModuleList`` of supported layers, see
:mod:`mmkernels.hf.adapters`: standalone ``ViTModel`` / ``Dinov2Model`` / ``CLIPVisionModel`` /
``SiglipVisionModel``, the vision half of ``CLIPModel`` / ``SiglipModel``, and any model that holds
them) gets an instance forward on each of its layers. The encoder's own loop, the model's final
norm, pooler / head and output type are HF's, unchanged; each layer runs through its adapter with
the method's per-block step from :mod:`mmkernels.reduce.methods` (the same functions that serve
:class:`mmkernels.models.VisionTransformer`):

* ``tome`` ``{r, protect_first}``: every layer merges ``r`` tokens (an int, or one value per
  layer; clipped to what can still merge, as :func:`~mmkernels.reduce.methods.tome_schedule`),
  with proportional attention (``key_bias = log(size)``); the first ``protect_first`` tokens
  (CLS) never merge. Merged tokens keep their order.
* ``evit`` ``{keep, layers, protect_first}``: at each layer in ``layers`` (negative indices count
  from the end) keep ``ceil(keep * patches)`` patch tokens by score and fuse the rest into one
  token appended at the end.
* ``visionzip`` ``{dominant, contextual, layer}``: after layer ``layer`` (default ``-2``) keep the
  prefix token(s), ``dominant`` tokens by score and ``contextual`` merged tokens; the remaining
  layers run on those.
* ``prumerge`` ``{layer, plus}``: after layer ``layer`` keep each image's IQR-outlier tokens,
  merged with their most similar pruned tokens; the count is data-dependent, so a batch whose
  images keep different counts raises (run one image at a time). ``plus=True`` (PruMerge+) is
  not implemented yet.
* ``fastv`` belongs to a VLM's language model (:mod:`mmkernels.hf.fastv`, LLaVA models). Other
  vision-language models are refused (their language model expects a fixed number of image
  tokens per image; LLaVA's prompts are compacted, :mod:`mmkernels.hf.families.llava`), as are
  transformers backbones (``Dinov2Backbone`` & co.: feature maps need every patch token).

Scores rank tokens by the attention CLS gives them (SigLIP has no CLS token: the mean attention
each token receives). :func:`output_tokens` states the output token count of a spec.

Outputs: ``last_hidden_state`` has the reduced length (the CLS token stays first, so poolers that
read position 0 still read CLS). ``output_hidden_states=True`` returns each layer's tokens at the
length they have at that point. ``output_attentions=True`` cannot be served (fused attention has
no attention maps): such a call runs the encoder **unreduced** (HF's own layer forwards) and warns.
"""

from __future__ import annotations

import functools
import inspect
import threading
import warnings
import weakref
from dataclasses import dataclass
from typing import Any, Dict, List, Optional

from torch import Tensor, nn

from . import hf_attention
from .adapters import SUPPORTED_LAYERS, LayerAdapter, adapter_for
from .specs import REDUCE_KEYS, _check_reduce
from ..reduce.methods import (
    evit_block_step,
    evit_count,
    prumerge_block_step,
    tome_block_step,
    tome_schedule,
    visionzip_block_step,
)

PRUMERGE_NEIGHBOURS = 32  # prumerge's k: pruned tokens each kept token may absorb


@dataclass
class VisionEncoder:
    """One vision encoder found in a model: its layers' ``ModuleList`` and their adapters."""

    path: str  # path of the ModuleList of layers ("" never: a list has a name)
    layers: nn.ModuleList
    adapters: List[LayerAdapter]

    @property
    def family(self) -> str:
        return self.adapters[0].family

    @property
    def prefix_tokens(self) -> int:
        return self.adapters[0].prefix_tokens

    @property
    def depth(self) -> int:
        return len(self.adapters)

    def num_tokens(self) -> Optional[int]:
        """Tokens at the configured image size (``None`` when the config does not say)."""
        config = getattr(self.adapters[0].attention, "config", None)
        image, patch = getattr(config, "image_size", None), getattr(config, "patch_size", None)
        if image is None or patch is None:
            return None
        h, w = (image, image) if isinstance(image, int) else tuple(image)[:2]
        p = (patch, patch) if isinstance(patch, int) else tuple(patch)[:2]
        return self.prefix_tokens + (h // p[0]) * (w // p[1])


def find_vision_encoders(model: nn.Module) -> List[VisionEncoder]:
    """Every ``ModuleList`` in ``model`` whose entries are all layers of one supported family
    (by type, see :func:`mmkernels.hf.adapters.adapter_for`), in module order."""
    found = []
    for name, module in model.named_modules():
        if not isinstance(module, nn.ModuleList) or len(module) == 0:
            continue
        adapters = [adapter_for(layer) for layer in module]
        if all(a is not None for a in adapters) and len({type(a) for a in adapters}) == 1:
            found.append(VisionEncoder(name, module, adapters))
    return found


# ----------------------------------------------------------------------------------------------
# Specs
# ----------------------------------------------------------------------------------------------


def _as_spec(spec) -> Dict[str, Any]:
    """A reduce dict (defaults filled, checked by :mod:`mmkernels.hf.specs`) from a user dict or
    a :class:`~mmkernels.hf.specs.PatchSettings` ``reduce`` record."""
    if isinstance(spec, tuple):
        spec = dict(spec)
    return _check_reduce(spec)


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _layer_index(name: str, value, depth: int) -> int:
    if not _is_int(value) or not -depth <= value < depth:
        raise ValueError(
            f"reduce[{name!r}]={value!r} must be a layer index in [-{depth}, {depth}) for an encoder of {depth} layers"
        )
    return value % depth


def _check_spec(spec: Dict[str, Any], depth: int) -> Dict[str, Any]:
    """Check the values of a spec against an encoder of ``depth`` layers; returns the spec with
    layer indices made non-negative. Raises ``ValueError`` naming the key."""
    method = spec["method"]
    spec = dict(spec)
    if method == "fastv":
        raise ValueError(
            "reduce method 'fastv' prunes image tokens inside a vision-language model's language "
            "model (after its layer K), not in a vision encoder: its token count is the prompt's"
        )
    if "protect_first" in spec and (not _is_int(spec["protect_first"]) or spec["protect_first"] < 0):
        raise ValueError(f"reduce['protect_first'] must be an int >= 0, got {spec['protect_first']!r}")
    if method == "tome":
        r = spec["r"]
        if isinstance(r, (list, tuple)):
            if len(r) != depth:
                raise ValueError(
                    f"reduce['r'] has {len(r)} entries; the encoder has {depth} layers (give one per layer, or an int)"
                )
            values = list(r)
        else:
            values = [r]
        if not all(_is_int(v) and v >= 0 for v in values):
            raise ValueError(f"reduce['r'] must be an int >= 0 or a list of them, got {r!r}")
        spec["r"] = list(r) if isinstance(r, (list, tuple)) else r
    elif method == "evit":
        keep = spec["keep"]
        if isinstance(keep, bool) or not isinstance(keep, (int, float)) or not 0 < keep <= 1:
            raise ValueError(f"reduce['keep'] must be a keep rate in (0, 1], got {keep!r}")
        layers = spec["layers"]
        layers = [layers] if _is_int(layers) else layers
        if not isinstance(layers, (list, tuple)):
            raise ValueError(f"reduce['layers'] must be a list of layer indices, got {layers!r}")
        spec["layers"] = tuple(sorted({_layer_index("layers", i, depth) for i in layers}))
    elif method == "visionzip":
        for key in ("dominant", "contextual"):
            if not _is_int(spec[key]) or spec[key] < 0:
                raise ValueError(f"reduce[{key!r}] must be an int >= 0, got {spec[key]!r}")
        spec["layer"] = _layer_index("layer", spec["layer"], depth)
    elif method == "prumerge":
        if spec["plus"]:
            raise ValueError(
                "reduce method 'prumerge' with plus=True (PruMerge+, spatially "
                "sampled extra tokens) is not implemented yet; use plus=False"
            )
        spec["layer"] = _layer_index("layer", spec["layer"], depth)
    return spec


def output_tokens(spec, num_tokens: int, depth: int, prefix_tokens: int = 1) -> int:
    """Tokens a vision encoder of ``depth`` layers outputs for ``num_tokens`` input tokens
    (``prefix_tokens`` of them CLS-like: 1 for ViT / DINOv2 / CLIP, 0 for SigLIP) under the reduce
    ``spec`` (a dict as given to :func:`mmkernels.patch`; defaults filled in). Deterministic.

    Raises ``ValueError`` for a bad spec, for too few tokens (VisionZip), and for ``prumerge``
    (its count is each image's number of IQR outliers: data-dependent) and ``fastv``.
    """
    spec = _check_spec(_as_spec(spec), depth)
    method = spec["method"]
    n = int(num_tokens)
    if method == "tome":
        return n - sum(tome_schedule(spec["r"], depth, n, spec["protect_first"]))
    if method == "evit":
        for _ in spec["layers"]:
            n = evit_count(n, spec["keep"], spec["protect_first"])
        return n
    if method == "visionzip":
        dominant, contextual = spec["dominant"], spec["contextual"]
        if n - prefix_tokens - dominant < contextual:
            raise ValueError(
                f"{n} tokens cannot give {prefix_tokens} prefix + {dominant} dominant + {contextual} contextual tokens"
            )
        return prefix_tokens + dominant + contextual
    raise ValueError(
        "reduce method 'prumerge' keeps a data-dependent number of tokens (each "
        "image's IQR outliers of the attention scores, at least one, plus the "
        "prefix token): no count can be stated in advance"
    )


def _describe(spec: Dict[str, Any]) -> str:
    method = spec["method"]
    defaults = REDUCE_KEYS[method]
    parts = []
    for key, default in defaults.items():
        value = spec[key]
        if default is None or value != default:
            parts.append(f"{key}={list(value) if isinstance(value, tuple) else value}")
    return " ".join([method] + parts)


# ----------------------------------------------------------------------------------------------
# Running an encoder's layers through the adapters
# ----------------------------------------------------------------------------------------------


class _EncoderRun:
    """The reduction of one encoder: called by each layer's bound forward with its index.

    ToMe's token sizes and schedule pass from one layer to the next in a thread-local record tied
    to the tensor the previous layer returned; a layer that receives any other tensor (the first
    layer, or a caller that changed the hidden states between layers) starts a new run from it.
    """

    def __init__(self, encoder: VisionEncoder, spec: Dict[str, Any]):
        self.encoder, self.spec = encoder, spec
        self.method = spec["method"]
        self.local = threading.local()

    def _tome_state(self, i: int, x: Tensor):
        last = getattr(self.local, "tome", None)
        if i > 0 and last is not None and last[0]() is x:
            return last[1], last[2]
        r = self.spec["r"]
        depth = self.encoder.depth
        schedule = tome_schedule(r[i:] if isinstance(r, list) else r, depth - i, x.shape[1], self.spec["protect_first"])
        return None, dict(enumerate(schedule, start=i))

    def step(self, i: int, x: Tensor) -> Tensor:
        adapter, spec = self.encoder.adapters[i], self.spec
        if self.method == "tome":
            size, schedule = self._tome_state(i, x)
            x, size = tome_block_step(adapter, x, size, schedule[i], spec["protect_first"])
            self.local.tome = (weakref.ref(x), size, schedule) if i + 1 < self.encoder.depth else None
            return x
        if self.method == "evit":
            if i in spec["layers"]:
                return evit_block_step(adapter, x, spec["keep"], spec["protect_first"], scores=adapter.rank_scores)
            return adapter(x)
        if i != spec["layer"]:
            return adapter(x)
        if self.method == "visionzip":
            return visionzip_block_step(
                adapter, x, spec["dominant"], spec["contextual"], adapter.prefix_tokens, scores=adapter.rank_scores
            )
        packed, cu = prumerge_block_step(
            adapter, x, PRUMERGE_NEIGHBOURS, adapter.prefix_tokens, scores=adapter.rank_scores
        )
        counts = (cu[1:] - cu[:-1]).tolist()
        if len(set(counts)) != 1:
            raise ValueError(
                f"prumerge kept {counts} tokens for the {len(counts)} images of this batch: an "
                "encoder output is one (B, N, C) tensor, so images that keep different counts "
                "cannot share a batch; run them one at a time"
            )
        return packed.view(len(counts), counts[0], packed.shape[-1])

    def layer_forward(self, i: int):
        run = self

        def forward(layer, hidden_states, attention_mask=None, *args, **kwargs):
            if kwargs.get("output_attentions") or _attentions_recorded():
                if i == 0:
                    warnings.warn(
                        "mmkernels token reduction: output_attentions=True asks for attention "
                        "maps, which fused attention does not make; this encoder runs unreduced",
                        stacklevel=2,
                    )
                if attention_mask is not None or args or _takes_mask(type(layer)):
                    return type(layer).forward(layer, hidden_states, attention_mask, *args, **kwargs)
                return type(layer).forward(layer, hidden_states, **kwargs)
            if attention_mask is not None or args:
                raise ValueError(
                    f"{type(layer).__name__} (token reduction by mmkernels.patch) got an attention "
                    "mask or extra positional arguments: a reduced encoder changes the token "
                    "count, so a per-token mask cannot follow it; call the model without "
                    "attention_mask or unpatch it"
                )
            return run.step(i, hidden_states)

        return forward


def _takes_mask(cls: type) -> bool:
    """Whether a layer class's forward has an ``attention_mask`` parameter (DINOv2's has none up
    to transformers 5.17)."""
    return "attention_mask" in inspect.signature(cls.forward).parameters


@functools.lru_cache(maxsize=None)
def _output_collector():
    """transformers' output collector (None in releases without it), imported once: every reduced
    layer call asks it."""
    try:
        from transformers.utils.output_capturing import _active_collector
    except ImportError:
        return None
    return _active_collector


def _attentions_recorded() -> bool:
    """Whether the running model call records attention maps (``output_attentions=True``):
    transformers 5.x collects them with hooks and does not always pass the flag down to layers."""
    collector = _output_collector()
    collected = None if collector is None else collector.get()
    return bool(collected) and "attentions" in collected


# ----------------------------------------------------------------------------------------------
# Entry point (called by mmkernels.hf.core.patch)
# ----------------------------------------------------------------------------------------------


def _backbone(model: nn.Module) -> Optional[str]:
    """The class name of a transformers backbone (feature maps on the patch grid) in ``model``."""
    try:
        from transformers.backbone_utils import BackboneMixin
    except ImportError:  # releases before the move out of utils/
        try:
            from transformers.utils.backbone_utils import BackboneMixin
        except ImportError:
            return None
    for module in model.modules():
        if isinstance(module, BackboneMixin):
            return type(module).__name__
    return None


def _vision_language_model(model: nn.Module) -> Optional[str]:
    """The class name of a vision-language model part (its config counts image tokens)."""
    for module in model.modules():
        config = getattr(module, "config", None)
        if config is None:
            continue
        if (
            getattr(config, "image_token_id", None) is not None
            or getattr(config, "image_token_index", None) is not None
        ):
            return type(module).__name__
    return None


def apply_reduction(model: nn.Module, spec, record) -> None:
    """Reduce the tokens of every vision encoder in ``model`` by ``spec`` (a reduce dict or a
    :class:`~mmkernels.hf.specs.PatchSettings` ``reduce`` record); ``record`` is the patch's undo
    record (:class:`mmkernels.hf.core._Undo`): bound forwards are undone by ``unpatch``; one
    report row per encoder.

    A LLaVA model's vision tower is reduced and its prompts compacted to match
    (:mod:`mmkernels.hf.families.llava`); ``fastv`` goes to the language model of a LLaVA model
    (:mod:`mmkernels.hf.fastv`). Raises ``ValueError`` for other vision-language models (not
    supported yet), when the model has no supported vision encoder, when an encoder's attention
    is not patched, and for spec values that do not fit an encoder (layer indices, r schedule
    length, token counts).
    """
    spec = _as_spec(spec)
    if spec["method"] == "fastv":
        from .fastv import apply_fastv

        apply_fastv(model, spec, record)
        return
    vlm = _vision_language_model(model)
    if vlm is not None:
        from .families import llava

        if llava.is_llava(model):
            llava.reduce_llava(model, spec, record, _reduce_encoders)
            return
        raise ValueError(
            f"reduce on {type(model).__name__}: token reduction inside this vision-language model "
            f"({vlm}) is not supported yet (LLaVA is): its language model expects a fixed number "
            "of image tokens per image, so the prompt's image-token bookkeeping has to follow the "
            "reduction. Reduce a standalone vision encoder (CLIPVisionModel, SiglipVisionModel, "
            "...) instead"
        )
    _reduce_encoders(model, spec, record)


def _reduce_encoders(model: nn.Module, spec: Dict[str, Any], record) -> list:
    """Reduce every vision encoder of ``model`` (no VLM bookkeeping); returns
    ``[(encoder, checked spec), ...]``."""
    from .core import Row, bind_forward

    backbone = _backbone(model)
    if backbone is not None:
        raise ValueError(
            f"reduce on {type(model).__name__}: {backbone} returns feature maps on the patch grid, "
            "which needs every patch token; token reduction does not apply to backbones"
        )
    encoders = find_vision_encoders(model)
    if not encoders:
        raise ValueError(
            f"reduce on {type(model).__name__}: no supported vision encoder found (looked for a "
            f"list of {SUPPORTED_LAYERS} layers)"
        )
    plans = []
    for encoder in encoders:
        unpatched = [type(a.attention).__name__ for a in encoder.adapters if a.attention not in hf_attention.STATES]
        if unpatched:
            raise ValueError(
                f"reduce: the attention modules of {encoder.path} ({unpatched[0]}) "
                "are not routed through mmkernels' attention, which gives the scores "
                "and keys token reduction reads"
            )
        checked = _check_spec(spec, encoder.depth)
        n = encoder.num_tokens()
        if checked["method"] == "prumerge":
            count = "adaptive tokens (prefix + each image's IQR outliers)"
        elif n is not None:
            count = f"{output_tokens(spec, n, encoder.depth, encoder.prefix_tokens)} tokens"
        else:
            count = "? tokens"
        detail = (
            f"{_describe(spec)}: {n if n is not None else '?'} -> {count} "
            f"({encoder.family}, {encoder.depth} layers, "
            f"scores {encoder.adapters[0].rank_scores!r})"
        )
        plans.append((encoder, checked, detail))
    for encoder, checked, detail in plans:
        run = _EncoderRun(encoder, checked)
        for i, layer in enumerate(encoder.layers):
            bind_forward(layer, run.layer_forward(i), record)
        record.report.rows.append(Row(encoder.path, "reduce", "mmkernels", detail))
    record.report.notes.append(
        "reduce: the encoder output has the reduced token count (CLS first); "
        "output_hidden_states gives each layer's tokens at their reduced length; "
        "output_attentions=True runs the encoder unreduced (fused attention makes no maps)"
    )
    if any(e.prefix_tokens == 0 for e, _, _ in plans) and "protect_first" in spec and spec["protect_first"] > 0:
        record.report.notes.append(
            f"reduce: SigLIP has no CLS token: protect_first={spec['protect_first']} keeps its "
            "first patch token(s) out of the reduction (protect_first=0 treats all alike)"
        )
    return [(encoder, checked) for encoder, checked, _ in plans]
