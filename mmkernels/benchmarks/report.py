"""Run benchmark cases, write table / JSON / PNG, and check the gates and goals of gates.toml.

A **gate** (``[[gate]]``) is a floor: ``mmkernels bench --gate`` fails when one fails. A **goal**
(``[[goal]]``, same fields) is a stretch target: reported beside the measurement with the case's
fraction of this machine's peak, never failing the run. The peak is measured in the same run
(:func:`measured_peak_gflops`: the float32 FMA peak of the vector path this CPU runs)."""

from __future__ import annotations

import json
import os
import platform
import statistics
from pathlib import Path
from typing import Dict, List, Optional

import torch

from .timing import paired_ratio, timed_rounds

GATES_FILE = Path(__file__).with_name("gates.toml")


def machine_description() -> str:
    cpu = platform.processor() or platform.machine()
    family = model = None
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                key, value = key.strip(), value.strip()
                if key == "model name":
                    cpu = value
                elif key == "cpu family":
                    family = value
                elif key == "model":
                    model = value
                elif not key and family is not None:
                    break  # the first processor's block is enough
    except OSError:
        pass
    if family is not None:  # "AMD EPYC" alone does not tell Zen 4 (family 25) from Zen 5 (26)
        cpu += f" (family {family} model {model})"
    return (
        f"{cpu}, {os.cpu_count()} cores, torch {torch.__version__}, {torch.get_num_threads()} threads, "
        f"ISA {_cpu_isa()}, CPU class {_cpu_class()}"
    )


def _cpu_isa() -> str:
    # The op layer's answer, as `mmkernels info` gives it (cli imports this module, never the reverse).
    from ..attention import cpu

    return cpu.cpu_isa_or_reason()


def _cpu_class() -> str:
    from .. import _extension

    return _extension.cpu_class()


_PEAK: Optional[float] = None
_PEAK_SOURCE = ""


def measured_peak_gflops() -> float:
    """This machine's float32 FMA peak in GFLOP/s (all threads), measured once per process: the C++
    extension's register-resident FMA loop on the vector path this CPU runs
    (``mmkernels_C::fma_peak_gflops``); without the extension, the best of a few 1536^3
    ``torch.mm`` calls (BLAS reaches 50-95% of the FMA peak depending on the CPU, so fractions of
    it overstate)."""
    global _PEAK, _PEAK_SOURCE
    if _PEAK is None:
        from .. import _extension

        ops = _extension.CPU.ops("fma_peak_gflops")
        if ops is not None:
            _PEAK = float(ops.fma_peak_gflops(10_000_000, 5))
            _PEAK_SOURCE = "float32 FMA peak (register-resident FMA loop)"
        else:
            _PEAK, _PEAK_SOURCE = _gemm_gflops(), "float32 GEMM (torch.mm 1536^3; extension not built)"
    return _PEAK


_DOT_PEAKS: Optional[Dict[str, float]] = None
_DOT_SOURCE = ""
_BANDWIDTH: Optional[float] = None


def measured_dot_peaks() -> Dict[str, float]:
    """The bf16 / int8 peaks in GOP/s (all threads) of the instructions our kernels multiply bf16
    and int8 with on this CPU path, measured once per process (``mmkernels_C::dot_peak_gops``):
    the AMX tiles (tdpbf16ps / tdpbusd) on "amx", vdpbf16ps / vpdpbusd on "avx512_bf16";
    ``{"bf16": ..., "int8": ...}``, empty on other paths."""
    global _DOT_PEAKS, _DOT_SOURCE
    if _DOT_PEAKS is None:
        _DOT_PEAKS = {}
        from .. import _extension

        ops = _extension.CPU.ops("dot_peak_gops")
        isa = _cpu_isa()
        if ops is not None and isa in ("amx", "avx512_bf16"):
            _DOT_SOURCE = "AMX tiles" if isa == "amx" else "AVX-512 vdpbf16ps / vpdpbusd"
            for kind, name in enumerate(("bf16", "int8")):
                try:
                    _DOT_PEAKS[name] = float(ops.dot_peak_gops(kind, 2_000_000, 5))
                except RuntimeError:  # int8 without VNNI
                    pass
    return _DOT_PEAKS


def measured_bandwidth_gbs() -> float:
    """Memory read bandwidth in GB/s, measured once per process: the best of 10 sums of 256 MiB
    (bytes read per second, all threads; a GEMV only reads its weight). GEMV cases give their
    fraction of it; a weight that fits in the last-level cache stays there between rounds and can
    read faster than memory (fractions above 100%)."""
    global _BANDWIDTH
    if _BANDWIDTH is None:
        import time

        src = torch.ones(64 << 20)
        src.sum()
        best = float("inf")
        for _ in range(10):
            t0 = time.perf_counter()
            src.sum()
            best = min(best, time.perf_counter() - t0)
        _BANDWIDTH = src.numel() * 4 / best / 1e9
    return _BANDWIDTH


def peak_for(case_id: str) -> float:
    """The peak a case's GFLOP/s are a fraction of: the measured bf16 dot-product / tile peak for
    bfloat16 attention, the int8 one for W8A8 (where this CPU path has them), else the float32
    FMA peak."""
    dots = measured_dot_peaks() if _PEAK else {}
    if "bf16" in dots and "-bfloat16" in case_id:
        return dots["bf16"]
    if "int8" in dots and "-w8a8-" in case_id:
        return dots["int8"]
    return _PEAK or 0.0


def peak_description() -> str:
    peak = measured_peak_gflops()
    text = f"{_PEAK_SOURCE} {peak:.0f} GFLOP/s, this run"
    dots = measured_dot_peaks()
    if dots:
        text += f"; {_DOT_SOURCE}: " + ", ".join(
            f"{name} {v:.0f} {'GFLOP/s' if name == 'bf16' else 'GOP/s'}" for name, v in dots.items()
        )
    return text + f"; memory read bandwidth {measured_bandwidth_gbs():.1f} GB/s (256 MiB sum)"


def _gemm_gflops() -> float:
    import time

    n = 1536
    a, b = torch.randn(n, n), torch.randn(n, n)
    torch.mm(a, b)
    best = float("inf")
    for _ in range(5):
        t0 = time.perf_counter()
        torch.mm(a, b)
        best = min(best, time.perf_counter() - t0)
    return 2.0 * n**3 / best / 1e9


def run_cases(cases, *, budget_s: float = 2.0, log=print) -> List[Dict]:
    results = []
    for case in cases:
        limits = {"max_reps": case.max_rounds} if case.max_rounds else {}
        samples = timed_rounds(case.contenders, budget_s=case.budget_s or budget_s, **limits)
        times = {k: statistics.median(v) for k, v in samples.items()}
        ours = times["mmkernels"]
        row = {
            "case": case.id,
            "description": case.description,
            "times_ms": {k: v * 1e3 for k, v in times.items()},
            # Speed-ups are paired: the median over rounds of peer time / our time.
            "speedup_vs": {k: paired_ratio(v, samples["mmkernels"]) for k, v in samples.items() if k != "mmkernels"},
            "samples_ms": {k: [t * 1e3 for t in v] for k, v in samples.items()},
            "gflops": case.flops / ours / 1e9 if case.flops else None,
            "gbs": case.meta["bytes"] / ours / 1e9 if case.meta.get("bytes") else None,
            "max_error": case.error() if case.error else None,
        }
        results.append(row)
        log(
            f"  {case.id:38s} ours {ours * 1e3:9.3f} ms  "
            + "  ".join(f"{k} {v:5.2f}x" for k, v in row["speedup_vs"].items())
        )
    return results


def load_gates(path: Optional[Path] = None) -> List[Dict]:
    """The ``[[gate]]`` entries of the gates file (floors that fail the run)."""
    import tomllib

    with open(path or GATES_FILE, "rb") as f:
        return tomllib.load(f)["gate"]


def load_goals(path: Optional[Path] = None) -> List[Dict]:
    """The ``[[goal]]`` entries of the gates file (stretch targets, reported only)."""
    import tomllib

    with open(path or GATES_FILE, "rb") as f:
        return tomllib.load(f).get("goal", [])


def gate_applies(gate: Dict, cpu_class: Optional[str] = None) -> bool:
    """Whether a gate / goal holds on this machine's CPU class: entries with ``classes = [...]``
    (e.g. ``["amx"]``: Intel Xeon with AMX tiles) hold only there; entries without hold on every
    class. ``cpu_class``: default :func:`mmkernels._extension.cpu_class`."""
    classes = gate.get("classes")
    if not classes:
        return True
    unknown = set(classes) - set(_extension_classes())
    if unknown:
        raise ValueError(f"gate {gate['name']!r}: unknown CPU classes {sorted(unknown)}")
    return (cpu_class or _cpu_class()) in classes


def _extension_classes():
    from .. import _extension

    return _extension.CPU_CLASSES


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
        verdict = {**gate, "value": value, "passed": passed}
        if row.get("gflops") and peak_for(row["case"]):
            verdict["fraction_of_peak"] = row["gflops"] / peak_for(row["case"])
        verdicts.append(verdict)
    return verdicts


def markdown_table(results: List[Dict]) -> str:
    lines = [
        "| case | mmkernels ms | GFLOP/s | speed-up vs peers (peer time / ours) | max abs err |",
        "|---|---:|---:|---|---:|",
    ]
    for r in results:
        peers = ", ".join(f"{k} {v:.2f}x ({r['times_ms'][k]:.2f} ms)" for k, v in r["speedup_vs"].items())
        gf = f"{r['gflops']:.0f}" if r["gflops"] else "-"
        if r["gflops"] and peak_for(r["case"]):
            gf += f" ({r['gflops'] / peak_for(r['case']):.0%})"
        if r.get("gbs") and _BANDWIDTH:
            gf += f"; {r['gbs']:.0f} GB/s ({r['gbs'] / _BANDWIDTH:.0%} of bw)"
        err = f"{r['max_error']:.1e}" if r["max_error"] is not None else "-"
        lines.append(f"| {r['case']} | {r['times_ms']['mmkernels']:.3f} | {gf} | {peers} | {err} |")
    return "\n".join(lines)


def gates_table(verdicts: List[Dict]) -> str:
    lines = ["| gate | measured | verdict |", "|---|---:|---|"]
    for v in verdicts:
        value = "-" if v["value"] is None else (f"{v['value']:.2f}x")
        lines.append(f"| {v['name']} | {value} | {'PASS' if v['passed'] else 'FAIL'} |")
    return "\n".join(lines)


def goals_table(verdicts: List[Dict]) -> str:
    """Goals: measured value, met or not, and the case's fraction of the measured peak."""
    peak = f" (peak: {_PEAK_SOURCE} {_PEAK:.0f} GFLOP/s, this run)" if _PEAK else ""
    lines = [f"| goal (reported, never failing){peak} | measured | | fraction of peak |", "|---|---:|---|---:|"]
    for v in verdicts:
        value = "-" if v["value"] is None else f"{v['value']:.2f}x"
        frac = f"{v['fraction_of_peak']:.0%}" if v.get("fraction_of_peak") else "-"
        lines.append(f"| {v['name']} | {value} | {'met' if v['passed'] else 'not met'} | {frac} |")
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
    paths = {"json": out_dir / f"{family}.json", "markdown": out_dir / f"{family}.md", "png": out_dir / f"{family}.png"}
    paths["json"].write_text(json.dumps({"machine": machine, "results": results}, indent=2))
    paths["markdown"].write_text(f"Machine: {machine}\n\n{markdown_table(results)}\n")
    if plot(family, results, paths["png"]) is None:
        paths.pop("png")
    return paths


def write_gates(verdicts: List[Dict], out_dir: Path, goals: Optional[List[Dict]] = None) -> Path:
    """``gates.md`` / ``gates.json`` under ``out_dir``: the gates' verdicts and the goals'."""
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "gates.md"
    text = f"Machine: {machine_description()}\n\n{gates_table(verdicts)}\n"
    if goals:
        text += f"\n{goals_table(goals)}\n"
    path.write_text(text)
    (out_dir / "gates.json").write_text(json.dumps({"gates": verdicts, "goals": goals or []}, indent=2))
    return path


# ---------------------------------------------------------------------------------------------
# Whole-model cases (benchmarks/models.py): speed-up against a baseline contender and fidelity
# ---------------------------------------------------------------------------------------------


def run_cases_with_meta(cases, *, budget_s: float = 2.0, log=print) -> List[Dict]:
    """:func:`run_cases` one case at a time, and each row also carries its case's ``meta``
    (``"meta"``); the log line gives speed-ups over the baseline. When the
    meta names a ``baseline`` contender, the row gains ``"speedup_vs_baseline"``:
    ``{contender: time(baseline) / time(contender)}`` (paired over rounds); when it gives
    ``fidelity`` (``{contender: value}``), ``"fidelity"`` and ``"fidelity_metric"``."""
    results = []
    for case in cases:
        (row,) = run_cases([case], budget_s=budget_s, log=lambda text: None)
        meta = dict(case.meta)
        row["meta"] = meta
        base = meta.get("baseline")
        if base in row["samples_ms"]:
            row["baseline"] = base
            row["speedup_vs_baseline"] = {
                k: paired_ratio(row["samples_ms"][base], v) for k, v in row["samples_ms"].items()
            }
        if "fidelity" in meta:
            row["fidelity"] = meta["fidelity"]
            row["fidelity_metric"] = meta.get("fidelity_metric", "")
        results.append(row)
        if base in row["samples_ms"]:
            log(
                f"  {case.id:38s} {base} {row['times_ms'][base]:9.1f} ms  "
                + "  ".join(f"{k} {v:5.2f}x" for k, v in row["speedup_vs_baseline"].items() if k != base)
                + f"  (speed-up vs {base}, {len(row['samples_ms'][base])} rounds)"
            )
        else:
            log(f"  {case.id:38s} ours {row['times_ms']['mmkernels']:9.1f} ms")
    return results


def _speed_gates(row: Dict, gates: List[Dict]) -> Dict[str, List[Dict]]:
    """Gates on ``row``'s case with a min_speedup of a contender over the row's baseline,
    keyed by subject, each with its measured value and verdict."""
    out: Dict[str, List[Dict]] = {}
    for gate in gates:
        if gate["case"] != row["case"] or gate.get("baseline") != row.get("baseline") or "min_speedup" not in gate:
            continue
        if not gate_applies(gate):
            continue
        (verdict,) = check_gates([row], [gate])
        out.setdefault(gate["subject"], []).append(verdict)
    return out


def models_table(results: List[Dict], gates: Optional[List[Dict]] = None) -> str:
    """One line per contender: median time, speed-up over the case's baseline (paired), fidelity
    to the baseline, and the speed gates / fidelity goals that apply. ``gates``: default the
    packaged gates file. Descriptions and notes follow the table."""
    if gates is None:
        try:
            gates = load_gates()
        except (OSError, KeyError):
            gates = []
    lines = [
        "| case | contender | median ms | speed-up vs baseline | fidelity | fidelity metric | gate / goal |",
        "|---|---|---:|---:|---:|---|---|",
    ]
    notes = []
    for r in results:
        speed = r.get("speedup_vs_baseline", {})
        fidelity = r.get("fidelity", {})
        goals = r.get("meta", {}).get("fidelity_goal", {})
        by_subject = _speed_gates(r, gates)
        for i, (name, ms) in enumerate(r["times_ms"].items()):
            marks = []
            for v in by_subject.get(name, []):
                marks.append(f"gate >= {v['min_speedup']:g}x: {'PASS' if v['passed'] else 'FAIL'}")
            if name in goals and name in fidelity:
                met = fidelity[name] >= goals[name]
                marks.append(f"fidelity goal >= {goals[name]:g}: {'met' if met else 'NOT met'}")
            if name == r.get("baseline"):
                marks.append("baseline")
            sp = f"{speed[name]:.2f}x" if name in speed else "-"
            fid = f"{fidelity[name]:.5f}" if name in fidelity else "-"
            lines.append(
                f"| {r['case'] if i == 0 else ''} | {name} | {ms:.1f} | {sp} | {fid} | "
                f"{r.get('fidelity_metric', '') if i == 0 else ''} | "
                f"{'; '.join(marks)} |"
            )
        meta = r.get("meta", {})
        notes.append(f"- {r['case']}: {r['description']}")
        for name, setting in meta.get("settings", {}).items():
            notes.append(f"  - {name}: {setting}")
        for name, note in meta.get("notes", {}).items():
            notes.append(f"  - note, {name}: {note}")
        for name, extra in meta.get("fidelity_extra", {}).items():
            notes.append(f"  - {name}: " + ", ".join(f"{k} {v:.3g}" for k, v in extra.items()))
    return "\n".join(lines + [""] + notes)


def _pareto_front(points: List[tuple]) -> List[tuple]:
    """The points no other point beats on both fidelity (x) and speed-up (y), by x."""
    front = [p for p in points if not any(q[0] >= p[0] and q[1] >= p[1] and q[:2] != p[:2] for q in points)]
    return sorted(front)


def _pareto_axes(ax, row: Dict) -> None:
    speed, fidelity = row.get("speedup_vs_baseline", {}), row.get("fidelity", {})
    points = [(fidelity[k], speed[k], k) for k in row["times_ms"] if k in speed and k in fidelity]
    for x, y, name in points:
        base = name == row.get("baseline")
        ax.scatter([x], [y], marker="s" if base else "o", color="gray" if base else None, zorder=3)
        # the baseline's label goes below its point: attention-only sits just above it
        ax.annotate(
            f"{name}\n{y:.2f}x, {x:.5f}", (x, y), textcoords="offset points", xytext=(4, -16 if base else 4), fontsize=6
        )
    front = _pareto_front(points)
    if len(front) > 1:
        ax.plot([p[0] for p in front], [p[1] for p in front], "--", color="black", linewidth=0.7, label="Pareto front")
        ax.legend(fontsize=6, loc="lower left")
    ax.axhline(1.0, color="gray", linewidth=0.6)
    from matplotlib.ticker import FormatStrFormatter, MaxNLocator

    xs = [p[0] for p in points] or [1.0]
    lo, hi = min(xs), max(xs)
    pad = max((hi - lo) * 0.3, 2e-5)  # cosines equal to 1e-9 still get a readable axis
    ax.set_xlim(lo - pad, hi + pad)
    ax.xaxis.set_major_locator(MaxNLocator(5))
    ax.xaxis.set_major_formatter(FormatStrFormatter("%.5f"))
    ax.tick_params(labelsize=6)
    ax.set_xlabel(f"fidelity to {row.get('baseline', 'baseline')}: {row.get('fidelity_metric', '')}", fontsize=7)
    ax.set_ylabel(f"speed-up vs {row.get('baseline', 'baseline')} (paired median)", fontsize=7)
    ax.set_title(row["case"], fontsize=8)
    ax.margins(y=0.2)


def pareto_plot(results: List[Dict], path: Path) -> Optional[Path]:
    """Speed-up (y) against fidelity (x), one labelled point per contender, one panel per case
    (those with both); None when matplotlib is missing or no case has both."""
    rows = [r for r in results if r.get("fidelity") and r.get("speedup_vs_baseline")]
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    if not rows:
        return None
    cols = min(2, len(rows))
    nrows = (len(rows) + cols - 1) // cols
    fig, axes = plt.subplots(nrows, cols, figsize=(6 * cols, 4.2 * nrows), squeeze=False)
    for ax, row in zip(axes.flat, rows):
        _pareto_axes(ax, row)
    for ax in list(axes.flat)[len(rows) :]:
        ax.set_visible(False)
    fig.suptitle("speed-up vs fidelity — " + machine_description()[:110], fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def write_models_report(
    family: str, results: List[Dict], out_dir: Path, gates: Optional[List[Dict]] = None
) -> Dict[str, Path]:
    """``<family>.json`` (rows with fidelity and speed-ups), ``<family>.md``
    (:func:`models_table`), ``<family>.png`` (every case's Pareto panel) and
    ``<family>-pareto-<case>.png`` (one per case) under ``out_dir``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    machine = machine_description()
    paths = {"json": out_dir / f"{family}.json", "markdown": out_dir / f"{family}.md"}
    paths["json"].write_text(json.dumps({"machine": machine, "results": results}, indent=2))
    paths["markdown"].write_text(f"Machine: {machine}\n\n{models_table(results, gates)}\n")
    if pareto_plot(results, out_dir / f"{family}.png") is not None:
        paths["png"] = out_dir / f"{family}.png"
        for row in results:
            path = out_dir / f"pareto-{row['case']}.png"
            if pareto_plot([row], path) is not None:
                paths[f"pareto:{row['case']}"] = path
    return paths
