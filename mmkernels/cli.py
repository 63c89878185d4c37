"""``mmkernels info | bench | compile-gate``."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path


def cpu_isa() -> str:
    from .attention import cpu
    return cpu.cpu_isa() if cpu.is_available() else "n/a (extension not built)"


def info() -> int:
    import platform

    import torch

    from . import __version__, _dispatch
    from .attention import cpu
    print(f"mmkernels {__version__}")
    print(f"python {platform.python_version()}, torch {torch.__version__}"
          f" (CUDA {torch.version.cuda or 'none'})")
    try:
        import triton
        print(f"triton {triton.__version__}")
    except ImportError:
        print("triton: not installed")
    print(f"C++ extension mmkernels._C: {'built' if cpu.is_available() else 'NOT built'}"
          + ("" if cpu.is_available() else f" ({cpu.LOAD_ERROR})"))
    print(f"CPU SIMD path: {cpu_isa()}; threads: {torch.get_num_threads()}")
    print(f"CUDA GPU: {torch.cuda.get_device_name() if torch.cuda.is_available() else 'none'}")
    rows = _dispatch.capability_table()
    keys = ["op", "backend", "available", "devices", "dtypes", "head dims", "notes"]
    widths = {k: max(len(k), *(len(str(r.get(k, ""))) for r in rows)) for k in keys}
    print()
    print("  ".join(k.ljust(widths[k]) for k in keys))
    for r in rows:
        print("  ".join(str(r.get(k, "")).ljust(widths[k]) for k in keys))
    return 0


def bench(args) -> int:
    import torch

    from .benchmarks import attention as attention_cases
    from .benchmarks import models as models_cases
    from .benchmarks import quant as quant_cases
    from .benchmarks import reduce as reduce_cases
    from .benchmarks import report
    families = {"attention": attention_cases.all_cases, "reduce": reduce_cases.all_cases,
                "quant": quant_cases.all_cases, "models": models_cases.all_cases}
    chosen = families if args.family == "all" else {
        k: v for k, v in families.items() if k == args.family}
    if args.gate and args.quick:
        print("--gate needs the full cases; --quick runs tiny shapes that gates do not apply to",
              file=sys.stderr)
        return 2
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"machine: {report.machine_description()}")
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
        verdicts = report.check_gates(all_results, [g for g in gates if g["case"] in ran])
        print(report.gates_table(verdicts))
        skipped = len(gates) - len(verdicts)
        if skipped:
            print(f"({skipped} gates not checked: their cases were not selected)")
        written.append(report.write_gates(verdicts, Path(args.out)))
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
    (out / "fidelity.json").write_text(json.dumps(
        {"machine": report.machine_description(), "rows": fidelity.as_json(rows)}, indent=2))
    return [out / "fidelity.md", out / "fidelity.json"]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="mmkernels", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("info", help="versions, SIMD path, extension status, capability table")
    b = sub.add_parser("bench", help="benchmark every kernel against its peers")
    b.add_argument("--gate", action="store_true", help="check the gates (exit 1 if one fails)")
    b.add_argument("--gates", type=Path, default=None, help="gates file (default: the packaged one)")
    b.add_argument("--quick", action="store_true", help="tiny shapes: a smoke run, not for gates")
    b.add_argument("--only", default=None, help="run only cases whose id contains this text")
    b.add_argument("--family", default="all", choices=["all", "attention", "reduce", "quant",
                                                        "models", "fidelity"],
                   help="kernel family to benchmark (models: patched HF models vs unpatched, "
                        "speed and fidelity, minutes long; fidelity: the whole-model accuracy "
                        "report, minutes long; not with --quick)")
    b.add_argument("--out", default="bench/out", help="directory for table, JSON and PNG")
    b.add_argument("--budget", type=float, default=2.0, help="seconds of timing per case")
    b.add_argument("--threads", type=int, default=None, help="torch/OpenMP threads")
    sub.add_parser("compile-gate", help="AOT-compile Triton configs and csrc/cuda for sm_80/sm_90")
    from . import quantize_cli
    quantize_cli.add_parser(sub)
    args = parser.parse_args(argv)
    if args.command == "info":
        return info()
    if args.command == "bench":
        return bench(args)
    if args.command == "quantize":
        return quantize_cli.run(args)
    from .compile_gate import run_gate
    return 0 if run_gate(verbose=True) else 1


if __name__ == "__main__":
    sys.exit(main())
