"""Run benchmark cases, write table / JSON / PNG, and check the gates of gates.toml."""
from __future__ import annotations

import json
import os
import platform
from pathlib import Path
from typing import Dict, List, Optional

import torch

import statistics

from .timing import paired_ratio, timed_rounds

GATES_FILE = Path(__file__).with_name("gates.toml")


def machine_description() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    from .. import cli
    return (f"{cpu}, {os.cpu_count()} cores, torch {torch.__version__}, "
            f"{torch.get_num_threads()} threads, ISA {cli.cpu_isa()}")


def run_cases(cases, *, budget_s: float = 2.0, log=print) -> List[Dict]:
    results = []
    for case in cases:
        limits = {"max_reps": case.max_rounds} if case.max_rounds else {}
        samples = timed_rounds(case.contenders, budget_s=case.budget_s or budget_s, **limits)
        times = {k: statistics.median(v) for k, v in samples.items()}
        ours = times["mmkernels"]
        row = {"case": case.id, "description": case.description,
               "times_ms": {k: v * 1e3 for k, v in times.items()},
               # Speed-ups are paired: the median over rounds of peer time / our time.
               "speedup_vs": {k: paired_ratio(v, samples["mmkernels"])
                              for k, v in samples.items() if k != "mmkernels"},
               "samples_ms": {k: [t * 1e3 for t in v] for k, v in samples.items()},
               "gflops": case.flops / ours / 1e9 if case.flops else None,
               "max_error": case.error() if case.error else None}
        results.append(row)
        log(f"  {case.id:38s} ours {ours * 1e3:9.3f} ms  " + "  ".join(
            f"{k} {v:5.2f}x" for k, v in row["speedup_vs"].items()))
    return results


def load_gates(path: Optional[Path] = None) -> List[Dict]:
    import tomllib
    with open(path or GATES_FILE, "rb") as f:
        return tomllib.load(f)["gate"]


def _ratio(row: Dict, num: str, den: str) -> float:
    """time(num) / time(den) for one case: paired over rounds when the samples are recorded
    (see timing.paired_ratio), else the ratio of the medians."""
    samples = row.get("samples_ms")
    if samples and num in samples and den in samples:
        return paired_ratio(samples[num], samples[den])
    return row["times_ms"][num] / row["times_ms"][den]


def check_gates(results: List[Dict], gates: List[Dict]) -> List[Dict]:
    by_case = {r["case"]: r for r in results}
    verdicts = []
    for gate in gates:
        row = by_case.get(gate["case"])
        if row is None:
            verdicts.append({**gate, "value": None, "passed": False, "why": "case not run"})
            continue
        if "min_speedup" in gate:
            value = _ratio(row, gate["baseline"], gate["subject"])
            passed = value >= gate["min_speedup"]
        else:
            value = _ratio(row, gate["subject"], gate["baseline"])
            passed = value <= gate["max_slowdown"]
        verdicts.append({**gate, "value": value, "passed": passed})
    return verdicts


def markdown_table(results: List[Dict]) -> str:
    lines = ["| case | mmkernels ms | GFLOP/s | speed-up vs peers (peer time / ours) | max abs err |",
             "|---|---:|---:|---|---:|"]
    for r in results:
        peers = ", ".join(f"{k} {v:.2f}x ({r['times_ms'][k]:.2f} ms)"
                          for k, v in r["speedup_vs"].items())
        gf = f"{r['gflops']:.0f}" if r["gflops"] else "-"
        err = f"{r['max_error']:.1e}" if r["max_error"] is not None else "-"
        lines.append(f"| {r['case']} | {r['times_ms']['mmkernels']:.3f} | {gf} | {peers} | {err} |")
    return "\n".join(lines)


def gates_table(verdicts: List[Dict]) -> str:
    lines = ["| gate | measured | verdict |", "|---|---:|---|"]
    for v in verdicts:
        value = "-" if v["value"] is None else (f"{v['value']:.2f}x")
        lines.append(f"| {v['name']} | {value} | {'PASS' if v['passed'] else 'FAIL'} |")
    return "\n".join(lines)


def plot(family: str, results: List[Dict], path: Path) -> Optional[Path]:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    peers = sorted({p for r in results for p in r["speedup_vs"]})
    fig, ax = plt.subplots(figsize=(max(8, len(results) * 0.6), 5))
    width = 0.8 / max(1, len(peers))
    for i, peer in enumerate(peers):
        xs = [j + i * width for j, r in enumerate(results) if peer in r["speedup_vs"]]
        ys = [r["speedup_vs"][peer] for r in results if peer in r["speedup_vs"]]
        ax.bar(xs, ys, width, label=peer)
    ax.axhline(1.0, color="black", linewidth=0.8)
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(results))])
    ax.set_xticklabels([r["case"] for r in results], rotation=60, ha="right", fontsize=7)
    ax.set_ylabel("speed-up of mmkernels (peer time / our time)")
    ax.set_title(f"mmkernels {family} vs peers — " + machine_description()[:90], fontsize=8)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def write_report(family: str, results, out_dir: Path) -> Dict[str, Path]:
    """``<family>.json``, ``<family>.md`` and ``<family>.png`` under ``out_dir``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    machine = machine_description()
    paths = {"json": out_dir / f"{family}.json", "markdown": out_dir / f"{family}.md",
             "png": out_dir / f"{family}.png"}
    paths["json"].write_text(json.dumps({"machine": machine, "results": results}, indent=2))
    paths["markdown"].write_text(f"Machine: {machine}\n\n{markdown_table(results)}\n")
    if plot(family, results, paths["png"]) is None:
        paths.pop("png")
    return paths


def write_gates(verdicts: List[Dict], out_dir: Path) -> Path:
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "gates.md"
    path.write_text(f"Machine: {machine_description()}\n\n{gates_table(verdicts)}\n")
    (out_dir / "gates.json").write_text(json.dumps(verdicts, indent=2))
    return path
