"""What a weight bucket looks like on the wire, and how the engine process reads it back.

A bucket is a list of `WireTensor`s: an HF name, a contiguous array in the engine's dtype, and the name-table
layout still to apply (`None` when the sender already produced the HF layout). Two containers defer the layout
to the engine process: iterating one there yields `(hf_name, torch.Tensor)` pairs in HF shape, a pending layout
applied as a strided view (e.g. a transpose), so the engine's own `param.copy_(tensor)` does the relayout inside
the copy it makes anyway instead of in a separate pass on the learner.

    Tensors      arrays in memory (a local engine, or pickled along with a Ray call)
    ShmTensors   a safetensors file in /dev/shm, memory-mapped by an engine on the same host

The object-store route sends plain `(hf_name, array)` pairs in HF layout instead (what the rollout pool stores
and replays). Importable without torch or jax; torch is imported only while iterating.
"""
from __future__ import annotations

import json
import mmap
import struct
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Optional

import numpy as np

from shared.models import qwen2_5_vl_params as table

LAYOUTS = {r.layout.name: r.layout for r in table.RULES}

_ST_DTYPES = {"float32": "F32", "bfloat16": "BF16", "float16": "F16", "float64": "F64"}
_BY_ST = {v: k for k, v in _ST_DTYPES.items()}
# bfloat16 travels as its 16 bits: numpy names it only through ml_dtypes, which engine processes need not have.
_CARRIER = {"bfloat16": np.uint16}


@dataclass
class WireTensor:
    name: str
    array: Any  # numpy array (host transports) or a device array (NCCL)
    layout: Optional[str]  # name-table layout still to apply, None when `array` is in HF layout
    hf_shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return int(self.array.nbytes)


def to_torch(array: np.ndarray, dtype_name: str, layout: Optional[str], hf_shape: tuple[int, ...]):
    import torch

    carrier = _CARRIER.get(dtype_name)
    x = array.view(carrier) if carrier is not None and array.dtype != carrier else array
    if layout is not None:
        x = LAYOUTS[layout].to_hf(x, hf_shape)
    with warnings.catch_warnings():  # object-store and mmap views are read-only; engines only copy from them
        warnings.simplefilter("ignore", UserWarning)
        t = torch.from_numpy(x)
    if carrier is not None:
        t = t.view(getattr(torch, dtype_name))
    if tuple(t.shape) != tuple(hf_shape):
        raise ValueError(f"wire tensor has shape {tuple(t.shape)} after layout {layout}, expected {hf_shape}")
    return t


def to_wire(items: list[WireTensor]) -> list[tuple]:
    """Plain tuples (name, array, dtype name, layout, hf shape); bfloat16 as its uint16 bits, so unpickling in the
    engine process does not need ml_dtypes."""
    out = []
    for w in items:
        dtype_name = w.array.dtype.name
        carrier = _CARRIER.get(dtype_name)
        out.append((w.name, w.array.view(carrier) if carrier else w.array, dtype_name, w.layout, tuple(w.hf_shape)))
    return out


class Tensors:
    """A bucket held in memory."""

    def __init__(self, items: list[WireTensor]):
        self.wire = to_wire(items)

    def __len__(self) -> int:
        return len(self.wire)

    def __iter__(self) -> Iterator[tuple[str, Any]]:
        return _iter_wire(self.wire)


def _iter_wire(wire: list[tuple]) -> Iterator[tuple[str, Any]]:
    for name, array, dtype_name, layout, hf_shape in wire:
        yield name, to_torch(array, dtype_name, layout, hf_shape)


def write_safetensors(path: str | Path, items: list[WireTensor]) -> dict[str, dict]:
    """Write the bucket as a safetensors file, straight from the arrays (no intermediate buffer); returns the
    header. Layouts ride in `__metadata__` so the file is self-describing."""
    header: dict[str, Any] = {}
    offset = 0
    for w in items:
        if w.array.dtype.name not in _ST_DTYPES:
            raise ValueError(f"{w.name}: dtype {w.array.dtype} cannot be written to safetensors")
        header[w.name] = {"dtype": _ST_DTYPES[w.array.dtype.name], "shape": list(w.array.shape),
                          "data_offsets": [offset, offset + w.nbytes]}  # fmt: skip
        offset += w.nbytes
    meta = {w.name: json.dumps([w.layout, list(w.hf_shape)]) for w in items}
    raw = json.dumps({"__metadata__": meta, **header}).encode()
    raw += b" " * (-len(raw) % 8)  # the format pads the header to 8 bytes
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for w in items:
            f.write(memoryview(np.ascontiguousarray(w.array).reshape(-1).view(np.uint8)))
    return header


class ShmTensors:
    """A bucket written to a file on a shared-memory filesystem; read by memory-mapping it."""

    def __init__(self, path: str, count: int):
        self.path = path
        self.count = count

    def __len__(self) -> int:
        return self.count

    def __iter__(self) -> Iterator[tuple[str, Any]]:
        with open(self.path, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(n))
            # Populating the page table in one call beats a page fault per 4 KiB during the engine's copy.
            mm = mmap.mmap(f.fileno(), 0, flags=mmap.MAP_SHARED | getattr(mmap, "MAP_POPULATE", 0), prot=mmap.PROT_READ)
        meta = header.pop("__metadata__")
        data = np.frombuffer(mm, dtype=np.uint8, offset=8 + n)
        for name, info in header.items():
            dtype_name = _BY_ST[info["dtype"]]
            start, end = info["data_offsets"]
            arr = data[start:end].view(_CARRIER.get(dtype_name, dtype_name)).reshape(info["shape"])
            layout, hf_shape = json.loads(meta[name])
            yield name, to_torch(arr, dtype_name, layout, tuple(hf_shape))
