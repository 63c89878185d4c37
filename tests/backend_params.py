"""The backends a family's tests run on, read from the dispatch registry (used by conftest's
``backend`` fixture; importable by a test that parametrises by hand, e.g. a hypothesis test)."""

import importlib
import os
from typing import List, NamedTuple, Optional

import pytest
import torch

from mmkernels import _dispatch

ISA_ORDER = ["scalar", "avx2", "avx512", "avx512_bf16", "amx"]

# The op whose registered backends a family's ``backend`` fixture follows (by the test file's folder,
# tests/<family>/); a test module may name another op with ``BACKEND_OP = "..."``.
FAMILY_OPS = {"attention": "attention", "reduce": "tome_plan", "quant": "qmatmul"}


class BackendUnderTest(NamedTuple):
    """What the ``backend`` fixture yields: a registered backend's name (pass it as ``backend=``)
    and the device its inputs go on (``name, device = backend`` unpacks it)."""

    name: str
    device: str


def _device(b) -> str:
    devices = getattr(b, "devices", None)  # None: any device
    if devices is not None and "cpu" not in devices:
        return "cuda"
    if b.name != "reference" and torch.cuda.is_available() and (devices is None or "cuda" in devices):
        return "cuda"
    return "cpu"  # triton without a GPU: the interpreter


# Families with AMX kernels: on a CPU that runs avx512_bf16, their tests also run those kernels
# over emulated tiles (MMKERNELS_CPU_ISA=amx_emulated, csrc/cpu/tile_emu.h), so that the AMX code
# is tested on machines without AMX too; the real tiles run where the CPU has them ("amx").
AMX_FAMILIES = ("attention", "quant")


def cpu_isa_paths(family: str) -> List[str]:
    """The ISA paths of ``mmkernels.<family>.cpu`` this CPU can run, lowest first (then
    "amx_emulated" for the families with AMX kernels, where the CPU can run it)."""
    cpu = importlib.import_module(f"mmkernels.{family}.cpu")
    paths = ISA_ORDER[: ISA_ORDER.index(cpu.cpu_isa()) + 1]
    if family in AMX_FAMILIES and "avx512_bf16" in paths and _runs_amx_emulated(cpu):
        paths.append("amx_emulated")
    return paths


def amx_isa_params(family: str) -> list:
    """``pytest.param`` for "amx" (the real tiles) and "amx_emulated", for tests of a family's AMX
    kernels: a path this CPU cannot run is a skipped param that says why (for "amx": the CPU
    probe's reason, e.g. no AMX, or the kernel refused the tile-data permission)."""
    paths = cpu_isa_paths(family)
    params = []
    for isa in ("amx", "amx_emulated"):
        if isa in paths:
            params.append(pytest.param(isa, id=isa))
        else:
            why = _amx_reason() if isa == "amx" else "needs AVX-512 BF16 and VNNI"
            params.append(pytest.param(isa, id=isa, marks=pytest.mark.skip(reason=f"{isa}: {why}")))
    return params


def _amx_reason() -> str:
    from mmkernels import _extension

    ops = _extension.CPU.ops("cpu_features")
    line = ops.cpu_features() if ops is not None else "extension not built"
    if "amx=no" not in line:
        return line
    why = line.split("amx=no", 1)[1].strip()
    return why[1:-1] if why.startswith("(") and why.endswith(")") else why


def _runs_amx_emulated(cpu) -> bool:
    old = os.environ.get("MMKERNELS_CPU_ISA")
    os.environ["MMKERNELS_CPU_ISA"] = "amx_emulated"
    try:
        return cpu.cpu_isa() == "amx_emulated"
    except RuntimeError:  # no AVX-512 VNNI
        return False
    finally:
        if old is None:
            del os.environ["MMKERNELS_CPU_ISA"]
        else:
            os.environ["MMKERNELS_CPU_ISA"] = old


def backend_cases(op: str, isa_family: Optional[str] = None) -> list:
    """``pytest.param((BackendUnderTest, isa or None), id=...)`` for every backend registered for
    ``op``, in the registry's order: an unavailable one (not built, no GPU) is a skipped param
    with the reason. With ``isa_family`` the cpu backend runs once per ISA path
    (:func:`cpu_isa_paths`, forced with MMKERNELS_CPU_ISA by the fixture)."""
    params = []
    for b in _dispatch.backends_for(op):
        ok, why = b.availability()
        value = BackendUnderTest(b.name, _device(b))
        if ok and value.device == "cuda" and not torch.cuda.is_available():
            ok, why = False, "needs a CUDA GPU"
        if not ok:
            params.append(
                pytest.param(
                    (value, None), id=b.name, marks=pytest.mark.skip(reason=f"{b.name} backend unavailable: {why}")
                )
            )
        elif b.name == "cpu" and isa_family is not None:
            params += [pytest.param((value, isa), id=f"cpu-{isa}") for isa in cpu_isa_paths(isa_family)]
        else:
            params.append(pytest.param((value, None), id=b.name))
    return params


def attention_call(dtype: str = "float32", **overrides):
    """A ViT-B/16-like CPU attention call description (D=64, 12 query and kv heads, dense, no
    features) for tests of the backends' rules; ``overrides`` replace fields."""
    from mmkernels.attention.api import AttentionCall

    fields = dict(
        device_type="cpu",
        dtype_name=dtype,
        head_dim=64,
        head_dim_v=64,
        num_heads_q=12,
        num_heads_kv=12,
        varlen=False,
        causal=False,
        has_bias=False,
        scores=None,
        return_lse=False,
    )
    fields.update(overrides)
    return AttentionCall(**fields)
