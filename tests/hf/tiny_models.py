"""Tiny random-config Hugging Face models (no downloads), one builder per family.

Each builder returns a :class:`Case`: the model (eval, float32), a ``make_inputs(batch, lengths)``
function (``lengths`` gives each row's number of real tokens, for padded text), an ``outputs``
function that picks the tensors to compare, and which token positions are real (to ignore padding).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

import transformers as tf

TEXT = dict(vocab_size=97, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=96)


@dataclass
class Case:
    name: str
    build: Callable[[], torch.nn.Module]
    make_inputs: Callable[..., dict]
    outputs: Callable[[object], dict]
    padded: bool = False  # the inputs carry an attention_mask with padding
    decoder: bool = False  # greedy generate() is compared too
    patched_attention: int = 0  # attention modules the patch must route


def _ids(batch, lengths, vocab, left=False):
    length = max(lengths)
    ids = torch.randint(3, vocab, (batch, length))
    mask = torch.zeros(batch, length, dtype=torch.long)
    for i, n in enumerate(lengths):
        if left:
            mask[i, length - n :] = 1
        else:
            mask[i, :n] = 1
    ids = torch.where(mask.bool(), ids, 0)
    return ids, mask


def _text_inputs(vocab, left=False):
    def make(batch=2, lengths=(9, 6)):
        ids, mask = _ids(batch, lengths, vocab, left)
        return {"input_ids": ids, "attention_mask": mask}

    return make


def _pixels(size, channels=3):
    def make(batch=2, lengths=None):
        return {"pixel_values": torch.randn(batch, channels, size, size)}

    return make


def _hidden(out):
    return {"last_hidden_state": out.last_hidden_state}


def vit():
    cfg = tf.ViTConfig(
        hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=96, image_size=32, patch_size=8
    )
    return Case("vit", lambda: tf.ViTModel(cfg), _pixels(32), _hidden, patched_attention=2)


def dinov2():
    cfg = tf.Dinov2Config(
        hidden_size=64, num_hidden_layers=2, num_attention_heads=4, mlp_ratio=2, image_size=42, patch_size=14
    )
    return Case("dinov2", lambda: tf.Dinov2Model(cfg), _pixels(42), _hidden, patched_attention=2)


def _clip_configs(cls_text, cls_vision, **text_extra):
    text = dict(
        vocab_size=97,
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=96,
        max_position_embeddings=32,
        **text_extra,
    )
    vision = dict(
        hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=96, image_size=32, patch_size=8
    )
    return text, vision


def clip():
    text, vision = _clip_configs(None, None, eos_token_id=2)
    cfg = tf.CLIPConfig(text_config=text, vision_config=vision, projection_dim=32)

    def make(batch=2, lengths=(9, 6)):
        ids, mask = _ids(batch, lengths, 97)
        for i, n in enumerate(lengths):
            ids[i, n - 1] = 2  # CLIP pools the EOS token
        return {"input_ids": ids, "attention_mask": mask, **_pixels(32)(batch)}

    return Case(
        "clip",
        lambda: tf.CLIPModel(cfg),
        make,
        lambda o: {"text_embeds": o.text_embeds, "image_embeds": o.image_embeds},
        padded=True,
        patched_attention=4,
    )


def siglip():
    text, vision = _clip_configs(None, None)
    cfg = tf.SiglipConfig(text_config=text, vision_config=vision)

    def make(batch=2, lengths=(9, 6)):
        ids, mask = _ids(batch, lengths, 97)
        return {"input_ids": ids, "attention_mask": mask, **_pixels(32)(batch)}

    # SigLIP's text tower pools the last position: compare full hidden states of real tokens.
    return Case(
        "siglip",
        lambda: tf.SiglipModel(cfg),
        make,
        lambda o: {"text": o.text_model_output.last_hidden_state, "image_embeds": o.image_embeds},
        padded=True,
        patched_attention=4,
    )


def bert():
    cfg = tf.BertConfig(**TEXT, max_position_embeddings=32)
    return Case(
        "bert",
        lambda: tf.BertModel(cfg, add_pooling_layer=False),
        _text_inputs(97),
        _hidden,
        padded=True,
        patched_attention=2,
    )


def llama():
    cfg = tf.LlamaConfig(
        **TEXT, num_key_value_heads=2, max_position_embeddings=64, pad_token_id=0, bos_token_id=1, eos_token_id=2
    )
    return Case(
        "llama",
        lambda: tf.LlamaForCausalLM(cfg),
        _text_inputs(97, left=True),
        lambda o: {"logits": o.logits},
        padded=True,
        decoder=True,
        patched_attention=2,
    )


def qwen2():
    cfg = tf.Qwen2Config(
        **TEXT, num_key_value_heads=1, max_position_embeddings=64, pad_token_id=0, bos_token_id=1, eos_token_id=2
    )
    return Case(
        "qwen2",
        lambda: tf.Qwen2ForCausalLM(cfg),
        _text_inputs(97, left=True),
        lambda o: {"logits": o.logits},
        padded=True,
        decoder=True,
        patched_attention=2,
    )


def whisper():
    cfg = tf.WhisperConfig(
        vocab_size=97,
        d_model=64,
        encoder_layers=2,
        decoder_layers=2,
        encoder_attention_heads=4,
        decoder_attention_heads=4,
        encoder_ffn_dim=96,
        decoder_ffn_dim=96,
        num_mel_bins=16,
        max_source_positions=20,
        max_target_positions=32,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
        decoder_start_token_id=1,
        suppress_tokens=[],
        begin_suppress_tokens=[],
    )

    def make(batch=2, lengths=None):
        return {"input_features": torch.randn(batch, 16, 40), "decoder_input_ids": torch.randint(3, 97, (batch, 5))}

    return Case(
        "whisper",
        lambda: tf.WhisperForConditionalGeneration(cfg),
        make,
        lambda o: {"logits": o.logits, "encoder": o.encoder_last_hidden_state},
        decoder=True,
        patched_attention=6,
    )


def llava(text_layers: int = 2):
    vision = dict(
        model_type="clip_vision_model",
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=96,
        image_size=32,
        patch_size=8,
    )
    text = dict(
        model_type="llama",
        **{**TEXT, "num_hidden_layers": text_layers},
        num_key_value_heads=2,
        max_position_embeddings=128,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    cfg = tf.LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_id=96,
        vision_feature_layer=-1,
        vision_feature_select_strategy="default",
    )
    n_image = (32 // 8) ** 2  # "default" drops the CLS token

    def make(batch=2, lengths=(5, 3)):
        ids, mask = _ids(batch, [n + n_image + 2 for n in lengths], 95, left=True)
        for i, n in enumerate(lengths):
            start = ids.shape[1] - (n + n_image + 2) + 1
            ids[i, start : start + n_image] = 96
        return {"input_ids": ids, "attention_mask": mask, **_pixels(32)(batch)}

    return Case(
        "llava",
        lambda: tf.LlavaForConditionalGeneration(cfg),
        make,
        lambda o: {"logits": o.logits},
        padded=True,
        decoder=True,
        patched_attention=4,
    )


def llava_row_alone(inputs, i):
    """Row ``i`` of a padded LLaVA batch (from ``llava().make_inputs``) as a batch of one, its
    padding removed."""
    keep = inputs["attention_mask"][i].bool()
    return {
        "input_ids": inputs["input_ids"][i : i + 1, keep],
        "attention_mask": inputs["attention_mask"][i : i + 1, keep],
        "pixel_values": inputs["pixel_values"][i : i + 1],
    }


def qwen2_vl_vision():
    cfg = tf.Qwen2VLConfig(
        vision_config=dict(
            depth=2,
            embed_dim=64,
            num_heads=4,
            hidden_size=64,
            mlp_ratio=2,
            patch_size=4,
            spatial_merge_size=2,
            temporal_patch_size=2,
            in_channels=3,
        ),
        text_config=dict(**TEXT, num_key_value_heads=2),
    )
    from transformers.models.qwen2_vl.modeling_qwen2_vl import Qwen2VisionTransformerPretrainedModel

    grid = torch.tensor([[1, 4, 4], [1, 2, 6]])  # two images of different sizes, packed

    def make(batch=None, lengths=None):
        tokens = int(grid.prod(-1).sum())
        return {"hidden_states": torch.randn(tokens, 3 * 2 * 4 * 4), "grid_thw": grid}

    def outputs(o):
        return {"merged": o.pooler_output if hasattr(o, "pooler_output") else o}

    return Case(
        "qwen2_vl_vision",
        lambda: Qwen2VisionTransformerPretrainedModel(cfg.vision_config),
        make,
        outputs,
        patched_attention=2,
    )


CASES = [vit, dinov2, clip, siglip, bert, whisper, llama, qwen2, llava, qwen2_vl_vision]
