"""GPU benchmark cases of ``qmatmul`` and the speed targets they check (GPU only).

    python -m mmkernels.benchmarks.qmatmul_gpu [--quick] [--only TEXT] [--json PATH]

The targets (also in the docstring of mmkernels/quant/triton.py) are goals, not claims: no GPU has
measured them yet. Each case times its contenders with ``triton.testing.do_bench`` (median, L2
flushed between repetitions, so a decode GEMV really streams its weights from HBM) on the same
inputs, and reports our max error against the float64 reference.

* int4 decode: weight-only int4 (group 128, symmetric), M = 1 .. 16, fp16 activations, at LLM / VLM
  layer shapes; target: ``time(cuBLAS fp16 F.linear) / time(mmkernels) >= 3`` on A100 / H100.
* W8A8 prefill: int8 and fp8 (per-channel weights, per-token activations, quantization included),
  M >= 256; target: ``time(cuBLAS bf16 F.linear) / time(mmkernels) >= 1.4``. torch's own int8
  (``torch._int_mm``) and fp8 (``torch._scaled_mm``) GEMMs are timed as peers when they run.

Without a GPU ``all_cases()`` returns an empty list and ``main`` says why.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Dict, List, Optional

import torch
import torch.nn.functional as F

from .case import Case

# (name, N, K): output features x input features of real layers
LAYER_SHAPES = [("llama7b_qkv_o", 4096, 4096), ("llama7b_up", 11008, 4096), ("llama7b_down", 4096, 11008)]
QUICK_SHAPES = [("llama7b_qkv_o", 4096, 4096)]
DECODE_M = (1, 2, 4, 8, 16)
PREFILL_M = (256, 1024, 4096)

# (case id substring, subject, baseline, minimum time(baseline) / time(subject))
SPEED_TARGETS = [
    ("int4_decode", "mmkernels", "cublas_fp16", 3.0),
    ("w8a8_int8_prefill", "mmkernels", "cublas_bf16", 1.4),
    ("w8a8_fp8_prefill", "mmkernels", "cublas_bf16", 1.4),
]


def _err(run, x, qw, act_bits=None):
    from mmkernels.quant import qmatmul_reference

    def measure():
        want = qmatmul_reference(x.double(), qw, act_bits=act_bits)
        return (run().double() - want).abs().max().item()

    return measure


def int4_decode_cases(shapes, ms=DECODE_M, dtype=torch.float16) -> List[Case]:
    import mmkernels
    from mmkernels.quant import quantize_weight

    cases = []
    g = torch.Generator(device="cuda").manual_seed(0)
    for name, n, k in shapes:
        w = torch.randn(n, k, device="cuda", generator=g) * 0.02
        qw = quantize_weight(w, bits=4, group_size=128)
        w16 = qw.dequantize(dtype)
        for m in ms:
            x = torch.randn(m, k, device="cuda", generator=g).to(dtype)
            contenders = {
                "mmkernels": (lambda x=x, qw=qw: mmkernels.qmatmul(x, qw)),
                "mmkernels_triton": (lambda x=x, qw=qw: mmkernels.qmatmul(x, qw, backend="triton")),
                "cublas_fp16": (lambda x=x, w16=w16: F.linear(x, w16)),
            }
            cases.append(
                Case(
                    f"int4_decode-{name}-m{m}",
                    f"int4 g128 sym M={m} N={n} K={k} {str(dtype).replace('torch.', '')}",
                    contenders,
                    _err(contenders["mmkernels"], x, qw),
                    2.0 * m * n * k,
                    meta=dict(m=m, n=n, k=k),
                )
            )
    return cases


def w8a8_prefill_cases(shapes, ms=PREFILL_M, dtype=torch.bfloat16) -> List[Case]:
    import mmkernels
    from mmkernels.quant import quantize_weight
    from mmkernels.quant.reference import quantize_activations, quantize_activations_fp8

    cases = []
    g = torch.Generator(device="cuda").manual_seed(1)
    for name, n, k in shapes:
        w = torch.randn(n, k, device="cuda", generator=g) * 0.02
        wb = w.to(dtype)
        for fp8 in (False, True):
            if fp8 and torch.cuda.get_device_capability() < (8, 9):
                continue  # runs (fp16-decoded) on sm_80, but the target is about fp8 hardware
            qw = quantize_weight(w, bits=8, fp8=fp8)
            for m in ms:
                x = torch.randn(m, k, device="cuda", generator=g).to(dtype)
                contenders = {
                    "mmkernels": (lambda x=x, qw=qw: mmkernels.qmatmul(x, qw, act_bits=8)),
                    "cublas_bf16": (lambda x=x, wb=wb: F.linear(x, wb)),
                }
                if not fp8:
                    wt = qw.qweight.t()  # (K, N) column-major int8, as _int_mm wants

                    def torch_int8(x=x, wt=wt, s=qw.scales[:, 0]):
                        xq, sx = quantize_activations(x.float())
                        return (torch._int_mm(xq, wt).float() * sx[:, None] * s).to(x.dtype)

                    contenders["torch_int_mm"] = torch_int8
                else:
                    wt = qw.qweight.t()

                    def torch_fp8(x=x, wt=wt, s=qw.scales[:, 0]):
                        xq, sx = quantize_activations_fp8(x.float())
                        return torch._scaled_mm(
                            xq, wt, scale_a=sx[:, None].contiguous(), scale_b=s[None, :].contiguous(), out_dtype=x.dtype
                        )

                    contenders["torch_scaled_mm"] = torch_fp8
                kind = "fp8" if fp8 else "int8"
                cases.append(
                    Case(
                        f"w8a8_{kind}_prefill-{name}-m{m}",
                        f"W8A8 {kind} per-channel M={m} N={n} K={k} bf16 x",
                        contenders,
                        _err(contenders["mmkernels"], x, qw, 8),
                        2.0 * m * n * k,
                        meta=dict(m=m, n=n, k=k),
                    )
                )
    return cases


def all_cases(quick: bool = False, only: Optional[str] = None) -> List[Case]:
    """Every GPU qmatmul case (empty without a CUDA GPU)."""
    if not torch.cuda.is_available():
        return []
    shapes = QUICK_SHAPES if quick else LAYER_SHAPES
    cases = int4_decode_cases(shapes, (1, 16) if quick else DECODE_M)
    cases += w8a8_prefill_cases(shapes, (256,) if quick else PREFILL_M)
    if only:
        cases = [c for c in cases if only in c.id]
    return cases


def time_case(case: Case) -> Dict[str, float]:
    """Median milliseconds per contender (triton.testing.do_bench flushes L2 before each run);
    a contender that raises (e.g. _scaled_mm on an old GPU) is reported as NaN."""
    from triton.testing import do_bench

    out = {}
    for name, fn in case.contenders.items():
        try:
            out[name] = float(do_bench(fn, warmup=25, rep=100, return_mode="median"))
        except Exception as exc:  # a peer that cannot run here
            print(f"  {case.id}: {name} failed: {type(exc).__name__}: {str(exc)[:120]}")
            out[name] = float("nan")
    return out


def check_targets(results: List[dict]) -> List[dict]:
    verdicts = []
    for key, subject, baseline, need in SPEED_TARGETS:
        for r in results:
            if key in r["case"] and subject in r["ms"] and baseline in r["ms"]:
                speedup = r["ms"][baseline] / r["ms"][subject]
                verdicts.append(
                    dict(
                        case=r["case"],
                        target=f"{baseline}/{subject} >= {need}",
                        speedup=speedup,
                        passed=speedup >= need,
                    )
                )
    return verdicts


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="one shape, two batch sizes")
    ap.add_argument("--only", default=None, help="run only cases whose id contains this text")
    ap.add_argument("--json", default=None, help="write the results here")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("no CUDA GPU: the qmatmul GPU benchmark needs one (nothing measured)")
        return 0
    print(f"GPU: {torch.cuda.get_device_name()} (capability {'.'.join(map(str, torch.cuda.get_device_capability()))})")
    results = []
    for case in all_cases(args.quick, args.only):
        ms = time_case(case)
        err = case.error() if case.error else float("nan")
        results.append(
            dict(
                case=case.id,
                description=case.description,
                ms=ms,
                max_err=err,
                tflops={k: case.flops / (v * 1e9) for k, v in ms.items()},
            )
        )
        line = "  ".join(f"{k} {v:.4f} ms" for k, v in ms.items())
        print(f"{case.id:<40} {line}  max err {err:.3g}")
    verdicts = check_targets(results)
    print("\nspeed targets (goals, see mmkernels/quant/triton.py):")
    for v in verdicts:
        print(f"  {'PASS' if v['passed'] else 'miss'}  {v['case']:<40} {v['target']:<30} {v['speedup']:.2f}x")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(results=results, targets=verdicts), f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
