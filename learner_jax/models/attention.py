"""Attention kernels, chosen by name. One signature serves the causal text model and the grouped vision attention:

    attn(q_BTHK, k_BSGK, v_BSGK, mask_BTS) -> o_BTHK     (G key/value heads, H = G * r query heads)

`mask_BTS` is True where query t may attend to key s. Fully masked rows (padding queries) return finite values.
"""
from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp

AttentionFn = Callable[[jnp.ndarray, jnp.ndarray, jnp.ndarray, jnp.ndarray], jnp.ndarray]


def softmax_attention(q_BTHK, k_BSGK, v_BSGK, mask_BTS):
    """Explicit masked softmax in float32; grouped-query heads share K/V without copying them."""
    B, T, H, K = q_BTHK.shape
    G = k_BSGK.shape[2]
    q_BTGRK = q_BTHK.reshape(B, T, G, H // G, K)
    s_BGRTS = jnp.einsum("btgrk,bsgk->bgrts", q_BTGRK, k_BSGK, preferred_element_type=jnp.float32) * K**-0.5
    s_BGRTS = jnp.where(mask_BTS[:, None, None], s_BGRTS, jnp.finfo(jnp.float32).min)
    p_BGRTS = jax.nn.softmax(s_BGRTS, axis=-1).astype(v_BSGK.dtype)
    return jnp.einsum("bgrts,bsgk->btgrk", p_BGRTS, v_BSGK).reshape(B, T, H, K)


def dot_product_attention(q_BTHK, k_BSGK, v_BSGK, mask_BTS):
    """`jax.nn.dot_product_attention`: XLA's fused attention, cuDNN kernels where the backend offers them."""
    return jax.nn.dot_product_attention(q_BTHK, k_BSGK, v_BSGK, mask=mask_BTS[:, None])


def get_attention(name: str) -> AttentionFn:
    if name == "auto":
        name = "softmax" if jax.default_backend() == "cpu" else "dot_product"
    impls = {"softmax": softmax_attention, "dot_product": dot_product_attention}
    if name not in impls:
        raise ValueError(f"attention {name!r}: expected softmax, dot_product or auto")
    return impls[name]
