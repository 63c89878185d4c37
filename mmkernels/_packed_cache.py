"""The cache of prepacked weight layouts that the CPU backends build from users' tensors.

A custom op receives a weight's plain tensors on every call (a module cannot cross the op
boundary), so the layouts its kernels read (qmatmul's VNNI-blocked / weight-only strips,
``mmkernels.linear``'s fp32 panels) are built once and kept here, keyed weakly on the weight tensor
object (an entry dies with its weight), one entry per ``kind`` of layout. An entry remembers the
version counters, data pointer, shape and strides of the weight and the identities and version
counters of its companions (qmatmul's scales / zeros); an in-place change of any of them
(``copy_``, ``load_state_dict``, ...) rebuilds it on the next call. Writes that bypass the version
counter are not seen: through ``.data`` (``p.data.mul_(2)``, ``weight.data += delta`` as LoRA merges
do: ``.data`` is a tensor with its own counter), ``.numpy()`` (or an array it came from via
``torch.from_numpy``), DLPack, raw pointers, shared memory written by another process, and any
in-place change of a tensor created under ``torch.inference_mode()`` (no version counter).
``mmkernels.clear_caches()`` drops everything after such a write.
"""

from __future__ import annotations

import threading
import weakref
from typing import Callable, Dict, Optional, Sequence, Tuple

from torch import Tensor

# id(weight) -> (weak reference to weight, {kind: entry}). A plain dict read without the lock
# (a dict lookup is atomic): torch's WeakIdKeyDictionary built a reference object per lookup,
# ~1 us of a ~25 us small W8A8 call. The reference's callback drops the slot when its weight dies;
# the identity check on hit guards against a new tensor reusing a dead one's id before that.
_CACHE: Dict[int, tuple] = {}
_LOCK = threading.Lock()


def version(t: Optional[Tensor]):
    """``t``'s autograd version counter; None for None and for inference tensors (they have none:
    reading it raises, ~5 us a call, so this asks first)."""
    if t is None or t.is_inference():
        return None
    return t._version


def _stamp(weight: Tensor, companions: Sequence[Optional[Tensor]]) -> tuple:
    """What must be unchanged for a cache entry to stay valid."""
    return (
        version(weight),
        tuple(version(t) for t in companions),
        weight.data_ptr(),
        tuple(weight.shape),
        tuple(weight.stride()),
    )


def _entries(weight: Tensor) -> Optional[dict]:
    slot = _CACHE.get(id(weight))
    return slot[1] if slot is not None and slot[0]() is weight else None


def _forget(key: int, ref: weakref.ref) -> None:
    # No lock: a weight can die (and this run) anywhere, even inside a `with _LOCK` block. A race
    # with a new slot for a reused id can only drop that slot: a cache miss, never a wrong hit.
    slot = _CACHE.get(key)
    if slot is not None and slot[0] is ref:
        _CACHE.pop(key, None)


def _same(refs: tuple, companions: Sequence[Optional[Tensor]]) -> bool:
    return len(refs) == len(companions) and all(
        (r is None and t is None) or (r is not None and r() is t) for r, t in zip(refs, companions)
    )


def packed(
    weight: Tensor,
    kind: str,
    companions: Sequence[Optional[Tensor]],
    build: Callable[[], Tuple[Tensor, ...]],
) -> Tuple[Tensor, ...]:
    """The ``kind`` layout of ``weight`` (with its ``companions``), built by ``build()`` on a miss."""
    stamp = _stamp(weight, companions)
    entries = _entries(weight)
    hit = entries.get(kind) if entries is not None else None
    if hit is not None:
        refs, old_stamp, tensors = hit
        if old_stamp == stamp and _same(refs, companions):
            return tensors
    tensors = build()
    refs = tuple(weakref.ref(t) if t is not None else None for t in companions)
    key = id(weight)
    with _LOCK:
        entries = _entries(weight)
        if entries is None:
            entries = {}
            _CACHE[key] = (weakref.ref(weight, lambda ref, key=key: _forget(key, ref)), entries)
        entries[kind] = (refs, stamp, tensors)
    return tensors


def forget(weight: Tensor) -> None:
    """Drop ``weight``'s entries (``mmkernels.unpatch``: the restored layers need no packed copy)."""
    with _LOCK:
        if _entries(weight) is not None:
            _CACHE.pop(id(weight), None)


def is_cached(weight: Tensor) -> bool:
    """Whether ``weight`` has a prepacked layout in the cache now."""
    return _entries(weight) is not None


def clear() -> None:
    """Drop every cached prepacked weight (rebuilt on the next call)."""
    with _LOCK:
        _CACHE.clear()


def size() -> int:
    """Number of weights with a cached prepacked layout (for tests)."""
    with _LOCK:
        return len(_CACHE)


def clear_caches() -> None:
    """Drop every cache mmkernels keeps of data derived from your tensors; exported as
    ``mmkernels.clear_caches()``. Today that is the prepacked weights of the CPU backends of
    ``qmatmul`` and ``linear`` (rebuilt on the next call, a one-off cost per weight).

    Why it exists: a cached entry is reused while its weight tensors keep their identity, data
    pointer and autograd version counter (``tensor._version``), which every in-place torch op
    (``copy_``, ``mul_``, ``load_state_dict``, ...) bumps. Writes that bypass the version counter
    are invisible to the cache, and the next call would compute with the old weight:

    * through ``.data`` (``layer.weight.data.mul_(2)``, ``weight.data += delta``: ``.data`` has
      its own version counter), which is how some libraries merge adapters (LoRA) into a weight;
    * through ``.numpy()`` (``qweight.numpy()[...] = ...``), or a NumPy array the tensor shares
      memory with (``torch.from_numpy``), DLPack, ``data_ptr()`` / ctypes, or shared memory
      written by another process;
    * any in-place change of a tensor created under ``torch.inference_mode()`` (it has no
      version counter).

    Call ``mmkernels.clear_caches()`` after such a write. Thread-safe; never needed after torch
    in-place ops or ``load_state_dict``.
    """
    clear()
