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


@jax.custom_vjp
def matmul(x_ND: jnp.ndarray, w_DF: jnp.ndarray) -> jnp.ndarray:
    """x @ w, whose weight gradient is computed as an ordinary [D, N] x [N, F] matmul.

    Autodiff's own form contracts the token axis of both operands, which XLA:CPU runs about 2x slower than a
    matmul of the same size; transposing x first (kept apart by an optimisation barrier) is faster, and the same
    numbers up to summation order.
    """
    return x_ND @ w_DF


def _matmul_fwd(x_ND, w_DF):
    return x_ND @ w_DF, (x_ND, w_DF)


def _matmul_bwd(res, dy_NF):
    x_ND, w_DF = res
    x_MD, dy_MF = x_ND.reshape(-1, x_ND.shape[-1]), dy_NF.reshape(-1, dy_NF.shape[-1])
    dw_DF = jax.lax.optimization_barrier(x_MD.T) @ dy_MF
    return dy_NF @ w_DF.T, dw_DF.astype(w_DF.dtype)


matmul.defvjp(_matmul_fwd, _matmul_bwd)


def linear(x_ND: jnp.ndarray, p: dict[str, jnp.ndarray]) -> jnp.ndarray:
    y = matmul(x_ND, p["kernel"])
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
