"""pytest-benchmark view of the quantized-matmul cases (the same definitions `mmkernels bench` runs).

    .venv/bin/python -m pytest bench/test_quant_bench.py --benchmark-only \
        --benchmark-group-by=param:case_id

Gates are not checked here; use `mmkernels bench --family quant --gate`.
"""

import pytest

from mmkernels.benchmarks.quant import QUICK_SHAPES, SHAPES, qmatmul_case, FORMATS

SPECS = [(fmt, *shape) for shape in SHAPES + QUICK_SHAPES for fmt in FORMATS]


@pytest.fixture(scope="module")
def cases():
    return {}


@pytest.mark.parametrize("spec", SPECS, ids=[f"{s[0]}-m{s[2]}-k{s[3]}-n{s[4]}" for s in SPECS])
def test_qmatmul(benchmark, cases, spec):
    case = cases.setdefault(spec, qmatmul_case(*spec))
    benchmark.extra_info["case_id"] = case.id
    benchmark.extra_info["contenders"] = sorted(case.contenders)
    benchmark(case.contenders["mmkernels"])
