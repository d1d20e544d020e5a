"""Rotary embeddings: multimodal 3-D RoPE of the language model, 2-D RoPE of the vision tower, and the host-side
3-D position ids (`get_rope_index`, the rule of transformers' `Qwen2_5_VLModel.get_rope_index`).
"""
from __future__ import annotations

from typing import Optional

import jax.numpy as jnp
import numpy as np

from .config import Qwen25VLConfig, TextConfig, VisionConfig


def get_rope_index(
    input_ids_BT: np.ndarray, image_grid_thw_N3: np.ndarray, attention_mask_BT: np.ndarray, cfg: Qwen25VLConfig,
    prompt_mask_BT: Optional[np.ndarray] = None,
) -> np.ndarray:
    """3-D (temporal, height, width) position ids [3, B, T] computed on host.

    Text runs count on from the previous position; an image's `<|image_pad|>` run gets its merged grid
    (t, h/m, w/m) offset by the position before it, and text after it resumes at that offset + max(h, w)/m.
    Padding tokens (mask 0) get position 0. Images are consumed in order across the batch.

    Only prompt tokens (`prompt_mask_BT`, default: every token) can be image placeholders. Tokens after the
    prompt are text whatever their id: a sampled `<|image_pad|>`, `<|video_pad|>` or `<|vision_start|>` continues
    the 1-D positions, as vLLM's decode does (`MRotaryEmbedding.get_next_input_positions_tensor`: position =
    context length + the prompt's mrope delta). This is transformers' rule with `mm_token_type_ids` = 1 on the
    prompt's image tokens only.
    """
    input_ids_BT = np.asarray(input_ids_BT)
    mask_BT = np.asarray(attention_mask_BT).astype(bool)
    prompt_BT = mask_BT if prompt_mask_BT is None else mask_BT & np.asarray(prompt_mask_BT).astype(bool)
    grids = [tuple(int(v) for v in g) for g in np.asarray(image_grid_thw_N3).reshape(-1, 3)]
    if np.any(input_ids_BT[prompt_BT] == cfg.video_token_id):
        raise ValueError("video tokens in a prompt are not supported (expected images only)")
    placeholder_BT = prompt_BT & (input_ids_BT == cfg.image_token_id)
    m = cfg.vision.spatial_merge_size
    pos_3BT = np.zeros((3, *input_ids_BT.shape), np.int64)
    next_grid = 0
    for b in range(input_ids_BT.shape[0]):
        is_img = placeholder_BT[b][mask_BT[b]]
        # Runs of equal modality: starts where the image flag changes.
        starts = np.flatnonzero(np.diff(is_img.astype(np.int8), prepend=2))
        ends = np.append(starts[1:], len(is_img))
        chunks, cur = [], 0
        for s, e in zip(starts, ends):
            if not is_img[s]:
                chunks.append(np.broadcast_to(np.arange(e - s) + cur, (3, e - s)))
                cur += e - s
                continue
            if next_grid >= len(grids):
                raise ValueError(f"sample {b} has more image-token runs than image_grid_thw rows ({len(grids)})")
            t, h, w = grids[next_grid]
            next_grid += 1
            gt, gh, gw = t, h // m, w // m
            if e - s != gt * gh * gw:
                raise ValueError(f"sample {b}: image run of {e - s} tokens, but grid {(t, h, w)} needs {gt * gh * gw}")
            tt, hh, ww = np.meshgrid(np.arange(gt), np.arange(gh), np.arange(gw), indexing="ij")
            chunks.append(np.stack([tt.ravel(), hh.ravel(), ww.ravel()]) + cur)
            cur += max(h, w) // m
        if chunks:
            pos_3BT[:, b, mask_BT[b]] = np.concatenate(chunks, axis=1)
    if next_grid != len(grids):
        raise ValueError(f"image_grid_thw has {len(grids)} rows but the batch has {next_grid} image-token runs")
    return pos_3BT


def _inv_freq(dim: int, theta: float) -> np.ndarray:
    return (1.0 / (theta ** (np.arange(0, dim, 2, dtype=np.float32) / np.float32(dim)))).astype(np.float32)


def text_cos_sin(position_ids_3BT: jnp.ndarray, cfg: TextConfig) -> tuple[jnp.ndarray, jnp.ndarray]:
    """cos, sin [B, T, head_dim] (float32): frequency band f uses the axis its `mrope_section` assigns it."""
    inv_freq_F = _inv_freq(cfg.head_dim, cfg.rope_theta)
    axis_F = np.repeat(np.arange(len(cfg.mrope_section)) % 3, cfg.mrope_section)
    pos_BTF = jnp.moveaxis(position_ids_3BT.astype(jnp.float32)[axis_F], 0, -1)  # [B, T, F], axis per band
    freqs_BTF = pos_BTF * inv_freq_F
    freqs_BTK = jnp.concatenate([freqs_BTF, freqs_BTF], axis=-1)
    return jnp.cos(freqs_BTK), jnp.sin(freqs_BTK)


def vision_cos_sin(pos_P2: jnp.ndarray, cfg: VisionConfig) -> tuple[jnp.ndarray, jnp.ndarray]:
    """cos, sin [P, head_dim] (float32): the first half of the bands rotate with the row, the second with the column."""
    inv_freq_F = _inv_freq(cfg.head_dim // 2, cfg.rope_theta)
    freqs_P2F = pos_P2.astype(jnp.float32)[..., None] * inv_freq_F
    freqs_PF = freqs_P2F.reshape(pos_P2.shape[0], -1)
    freqs_PK = jnp.concatenate([freqs_PF, freqs_PF], axis=-1)
    return jnp.cos(freqs_PK), jnp.sin(freqs_PK)


def apply_rope(x_NHK: jnp.ndarray, cos_NK: jnp.ndarray, sin_NK: jnp.ndarray) -> jnp.ndarray:
    """Rotate-half RoPE; cos/sin broadcast over the head axis (second to last)."""
    half = x_NHK.shape[-1] // 2
    rotated = jnp.concatenate([-x_NHK[..., half:], x_NHK[..., :half]], axis=-1)
    return x_NHK * cos_NK[..., None, :] + rotated * sin_NK[..., None, :]
