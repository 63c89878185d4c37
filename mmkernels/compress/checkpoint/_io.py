"""File helpers shared by the checkpoint formats: safetensors read/write with clear errors, JSON,
sha256 of a tensor's bytes, dtype names, int32 bit packing.

Reading never executes code: tensors come from safetensors files (a JSON header plus raw
little-endian bytes, parsed by the ``safetensors`` library), metadata from JSON. Nothing is
unpickled.

Reading stays inside the checkpoint: a file that is a symlink (or lies under a symlinked folder)
resolving outside its checkpoint folder is refused with a ValueError naming it. One layout is
allowed: the Hugging Face hub cache, where ``<repo>/snapshots/<revision>/<file>`` links to
``<repo>/blobs/<hash>`` of the same cached repository. JSON nested deeper than Python's parser
can follow (a RecursionError) is refused as a ValueError naming the file.
"""

from __future__ import annotations

import hashlib
import json
import os
from typing import Dict, Iterable, Optional

import torch
from torch import Tensor

from ..._describe import dtype_name

_DTYPES = {
    dtype_name(d): d
    for d in (
        torch.float64,
        torch.float32,
        torch.float16,
        torch.bfloat16,
        torch.float8_e4m3fn,
        torch.float8_e5m2,
        torch.int64,
        torch.int32,
        torch.int16,
        torch.int8,
        torch.uint8,
        torch.bool,
    )
}

# Bytes per element of each safetensors dtype code (the header's "dtype" field).
_ST_ITEMSIZE = {
    "F64": 8,
    "F32": 4,
    "F16": 2,
    "BF16": 2,
    "F8_E4M3": 1,
    "F8_E5M2": 1,
    "I64": 8,
    "I32": 4,
    "I16": 2,
    "I8": 1,
    "U8": 1,
    "BOOL": 1,
    "U16": 2,
    "U32": 4,
    "U64": 8,
}
_MAX_HEADER = 100 * 1024 * 1024


def dtype_from_name(name: str, where: str) -> torch.dtype:
    try:
        return _DTYPES[name]
    except (KeyError, TypeError):
        raise ValueError(f"{where}: unknown dtype {name!r}; expected one of {sorted(_DTYPES)}") from None


def describe(t: Tensor) -> str:
    return f"{dtype_name(t.dtype)}{list(t.shape)}"


def cast_float(t: Tensor, dtype: Optional[torch.dtype]) -> Tensor:
    """``t`` in ``dtype`` when both are floating (unquantized tensors stored smaller), else ``t``."""
    return t.to(dtype) if dtype is not None and t.is_floating_point() else t


def tensor_sha256(t: Tensor) -> str:
    """sha256 of the tensor's bytes in row-major order (what safetensors stores)."""
    flat = t.detach().cpu().contiguous().reshape(-1)
    return hashlib.sha256(flat.view(torch.uint8).numpy()).hexdigest()


# ---------------------------------------------------------------------------------------------
# JSON and safetensors
# ---------------------------------------------------------------------------------------------


def resolve_inside(path: str, root: Optional[str] = None) -> str:
    """The real path of the checkpoint file ``path``, refusing one that resolves (through
    symlinks) outside the checkpoint folder ``root`` (default: the folder ``path`` is in).

    Allowed: a checkpoint folder that is itself a symlink, links within the folder, and the
    Hugging Face hub cache layout (``<repo>/snapshots/<rev>/<file>`` -> ``<repo>/blobs/<hash>``).
    Read the returned path, not ``path``, so that the file checked is the file read.
    """
    root = os.path.dirname(os.path.abspath(path)) if root is None else root
    real_root = os.path.realpath(root)
    real = os.path.realpath(path)
    if _within(real, real_root):
        return real
    snapshots = os.path.dirname(real_root)
    if os.path.basename(snapshots) == "snapshots" and _within(real, os.path.join(os.path.dirname(snapshots), "blobs")):
        return real
    raise ValueError(
        f"{path}: resolves to {real}, outside the checkpoint folder {real_root} "
        f"(a symlink leading out of the checkpoint); refusing to read it. Copy the "
        f"file into the checkpoint folder if it is meant to be there"
    )


def _within(path: str, folder: str) -> bool:
    return os.path.commonpath([path, folder]) == folder


def _parse_json(text, path: str, what: str = "not valid JSON"):
    try:
        return json.loads(text)
    except RecursionError:
        raise ValueError(
            f"{path}: {what} (nested too deeply to parse; a checkpoint's JSON is a few levels deep)"
        ) from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: {what} ({e})") from None


def read_json(path: str, root: Optional[str] = None) -> dict:
    """The JSON object in ``path`` (a file of the checkpoint folder ``root``, default its own
    folder: see :func:`resolve_inside`). ValueError naming the file when it is missing, leads
    out of the checkpoint, is not valid UTF-8 JSON, is nested too deeply, or is not an object."""
    if not os.path.isfile(path):
        raise ValueError(f"{path}: file not found")
    real = resolve_inside(path, root)
    try:
        with open(real, encoding="utf-8") as f:
            text = f.read()
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None
    data = _parse_json(text, path)
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a JSON object at the top level, got {type(data).__name__}")
    return data


def write_json(path: str, data: dict) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=2, sort_keys=False)
        f.write("\n")


def save_tensors(tensors: Dict[str, Tensor], path: str, metadata: Optional[Dict[str, str]] = None) -> None:
    """Write ``tensors`` (copied to contiguous CPU memory, so views and tied tensors are fine)."""
    from safetensors.torch import save_file

    out = {k: v.detach().cpu().contiguous().clone() for k, v in tensors.items()}
    save_file(out, path, metadata=metadata)


def check_safetensors_file(path: str, root: Optional[str] = None) -> dict:
    """Parse the header of a safetensors file and check the file holds every byte it describes.

    Returns the header (tensor name -> {dtype, shape, data_offsets}). Raises ValueError naming the
    file for a missing, truncated or malformed file, or one leading out of the checkpoint folder
    ``root`` (default: its own folder; see :func:`resolve_inside`).
    """
    if not os.path.isfile(path):
        raise ValueError(f"{path}: file not found")
    real = resolve_inside(path, root)
    size = os.path.getsize(real)
    with open(real, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise ValueError(f"{path}: truncated safetensors file ({size} bytes; the 8-byte header length is missing)")
        n = int.from_bytes(head, "little")
        if n > _MAX_HEADER or 8 + n > size:
            raise ValueError(
                f"{path}: truncated or corrupt safetensors file: the header claims "
                f"{n} bytes but the file has {size} bytes in all"
            )
        try:
            text = f.read(n).decode("utf-8")
        except UnicodeDecodeError as e:
            raise ValueError(f"{path}: corrupt safetensors header ({e})") from None
        header = _parse_json(text, path, "corrupt safetensors header")
    if not isinstance(header, dict):
        raise ValueError(f"{path}: corrupt safetensors header (not a JSON object)")
    end = 0
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            begin, stop = (int(v) for v in info["data_offsets"])
            numel = 1
            for d in info["shape"]:
                numel *= int(d)
            itemsize = _ST_ITEMSIZE[info["dtype"]]
        except (KeyError, TypeError, ValueError):
            raise ValueError(f"{path}: corrupt safetensors header entry for tensor {name!r}: {info!r}") from None
        if stop - begin != numel * itemsize:
            raise ValueError(
                f"{path}: tensor {name!r} spans {stop - begin} bytes but its "
                f"{info['dtype']}{info['shape']} needs {numel * itemsize}"
            )
        end = max(end, stop)
    if size < 8 + n + end:
        raise ValueError(
            f"{path}: truncated safetensors file: {size} bytes, but its header "
            f"describes {8 + n + end} bytes of header and tensor data"
        )
    return header


def load_tensors(path: str, root: Optional[str] = None) -> Dict[str, Tensor]:
    """Every tensor of a safetensors file, on the CPU (checked by :func:`check_safetensors_file`
    first, which also refuses a file leading out of the checkpoint folder ``root``)."""
    check_safetensors_file(path, root)
    from safetensors.torch import load_file

    try:
        return load_file(resolve_inside(path, root), device="cpu")
    except Exception as e:  # safetensors raises its own error type; name the file
        raise ValueError(f"{path}: cannot read the safetensors file ({e})") from None


def load_checkpoint_tensors(directory: str) -> Dict[str, Tensor]:
    """Tensors of a Hugging Face style checkpoint directory: ``model.safetensors``, or the shards
    listed by ``model.safetensors.index.json``."""
    single = os.path.join(directory, "model.safetensors")
    index = os.path.join(directory, "model.safetensors.index.json")
    if os.path.isfile(single):
        return load_tensors(single, directory)
    if os.path.isfile(index):
        weight_map = read_json(index, directory).get("weight_map")
        if not isinstance(weight_map, dict):
            raise ValueError(f"{index}: expected a 'weight_map' object")
        tensors: Dict[str, Tensor] = {}
        for shard in sorted(set(weight_map.values())):
            if os.path.basename(shard) != shard:
                raise ValueError(f"{index}: shard name {shard!r} must be a file name in the checkpoint directory")
            tensors.update(load_tensors(os.path.join(directory, shard), directory))
        missing = sorted(set(weight_map) - set(tensors))
        if missing:
            raise ValueError(f"{index}: tensors listed but absent from the shards: {missing[:8]}")
        return tensors
    raise ValueError(f"{directory}: no model.safetensors (or model.safetensors.index.json) found")


# ---------------------------------------------------------------------------------------------
# int32 bit packing (GPTQ qweight / qzeros, compressed-tensors weight_packed / weight_zero_point)
# ---------------------------------------------------------------------------------------------


def pack_int32(values: Tensor, bits: int, dim: int) -> Tensor:
    """Pack unsigned ``bits``-bit integers along ``dim`` into int32 words, ``32 // bits`` per word:
    value ``i`` of each run goes to bits ``[i * bits, (i + 1) * bits)`` (lowest bits first). The
    word's 32-bit pattern is stored as a two's complement int32."""
    per = 32 // bits
    v = values.to(torch.int64).movedim(dim, -1)
    if v.shape[-1] % per:
        raise ValueError(
            f"pack_int32: dimension {dim} has {v.shape[-1]} values, not a multiple of "
            f"{per} ({bits}-bit values per int32 word)"
        )
    if v.numel() and (int(v.min()) < 0 or int(v.max()) >= (1 << bits)):
        raise ValueError(f"pack_int32: values must lie in [0, {(1 << bits) - 1}], got [{int(v.min())}, {int(v.max())}]")
    v = v.reshape(*v.shape[:-1], v.shape[-1] // per, per)
    shifts = torch.arange(per, dtype=torch.int64) * bits
    words = (v << shifts).sum(dim=-1)
    words = torch.where(words >= (1 << 31), words - (1 << 32), words).to(torch.int32)
    return words.movedim(-1, dim).contiguous()


def unpack_int32(words: Tensor, bits: int, dim: int) -> Tensor:
    """Inverse of :func:`pack_int32`: int64 values in ``[0, 2^bits)``."""
    per = 32 // bits
    w = (words.to(torch.int64) & 0xFFFFFFFF).movedim(dim, -1)
    shifts = torch.arange(per, dtype=torch.int64) * bits
    v = (w[..., None] >> shifts) & ((1 << bits) - 1)
    v = v.reshape(*w.shape[:-1], w.shape[-1] * per)
    return v.movedim(-1, dim).contiguous()


def expect_tensor(
    tensors: Dict[str, Tensor], key: str, where: str, dtypes: Iterable[torch.dtype], shape=None
) -> Tensor:
    """``tensors[key]`` checked for dtype (one of ``dtypes``) and shape (``None`` entries: any)."""
    dtypes = tuple(dtypes)
    if key not in tensors:
        raise ValueError(f"{where}: tensor {key!r} is missing")
    t = tensors[key]
    ok_shape = shape is None or (len(shape) == t.dim() and all(s is None or s == d for s, d in zip(shape, t.shape)))
    if t.dtype not in dtypes or not ok_shape:
        want = "/".join(dtype_name(d) for d in dtypes)
        if shape is not None:
            want += "[" + ", ".join("*" if s is None else str(s) for s in shape) + "]"
        raise ValueError(f"{where}: tensor {key!r} is {describe(t)}, expected {want}")
    return t
