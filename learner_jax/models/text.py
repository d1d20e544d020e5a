"""Qwen2 decoder stack with multimodal RoPE: GQA with q/k/v biases, RMSNorm, SwiGLU."""
from __future__ import annotations

from typing import Any

import jax.numpy as jnp

from .attention import AttentionFn, get_attention
from .config import ModelOptions, TextConfig
from .layers import linear, rms_norm, scan_layers, swiglu
from .rope import apply_rope


def _layer(x_BTD, p, cos_BTK, sin_BTK, mask_BTT, cfg: TextConfig, attn: AttentionFn):
    B, T, _ = x_BTD.shape
    K = cfg.head_dim
    h_BTD = rms_norm(x_BTD, p["input_norm"]["scale"], cfg.rms_norm_eps)
    q_BTHK = apply_rope(linear(h_BTD, p["q"]).reshape(B, T, cfg.num_heads, K), cos_BTK, sin_BTK)
    k_BTGK = apply_rope(linear(h_BTD, p["k"]).reshape(B, T, cfg.num_kv_heads, K), cos_BTK, sin_BTK)
    v_BTGK = linear(h_BTD, p["v"]).reshape(B, T, cfg.num_kv_heads, K)
    o_BTHK = attn(q_BTHK, k_BTGK, v_BTGK, mask_BTT)
    x_BTD = x_BTD + linear(o_BTHK.reshape(B, T, -1), p["o"])
    return x_BTD + swiglu(rms_norm(x_BTD, p["post_norm"]["scale"], cfg.rms_norm_eps), p["mlp"])


def decoder(p: dict[str, Any], x_BTD, cos_BTK, sin_BTK, attention_mask_BT, cfg: TextConfig,
            opts: ModelOptions) -> jnp.ndarray:  # fmt: skip
    """Final-normed hidden states [B, T, D]. Causal attention restricted to non-padding keys."""
    T = x_BTD.shape[1]
    causal_TT = jnp.tril(jnp.ones((T, T), bool))
    mask_BTT = causal_TT[None] & attention_mask_BT.astype(bool)[:, None, :]
    cos_BTK, sin_BTK = cos_BTK.astype(x_BTD.dtype), sin_BTK.astype(x_BTD.dtype)
    attn = get_attention(opts.attention)
    layer = lambda x, lp: _layer(x, lp, cos_BTK, sin_BTK, mask_BTT, cfg, attn)  # noqa: E731
    x_BTD = scan_layers(layer, x_BTD, p["layers"], opts)
    return rms_norm(x_BTD, p["norm"]["scale"], cfg.rms_norm_eps)
