"""The command line: info, a quick benchmark run that writes its three outputs, gate checking."""

import json
import subprocess
import sys

from mmkernels.benchmarks import report


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "mmkernels.cli", *args], capture_output=True, text=True, timeout=600)


def test_info_prints_versions_isa_and_capabilities():
    res = run_cli("info")
    assert res.returncode == 0, res.stderr
    for text in (
        "torch",
        "C++ extension mmkernels._C",
        "CPU SIMD path",
        "CPU class",
        "CPU features: ",
        "attention",
        "reference",
        "qmatmul  (features: int4",
    ):
        assert text in res.stdout
    assert max(len(line) for line in res.stdout.splitlines()) <= 100  # a 100-column terminal
    assert "OpenMP" not in res.stdout  # notes only with --verbose
    from mmkernels.attention import cpu

    if cpu.is_available():  # the CPUID probe's line, AVX512-FP16 included
        assert "avx512_fp16=yes" in res.stdout or "avx512_fp16=no" in res.stdout


def test_info_shows_the_auto_choice_and_why():
    """The CPU class is forced through MMKERNELS_CPU_CLASS: the choice follows the rule, never a
    timing (AMX: torch's SDPA for plain attention; elsewhere our cpu kernel)."""
    import os

    import pytest
    from mmkernels.attention import cpu

    if not cpu.is_available():
        pytest.skip(f"the rule compares with the cpu backend: {cpu.LOAD_ERROR}")
    for klass, choice in (("avx512", "cpu"), ("amx", "torch")):
        res = subprocess.run(
            [sys.executable, "-m", "mmkernels.cli", "info"],
            capture_output=True,
            text=True,
            timeout=600,
            env={**os.environ, "MMKERNELS_CPU_CLASS": klass},
        )
        assert res.returncode == 0, res.stderr
        text = res.stdout.split("auto-selection on this machine", 1)[1]
        assert f"(CPU class {klass})" in text
        assert f"attention(float32 on cpu, D=64, Dv=64, Hq=12, Hkv=12) -> {choice}" in text
        assert "qmatmul(float32 on cpu, int8 per-channel sym, A8) -> cpu" in text
        assert ("AMX CPU: oneDNN's SDPA" if klass == "amx" else "without AMX: our cpu") in text


def test_info_verbose_adds_the_notes():
    res = run_cli("info", "--verbose")
    assert res.returncode == 0, res.stderr
    assert "OpenMP, AVX-512 / AVX2 / scalar chosen at run time" in res.stdout
    assert max(len(line) for line in res.stdout.splitlines()) <= 100


def test_quick_bench_writes_table_json_png(tmp_path):
    res = run_cli(
        "bench",
        "--quick",
        "--family",
        "attention",
        "--only",
        "vit_b16-float32",
        "--budget",
        "0.05",
        "--out",
        str(tmp_path),
    )
    assert res.returncode == 0, res.stderr
    data = json.loads((tmp_path / "attention.json").read_text())
    case_ids = {r["case"] for r in data["results"]}
    assert {"vit_b16-float32", "vit_b16-float32-scores_cls", "vit_b16-float32-key_bias"} <= case_ids
    assert all(r["max_error"] < 1e-4 for r in data["results"])
    assert (tmp_path / "attention.png").stat().st_size > 1000
    assert "| vit_b16-float32 |" in (tmp_path / "attention.md").read_text()


def test_gate_refuses_quick_shapes(tmp_path):
    res = run_cli("bench", "--quick", "--gate", "--out", str(tmp_path))
    assert res.returncode == 2 and "--gate needs the full cases" in res.stderr


def test_gate_checker_arithmetic():
    results = [{"case": "c", "times_ms": {"mmkernels": 2.0, "sdpa": 3.0, "mmkernels_plain": 1.5}}]
    gates = [
        {"name": "fast", "case": "c", "subject": "mmkernels", "baseline": "sdpa", "min_speedup": 1.4},
        {"name": "slow", "case": "c", "subject": "mmkernels", "baseline": "sdpa", "min_speedup": 1.6},
        {"name": "overhead", "case": "c", "subject": "mmkernels", "baseline": "mmkernels_plain", "max_slowdown": 1.25},
        {"name": "missing", "case": "zzz", "subject": "mmkernels", "baseline": "sdpa", "min_speedup": 1.0},
    ]
    verdicts = {v["name"]: v["passed"] for v in report.check_gates(results, gates)}
    assert verdicts == {"fast": True, "slow": False, "overhead": False, "missing": False}


def test_gate_checker_uses_paired_samples():
    # Round 2 is slowed for both contenders (a burst of load): the medians of each contender
    # mix rounds, the paired ratio stays at the true 1.10x of every round.
    ours = [10.0, 10.0, 30.0, 10.0, 10.0]
    peer = [11.0, 11.0, 33.0, 11.0, 11.0]
    results = [
        {"case": "c", "times_ms": {"mmkernels": 10.0, "peer": 11.0}, "samples_ms": {"mmkernels": ours, "peer": peer}}
    ]
    gates = [{"name": "g", "case": "c", "subject": "mmkernels", "baseline": "peer", "min_speedup": 1.1}]
    (v,) = report.check_gates(results, gates)
    assert v["passed"] and abs(v["value"] - 1.1) < 1e-12


def test_paired_ratio_is_median_of_round_ratios():
    from mmkernels.benchmarks.timing import paired_ratio, timed_rounds

    assert paired_ratio([2.0, 9.0, 4.0], [1.0, 3.0, 1.0]) == 3.0
    import pytest

    with pytest.raises(ValueError, match="one length"):
        paired_ratio([1.0], [1.0, 2.0])
    calls = []
    samples = timed_rounds(
        {"a": lambda: calls.append("a"), "b": lambda: calls.append("b")}, warmup=0, min_reps=4, max_reps=4, budget_s=0.0
    )
    assert len(samples["a"]) == len(samples["b"]) == 4


def test_packaged_gates_reference_real_cases():
    import pytest

    pytest.importorskip("mmkernels.models")
    from mmkernels.benchmarks import attention, models, quant, reduce

    ids = {c.id for c in attention.all_cases()} | {c.id for c in reduce.all_cases()}
    ids |= set(quant.case_ids()) | set(models.case_ids())
    for gate in report.load_gates():
        assert gate["case"] in ids, gate["name"]


def test_package_works_without_the_extension():
    """With mmkernels._C unavailable the package imports, the reference serves CPU calls and
    `info` says why the C++ backend is missing."""
    code = (
        "import sys, warnings; sys.modules['mmkernels._C'] = None\n"
        "import torch, mmkernels\n"
        "from mmkernels import cli\n"
        "q = torch.randn(1, 2, 5, 16)\n"
        "with warnings.catch_warnings(record=True):\n"
        "    warnings.simplefilter('always')\n"
        "    out = mmkernels.attention(q, q, q)\n"
        "    idx = mmkernels.select_tokens(torch.rand(1, 5), 2)\n"
        "assert out.shape == (1, 2, 5, 16) and idx.shape == (1, 2)\n"
        "cli.info()\n"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    assert "C++ extension mmkernels._C: NOT built" in res.stdout
