"""The GPU compile gate (mmkernels/compile_gate.py) and the CUDA kernels of csrc/cuda/.

* test_gate_passes: AOT-compiles every Triton target for sm_80 / sm_90 and nvcc-compiles csrc/cuda/*.cu
  (no GPU needed); fails on compile errors, spills or missing tensor-core instructions.
* the parser tests feed synthetic cuobjdump / ptxas text.
* test_merge_attention_states_gpu: runtime check of the CUDA kernel against float64 torch (GPU only).
"""

import math
import os
import shutil

import pytest
import torch

from mmkernels import compile_gate as gate

pytest.importorskip("triton")


def test_gate_passes():
    assert gate.run_gate(verbose=True) is True


CUOBJDUMP_SPILL = """
Resource usage:
 Common:
  GLOBAL:0
 Function _attn_fwd_kernel:
  REG:255 STACK:88 SHARED:0 LOCAL:0 CONSTANT[0]:700 TEXTURE:0 SURFACE:0 SAMPLER:0
 Function helper:
  REG:40 STACK:0 SHARED:1024 LOCAL:16 CONSTANT[0]:400 TEXTURE:0 SURFACE:0 SAMPLER:0
"""

CUOBJDUMP_CLEAN = """
Resource usage:
 Common:
  GLOBAL:0
 Function _attn_fwd_kernel:
  REG:168 STACK:0 SHARED:0 LOCAL:0 CONSTANT[0]:700 TEXTURE:0 SURFACE:0 SAMPLER:0
"""

PTXAS_SPILL = """
ptxas info    : 0 bytes gmem
ptxas info    : Compiling entry function '_Z6kernelPf' for 'sm_80'
ptxas info    : Function properties for _Z6kernelPf
    32 bytes stack frame, 24 bytes spill stores, 20 bytes spill loads
ptxas info    : Used 255 registers, used 1 barriers, 4096 bytes smem, 360 bytes cmem[0]
ptxas info    : Compiling entry function '_Z5cleanPf' for 'sm_80'
ptxas info    : Function properties for _Z5cleanPf
    0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
ptxas info    : Used 30 registers, used 0 barriers, 360 bytes cmem[0]
"""


def test_cuobjdump_parser_detects_spill():
    usage = gate.parse_resource_usage(CUOBJDUMP_SPILL)
    assert usage["_attn_fwd_kernel"] == dict(reg=255, stack=88, shared=0, local=0)
    assert usage["helper"]["local"] == 16
    assert gate.cuobjdump_spill_bytes(CUOBJDUMP_SPILL) == 104
    assert gate.cuobjdump_spill_bytes(CUOBJDUMP_CLEAN) == 0


def test_ptxas_parser_detects_spill():
    funcs = gate.parse_ptxas_verbose(PTXAS_SPILL)
    assert [f["function"] for f in funcs] == ["_Z6kernelPf", "_Z5cleanPf"]
    assert funcs[0]["spill_stores"] == 24 and funcs[0]["spill_loads"] == 20 and funcs[0]["registers"] == 255
    assert funcs[0]["smem"] == 4096 and funcs[1]["spill_stores"] == 0
    assert gate.ptxas_spill_bytes(PTXAS_SPILL) == 44


def test_tensor_core_detection():
    assert gate.tensor_core_ops("  /*0360*/  HMMA.16816.F32 R16, R20.reuse, R4, RZ ;") == "HMMA"
    assert gate.tensor_core_ops("  HGMMA.64x64x16.F32 R24, gdesc[UR4], RZ ;\n HMMA.16816.F32 R1") == "HGMMA"
    assert gate.tensor_core_ops("  FFMA R1, R2, R3, R4 ;") == "no"
    # int8 / fp8 dots (mmkernels.quant.triton): IMMA (mma.sync), IGMMA / QGMMA (Hopper wgmma)
    assert gate.tensor_core_ops("  IMMA.16832.S8.S8 R8, R12.ROW, R4.COL, R8 ;") == "IMMA"
    assert gate.tensor_core_ops("  IGMMA.64x64x32.S8.S8 R24, gdesc[UR4], R24 ;") == "IGMMA"
    assert gate.tensor_core_ops("  QGMMA.64x64x32.F32.E4M3.E4M3 R24, gdesc[UR4], RZ ;") == "QGMMA"
    assert gate.tensor_core_op_set("HMMA.16816.F32 R1 ;\n IMMA.16832.S8.S8 R2 ;") == {"HMMA", "IMMA"}


def test_quant_targets_are_gated():
    """mmkernels.quant.triton's kernels are part of the gate, each dot kernel with the tensor-core
    instructions it must show."""
    assert "mmkernels.quant.triton" in gate.TRITON_TARGET_MODULES
    from mmkernels.quant import triton as qt

    targets = qt.compile_targets((80, 90))
    int8 = [t for t in targets if t.kernel == "_w8a8_gemm_kernel" and t.constexprs["FP8"] is False]
    assert int8 and all(set(t.tensor_core_ops) == {"IMMA", "IGMMA"} for t in int8)
    fp8_90 = [t for t in targets if t.kernel == "_w8a8_gemm_kernel" and t.constexprs["FP8"] and t.capability == 90]
    assert fp8_90 and all(t.tensor_core_ops == ("QGMMA",) for t in fp8_90)


def test_nvcc_missing_is_skipped_not_passed(tmp_path):
    src = gate.nvcc_sources()
    if not src:
        pytest.skip("no csrc/cuda/*.cu")
    res = gate.compile_cuda_source(src[0], 80, str(tmp_path), nvcc=None) if shutil.which("nvcc") is None else None
    if res is None:  # nvcc present: simulate its absence
        old = os.environ["PATH"]
        os.environ["PATH"] = ""
        try:
            res = gate.compile_cuda_source(src[0], 80, str(tmp_path))
        finally:
            os.environ["PATH"] = old
    assert res.status == "SKIPPED" and not res.failed


# ----------------------------------------------------------------------------------------------
# merge_attention_states (CUDA runtime; needs a GPU and the built mmkernels._cuda extension)
# ----------------------------------------------------------------------------------------------
def merge_attention_states_reference(o1, lse1, o2, lse2):
    """float64: lse = logaddexp(lse1, lse2); o = o1 exp(lse1 - lse) + o2 exp(lse2 - lse); both -inf -> 0."""
    o1, o2, lse1, lse2 = o1.double(), o2.double(), lse1.double(), lse2.double()
    lse = torch.logaddexp(lse1, lse2)
    dead = torch.isneginf(lse)
    safe = lse.masked_fill(dead, 0)
    w1 = torch.exp(lse1 - safe).masked_fill(dead, 0)[..., None]
    w2 = torch.exp(lse2 - safe).masked_fill(dead, 0)[..., None]
    o = torch.where(w1 > 0, o1 * w1, 0) + torch.where(w2 > 0, o2 * w2, 0)
    return o, lse


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_merge_attention_states_gpu(dtype):
    _cuda = pytest.importorskip("mmkernels._cuda", reason="CUDA extension not built")  # noqa: F841
    rows, H, D = 37, 5, 72
    g = torch.Generator().manual_seed(0)
    # strided: (rows, H, D) views of (H, rows, D) storage
    o1 = torch.randn(H, rows, D, generator=g).to(dtype).transpose(0, 1).cuda()
    o2 = torch.randn(rows, H, 2 * D, generator=g).to(dtype)[..., ::2].cuda()
    lse1 = (torch.randn(rows, H, generator=g) * 3).cuda()
    lse2 = (torch.randn(H, rows, generator=g) * 3).t().cuda()
    lse1[0, :] = -math.inf  # part 1 empty
    lse2[1, :] = -math.inf  # part 2 empty
    lse1[2, :] = -math.inf  # both empty
    lse2[2, :] = -math.inf
    o1[0] = float("nan")  # an empty part's output is never read
    o, lse = torch.ops.mmkernels_cuda.merge_attention_states(o1, lse1, o2, lse2)
    ref_o, ref_lse = merge_attention_states_reference(o1.cpu(), lse1.cpu(), o2.cpu(), lse2.cpu())
    tol = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}[dtype]
    assert not torch.isnan(o).any()
    torch.testing.assert_close(o.cpu().double(), ref_o, atol=tol, rtol=tol)
    torch.testing.assert_close(lse.cpu().double(), ref_lse, atol=1e-5, rtol=1e-5)
    assert torch.all(o[2] == 0) and torch.all(torch.isneginf(lse[2]))
