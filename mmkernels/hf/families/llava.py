"""Token reduction in a LLaVA model's vision tower, with the image-token bookkeeping kept.

LLaVA's processor expands each ``<image>`` into as many image tokens as the unreduced tower
gives (``N`` per image) and the model refuses a prompt whose image-token count differs from its
image features. With ``reduce=`` the tower gives ``K < N`` features per image, so the patched
model compacts its prompt: in every run of image tokens (``N`` per image) the first ``K`` stay,
the rest leave ``input_ids`` / ``attention_mask`` / ``labels`` (rows that end up shorter are
left-padded, masked). This happens in the instance's ``forward`` (``LlavaModel``) and in
``generate`` (before generation starts, so the cache, the mask and the positions all count
the compacted prompt); ``generate`` returns the caller's original prompt followed by the new
tokens, as without reduction. A prompt already holding ``K`` image tokens per image passes as is.

``K`` is stated at patch time (report row), from the tower's token count at its configured image
size, the reduce spec, ``vision_feature_layer`` (which hidden state LLaVA reads) and
``vision_feature_select_strategy`` (``"default"`` drops the CLS token). PruMerge (a
data-dependent count) and a list of feature layers are refused.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor, nn


def _llava_inner(model: nn.Module) -> Optional[nn.Module]:
    """The ``LlavaModel`` (vision tower + projector + language model) inside ``model``."""
    for module in model.modules():
        if type(module).__name__ == "LlavaModel" and hasattr(module, "vision_tower"):
            return module
    return None


def image_token_id(config) -> int:
    """The image placeholder token of a LLaVA config (``image_token_id``; older configs name it
    ``image_token_index``)."""
    token = getattr(config, "image_token_id", None)
    return int(config.image_token_index if token is None else token)


def is_llava(model: nn.Module) -> bool:
    return _llava_inner(model) is not None


def tokens_after(spec: dict, n: int, depth: int, prefix: int, layers_run: int) -> int:
    """Tokens of the hidden state after ``layers_run`` of ``depth`` layers under ``spec``."""
    from ...reduce.methods import evit_count, tome_schedule

    method = spec["method"]
    if method == "tome":
        return n - sum(tome_schedule(spec["r"], depth, n, spec["protect_first"])[:layers_run])
    if method == "evit":
        for layer in spec["layers"]:
            if layer < layers_run:
                n = evit_count(n, spec["keep"], spec["protect_first"])
        return n
    if method == "visionzip":
        return prefix + spec["dominant"] + spec["contextual"] if spec["layer"] < layers_run else n
    raise ValueError(
        f"reduce method {method!r} keeps a data-dependent number of tokens per image: "
        "LLaVA's prompt needs a count stated in advance (use tome, evit or visionzip)"
    )


def _compact_row(ids: Tensor, image_token: int, n: int, k: int) -> Tensor:
    """Indices of the tokens of one row to keep: the first ``k`` of every ``n`` image tokens."""
    is_image = ids == image_token
    keep = torch.ones_like(is_image)
    run = 0
    for i, flag in enumerate(is_image.tolist()):
        run = run + 1 if flag else 0
        if flag and (run - 1) % n >= k:
            keep[i] = False
    return keep.nonzero().squeeze(1)


class PromptCompactor:
    """Compacts LLaVA prompts from ``n`` to ``k`` image tokens per image."""

    def __init__(self, image_token: int, n: int, k: int, pad_token: int):
        self.image_token, self.n, self.k, self.pad = image_token, n, k, pad_token

    def needed(self, input_ids: Optional[Tensor], num_images: Optional[int]) -> bool:
        if input_ids is None or num_images is None or self.k == self.n:
            return False
        count = int((input_ids == self.image_token).sum())
        return count == self.n * num_images and count != self.k * num_images

    def __call__(self, input_ids: Tensor, **per_token: Optional[Tensor]):
        """``(input_ids, {name: tensor})`` compacted; other per-token tensors follow the ids."""
        rows = [_compact_row(row, self.image_token, self.n, self.k) for row in input_ids]
        width = max(len(r) for r in rows)
        fill = {"input_ids": self.pad, "attention_mask": 0, "labels": -100}
        out = {}
        for name, t in (("input_ids", input_ids), *per_token.items()):
            if t is None:
                out[name] = None
                continue
            new = t.new_full((t.shape[0], width), fill.get(name, 0))
            for i, keep in enumerate(rows):
                new[i, width - len(keep) :] = t[i, keep]
            out[name] = new
        if per_token.get("attention_mask") is None and any(len(r) != width for r in rows):
            mask = torch.zeros((input_ids.shape[0], width), dtype=torch.long, device=input_ids.device)
            for i, keep in enumerate(rows):
                mask[i, width - len(keep) :] = 1
            out["attention_mask"] = mask
        return out


def _num_images(pixel_values) -> Optional[int]:
    if pixel_values is None:
        return None
    return len(pixel_values) if isinstance(pixel_values, (list, tuple)) else pixel_values.shape[0]


def _forward(compactor: PromptCompactor):
    def forward(self, input_ids=None, pixel_values=None, attention_mask=None, position_ids=None, *args, **kwargs):
        if compactor.needed(input_ids, _num_images(pixel_values)):
            if args:
                raise ValueError("LLaVA with token reduction: pass arguments after attention_mask by name")
            packed = compactor(input_ids, attention_mask=attention_mask)
            input_ids, attention_mask, position_ids = (packed["input_ids"], packed["attention_mask"], None)
        return type(self).forward(self, input_ids, pixel_values, attention_mask, position_ids, *args, **kwargs)

    return forward


def _top_forward(compactor: PromptCompactor):
    def forward(self, input_ids=None, pixel_values=None, attention_mask=None, position_ids=None, *args, **kwargs):
        labels = kwargs.pop("labels", None)
        if compactor.needed(input_ids, _num_images(pixel_values)):
            if args:
                raise ValueError("LLaVA with token reduction: pass arguments after attention_mask by name")
            packed = compactor(input_ids, attention_mask=attention_mask, labels=labels)
            input_ids, attention_mask, labels = (packed["input_ids"], packed["attention_mask"], packed["labels"])
            position_ids = None
        if labels is not None:
            kwargs["labels"] = labels
        return type(self).forward(self, input_ids, pixel_values, attention_mask, position_ids, *args, **kwargs)

    return forward


def _generate(compactor: PromptCompactor):
    def generate(self, input_ids=None, pixel_values=None, attention_mask=None, **kwargs):
        original = input_ids
        if compactor.needed(input_ids, _num_images(pixel_values)):
            packed = compactor(input_ids, attention_mask=attention_mask)
            input_ids, attention_mask = packed["input_ids"], packed["attention_mask"]
        out = type(self).generate(
            self, input_ids=input_ids, pixel_values=pixel_values, attention_mask=attention_mask, **kwargs
        )
        if original is input_ids:
            return out
        sequences = out if isinstance(out, Tensor) else out.sequences
        restored = torch.cat([original, sequences[:, input_ids.shape[1] :]], dim=1)
        if isinstance(out, Tensor):
            return restored
        out.sequences = restored
        return out

    return generate


def reduce_llava(model: nn.Module, spec: dict, record, reduce_encoders) -> None:
    """Reduce the vision tower of the LLaVA model inside ``model`` and keep its prompts
    consistent. ``reduce_encoders(module, spec, record)`` reduces a plain vision model and
    returns its encoders (:func:`mmkernels.hf.reduction.apply_reduction`'s work)."""
    from ..core import Row, bind_forward, bind_method

    inner = _llava_inner(model)
    config = inner.config
    layer = config.vision_feature_layer
    if not isinstance(layer, int):
        raise ValueError(
            f"reduce on LLaVA with vision_feature_layer={layer!r} (several layers "
            "concatenated) is not supported: each layer would keep other tokens"
        )
    encoders = reduce_encoders(inner.vision_tower, spec, record)
    if len(encoders) != 1:
        raise ValueError(f"reduce on LLaVA: expected one vision encoder in the vision tower, found {len(encoders)}")
    encoder, checked = encoders[0]
    n_in = encoder.num_tokens()
    depth = encoder.depth
    layers_run = layer % (depth + 1)  # hidden_states has depth + 1 entries
    k_tokens = tokens_after(checked, n_in, depth, encoder.prefix_tokens, layers_run)
    drop = 1 if config.vision_feature_select_strategy == "default" else 0
    n, k = n_in - drop, k_tokens - drop
    if k <= 0:
        raise ValueError(f"reduce on LLaVA leaves {k} image tokens per image")
    image_token = image_token_id(config)
    pad = getattr(config.text_config, "pad_token_id", None) or 0
    compactor = PromptCompactor(image_token, n, k, pad)
    bind_forward(inner, _forward(compactor), record)
    if model is not inner:
        bind_forward(model, _top_forward(compactor), record)
    if hasattr(model, "generate"):
        bind_method(model, "generate", _generate(compactor), record)
    record.report.rows.append(
        Row(type(inner).__name__, "prompt", "mmkernels", f"image tokens per image {n} -> {k} (prompts compacted)")
    )
    record.report.notes.append(
        "LLaVA: prompts expanded for the unreduced tower are compacted to the reduced count in "
        "forward() and generate(); generate() returns the original prompt followed by the new "
        "tokens, forward() returns logits for the compacted prompt"
    )
