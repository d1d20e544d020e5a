"""Qwen2 decoder stack with multimodal RoPE: GQA with q/k/v biases, RMSNorm, SwiGLU."""
from __future__ import annotations

from typing import Optional

import jax.numpy as jnp
from flax import nnx

from .attention import AttentionFn, cudnn_causal_attention, get_attention, resolve_attention
from .config import ModelOptions, Qwen25VLConfig
from .layers import Embed, Linear, RMSNorm, SwiGLU, scan_layers, stack
from .lora import LoraSpec
from .rope import apply_rope

LAYERS = "text/layers"


class DecoderLayer(nnx.Module):
    """One pre-norm decoder layer: x + attn(norm(x)), then + mlp(norm(x))."""

    def __init__(self, cfg: Qwen25VLConfig, *, rngs: nnx.Rngs, lora: Optional[LoraSpec] = None):
        t = cfg.text
        self.num_heads, self.num_kv_heads, self.head_dim = t.num_heads, t.num_kv_heads, t.head_dim
        self.input_norm = RMSNorm(cfg, f"{LAYERS}/input_norm", t.rms_norm_eps, rngs=rngs)
        self.q = Linear(cfg, f"{LAYERS}/q", rngs=rngs, lora=lora)
        self.k = Linear(cfg, f"{LAYERS}/k", rngs=rngs, lora=lora)
        self.v = Linear(cfg, f"{LAYERS}/v", rngs=rngs, lora=lora)
        self.o = Linear(cfg, f"{LAYERS}/o", rngs=rngs, lora=lora)
        self.post_norm = RMSNorm(cfg, f"{LAYERS}/post_norm", t.rms_norm_eps, rngs=rngs)
        self.mlp = SwiGLU(cfg, f"{LAYERS}/mlp", rngs=rngs, lora=lora)

    def __call__(self, x_BTD, cos_BTK, sin_BTK, mask_BTT, attn: AttentionFn) -> jnp.ndarray:
        B, T, _ = x_BTD.shape
        K = self.head_dim
        h_BTD = self.input_norm(x_BTD)
        q_BTHK = apply_rope(self.q(h_BTD).reshape(B, T, self.num_heads, K), cos_BTK, sin_BTK)
        k_BTGK = apply_rope(self.k(h_BTD).reshape(B, T, self.num_kv_heads, K), cos_BTK, sin_BTK)
        v_BTGK = self.v(h_BTD).reshape(B, T, self.num_kv_heads, K)
        o_BTHK = attn(q_BTHK, k_BTGK, v_BTGK, mask_BTT)
        x_BTD = x_BTD + self.o(o_BTHK.reshape(B, T, -1))
        return x_BTD + self.mlp(self.post_norm(x_BTD))


class TextModel(nnx.Module):
    """Token embedding, `num_layers` decoder layers stacked on a leading axis (one `lax.scan`), final norm."""

    def __init__(self, cfg: Qwen25VLConfig, *, rngs: nnx.Rngs, lora: Optional[LoraSpec] = None):
        self.head_dim = cfg.text.head_dim
        self.embed = Embed(cfg, "text/embed", rngs=rngs)
        self.layers = stack(lambda r: DecoderLayer(cfg, rngs=r, lora=lora), cfg.text.num_layers, rngs)
        self.norm = RMSNorm(cfg, "text/norm", cfg.text.rms_norm_eps, rngs=rngs)

    def __call__(self, x_BTD, cos_BTK, sin_BTK, attention_mask_BT, opts: ModelOptions) -> jnp.ndarray:
        """Final-normed hidden states [B, T, D] of the input embeddings `x_BTD`. Causal attention restricted to
        non-padding keys: a [B, T, T] mask for softmax / dot_product, the row lengths for cudnn."""
        T = x_BTD.shape[1]
        if resolve_attention(opts.attention, opts.dtype, (self.head_dim,)) == "cudnn":
            # cuDNN masks from the row lengths: no [B, T, T] mask is built.
            valid_BT = attention_mask_BT.astype(bool)
            mask_BTT = None
            attn = lambda q, k, v, _: cudnn_causal_attention(q, k, v, valid_BT)  # noqa: E731
        else:
            causal_TT = jnp.tril(jnp.ones((T, T), bool))
            mask_BTT = causal_TT[None] & attention_mask_BT.astype(bool)[:, None, :]
            attn = get_attention(opts.attention)
        cos_BTK, sin_BTK = cos_BTK.astype(x_BTD.dtype), sin_BTK.astype(x_BTD.dtype)
        layer = lambda x, mod: mod(x, cos_BTK, sin_BTK, mask_BTT, attn)  # noqa: E731
        return self.norm(scan_layers(layer, x_BTD, self.layers, opts))
