"""A cheap fingerprint of a float tensor, computed the same way by the learner and inside engine processes.

Engines compute it where their weights live (`rollout_torch.engine.tensor_checksum`), so only fingerprints cross
processes when the bridge verifies a push, never float32 copies of the tensors.

float64 sum and sum of squares (tolerant comparison, for layouts or dtypes that are not bit-exact) and a CRC-32
of the float32 bytes (exact comparison). A tensor fused from row blocks is fingerprinted part by part, without
concatenating: the sums add up and the CRC chains over the parts in row order. numpy only.

Any float dtype goes in as it is (bfloat16 from the learner's wire or an engine's weights): it is read in row
blocks of at most `BLOCK` elements, each cast to float32 on its own, so a bfloat16 tensor or
a transposed view never gets a whole float32 copy (peak extra memory 16 MB instead of 4 bytes per element).
The CRC stays over the float32 bytes, so the two sides agree whatever dtype each holds: bfloat16 -> float32 is
exact, and an engine holding float32 values that bfloat16 cannot represent still differs, as it should. A CRC
over each side's own bytes would not compare across dtypes (an fp32 engine beside a bf16 wire, for example).
"""
from __future__ import annotations

import zlib
from dataclasses import dataclass
from typing import Iterable, Sequence

import numpy as np

BLOCK = 1 << 22  # elements cast to float32 at a time


def row_ranges(shape: Sequence[int]) -> list[tuple[int, int]]:
    """Row ranges [start, stop) splitting a tensor of `shape` into blocks of at most BLOCK elements (one row at
    least); a scalar or small tensor is one block, [(0, 0)] for a scalar."""
    if not shape:
        return [(0, 0)]
    size = int(np.prod(shape))
    if size <= BLOCK:
        return [(0, int(shape[0]))]
    rows = max(1, BLOCK // max(1, size // shape[0]))
    return [(s, min(s + rows, shape[0])) for s in range(0, shape[0], rows)]


def _row_blocks(p: np.ndarray):
    """`p` as consecutive row blocks (`row_ranges`), in C order."""
    if p.ndim == 0:
        yield p
        return
    for start, stop in row_ranges(p.shape):
        yield p[start:stop]


@dataclass(frozen=True)
class Checksum:
    shape: tuple[int, ...]
    sum: float
    sumsq: float
    crc: int

    @staticmethod
    def of(array: np.ndarray) -> "Checksum":
        return Checksum.of_parts([array])

    @staticmethod
    def of_parts(parts: Sequence[np.ndarray]) -> "Checksum":
        """The checksum of `np.concatenate(parts)` (along rows), computed without the concatenation."""
        parts = [np.asarray(p) for p in parts]
        rows = sum(int(p.shape[0]) if p.ndim else 1 for p in parts)
        shape = (rows, *parts[0].shape[1:]) if parts and parts[0].ndim else ()
        blocks = (np.ascontiguousarray(b, dtype=np.float32) for p in parts for b in _row_blocks(p))
        return Checksum.of_blocks(blocks, shape)

    @staticmethod
    def of_blocks(blocks: Iterable[np.ndarray], shape: Sequence[int]) -> "Checksum":
        """The checksum of a tensor of `shape` given as its consecutive C-order blocks, already float32 (an engine
        casts its own tensors block by block, see `row_ranges`)."""
        total, sq, crc = 0.0, 0.0, 0
        for block in blocks:
            x = np.ascontiguousarray(block, dtype=np.float32).reshape(-1)
            total += float(np.sum(x, dtype=np.float64))
            sq += float(np.einsum("i,i->", x, x, dtype=np.float64))
            crc = zlib.crc32(memoryview(x.view(np.uint8)), crc)
        return Checksum(tuple(int(s) for s in shape), total, sq, crc)

    def differs(self, other: "Checksum", exact: bool = True, rtol: float = 1e-5) -> str:
        """Why `other` is not this tensor ("" when it matches): bytes when `exact`, else sums within `rtol`."""
        if self.shape != other.shape:
            return f"shape {other.shape} != {self.shape}"
        if exact:
            return "" if self.crc == other.crc else f"bytes differ (sum {other.sum:.6g} vs {self.sum:.6g})"
        scale = max(abs(self.sumsq), 1e-30)
        if abs(self.sum - other.sum) > rtol * (scale * max(1, np.prod(self.shape))) ** 0.5 or \
                abs(self.sumsq - other.sumsq) > rtol * scale:  # fmt: skip
            return f"sum {other.sum:.6g} vs {self.sum:.6g}, sum of squares {other.sumsq:.6g} vs {self.sumsq:.6g}"
        return ""
