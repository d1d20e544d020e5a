"""Host-side assembly of a model batch from token lists and each sample's `VisionInputs`.

Static shapes for jit: sequences are left-padded to `seq_len` and patches padded to `num_patches` (both default
to `vision_plan.bucket` of the real size); the vision plan's group tables are bucketed the same way. A jitted
step therefore compiles once per distinct (B, T, P, window groups, images, image size) bucket tuple, each of
which takes at most four values per doubling of the underlying size.
"""
from __future__ import annotations

from typing import Optional, Sequence

import numpy as np

from shared.records import VisionInputs

from .config import Qwen25VLConfig
from .rope import get_rope_index
from .vision_plan import bucket, make_plan


def build_batch(token_ids: Sequence[Sequence[int]], vision: Sequence[Optional[VisionInputs]], cfg: Qwen25VLConfig,
                *, pad_token_id: int, seq_len: Optional[int] = None,
                num_patches: Optional[int] = None) -> dict[str, np.ndarray]:  # fmt: skip
    """Arrays for `forward`: input_ids_BT, attention_mask_BT, position_ids_3BT, pixel_values_PC,
    image_grid_thw_N3 and the `vision_*` plan. `vision[b]` holds sample b's images (None or empty: text only)."""
    if len(token_ids) != len(vision):
        raise ValueError(f"{len(token_ids)} token lists but {len(vision)} vision inputs (expected one per sample)")
    lengths = [len(t) for t in token_ids]
    T = seq_len if seq_len is not None else bucket(max(lengths))
    if max(lengths) > T:
        raise ValueError(f"a sample has {max(lengths)} tokens, more than seq_len {T}")
    B = len(token_ids)
    ids_BT = np.full((B, T), pad_token_id, np.int32)
    mask_BT = np.zeros((B, T), np.int32)
    for b, toks in enumerate(token_ids):
        if lengths[b]:
            ids_BT[b, T - lengths[b]:] = toks
            mask_BT[b, T - lengths[b]:] = 1

    vcfg = cfg.vision
    merged = vcfg.merge_unit
    pixels, grids = [], []
    for b, v in enumerate(vision):
        v = v if v is not None else VisionInputs.empty(vcfg.patch_dim)
        grid = np.asarray(v.image_grid_thw, np.int64).reshape(-1, 3)
        n_tokens = int((np.asarray(token_ids[b]) == cfg.image_token_id).sum()) if lengths[b] else 0
        if n_tokens != int(np.prod(grid, axis=1).sum()) // merged:
            raise ValueError(f"sample {b}: {n_tokens} image tokens, but its grids {grid.tolist()} give "
                             f"{int(np.prod(grid, axis=1).sum()) // merged}")  # fmt: skip
        if v.pixel_values.shape != (int(np.prod(grid, axis=1).sum()), vcfg.patch_dim):
            raise ValueError(f"sample {b}: pixel_values {v.pixel_values.shape}, expected "
                             f"({int(np.prod(grid, axis=1).sum())}, {vcfg.patch_dim})")  # fmt: skip
        pixels.append(np.asarray(v.pixel_values, np.float32))
        grids.append(grid)
    grid_N3 = np.concatenate(grids)
    real = sum(len(p) for p in pixels)
    P = num_patches if num_patches is not None else -(-bucket(real) // merged) * merged
    pixels_PC = np.zeros((P, vcfg.patch_dim), np.float32)
    pixels_PC[:real] = np.concatenate(pixels) if real else pixels_PC[:0]

    return {
        "input_ids_BT": ids_BT,
        "attention_mask_BT": mask_BT,
        "position_ids_3BT": get_rope_index(ids_BT, grid_N3, mask_BT, cfg).astype(np.int32),
        "pixel_values_PC": pixels_PC,
        "image_grid_thw_N3": grid_N3.astype(np.int32),
        **make_plan(grid_N3, vcfg, P),
    }
