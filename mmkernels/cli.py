"""``mmkernels info | bench | compile-gate``."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def cpu_isa() -> str:
    from .attention import cpu

    return cpu.cpu_isa_or_reason()


def cpu_features() -> str:
    """The CPUID probe's flags (AVX-512 BF16 / VNNI / FP16, AMX and why not), or why unknown."""
    from . import _extension

    ok, why = _extension.CPU.availability("cpu_features")
    return _extension.CPU.require("cpu_features").cpu_features() if ok else f"n/a ({why})"


_INFO_COLUMNS = ("backend", "ok", "devices", "dtypes", "head dims", "features")
INFO_WIDTH = 100


def capability_lines(verbose: bool = False) -> list:
    """The capability table of ``mmkernels info``, one block per op, from the backends'
    declarations (mmkernels._dispatch); ``verbose`` adds each backend's notes."""
    import textwrap

    from . import _dispatch

    rows = _dispatch.capability_table()
    lines, unavailable = [], {}
    by_op = {}
    for r in rows:
        by_op.setdefault(r["op"], []).append(r)
    wrap = textwrap.TextWrapper(width=INFO_WIDTH, initial_indent="    ", subsequent_indent="      ")
    for op, op_rows in by_op.items():
        features = list(_dispatch._OPS.get(op, _dispatch._NO_FEATURES).features)
        lines.append(f"{op}" + (f"  (features: {', '.join(features)})" if features else ""))
        cells = []
        for r in op_rows:
            ok = r["available"] == "yes"
            if not ok:
                unavailable.setdefault(r["available"][4:-1], []).append(f"{op}/{r['backend']}")
            cells.append({"backend": r["backend"], "ok": "yes" if ok else "no", **r})
        # Columns every backend of this op leaves empty are dropped (e.g. head dims for qmatmul).
        keys = [k for k in _INFO_COLUMNS if k in ("backend", "ok") or any(c[k] != "-" for c in cells)]
        widths = {k: max(len(k), *(len(c[k]) for c in cells)) for k in keys}
        lines.append("  " + "  ".join(k.ljust(widths[k]) for k in keys).rstrip())
        for c in cells:
            lines.append("  " + "  ".join(c[k].ljust(widths[k]) for k in keys).rstrip())
            if verbose and c["notes"]:
                lines += wrap.wrap(c["notes"])
        lines.append("")
    lines.append("devices: * = only when asked for (backend= or MMKERNELS_[<OP>_]BACKEND)")
    if unavailable:
        lines.append("unavailable:")
        for why, where in unavailable.items():
            lines += textwrap.wrap(
                f"{', '.join(where)}: {why}", width=INFO_WIDTH, initial_indent="  ", subsequent_indent="    "
            )
    return lines


def _representative_calls() -> list:
    """A few calls whose automatic backend choice ``mmkernels info`` explains, ViT-B/16-sized
    (B=8, L=197, H=12, D=64; the MLP's first linear layer, M=8*197, K=768, N=3072) where
    calibration needs a size."""
    from ._calibration import size_bucket
    from .attention.api import AttentionCall
    from .linear.api import LinearCall
    from .quant.api import QMatmulCall

    def attn(dtype, causal=False):
        return AttentionCall(
            device_type="cpu",
            dtype_name=dtype,
            head_dim=64,
            head_dim_v=64,
            num_heads_q=12,
            num_heads_kv=12,
            varlen=False,
            causal=causal,
            has_bias=False,
            scores=None,
            return_lse=False,
            bucket=(size_bucket(197), size_bucket(197), size_bucket(8 * 12, cap=256)),
        )

    calls = [("attention", attn(d)) for d in ("float32", "bfloat16", "float16")]
    calls.append(("attention", attn("bfloat16", causal=True)))

    def qmm(dtype, bits, group_size, symmetric, act_bits):
        return QMatmulCall(
            device_type="cpu",
            dtype_name=dtype,
            bits=bits,
            group_size=group_size,
            symmetric=symmetric,
            act_bits=act_bits,
            smooth=False,
            bucket=(size_bucket(8 * 197), 768, 3072) if act_bits else None,
        )

    calls += [("qmatmul", qmm(d, 8, 0, True, 8)) for d in ("float32", "float16")]
    calls.append(("qmatmul", qmm("bfloat16", 4, 128, False, 0)))
    calls += [("linear", LinearCall("cpu", d, (size_bucket(8 * 197), 768, 3072))) for d in ("float32", "bfloat16")]
    return calls


def choice_lines() -> list:
    """Which backend auto-selection takes for some CPU calls on this machine, and why (the
    backends before it in priority order that could have run the call say why they were passed
    over: an auto rule such as "torch only on AMX")."""
    import textwrap

    from . import _dispatch, _extension

    lines = [f"auto-selection on this machine (CPU class {_extension.cpu_class()}):"]
    for op, call in _representative_calls():
        chosen, trail = _dispatch.auto_choice(op, call, "cpu")
        lines.append(f"  {call} -> {chosen.name if chosen else 'none'}")
        auto_here = {b.name for b in _dispatch.backends_for(op) if "cpu" in b.auto_devices}
        for name, verdict in trail:  # the backends ahead of the choice: why not them
            if chosen is not None and name == chosen.name:
                break
            if name in auto_here:
                lines += textwrap.wrap(
                    f"not {name}: {verdict}", width=INFO_WIDTH, initial_indent="      ", subsequent_indent="        "
                )
        if chosen is not None and chosen.auto_rule is not None:
            lines += textwrap.wrap(
                f"why: {chosen.auto_verdict(call)[1]}",
                width=INFO_WIDTH,
                initial_indent="      ",
                subsequent_indent="        ",
            )
    return lines


def calibration_lines() -> list:
    """Whether auto-selection is calibrated on this machine and why, the cache file, and the
    decisions cached for this machine (mmkernels._calibration)."""
    import textwrap

    from . import _calibration

    lines = textwrap.wrap(f"calibration: {_calibration.setting()[1]}", width=INFO_WIDTH, subsequent_indent="  ")
    lines.append(f"  cache file: {_calibration.cache_file()}")
    error = _calibration.write_error()
    if error:
        lines += textwrap.wrap(
            f"(not writable, decisions kept in this process only: {error})",
            width=INFO_WIDTH,
            initial_indent="  ",
            subsequent_indent="    ",
        )
    decisions = _calibration.cached()
    lines.append(f"  decisions cached for this machine: {len(decisions) or 'none'}")
    for d in decisions:
        times = ", ".join(f"{n} {t:.3g} ms" for n, t in sorted(d.times_ms.items(), key=lambda kv: kv[1]))
        lines += textwrap.wrap(
            f"{d.op} [{d.bucket}] -> {d.winner} ({times})",
            width=INFO_WIDTH,
            initial_indent="    ",
            subsequent_indent="      ",
        )
    return lines


def info(verbose: bool = False) -> int:
    import platform
    import textwrap

    import torch

    from . import __version__, _extension
    from .attention import cpu

    print(f"mmkernels {__version__}")
    print(f"python {platform.python_version()}, torch {torch.__version__} (CUDA {torch.version.cuda or 'none'})")
    try:
        import triton

        print(f"triton {triton.__version__}")
    except ImportError:
        print("triton: not installed")
    print(
        f"C++ extension mmkernels._C: {'built' if cpu.is_available() else 'NOT built'}"
        + ("" if cpu.is_available() else f" ({cpu.LOAD_ERROR})")
    )
    print(f"CPU SIMD path: {cpu_isa()}; CPU class: {_extension.cpu_class()}; threads: {torch.get_num_threads()}")
    print(textwrap.fill(f"CPU features: {cpu_features()}", width=INFO_WIDTH, subsequent_indent="  "))
    print(f"CUDA GPU: {torch.cuda.get_device_name() if torch.cuda.is_available() else 'none'}")
    print()
    print("\n".join(capability_lines(verbose)))
    print()
    print("\n".join(choice_lines()))
    print()
    print("\n".join(calibration_lines()))
    return 0


def bench(args) -> int:
    import torch

    from .benchmarks import attention as attention_cases
    from .benchmarks import models as models_cases
    from .benchmarks import quant as quant_cases
    from .benchmarks import reduce as reduce_cases
    from .benchmarks import report

    families = {
        "attention": attention_cases.all_cases,
        "reduce": reduce_cases.all_cases,
        "quant": quant_cases.all_cases,
        "models": models_cases.all_cases,
    }
    chosen = families if args.family == "all" else {k: v for k, v in families.items() if k == args.family}
    if args.gate and args.quick:
        print("--gate needs the full cases; --quick runs tiny shapes that gates do not apply to", file=sys.stderr)
        return 2
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"machine: {report.machine_description()}")
    if args.family in ("all", "attention", "quant") and not args.quick:
        print(f"peak: {report.peak_description()} (GFLOP/s columns give their fraction)")
    all_results, written = [], []
    for family, make_cases in chosen.items():
        print(f"[{family}]")
        # models: whole patched models against the unpatched one, each with its fidelity.
        whole = family == "models"
        run = report.run_cases_with_meta if whole else report.run_cases
        results = run(make_cases(quick=args.quick, only=args.only), budget_s=args.budget)
        if not results:
            continue
        all_results += results
        write = report.write_models_report if whole else report.write_report
        written += write(family, results, Path(args.out)).values()
        print()
        print(report.models_table(results) if whole else report.markdown_table(results))
        print()
    if args.family in ("all", "fidelity") and not args.quick:
        written += _fidelity(args)
    verdicts = []
    if args.gate:
        ran = {r["case"] for r in all_results}
        gates = report.load_gates(args.gates)
        here = [g for g in gates if report.gate_applies(g)]
        verdicts = report.check_gates(all_results, [g for g in here if g["case"] in ran])
        print(report.gates_table(verdicts))
        skipped = len(here) - len(verdicts)
        if skipped:
            print(f"({skipped} gates not checked: their cases were not selected)")
        if len(gates) > len(here):
            print(f"({len(gates) - len(here)} gates hold on other CPU classes only, not on {report._cpu_class()})")
        goals = report.check_gates(
            all_results, [g for g in report.load_goals(args.gates) if g["case"] in ran and report.gate_applies(g)]
        )
        if goals:
            print()
            print(report.goals_table(goals))
        written.append(report.write_gates(verdicts, Path(args.out), goals))
    print("\nwritten: " + ", ".join(str(p) for p in written))
    if verdicts and not all(v["passed"] for v in verdicts):
        print("some gates FAILED", file=sys.stderr)
        return 1
    return 0


def _fidelity(args) -> list:
    """The accuracy report (minutes long): goals are printed, never failing the run."""
    import json

    from .benchmarks import fidelity, report

    print("[fidelity]")
    rows = fidelity.run(only=args.only)
    if not rows:
        return []
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    table = fidelity.markdown(rows)
    print()
    print(table)
    print()
    (out / "fidelity.md").write_text(f"Machine: {report.machine_description()}\n\n{table}\n")
    (out / "fidelity.json").write_text(
        json.dumps({"machine": report.machine_description(), "rows": fidelity.as_json(rows)}, indent=2)
    )
    return [out / "fidelity.md", out / "fidelity.json"]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="mmkernels", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    i = sub.add_parser("info", help="versions, SIMD path, extension status, capability table")
    i.add_argument("--verbose", "-v", action="store_true", help="each backend's notes too")
    b = sub.add_parser("bench", help="benchmark every kernel against its peers")
    b.add_argument("--gate", action="store_true", help="check the gates (exit 1 if one fails)")
    b.add_argument("--gates", type=Path, default=None, help="gates file (default: the packaged one)")
    b.add_argument("--quick", action="store_true", help="tiny shapes: a smoke run, not for gates")
    b.add_argument("--only", default=None, help="run only cases whose id contains this text")
    b.add_argument(
        "--family",
        default="all",
        choices=["all", "attention", "reduce", "quant", "models", "fidelity"],
        help="kernel family to benchmark (models: patched HF models vs unpatched, "
        "speed and fidelity, minutes long; fidelity: the whole-model accuracy "
        "report, minutes long; not with --quick)",
    )
    b.add_argument("--out", default="bench/out", help="directory for table, JSON and PNG")
    b.add_argument("--budget", type=float, default=2.0, help="seconds of timing per case")
    b.add_argument("--threads", type=int, default=None, help="torch/OpenMP threads")
    sub.add_parser("compile-gate", help="AOT-compile Triton configs and csrc/cuda for sm_80/sm_90")
    from . import quantize_cli

    quantize_cli.add_parser(sub)
    args = parser.parse_args(argv)
    if args.command == "info":
        return info(verbose=args.verbose)
    if args.command == "bench":
        return bench(args)
    if args.command == "quantize":
        return quantize_cli.run(args)
    from .compile_gate import run_gate

    return 0 if run_gate(verbose=True) else 1


if __name__ == "__main__":
    sys.exit(main())
