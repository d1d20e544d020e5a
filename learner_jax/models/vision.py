"""Vision tower of Qwen2.5-VL: patch embedding, windowed / full-attention blocks with 2-D RoPE, 2x2 merger.

Runs on one concatenation of the batch's images, ordered and grouped by a host-side plan (see `vision_plan`).
"""
from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from .attention import AttentionFn, get_attention
from .config import ModelOptions, VisionConfig
from .layers import linear, rms_norm, scan_layers, swiglu
from .rope import apply_rope, vision_cos_sin

_EPS = 1e-6  # fixed in the reference vision tower, not configurable


def group_attention(q_PHK, k_PHK, v_PHK, idx_GS, attn: AttentionFn):
    """Attention inside each group of patch indices (a row of `idx_GS`; index P marks an empty slot)."""
    P = q_PHK.shape[0]
    valid_GS = idx_GS < P
    take = lambda x: x.at[idx_GS].get(mode="fill", fill_value=0)  # noqa: E731
    mask_GSS = jnp.broadcast_to(valid_GS[:, None, :], (*idx_GS.shape, idx_GS.shape[1]))
    o_GSHK = attn(take(q_PHK), take(k_PHK), take(v_PHK), mask_GSS)
    return jnp.zeros_like(q_PHK).at[idx_GS].set(o_GSHK, mode="drop")


def _block(x_PD, p, cos_PK, sin_PK, idx_GS, cfg: VisionConfig, attn: AttentionFn):
    P, H = x_PD.shape[0], cfg.num_heads
    h_PD = rms_norm(x_PD, p["norm1"]["scale"], _EPS)
    qkv_P3HK = linear(h_PD, p["attn"]["qkv"]).reshape(P, 3, H, cfg.head_dim)
    # RoPE in float32 then back to the compute dtype, as the reference does.
    rope = lambda t: apply_rope(t.astype(jnp.float32), cos_PK, sin_PK).astype(x_PD.dtype)  # noqa: E731
    o_PHK = group_attention(rope(qkv_P3HK[:, 0]), rope(qkv_P3HK[:, 1]), qkv_P3HK[:, 2], idx_GS, attn)
    x_PD = x_PD + linear(o_PHK.reshape(P, -1), p["attn"]["proj"])
    return x_PD + swiglu(rms_norm(x_PD, p["norm2"]["scale"], _EPS), p["mlp"])


def _runs(cfg: VisionConfig) -> list[tuple[int, int, bool]]:
    """Maximal runs [start, end) of consecutive blocks with the same attention kind (full or windowed)."""
    full = [i in cfg.fullatt_block_indexes for i in range(cfg.depth)]
    runs, start = [], 0
    for i in range(1, cfg.depth + 1):
        if i == cfg.depth or full[i] != full[start]:
            runs.append((start, i, full[start]))
            start = i
    return runs


def vision_tower(p: dict[str, Any], pixels_PC, plan: dict[str, jnp.ndarray], cfg: VisionConfig,
                 opts: ModelOptions) -> jnp.ndarray:  # fmt: skip
    """Merged image features [P / 4, out_hidden] in the processor's (and the `<|image_pad|>` tokens') order."""
    dtype = p["patch_embed"]["kernel"].dtype
    # Patch embedding acts row by row, so reordering the pixels first equals reordering its output.
    x_PD = pixels_PC[plan["vision_perm_P"]].astype(dtype) @ p["patch_embed"]["kernel"]
    cos_PK, sin_PK = vision_cos_sin(plan["vision_pos_P2"], cfg)
    attn = get_attention(opts.attention)
    for start, end, full in _runs(cfg):
        idx_GS = plan["vision_image_idx_GS"] if full else plan["vision_window_idx_GS"]
        layer = lambda x, bp, idx_GS=idx_GS: _block(x, bp, cos_PK, sin_PK, idx_GS, cfg, attn)  # noqa: E731
        x_PD = scan_layers(layer, x_PD, jax.tree.map(lambda a: a[start:end], p["blocks"]), opts)
    m = p["merger"]
    h_MU = rms_norm(x_PD, m["norm"]["scale"], _EPS).reshape(-1, cfg.hidden_size * cfg.merge_unit)
    out_MD = linear(jax.nn.gelu(linear(h_MU, m["fc1"]), approximate=False), m["fc2"])
    return out_MD[plan["vision_unperm_M"]]
