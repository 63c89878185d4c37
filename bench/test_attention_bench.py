"""pytest-benchmark view of the attention cases (the same definitions `mmkernels bench` runs).

    .venv/bin/python -m pytest bench/ --benchmark-only --benchmark-group-by=param:case_id

Gates are not checked here (pytest-benchmark does not interleave contenders); use
`mmkernels bench --gate`, which reads mmkernels/benchmarks/gates.toml.
"""

import pytest

from mmkernels.benchmarks.attention import all_cases

CASES = all_cases(quick=False)
PARAMS = [pytest.param(case, name, id=f"{case.id}:{name}") for case in CASES for name in case.contenders]


@pytest.mark.parametrize("case, contender", PARAMS)
def test_attention(benchmark, case, contender):
    benchmark.extra_info["case_id"] = case.id
    benchmark(case.contenders[contender])
