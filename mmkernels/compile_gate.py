"""GPU compile gate: build every GPU kernel for sm_80 and sm_90 without a GPU and check its resources.

    python -m mmkernels.compile_gate          # exit status 0 = pass
    from mmkernels.compile_gate import run_gate; run_gate(verbose=True) -> bool

Two parts:

1. Triton: every target of ``compile_targets()`` in ``mmkernels.attention.triton``,
   ``mmkernels.reduce.triton`` and ``mmkernels.quant.triton`` (see TRITON_TARGET_MODULES) is
   AOT-compiled with
   ``triton.compile(ASTSource(fn, signature, constexprs, attrs), target=GPUTarget("cuda", cc, 32),
   options={num_warps, num_stages})``. The cubin goes through Triton's bundled ``cuobjdump``:
   ``--dump-resource-usage`` gives registers, STACK / LOCAL (bytes of local memory = register spills) and
   static shared memory; ``--dump-sass`` shows whether tensor-core instructions were emitted (HMMA on
   sm_80; HGMMA (wgmma) or HMMA on sm_90; for int8 dots IMMA / IGMMA, for fp8 dots QGMMA: a target
   names the ones it accepts in ``tensor_core_ops``). Dynamic shared memory is ``metadata.shared``.
2. nvcc: every ``csrc/cuda/*.cu`` is compiled stand-alone for sm_80 and sm_90a with ``-Xptxas -v``;
   the per-function "bytes spill stores/loads" lines are parsed. No nvcc on PATH -> that part is
   reported as SKIPPED (which is not a pass of that part, but does not fail the gate).

A target fails on a compile error, any spill, shared memory beyond the GPU's per-block limit, or a
missing tensor-core instruction in a kernel whose dots must use them (fp16 / bf16 / tf32, int8,
fp8). Compiles run in two worker processes (fresh interpreters without ``TRITON_INTERPRET``, so
kernels compile rather than interpret).
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import dataclasses
import glob
import pickle
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from typing import Dict, List, Optional

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The CUDA sources: csrc/ of a checkout, or the copy an installed wheel carries (mmkernels/_csrc,
# written by setup.py's build_py).
CSRC_DIR = next(
    (
        d
        for d in (os.path.join(REPO_ROOT, "csrc"), os.path.join(os.path.dirname(os.path.abspath(__file__)), "_csrc"))
        if os.path.isdir(os.path.join(d, "cuda"))
    ),
    os.path.join(REPO_ROOT, "csrc"),
)
CUDA_SRC_DIR = os.path.join(CSRC_DIR, "cuda")
NVCC_ARCHES = {80: ["-arch=sm_80"], 90: ["-gencode", "arch=compute_90a,code=sm_90a"]}
# Largest dynamic shared memory one block may use (opt-in), bytes.
SMEM_LIMIT = {80: 163 * 1024, 90: 227 * 1024}
WORKERS = 2


@dataclass
class GateResult:
    kernel: str
    variant: str
    cc: int
    registers: Optional[int] = None
    shared: Optional[int] = None  # bytes: metadata.shared (Triton) / static smem (nvcc)
    spill: Optional[int] = None  # bytes: STACK + LOCAL (Triton) / spill stores + loads (nvcc)
    tensor_cores: Optional[str] = None  # "HMMA" / "HGMMA" / "no" / "-" (not required)
    status: str = "ok"  # ok | FAIL | SKIPPED
    detail: str = ""
    seconds: float = 0.0
    extra: Dict[str, object] = field(default_factory=dict)

    @property
    def failed(self) -> bool:
        return self.status == "FAIL"


# ----------------------------------------------------------------------------------------------
# Parsers (pure functions, unit-tested on synthetic text)
# ----------------------------------------------------------------------------------------------
_RES_RE = re.compile(r"Function\s+(\S+?):\s*\n\s*REG:(\d+)\s+STACK:(\d+)\s+SHARED:(\d+)\s+LOCAL:(\d+)")


def parse_resource_usage(text: str) -> Dict[str, Dict[str, int]]:
    """``cuobjdump --dump-resource-usage`` -> {function: {reg, stack, shared, local}}."""
    out = {}
    for m in _RES_RE.finditer(text):
        out[m.group(1)] = dict(
            reg=int(m.group(2)), stack=int(m.group(3)), shared=int(m.group(4)), local=int(m.group(5))
        )
    return out


def cuobjdump_spill_bytes(text: str) -> int:
    """Total STACK + LOCAL bytes over all functions of a resource-usage dump (> 0 means spills)."""
    return sum(r["stack"] + r["local"] for r in parse_resource_usage(text).values())


# Tensor-core SASS mnemonics: Hopper wgmma (HGMMA fp16 / bf16 / tf32, IGMMA int8, QGMMA fp8) and
# mma.sync (HMMA fp16 / bf16 / tf32, IMMA int8), in the order tensor_core_ops reports them.
TENSOR_CORE_OPS = ("HGMMA", "QGMMA", "IGMMA", "HMMA", "IMMA")


def tensor_core_op_set(sass: str) -> set:
    """Every tensor-core mnemonic of TENSOR_CORE_OPS present in a SASS dump."""
    return {op for op in TENSOR_CORE_OPS if re.search(rf"\b{op}\.", sass)}


def tensor_core_ops(sass: str) -> str:
    """The first of 'HGMMA', 'QGMMA', 'IGMMA', 'HMMA', 'IMMA' found in a SASS dump, or 'no'."""
    found = tensor_core_op_set(sass)
    return next((op for op in TENSOR_CORE_OPS if op in found), "no")


_PTXAS_FN_RE = re.compile(r"Compiling entry function '([^']+)' for '(sm_\w+)'")
_PTXAS_SPILL_RE = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
_PTXAS_REGS_RE = re.compile(r"Used (\d+) registers")
_PTXAS_SMEM_RE = re.compile(r"(\d+) bytes smem")


def parse_ptxas_verbose(text: str) -> List[Dict[str, object]]:
    """``nvcc -Xptxas -v`` output -> [{function, arch, registers, smem, stack, spill_stores, spill_loads}].

    ptxas prints, per entry function: "Compiling entry function 'F' for 'sm_XX'", then
    "Function properties for F" / "N bytes stack frame, S bytes spill stores, L bytes spill loads",
    then "Used R registers, ... B bytes smem ...". Lines are attributed to the last function named.
    """
    funcs: List[Dict[str, object]] = []
    cur: Optional[Dict[str, object]] = None
    for line in text.splitlines():
        m = _PTXAS_FN_RE.search(line)
        if m:
            cur = dict(
                function=m.group(1), arch=m.group(2), registers=None, smem=0, stack=0, spill_stores=0, spill_loads=0
            )
            funcs.append(cur)
            continue
        if cur is None:
            continue
        m = _PTXAS_SPILL_RE.search(line)
        if m:
            cur["stack"], cur["spill_stores"], cur["spill_loads"] = (int(g) for g in m.groups())
        m = _PTXAS_REGS_RE.search(line)
        if m:
            cur["registers"] = int(m.group(1))
            s = _PTXAS_SMEM_RE.search(line)
            if s:
                cur["smem"] = int(s.group(1))
    return funcs


def ptxas_spill_bytes(text: str) -> int:
    return sum(int(f["spill_stores"]) + int(f["spill_loads"]) for f in parse_ptxas_verbose(text))


# ----------------------------------------------------------------------------------------------
# Triton part
# ----------------------------------------------------------------------------------------------
def _triton_bin(name: str) -> str:
    import triton

    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name)


# Modules whose ``compile_targets(capabilities)`` list the Triton kernel variants to build.
TRITON_TARGET_MODULES = ("mmkernels.attention.triton", "mmkernels.reduce.triton", "mmkernels.quant.triton")


def collect_triton_targets(capabilities=(80, 90)) -> list:
    """Every Triton compile target of every module in TRITON_TARGET_MODULES."""
    import importlib

    targets = []
    for name in TRITON_TARGET_MODULES:
        targets += importlib.import_module(name).compile_targets(capabilities)
    return targets


def compile_triton_target(target, workdir: str) -> GateResult:
    """AOT-compile one CompileTarget and inspect its cubin (runs inside a worker process)."""
    import triton
    from triton.backends.compiler import GPUTarget

    short = target.kernel.strip("_").replace("attn_", "").replace("_kernel", "")
    label = getattr(target, "label", "") or (
        f"{target.dtype} {target.variant} "
        f"{target.constexprs['BLOCK_M']}x{target.constexprs['BLOCK_N']}"
        f" w{target.num_warps}s{target.num_stages}"
    )
    res = GateResult(kernel=short, variant=label, cc=target.capability)
    t0 = time.time()
    try:
        src = triton.compiler.ASTSource(target.resolve(), target.signature, target.constexprs, target.attrs)
        compiled = triton.compile(
            src,
            target=GPUTarget("cuda", target.capability, 32),
            options=dict(num_warps=target.num_warps, num_stages=target.num_stages),
        )
    except Exception as exc:  # a compile error fails the gate
        res.status, res.detail = "FAIL", f"compile error: {type(exc).__name__}: {str(exc)[-400:]}"
        res.seconds = time.time() - t0
        return res
    res.seconds = time.time() - t0
    cubin = os.path.join(
        workdir, f"{target.kernel}_{target.dtype}_{target.variant}_sm{target.capability}_{os.getpid()}.cubin"
    )
    with open(cubin, "wb") as f:
        f.write(compiled.asm["cubin"])
    cuobjdump = _triton_bin("cuobjdump")
    usage = subprocess.run([cuobjdump, "--dump-resource-usage", cubin], capture_output=True, text=True)
    sass = subprocess.run([cuobjdump, "--dump-sass", cubin], capture_output=True, text=True)
    funcs = parse_resource_usage(usage.stdout)
    if usage.returncode != 0 or not funcs:
        res.status, res.detail = "FAIL", f"cuobjdump failed: {usage.stderr.strip()[-300:]}"
        return res
    res.registers = max(r["reg"] for r in funcs.values())
    res.spill = cuobjdump_spill_bytes(usage.stdout)
    res.shared = int(compiled.metadata.shared) + max(r["shared"] for r in funcs.values())
    tc = tensor_core_ops(sass.stdout)
    wanted = tuple(getattr(target, "tensor_core_ops", ()) or ("HMMA", "HGMMA"))
    found = tensor_core_op_set(sass.stdout)
    if target.needs_tensor_cores and found & set(wanted):
        tc = next(op for op in TENSOR_CORE_OPS if op in found and op in wanted)
    res.tensor_cores = tc if target.needs_tensor_cores else (tc if tc != "no" else "-")
    problems = []
    if res.spill:
        problems.append(f"spills {res.spill} B (STACK+LOCAL)")
    if res.shared > SMEM_LIMIT[target.capability]:
        problems.append(f"shared memory {res.shared} B > {SMEM_LIMIT[target.capability]} B")
    if target.needs_tensor_cores and not found & set(wanted):
        problems.append(
            f"no tensor-core instruction ({' / '.join(wanted)}) in a dot kernel "
            f"(found: {', '.join(sorted(found)) or 'none'})"
        )
    if problems:
        res.status, res.detail = "FAIL", "; ".join(problems)
    return res


def _triton_worker(in_path: str, out_path: str) -> None:
    """Worker-process entry: compile the pickled targets in ``in_path``, pickle results to ``out_path``."""
    with open(in_path, "rb") as f:
        targets, workdir = pickle.load(f)
    results = [dataclasses.asdict(compile_triton_target(t, workdir)) for t in targets]
    with open(out_path, "wb") as f:
        pickle.dump(results, f)


def _run_triton_chunk(targets, workdir: str, index: int) -> List[GateResult]:
    """Compile a share of the targets in a fresh interpreter (no TRITON_INTERPRET, repo on sys.path).

    A fresh ``python -m mmkernels.compile_gate --worker`` process rather than multiprocessing: it
    neither re-imports the caller's __main__ (spawn) nor forks a process holding threads.
    """
    in_path = os.path.join(workdir, f"chunk{index}.in.pkl")
    out_path = os.path.join(workdir, f"chunk{index}.out.pkl")
    with open(in_path, "wb") as f:
        pickle.dump((list(targets), workdir), f)
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)
    env["PYTHONPATH"] = REPO_ROOT + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    proc = subprocess.run(
        [sys.executable, "-m", "mmkernels.compile_gate", "--worker", in_path, out_path],
        capture_output=True,
        text=True,
        env=env,
        cwd=REPO_ROOT,
    )
    if proc.returncode != 0 or not os.path.exists(out_path):
        detail = f"worker crashed (rc {proc.returncode}): {(proc.stdout + proc.stderr).strip()[-600:]}"
        return [
            GateResult(kernel=t.kernel, variant=f"{t.dtype} {t.variant}", cc=t.capability, status="FAIL", detail=detail)
            for t in targets
        ]
    with open(out_path, "rb") as f:
        return [GateResult(**r) for r in pickle.load(f)]


# ----------------------------------------------------------------------------------------------
# nvcc part
# ----------------------------------------------------------------------------------------------
def nvcc_sources() -> List[str]:
    return sorted(glob.glob(os.path.join(CUDA_SRC_DIR, "*.cu")))


def compile_cuda_source(path: str, cc: int, workdir: str, nvcc: Optional[str] = None) -> GateResult:
    name = os.path.basename(path)
    res = GateResult(kernel=name, variant="nvcc -O3", cc=cc, tensor_cores="-")
    nvcc = nvcc or shutil.which("nvcc")
    if nvcc is None:
        res.status, res.detail = "SKIPPED", "nvcc not on PATH"
        return res
    obj = os.path.join(workdir, f"{name}.sm{cc}.o")
    cmd = [
        nvcc,
        "-c",
        "-O3",
        "-std=c++17",
        *NVCC_ARCHES[cc],
        "-Xptxas",
        "-v",
        "-Werror",
        "all-warnings",
        "-Xcompiler",
        "-Wall",
        "-I",
        CSRC_DIR,
        path,
        "-o",
        obj,
    ]
    t0 = time.time()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    res.seconds = time.time() - t0
    text = proc.stdout + proc.stderr
    funcs = parse_ptxas_verbose(text)
    res.extra["functions"] = funcs
    if funcs:
        res.registers = max(int(f["registers"] or 0) for f in funcs)
        res.shared = max(int(f["smem"]) for f in funcs)
        res.spill = ptxas_spill_bytes(text)
    problems = []
    if proc.returncode != 0:
        problems.append("nvcc error: " + text.strip()[-600:])
    if res.spill:
        bad = [f["function"] for f in funcs if int(f["spill_stores"]) + int(f["spill_loads"])]
        problems.append(f"spills {res.spill} B in {', '.join(bad)}")
    if proc.returncode == 0 and not funcs:
        problems.append("no entry function in ptxas output (empty .cu?)")
    if problems:
        res.status, res.detail = "FAIL", "; ".join(problems)
    res.variant = f"nvcc -O3 ({len(funcs)} fn)"
    return res


# ----------------------------------------------------------------------------------------------
# Driver
# ----------------------------------------------------------------------------------------------
def format_table(results: List[GateResult]) -> str:
    head = ("kernel", "variant", "cc", "regs", "smem B", "spill B", "tensor cores", "status", "s")
    rows = [head]
    for r in results:
        rows.append(
            (
                r.kernel,
                r.variant,
                f"sm_{r.cc}",
                "-" if r.registers is None else str(r.registers),
                "-" if r.shared is None else str(r.shared),
                "-" if r.spill is None else str(r.spill),
                r.tensor_cores or "-",
                r.status + (f": {r.detail}" if r.detail else ""),
                f"{r.seconds:.1f}",
            )
        )
    widths = [max(len(row[i]) for row in rows[:]) if i != 7 else len(head[7]) for i in range(len(head))]
    lines = []
    for row in rows:
        cells = [c.ljust(w) if i != 7 else c for i, (c, w) in enumerate(zip(row, widths))]
        lines.append("  ".join(cells).rstrip())
    lines.insert(1, "-" * min(160, sum(widths) + 2 * len(widths)))
    return "\n".join(lines)


def run_gate(verbose: bool = True, capabilities=(80, 90), workers: int = WORKERS, triton_targets=None) -> bool:
    """Compile everything; print the table when verbose; True when nothing failed."""
    t0 = time.time()
    results: List[GateResult] = []
    try:
        import triton  # noqa: F401

        have_triton = True
    except Exception as exc:  # pragma: no cover
        have_triton = False
        results.append(GateResult("triton", "-", 0, status="FAIL", detail=f"triton not importable: {exc}"))

    with tempfile.TemporaryDirectory(prefix="mmk_gate_") as workdir:
        futures = []
        # One thread per worker process (each compiles an interleaved share of the targets); the
        # nvcc builds queue behind them on the same two threads.
        with cf.ThreadPoolExecutor(max_workers=workers) as threads:
            if have_triton:
                if triton_targets is None:
                    triton_targets = collect_triton_targets(capabilities)
                # heaviest first so the two shares finish together (the attention kernels, by head dim)
                order = sorted(triton_targets, key=lambda t: -t.constexprs.get("BLOCK_D", 0))
                futures += [threads.submit(_run_triton_chunk, order[i::workers], workdir, i) for i in range(workers)]
            nvcc = shutil.which("nvcc")
            for src in nvcc_sources():
                for cc in capabilities:
                    futures.append(threads.submit(compile_cuda_source, src, cc, workdir, nvcc))
            for fut in futures:
                r = fut.result()
                results.extend(r if isinstance(r, list) else [r])

    if not nvcc_sources():
        results.append(GateResult("csrc/cuda/*.cu", "-", 0, status="SKIPPED", detail="no .cu files"))
    failed = [r for r in results if r.failed]
    skipped = [r for r in results if r.status == "SKIPPED"]
    if verbose:
        print(format_table(results))
        print(
            f"\n{len(results)} builds: {len(results) - len(failed) - len(skipped)} ok, {len(failed)} failed, "
            f"{len(skipped)} skipped in {time.time() - t0:.0f} s"
        )
        for r in skipped:
            print(f"SKIPPED (not passed): {r.kernel} sm_{r.cc}: {r.detail}")
        print("compile gate:", "FAIL" if failed else "PASS")
    return not failed


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--worker"]:
        _triton_worker(argv[1], argv[2])
        return 0
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quiet", action="store_true")
    ap.add_argument("--cc", type=int, action="append", help="only these capabilities (80, 90)")
    ap.add_argument("--workers", type=int, default=WORKERS)
    args = ap.parse_args(argv)
    ok = run_gate(verbose=not args.quiet, capabilities=tuple(args.cc or (80, 90)), workers=args.workers)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
