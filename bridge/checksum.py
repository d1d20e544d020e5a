"""A cheap fingerprint of a float tensor, computed the same way by the learner and inside engine processes.

float64 sum and sum of squares (tolerant comparison, for layouts or dtypes that are not bit-exact) and a CRC-32
of the float32 bytes (exact comparison). A tensor fused from row blocks is fingerprinted part by part, without
concatenating: the sums add up and the CRC chains over the parts in row order. numpy only.

Any float dtype goes in as it is (bfloat16 from the learner's wire, float32 from an engine's `named_weights`):
it is read in row blocks of at most `BLOCK` elements, each cast to float32 on its own, so a bfloat16 tensor or
a transposed view never gets a whole float32 copy (peak extra memory 16 MB instead of 4 bytes per element).
The CRC stays over the float32 bytes, so the two sides agree whatever dtype each holds: bfloat16 -> float32 is
exact, and an engine holding float32 values that bfloat16 cannot represent still differs, as it should. A CRC
over each side's own bytes would not compare across dtypes (the engines report float32 whatever they hold).
"""
from __future__ import annotations

import zlib
from dataclasses import dataclass
from typing import Sequence

import numpy as np

BLOCK = 1 << 22  # elements cast to float32 at a time


def _row_blocks(p: np.ndarray):
    """`p` as consecutive row blocks of at most BLOCK elements (one row at least), in C order."""
    if p.ndim == 0 or p.size <= BLOCK:
        yield p
        return
    rows = max(1, BLOCK // max(1, p.size // p.shape[0]))
    for start in range(0, p.shape[0], rows):
        yield p[start:start + rows]


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
        total, sq, crc, rows = 0.0, 0.0, 0, 0
        for p in parts:
            p = np.asarray(p)
            for block in _row_blocks(p):
                x = np.ascontiguousarray(block, dtype=np.float32).reshape(-1)
                total += float(np.sum(x, dtype=np.float64))
                sq += float(np.einsum("i,i->", x, x, dtype=np.float64))
                crc = zlib.crc32(memoryview(x.view(np.uint8)), crc)
            rows += int(p.shape[0]) if p.ndim else 1
        shape = (rows, *parts[0].shape[1:]) if parts and parts[0].ndim else ()
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
