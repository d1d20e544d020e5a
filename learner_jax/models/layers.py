"""Small building blocks shared by the vision tower and the language model."""
from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp

from .config import ModelOptions


def rms_norm(x_ND: jnp.ndarray, scale_D: jnp.ndarray, eps: float) -> jnp.ndarray:
    """Normalise in float32, cast back, then scale (the order transformers uses, which matters in bfloat16)."""
    x32 = x_ND.astype(jnp.float32)
    y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
    return scale_D * y.astype(x_ND.dtype)


def linear(x_ND: jnp.ndarray, p: dict[str, jnp.ndarray]) -> jnp.ndarray:
    y = x_ND @ p["kernel"]
    return y + p["bias"] if "bias" in p else y


def swiglu(x_ND: jnp.ndarray, p: dict[str, Any]) -> jnp.ndarray:
    return linear(jax.nn.silu(linear(x_ND, p["gate"])) * linear(x_ND, p["up"]), p["down"])


def scan_layers(layer: Callable[[jnp.ndarray, Any], jnp.ndarray], x: jnp.ndarray, stacked: Any,
                opts: ModelOptions) -> jnp.ndarray:  # fmt: skip
    """Apply `layer(x, params_i)` for each slice of the stacked params. With `opts.remat` each layer's
    activations are recomputed in the backward pass instead of stored (only layer inputs stay in memory);
    `opts.unroll_layers` trades compile time for less per-layer loop overhead."""
    fn = jax.checkpoint(layer, prevent_cse=False) if opts.remat else layer
    x, _ = jax.lax.scan(lambda h, p: (fn(h, p), None), x, stacked, unroll=opts.unroll_layers)
    return x


def cast_floats(tree: Any, dtype: jnp.dtype) -> Any:
    return jax.tree.map(lambda a: a.astype(dtype) if jnp.issubdtype(a.dtype, jnp.floating) else a, tree)
