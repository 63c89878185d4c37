"""Calibrated auto-selection: time two backends on this machine once, remember the faster.

Where a CPU class has no measurement behind its auto-selection rule (see :func:`setting`), the
``torch`` backends' rules ask :func:`decide` instead: it runs each contender (zero-argument
callables on a synthetic problem of the call's size bucket, never the user's tensors) once to warm
up, then in interleaved rounds until about ``BUDGET_S`` is spent (at least ``MIN_ROUNDS`` unless
that takes ``HARD_CAP_S``), and takes the best (minimum) time of each: the least disturbed run of a
noisy machine. The faster contender wins, except that the one the caller prefers (torch: the
library everyone runs, the safe choice) wins when it is within ``TIE`` of the fastest.

Decisions are cached per process and persisted per machine as JSON under ``MMKERNELS_CACHE_DIR``
(default ``~/.cache/mmkernels``), in ``calibration-<hash>.json`` where the hash is of the
:func:`fingerprint` (CPU model, vendor, ISA flags, core count, torch threads, torch and mmkernels
versions, the extension's ISA paths), which the file repeats and is checked against. A missing,
corrupt or foreign file is ignored and rewritten (temporary file + ``os.replace``); an unwritable
directory leaves the decisions in memory only.

``MMKERNELS_CALIBRATE=0`` turns calibration off (the class rules decide), ``=1`` turns it on on
every CPU class; read when a call's backend is first selected (selections are cached per call).
By default calibration is on wherever the class rules rest on no measurement: everywhere but
AMD AVX-512 CPUs (Zen 4 / 5, where they were measured): AMX (our AMX tile kernels never ran on AMX
hardware), Intel AVX-512 without AMX, AVX2 and scalar CPUs. Nothing is calibrated while tracing or
compiling: the class rule decides there.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List, Mapping, Optional, Tuple

import torch

from . import _dispatch, _extension
from ._version import __version__

FORMAT = 1  # of the JSON file
BUDGET_S = 0.2  # timing per decision, warm-up included
HARD_CAP_S = 1.0  # no round starts after this (a contender slower than ~0.3 s gets one)
MIN_ROUNDS = 3
MAX_ROUNDS = 25
TIE = 0.05  # within 5% of the fastest, the preferred contender wins
SIZE_CAP = 4096  # sizes are bucketed to powers of two up to this

# ISA flags that decide which kernels run (ours and oneDNN's), for the fingerprint.
_FLAGS = (
    "avx2",
    "fma",
    "f16c",
    "avx512f",
    "avx512_bf16",
    "avx512_vnni",
    "avx512_fp16",
    "avx_vnni",
    "amx_tile",
    "amx_bf16",
    "amx_int8",
    "amx_fp16",
)
# The extension's per-family ISA path ops (MMKERNELS_CPU_ISA may change them at run time).
_ISA_OPS = {"attention": "cpu_isa", "qmatmul": "qmatmul_cpu_isa"}

_clock = time.perf_counter  # tests replace it


@dataclass(frozen=True)
class Decision:
    """The outcome of one calibration: ``winner`` among ``times_ms`` (best time per contender)."""

    op: str
    bucket: str
    winner: str
    times_ms: Mapping[str, float]
    why: str


_LOCK = threading.RLock()
_MEMORY: Dict[str, Dict[str, Decision]] = {}  # cache file path -> {key: decision}
_WRITE_ERRORS: Dict[str, str] = {}  # cache file path -> why it could not be written


def size_bucket(n: int, cap: int = SIZE_CAP) -> int:
    """``n`` rounded up to a power of two, at most ``cap``."""
    return min(cap, 1 << max(int(n) - 1, 0).bit_length())


def threads() -> int:
    """torch's intra-op thread count (synthetic problems grow with it)."""
    return max(1, torch.get_num_threads())


def gemm_problem(m: int, k: int, n: int, macs_per_thread: int) -> Tuple[int, int, int]:
    """(M, K, N) of the synthetic GEMM timed for a size bucket ``(m, k, n)``: N (down to about 256),
    then M (down to 16 when it is >= 16: the GEMM regime stays) halve until one run is about
    ``macs_per_thread`` multiply-adds per thread; K stays."""
    budget = macs_per_thread * threads()
    while n > 256 and m * k * n > budget:
        n = (n + 1) // 2
    while m > 16 and m * k * n > budget:
        m //= 2
    return m, k, n


def setting() -> Tuple[bool, str]:
    """Whether calibration is on, and why (``MMKERNELS_CALIBRATE``, else the CPU class: on wherever
    the class rules rest on no measurement of this kind of CPU, i.e. everywhere but AMD AVX-512)."""
    value = os.environ.get("MMKERNELS_CALIBRATE", "").strip().lower()
    if value in ("0", "false", "off", "no"):
        return False, "off (MMKERNELS_CALIBRATE=0): the CPU-class rules decide"
    if value in ("1", "true", "on", "yes"):
        return True, "on (MMKERNELS_CALIBRATE=1)"
    klass, vendor = _extension.cpu_class(), _extension.cpu_vendor()
    if klass == "avx512" and vendor == "amd":
        return (
            False,
            "off: the CPU-class rule is measured on AMD AVX-512 CPUs (Zen 4 / 5); MMKERNELS_CALIBRATE=1 forces it",
        )
    unmeasured = {
        "amx": "our AMX tile kernels never ran against oneDNN on AMX hardware",
        "avx512": f"the avx512 rule is measured on AMD Zen 4 / 5 only, this CPU's vendor is {vendor or 'unknown'}",
    }.get(klass, f"the {klass} rule was never measured")
    return True, f"on ({unmeasured}); MMKERNELS_CALIBRATE=0 turns it off"


_STATIC: Dict[str, object] = {}


def fingerprint() -> Dict[str, object]:
    """What the decisions depend on: the machine, the thread count, the versions, the ISA paths."""
    if not _STATIC:
        flags = _extension._cpu_flags()
        _STATIC.update(
            cpu=_extension.cpu_model(),
            vendor=_extension.cpu_vendor(),
            flags=[f for f in _FLAGS if f in flags],
            cores=os.cpu_count() or 0,
            torch=torch.__version__,
            mmkernels=__version__,
        )
    isa = {}
    for family, op in _ISA_OPS.items():
        ops = _extension.CPU.ops(op)
        isa[family] = getattr(ops, op)() if ops is not None else "unavailable"
    return {**_STATIC, "threads": threads(), "isa": isa}


def cache_dir() -> Path:
    return Path(os.environ.get("MMKERNELS_CACHE_DIR") or Path.home() / ".cache" / "mmkernels")


def cache_file(fp: Optional[Mapping[str, object]] = None) -> Path:
    """This machine's decision file (named by the fingerprint's hash)."""
    text = json.dumps(fp or fingerprint(), sort_keys=True)
    return cache_dir() / f"calibration-{hashlib.sha256(text.encode()).hexdigest()[:16]}.json"


def _read(path: Path, fp: Mapping[str, object]) -> Dict[str, Decision]:
    """The valid decisions of ``path`` for ``fp``; {} for a missing, corrupt or foreign file."""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):  # missing, unreadable, truncated, not JSON
        return {}
    if not isinstance(data, dict) or data.get("format") != FORMAT or data.get("fingerprint") != fp:
        return {}
    entries = data.get("decisions")
    out = {}
    for key, d in entries.items() if isinstance(entries, dict) else ():
        try:
            times = {str(n): float(t) for n, t in d["times_ms"].items()}
            decision = Decision(str(d["op"]), str(d["bucket"]), str(d["winner"]), times, str(d["why"]))
        except (TypeError, KeyError, ValueError, AttributeError):
            continue
        if decision.winner in times and all(math.isfinite(t) and t >= 0 for t in times.values()):
            out[key] = decision
    return out


def _write(path: Path, fp: Mapping[str, object], decisions: Mapping[str, Decision]) -> None:
    """Merge ``decisions`` into ``path`` (another process may have added some) atomically."""
    merged = {**_read(path, fp), **decisions}
    data = {
        "format": FORMAT,
        "fingerprint": fp,
        "decisions": {
            k: {"op": d.op, "bucket": d.bucket, "winner": d.winner, "times_ms": dict(d.times_ms), "why": d.why}
            for k, d in sorted(merged.items())
        },
    }
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=path.name, suffix=".tmp", dir=path.parent)
        try:
            with os.fdopen(fd, "w") as f:
                json.dump(data, f, indent=1)
            os.replace(tmp, path)
        except BaseException:
            os.unlink(tmp)
            raise
        _WRITE_ERRORS.pop(str(path), None)
    except OSError as exc:
        _WRITE_ERRORS[str(path)] = f"{type(exc).__name__}: {exc}"


def _decisions(path: Path, fp: Mapping[str, object]) -> Dict[str, Decision]:
    """This process's decisions for ``path``, loaded from the file the first time."""
    memory = _MEMORY.get(str(path))
    if memory is None:
        memory = _MEMORY[str(path)] = _read(path, fp)
    return memory


def _tracing() -> bool:
    if torch.compiler.is_compiling():
        return True
    try:
        from torch._guards import detect_fake_mode

        return detect_fake_mode() is not None
    except Exception:  # a torch without it
        return False


def _another_round(rounds: int, elapsed: float) -> bool:
    """At least one round; then more until ``BUDGET_S`` is spent (at least ``MIN_ROUNDS`` unless
    slow contenders reach ``HARD_CAP_S``), at most ``MAX_ROUNDS``."""
    if rounds == 0:
        return True
    if rounds >= MAX_ROUNDS:
        return False
    return elapsed < BUDGET_S or (rounds < MIN_ROUNDS and elapsed < HARD_CAP_S)


def _measure(contenders: Mapping[str, Callable[[], object]]) -> Tuple[Dict[str, float], Dict[str, str]]:
    """Best seconds per contender (one warm-up run each, then interleaved rounds), and the error
    of each that raised (it drops out)."""
    start = _clock()
    best = {name: math.inf for name in contenders}
    errors: Dict[str, str] = {}

    def run(name: str, timed: bool) -> None:
        t0 = _clock()
        try:
            contenders[name]()
        except Exception as exc:
            errors[name] = f"{type(exc).__name__}: {exc}"
            del best[name]
            return
        if timed:
            best[name] = min(best[name], _clock() - t0)

    for name in list(best):  # first-call costs (prepacking, oneDNN's JIT) stay out of the times
        run(name, timed=False)
    rounds = 0
    while best and _another_round(rounds, _clock() - start):
        for name in list(best) if rounds % 2 == 0 else list(best)[::-1]:
            if name in best:
                run(name, timed=True)
        rounds += 1
    return best, errors


def _choose(op: str, bucket: str, best: Mapping[str, float], errors: Mapping[str, str], prefer: str) -> Decision:
    fastest = min(best, key=best.get)
    winner = prefer if prefer in best and best[prefer] <= best[fastest] * (1 + TIE) else fastest
    times_ms = {n: round(t * 1e3, 4) for n, t in best.items()}
    timed = " vs ".join(f"{n} {times_ms[n]:.3g} ms" for n in sorted(best, key=best.get))
    why = f"calibrated on this machine: {timed} for {bucket}"
    if winner != fastest:
        why += f" (within {TIE:.0%}: {winner}, the safe choice)"
    if errors:
        why += "; failed: " + "; ".join(f"{n}: {e}" for n, e in errors.items())
    return Decision(op, bucket, winner, times_ms, why)


def decide(
    op: str, bucket: str, contenders: Callable[[], Mapping[str, Callable[[], object]]], prefer: str = "torch"
) -> Optional[Decision]:
    """The calibrated choice for ``(op, bucket)`` (``bucket``: a readable description of the size
    class, e.g. "bfloat16, D=64, Lq~256, Lk~256, B*H~128"), from the cache or by timing the
    contenders that ``contenders()`` makes; None when calibration is off, while tracing or
    compiling, or when every contender failed (the class rule decides then)."""
    if not setting()[0] or _tracing():
        return None
    with _LOCK:
        fp = fingerprint()
        path = cache_file(fp)
        memory = _decisions(path, fp)
        key = f"{op}: {bucket}"
        if key not in memory:
            with torch.no_grad():
                best, errors = _measure(contenders())
            if not best:
                return None
            memory[key] = _choose(op, bucket, best, errors, prefer)
            _write(path, fp, {key: memory[key]})
        return memory[key]


def cached() -> List[Decision]:
    """The decisions known for this machine (this process's and the file's), sorted by op, bucket."""
    with _LOCK:
        fp = fingerprint()
        path = cache_file(fp)
        both = {**_read(path, fp), **_decisions(path, fp)}
    return [both[k] for k in sorted(both)]


def write_error() -> str:
    """Why the decision file could not be written ("" when it could, or was never tried)."""
    return _WRITE_ERRORS.get(str(cache_file()), "")


def clear() -> None:
    """Forget this process's decisions (not the file), and the selections made from them."""
    with _LOCK:
        _MEMORY.clear()
        _WRITE_ERRORS.clear()
    _dispatch.clear_selection_cache()
