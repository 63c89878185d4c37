"""FastV inside a vision-language model's language model: ``reduce={"method": "fastv", ...}``.

FastV (Chen et al., ECCV 2024) lets the first ``layer`` decoder layers of the prefill see every
token; the attention that the **last** prompt token gives the image tokens in layer ``layer - 1``
(head-averaged, from our fused attention's ``scores="last"``, never an eager fallback) ranks them,
and layers ``layer, layer + 1, ...`` run on every text token plus the best
``ceil(keep * n_image)`` image tokens, in their original order. Their KV cache holds only those
tokens (the keys and values are computed from the pruned hidden states), while the first
``layer`` layers keep the whole prompt in theirs.

How the bookkeeping stays consistent (one :class:`_Run` per patched language model):

* the VLM's forward (``LlavaModel``) marks the image tokens of ``input_ids`` (the model's image
  token id); a direct call of the patched language model on ``inputs_embeds`` may pass the same
  mark as ``image_token_mask=`` (``(B, L)`` bool);
* a prefill (a call that starts a cache, or runs without one) with image tokens is pruned; every
  row of the batch must hold the same number of image tokens (one image per prompt, left padding
  as ``generate`` pads);
* the layers after the cut receive the rotary position embeddings, position ids and padding mask
  of the tokens they keep (rotary positions stay the original ones); in the decoding steps that
  follow, their padding mask is remapped onto their shorter cache;
* the positions, cache length and padding mask that transformers computes come from the first
  layer's (full) cache, so ``generate`` (batch > 1, greedy or sampled) runs unchanged.

Outputs: a pruned prefill returns hidden states / logits for the kept positions only (``generate``
reads the last one); ``labels`` are refused (FastV is an inference method: the logits no longer
line up with the prompt). Supported: LLaVA models (``LlavaForConditionalGeneration`` /
``LlavaModel``) whose language model's decoder layers run their attention through mmkernels.
"""

from __future__ import annotations

import inspect
import math
from typing import Any, Dict, List, Optional, Tuple

import torch
from torch import Tensor, nn

from . import hf_attention
from ..reduce import gather_tokens
from ..reduce.methods import fastv_keep_from_mask


class _Run:
    """The FastV state of one patched language model across its calls."""

    def __init__(self, cut: int, keep_ratio: float):
        self.cut, self.keep_ratio = cut, keep_ratio
        self.pending: Optional[Tensor] = None  # image mask handed down by the VLM's forward
        self.prefill_mask: Optional[Tensor] = None  # image mask of the running prefill
        self.keep: Optional[Tensor] = None  # (B, N') positions kept by the last prefill
        self.full = 0  # that prefill's length N
        self.pruning_call = False  # the running call is that prefill
        self.remapped: Dict[Tuple[int, ...], Tuple[Any, Any, Any]] = {}
        self.pruned = 0
        self.unpruned: Dict[str, int] = {}

    def skipped(self, reason: str) -> None:
        self.unpruned[reason] = self.unpruned.get(reason, 0) + 1

    # --- per-layer inputs of the layers after the cut --------------------------------------

    def remap(self, attention_mask, position_embeddings, position_ids):
        """The (mask, position embeddings, position ids) of a layer after the cut, computed once
        per call."""
        key = (id(attention_mask), id(position_embeddings), id(position_ids))
        if key not in self.remapped:
            if self.pruning_call:
                self.remapped[key] = (
                    self._prefill_mask(attention_mask),
                    self._rows(position_embeddings),
                    self._rows(position_ids),
                )
            else:
                self.remapped[key] = (self._cached_keys(attention_mask), position_embeddings, position_ids)
        return self.remapped[key]

    def _take(self, t: Tensor, dim: int) -> Tensor:
        """``t`` restricted to the kept positions along ``dim`` (batch dim 0 broadcast)."""
        keep = self.keep
        b = keep.shape[0]
        t = t.expand(b, *t.shape[1:]) if t.shape[0] == 1 and b > 1 else t
        shape = [1] * t.dim()
        shape[0], shape[dim] = b, keep.shape[1]
        index = keep.view(shape).expand(*[keep.shape[1] if d == dim else t.shape[d] for d in range(t.dim())])
        return t.gather(dim, index)

    def _rows(self, value):
        if value is None:
            return None
        if isinstance(value, (tuple, list)):  # (cos, sin), each (B, L, D)
            return type(value)(self._rows(v) for v in value)
        if value.dim() >= 2 and value.shape[1] == self.full:
            return self._take(value, 1)
        return value

    def _prefill_mask(self, mask: Optional[Tensor]) -> Optional[Tensor]:
        if mask is None:
            return None
        mask = self._take(mask, mask.dim() - 1)
        if mask.dim() == 4 and mask.shape[2] == self.full:  # (B, 1, Lq, Lk) from sdpa_mask
            mask = self._take(mask, 2)
        return mask

    def _cached_keys(self, mask: Optional[Tensor]) -> Optional[Tensor]:
        """A mask over the full-length keys -> the same over a pruned layer's cache (the kept
        prompt positions, then everything after the prompt)."""
        if mask is None or mask.shape[-1] < self.full:
            return mask
        prompt = self._take(mask[..., : self.full], mask.dim() - 1)
        return torch.cat([prompt, mask[..., self.full :]], dim=-1)


def _first_output(out):
    return out[0] if isinstance(out, tuple) else out


def _replace_first(out, value):
    return (value, *out[1:]) if isinstance(out, tuple) else value


def _ranking_forward(run: _Run, state: hf_attention.ModuleState):
    """Layer ``cut - 1``: runs with last-query scores during a prefill, then keeps the best image
    tokens of its output."""

    def forward(layer, hidden_states, *args, **kwargs):
        image = run.prefill_mask
        if image is None or tuple(hidden_states.shape[:2]) != tuple(image.shape):
            return type(layer).forward(layer, hidden_states, *args, **kwargs)
        run.prefill_mask = None
        state.scores_mode, state.last_scores = "last", None
        try:
            out = type(layer).forward(layer, hidden_states, *args, **kwargs)
            scores = state.last_scores
        finally:
            state.scores_mode, state.last_scores = None, None
        if scores is None:
            reasons = ", ".join(state.fallbacks) or "no scores"
            run.skipped(f"layer {run.cut - 1} attention ran on SDPA ({reasons})")
            return out
        run.keep = fastv_keep_from_mask(scores, image, run.keep_ratio)
        run.full, run.pruning_call = image.shape[1], True
        run.pruned += 1
        return _replace_first(out, gather_tokens(_first_output(out), run.keep))

    return forward


def _pruned_forward(run: _Run):
    """Layers ``cut, cut + 1, ...``: their inputs follow the kept tokens."""

    def forward(
        layer, hidden_states, *args, attention_mask=None, position_embeddings=None, position_ids=None, **kwargs
    ):
        if run.keep is not None:
            if args:
                raise ValueError(
                    "fastv: pass a decoder layer's arguments after hidden_states by name (transformers does)"
                )
            attention_mask, position_embeddings, position_ids = run.remap(
                attention_mask, position_embeddings, position_ids
            )
        return type(layer).forward(
            layer,
            hidden_states,
            *args,
            attention_mask=attention_mask,
            position_embeddings=position_embeddings,
            position_ids=position_ids,
            **kwargs,
        )

    return forward


def _cache_of(lm: nn.Module, args, kwargs):
    if "cache" in kwargs or "past_key_values" in kwargs:
        return kwargs.get("cache", kwargs.get("past_key_values"))
    try:
        bound = inspect.signature(type(lm).forward).bind_partial(lm, *args, **kwargs).arguments
    except TypeError:
        return None
    return bound.get("cache", bound.get("past_key_values"))


def _tokens_of(args, kwargs) -> Optional[Tuple[int, int]]:
    for value in (kwargs.get("inputs_embeds"), kwargs.get("input_ids"), *args[:1]):
        if isinstance(value, Tensor):
            return tuple(value.shape[:2])
    return None


def _language_model_forward(run: _Run):
    def forward(lm, *args, image_token_mask: Optional[Tensor] = None, **kwargs):
        image = image_token_mask if image_token_mask is not None else run.pending
        run.pending = None
        cache = _cache_of(lm, args, kwargs)
        fresh = cache is None or int(cache.get_seq_length()) == 0
        if fresh:
            run.keep = None
        if image is not None and bool(image.any()):
            tokens = _tokens_of(args, kwargs)
            if image.dtype != torch.bool or tokens is None or tuple(image.shape) != tokens:
                raise ValueError(
                    f"image_token_mask must be a bool (B, L) = {tokens} mask of the "
                    f"prompt's image tokens, got {image.dtype} {tuple(image.shape)}"
                )
            if fresh:
                run.prefill_mask = image
            else:
                run.skipped("image tokens in a call that continues a cache (chunked prefill)")
        try:
            return type(lm).forward(lm, *args, **kwargs)
        finally:
            run.prefill_mask, run.pruning_call = None, False
            run.remapped.clear()

    return forward


def _vlm_forward(run: _Run, image_token: int):
    def forward(inner, input_ids=None, *args, **kwargs):
        if input_ids is not None:
            image = input_ids == image_token
            run.pending = image if bool(image.any()) else None
        try:
            return type(inner).forward(inner, input_ids, *args, **kwargs)
        finally:
            run.pending = None

    return forward


def _top_forward(model: nn.Module):
    signature = inspect.signature(type(model).forward)

    def forward(self, *args, **kwargs):
        if signature.bind_partial(self, *args, **kwargs).arguments.get("labels") is not None:
            raise ValueError(
                "reduce method 'fastv' prunes image tokens after its layer, so the "
                "logits no longer line up with labels: it is an inference method "
                "(mmkernels.unpatch(model) to train)"
            )
        return type(self).forward(self, *args, **kwargs)

    forward.__signature__ = signature  # generate() validates its kwargs against it
    return forward


def _decoder_layers(lm: nn.Module) -> Optional[nn.ModuleList]:
    layers = getattr(lm, "layers", None)
    return layers if isinstance(layers, nn.ModuleList) and len(layers) else None


def _attention_state(layer: nn.Module) -> Optional[hf_attention.ModuleState]:
    for module in layer.modules():
        state = hf_attention.STATES.get(module)
        if state is not None:
            return state
    return None


def check_spec(spec: Dict[str, Any], depth: int) -> Dict[str, Any]:
    """``spec`` checked against a language model of ``depth`` decoder layers."""
    cut, keep = spec["layer"], spec["keep"]
    if isinstance(cut, bool) or not isinstance(cut, int) or not 1 <= cut < depth:
        raise ValueError(
            f"reduce['layer']={cut!r} must be an int in [1, {depth}) for a language "
            f"model of {depth} decoder layers: the first 'layer' layers see every "
            "token, the others the kept ones"
        )
    if isinstance(keep, bool) or not isinstance(keep, (int, float)) or not 0 < keep <= 1:
        raise ValueError(f"reduce['keep'] must be the kept fraction of image tokens in (0, 1], got {keep!r}")
    return dict(spec)


def kept_image_tokens(spec: Dict[str, Any], n_image: int) -> int:
    """Image tokens the layers after the cut keep out of ``n_image`` (per prompt)."""
    return math.ceil(spec["keep"] * n_image) if n_image else 0


def apply_fastv(model: nn.Module, spec: Dict[str, Any], record) -> None:
    """Patch FastV into the language model of the LLaVA model inside ``model``; raises
    ``ValueError`` for a model without image tokens, a VLM other than LLaVA, a language model whose
    attention is not patched, and bad spec values."""
    from .core import Row, bind_forward
    from .families import llava
    from .reduction import _vision_language_model

    inner = llava._llava_inner(model)
    if inner is None:
        if _vision_language_model(model) is None:
            raise ValueError(
                f"reduce method 'fastv' prunes image tokens inside a vision-language "
                f"model's language model; {type(model).__name__} has no image tokens "
                "(no config.image_token_id)"
            )
        raise ValueError(
            f"reduce method 'fastv' on {type(model).__name__}: supported inside LLaVA "
            "models' language model only, so far"
        )
    lm = inner.language_model
    layers = _decoder_layers(lm)
    if layers is None:
        raise ValueError(f"fastv: no decoder layers (a 'layers' ModuleList) in {type(lm).__name__}")
    checked = check_spec(spec, len(layers))
    states: List[Optional[hf_attention.ModuleState]] = [_attention_state(layer) for layer in layers]
    cut = checked["layer"]
    if any(s is None for s in states[cut - 1 :]):
        raise ValueError(
            f"fastv: the attention of {type(lm).__name__}'s decoder layers is not "
            "routed through mmkernels' attention, which gives the last-query scores"
        )
    image_token = llava.image_token_id(inner.config)
    run = _Run(cut, float(checked["keep"]))
    bind_forward(layers[cut - 1], _ranking_forward(run, states[cut - 1]), record)
    for layer in layers[cut:]:
        bind_forward(layer, _pruned_forward(run), record)
    bind_forward(lm, _language_model_forward(run), record)
    bind_forward(inner, _vlm_forward(run, image_token), record)
    if model is not inner:
        bind_forward(model, _top_forward(model), record)
    record.report.fastv = run
    path = next(name for name, m in model.named_modules() if m is lm)
    record.report.rows.append(
        Row(
            path,
            "reduce",
            "mmkernels",
            f"fastv: layers {cut}..{len(layers) - 1} of {len(layers)} keep "
            f"{checked['keep']:.0%} of the image tokens (ranked by the "
            f"last token's attention in layer "
            f"{cut - 1}); their KV cache holds the kept tokens",
        )
    )
    record.report.notes.append(
        "fastv: a prefill with image tokens returns hidden states / logits for the kept positions "
        "only (generate() reads the last); labels are refused (inference only); "
        "report.fastv_runtime() counts pruned and unpruned prefills"
    )
