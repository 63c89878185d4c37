"""Imports flow one way (issue 10 §2): the op layer (attention, reduce, quant) sits below the modules
(nn), the modules below the compression workflows (compress), those below the transformers patch
layer and the model layer (hf, models), and everything below the benchmarks and the CLI.

Every import statement of every module counts, including the ones inside functions: an "import
it late to dodge the cycle" is still an upward import. Read from the source (AST), so the test needs
no optional package and sees code paths that never run here.
"""

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

# Rank of each top-level part of the package: a module may import parts of the same or a lower rank.
RANKS = {
    "_version": 0,
    "_extension": 0,
    "_triton_support": 0,
    "_dispatch": 0,
    "_eager": 0,
    "_calibration": 0,
    "_packed_cache": 0,
    "_activations": 0,
    "_describe": 0,
    "attention": 1,
    "reduce": 1,
    "quant": 1,  # ops: api, reference, backends, kernels
    "linear": 1,
    "nn": 2,  # drop-in modules built on the ops
    "compress": 3,  # calibration, GPTQ, quantize_model, checkpoints
    "hf": 4,
    "models": 4,  # transformers patching, the model layer
    "(root)": 5,  # mmkernels/__init__: the flat public API
    "benchmarks": 5,
    "compile_gate": 5,
    "cli": 6,
    "quantize_cli": 6,
}
LAYER_NAMES = {1: "op layer", 2: "nn", 3: "compress", 4: "hf / models", 5: "public API / benchmarks", 6: "cli"}


def _sources():
    files = sorted((REPO / "mmkernels").rglob("*.py")) + sorted((REPO / "models").rglob("*.py"))
    return [p for p in files if "_csrc" not in p.parts]


def _module(path: Path):
    """(dotted module name, is a package __init__); models/ installs as mmkernels.models."""
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    if parts[0] == "models":
        parts.insert(0, "mmkernels")
    is_pkg = parts[-1] == "__init__"
    return ".".join(parts[:-1] if is_pkg else parts), is_pkg


def _part(module: str):
    """Top-level part of an mmkernels module name ("(root)" for the package itself); None outside."""
    parts = module.split(".")
    if parts[0] != "mmkernels":
        return None
    return parts[1] if len(parts) > 1 else "(root)"


def _imports(path: Path):
    """(line, imported module) for every import in ``path``, relative ones resolved; a
    ``from X import name`` yields ``X.name`` when X is a package part (``from .. import nn``)."""
    module, is_pkg = _module(path)
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = module.split(".") if is_pkg else module.split(".")[:-1]
                base = base[: len(base) - (node.level - 1)]
                source = ".".join(base + ([node.module] if node.module else []))
            else:
                source = node.module
            if source == "mmkernels":  # from mmkernels import nn / from .. import compress
                for alias in node.names:
                    target = f"mmkernels.{alias.name}"
                    yield node.lineno, target if _part(target) in RANKS else source
            else:
                yield node.lineno, source


def _violations():
    found = []
    for path in _sources():
        module, _ = _module(path)
        here = _part(module)
        rank = RANKS.get(here)
        assert rank is not None, f"{module}: add its top-level part {here!r} to RANKS in {__file__}"
        for line, target in _imports(path):
            there = _part(target)
            if there is None or there == here:
                continue
            assert there in RANKS, f"{path}:{line} imports {target}: add {there!r} to RANKS"
            if RANKS[there] > rank:
                found.append(
                    f"{path.relative_to(REPO)}:{line}: {module} ({LAYER_NAMES.get(rank, rank)}) "
                    f"imports {target} ({LAYER_NAMES.get(RANKS[there], RANKS[there])})"
                )
    return found


def test_every_part_of_the_package_has_a_rank():
    parts = {_part(_module(p)[0]) for p in _sources()}
    assert parts <= set(RANKS), f"unranked parts: {sorted(parts - set(RANKS))}"


def test_no_upward_imports():
    violations = _violations()
    assert not violations, "upward imports:\n" + "\n".join(violations)


@pytest.mark.parametrize(
    "lower, upper",
    [
        ("quant", "nn"),
        ("quant", "compress"),
        ("quant", "hf"),
        ("quant", "benchmarks"),
        ("nn", "compress"),
        ("compress", "hf"),
        ("benchmarks", "cli"),
    ],
)
def test_named_rules(lower, upper):
    """The rules the issue names, spelled out (they follow from RANKS; this keeps them from being
    ranked away silently)."""
    assert RANKS[lower] < RANKS[upper]


def test_the_checker_sees_late_and_relative_imports(tmp_path, monkeypatch):
    """A function-level relative import upward is reported (the checker is not vacuous)."""
    fake = tmp_path / "mmkernels" / "quant"
    fake.mkdir(parents=True)
    (tmp_path / "models").mkdir()
    (fake / "__init__.py").write_text("")
    (fake / "x.py").write_text("def f():\n    from ..compress import quantize_model\n    from .. import nn\n")
    monkeypatch.setitem(globals(), "REPO", tmp_path)
    assert [t for _, t in _imports(fake / "x.py")] == ["mmkernels.compress", "mmkernels.nn"]
    assert len(_violations()) == 2


def test_no_import_order_hacks():
    """Package __init__ files import in one block: no ``noqa: E402`` (an import that must come
    late is a cycle waiting to happen)."""
    hacks = [
        f"{p.relative_to(REPO)}:{i}"
        for p in _sources()
        for i, line in enumerate(p.read_text().splitlines(), 1)
        if "noqa: E402" in line
    ]
    assert not hacks, f"E402 suppressions: {hacks}"
