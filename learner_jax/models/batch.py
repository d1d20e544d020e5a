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
                *, pad_token_id: int, seq_len: Optional[int] = None, num_patches: Optional[int] = None,
                prompt_lengths: Optional[Sequence[int]] = None) -> dict[str, np.ndarray]:  # fmt: skip
    """Arrays for `forward`: input_ids_BT, attention_mask_BT, position_ids_3BT, image_mask_BT (the prompts'
    image placeholders), image_feature_idx_BT, pixel_values_PC and image_grid_thw_N3 of the distinct images, and
    the `vision_*` plan. `vision[b]` holds sample b's images (None or empty: text only); samples passing the same
    object share its encoding.

    `prompt_lengths[b]` (default: all of it) is how many leading tokens of `token_ids[b]` are its prompt. Only
    the prompt's `<|image_pad|>` tokens are placeholders: they must match the sample's grids, read image features
    and get 3-D positions. Response tokens are text whatever their id (a sampled `<|image_pad|>` or
    `<|video_pad|>` included): text embedding, 1-D positions continuing the prompt's, as in vLLM's decode."""
    if len(token_ids) != len(vision):
        raise ValueError(f"{len(token_ids)} token lists but {len(vision)} vision inputs (expected one per sample)")
    lengths = [len(t) for t in token_ids]
    prompts = lengths if prompt_lengths is None else [int(n) for n in prompt_lengths]
    if len(prompts) != len(lengths) or any(not 0 <= p <= n for p, n in zip(prompts, lengths)):
        raise ValueError(f"prompt_lengths {prompts} must give one length per sample, each within its {lengths} tokens")
    T = seq_len if seq_len is not None else bucket(max(lengths))
    if max(lengths) > T:
        raise ValueError(f"a sample has {max(lengths)} tokens, more than seq_len {T}")
    B = len(token_ids)
    ids_BT = np.full((B, T), pad_token_id, np.int32)
    mask_BT = np.zeros((B, T), np.int32)
    prompt_BT = np.zeros((B, T), bool)
    for b, toks in enumerate(token_ids):
        if lengths[b]:
            ids_BT[b, T - lengths[b]:] = toks
            mask_BT[b, T - lengths[b]:] = 1
            prompt_BT[b, T - lengths[b]:T - lengths[b] + prompts[b]] = True
    image_BT = prompt_BT & (ids_BT == cfg.image_token_id)

    vcfg = cfg.vision
    merged = vcfg.merge_unit
    # Samples of one prompt share one VisionInputs object: the tower encodes it once and every such sample's
    # image tokens read the same features (`image_feature_idx_BT`), so 16 samples do not cost 16 encodings.
    unique: dict[int, int] = {}
    pixels, unique_grids, sample_grids = [], [], []
    feat_idx_BT = np.zeros((B, T), np.int32)
    offsets = [0]
    for b, v in enumerate(vision):
        v = v if v is not None else VisionInputs.empty(vcfg.patch_dim)
        grid = np.asarray(v.image_grid_thw, np.int64).reshape(-1, 3)
        patches = int(np.prod(grid, axis=1).sum())
        n_tokens = int(image_BT[b].sum())
        if n_tokens != patches // merged:
            raise ValueError(f"sample {b}: {n_tokens} image tokens in its prompt, but its grids {grid.tolist()} give "
                             f"{patches // merged}")  # fmt: skip
        if v.pixel_values.shape != (patches, vcfg.patch_dim):
            raise ValueError(f"sample {b}: pixel_values {v.pixel_values.shape}, expected ({patches}, {vcfg.patch_dim})")
        sample_grids.append(grid)
        if not patches:
            continue
        if id(v) not in unique:
            unique[id(v)] = offsets[-1]
            pixels.append(np.asarray(v.pixel_values, np.float32))
            unique_grids.append(grid)
            offsets.append(offsets[-1] + patches // merged)
        feat_idx_BT[b, image_BT[b]] = unique[id(v)] + np.arange(n_tokens)
    grid_N3 = np.concatenate(unique_grids) if unique_grids else np.zeros((0, 3), np.int64)
    real = sum(len(p) for p in pixels)
    P = num_patches if num_patches is not None else -(-bucket(real) // merged) * merged
    pixels_PC = np.zeros((P, vcfg.patch_dim), np.float32)
    pixels_PC[:real] = np.concatenate(pixels) if real else pixels_PC[:0]
    rope_grids = np.concatenate(sample_grids)  # M-RoPE positions follow each sample's own images

    return {
        "input_ids_BT": ids_BT,
        "attention_mask_BT": mask_BT,
        "position_ids_3BT": get_rope_index(ids_BT, rope_grids, mask_BT, cfg, prompt_BT).astype(np.int32),
        "image_mask_BT": image_BT,
        "image_feature_idx_BT": feat_idx_BT,
        "pixel_values_PC": pixels_PC,
        "image_grid_thw_N3": grid_N3.astype(np.int32),
        **make_plan(grid_N3, vcfg, P),
    }
