"""Flax NNX building blocks shared by the vision tower and the language model: `Linear`, `RMSNorm`, `SwiGLU`,
`Embed`, `Head`, and the stacked-layer helpers (`stack`, `scan_layers`).

Every module is built from its path in the parameter table (`shared.models.qwen2_5_vl_params`), which gives each
parameter's shape and the logical tensor-parallel axis of each dimension; the axes ride on the `nnx.Param` as
`out_sharding` metadata (what `nnx.get_partition_spec` reads). Stacked layers carry a leading layer axis, annotated
None: it is the `lax.scan` axis and is never split.
"""
from __future__ import annotations

from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
from flax import nnx

from shared.models import qwen2_5_vl_params as table

from .config import ModelOptions, Qwen25VLConfig
from .lora import LoraSpec, make_lora

Init = Callable[[jax.Array, tuple[int, ...], Any], jax.Array]
# Initialisers only matter for fresh modules (tests, LoRA init); real weights come from checkpoints.
_KERNEL_INIT: Init = nnx.initializers.lecun_normal()


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


def param(cfg: Qwen25VLConfig, path: str, init: Init, rngs: nnx.Rngs) -> nnx.Param:
    """The table's parameter at `path`, float32, annotated with its logical axes. `eager_sharding=False`: the
    names are logical (heads, mlp, vocab), not mesh axes, so they must not be applied at creation."""
    leaf = table.leaf(cfg, path)
    return nnx.Param(init(rngs.params(), leaf.shape, jnp.float32), out_sharding=leaf.axes, eager_sharding=False)


def has_param(cfg: Qwen25VLConfig, path: str) -> bool:
    try:
        table.leaf(cfg, path)
    except KeyError:
        return False
    return True


class Linear(nnx.Module):
    """y = x @ kernel (+ bias), kernel [in, out]; the bias exists when the table lists one. A LoRA target also
    holds `lora` (an `nnx.LoRA`: A [in, r], B [r, out]) and adds (alpha / r) x A B to the base output."""

    def __init__(self, cfg: Qwen25VLConfig, path: str, *, rngs: nnx.Rngs, lora: Optional[LoraSpec] = None):
        self.kernel = param(cfg, f"{path}/kernel", _KERNEL_INIT, rngs)
        self.bias = param(cfg, f"{path}/bias", nnx.initializers.zeros, rngs) if has_param(cfg, f"{path}/bias") else None
        adapted = lora is not None and path in lora.targets
        axes = table.leaf(cfg, f"{path}/kernel").axes
        # Assigned once: NNX fixes an attribute as data or static on its first assignment.
        self.lora = make_lora(lora, axes, *self.kernel.shape, rngs) if adapted else None
        self.lora_scale = lora.scale if adapted else 0.0

    def __call__(self, x_ND: jnp.ndarray) -> jnp.ndarray:
        y_NF = matmul(x_ND, self.kernel[...])
        if self.bias is not None:
            y_NF = y_NF + self.bias[...]
        if self.lora is None:
            return y_NF
        # nnx.LoRA's own call multiplies with `@`; the custom-VJP matmul keeps its weight gradients fast on
        # XLA:CPU. The scale goes on the rank-r intermediate, the smallest tensor of the three.
        a_Nr = matmul(x_ND, self.lora.lora_a[...]) * self.lora_scale
        return y_NF + matmul(a_Nr, self.lora.lora_b[...])


class RMSNorm(nnx.Module):
    def __init__(self, cfg: Qwen25VLConfig, path: str, eps: float, *, rngs: nnx.Rngs):
        self.scale = param(cfg, f"{path}/scale", nnx.initializers.ones, rngs)
        self.eps = eps

    def __call__(self, x_ND: jnp.ndarray) -> jnp.ndarray:
        # Normalise in float32, cast back, then scale: the order transformers uses, which matters in bfloat16.
        x32 = x_ND.astype(jnp.float32)
        y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return self.scale[...] * y.astype(x_ND.dtype)


class SwiGLU(nnx.Module):
    def __init__(self, cfg: Qwen25VLConfig, path: str, *, rngs: nnx.Rngs, lora: Optional[LoraSpec] = None):
        self.gate = Linear(cfg, f"{path}/gate", rngs=rngs, lora=lora)
        self.up = Linear(cfg, f"{path}/up", rngs=rngs, lora=lora)
        self.down = Linear(cfg, f"{path}/down", rngs=rngs, lora=lora)

    def __call__(self, x_ND: jnp.ndarray) -> jnp.ndarray:
        return self.down(jax.nn.silu(self.gate(x_ND)) * self.up(x_ND))


class Embed(nnx.Module):
    """Token embedding [V, D]; `attend` is its transpose, the tied output projection."""

    def __init__(self, cfg: Qwen25VLConfig, path: str, *, rngs: nnx.Rngs):
        self.embedding = param(cfg, f"{path}/embedding", nnx.initializers.normal(0.02), rngs)

    def __call__(self, ids_BT: jnp.ndarray) -> jnp.ndarray:
        return self.embedding[...][ids_BT]


class Head(nnx.Module):
    """An output projection (LM head [D, V], value head [D, 1]): logits accumulate in float32 whatever the
    compute dtype, and its weight gradient is autodiff's (heads run once per token, outside the layer loop)."""

    def __init__(self, cfg: Qwen25VLConfig, path: str, *, rngs: nnx.Rngs):
        self.kernel = param(cfg, f"{path}/kernel", _KERNEL_INIT, rngs)

    def __call__(self, h_ND: jnp.ndarray) -> jnp.ndarray:
        return jnp.dot(h_ND, self.kernel[...], preferred_element_type=jnp.float32)


def stack(make: Callable[[nnx.Rngs], nnx.Module], n: int, rngs: nnx.Rngs) -> nnx.Module:
    """`n` independently initialised copies of `make(rngs)` as one module whose parameters have a leading layer
    axis (annotated None in their sharding metadata), to run under `lax.scan` with `scan_layers`."""
    keys = jax.random.split(rngs.params(), n)
    return nnx.vmap(lambda k: make(nnx.Rngs(k)), in_axes=0, out_axes=0,
                    transform_metadata={nnx.PARTITION_NAME: None})(keys)  # fmt: skip


def scan_layers(layer: Callable[[jnp.ndarray, Any], jnp.ndarray], x: jnp.ndarray, stacked: nnx.Module,
                opts: ModelOptions, start: int = 0, end: Optional[int] = None) -> jnp.ndarray:  # fmt: skip
    """x through `layer(x, module_i)` for the layers [start, end) of a `stack`ed module: the state is split off,
    sliced per layer by `lax.scan`, and merged back into one layer's module inside the step. With `opts.remat`
    each layer's activations are recomputed in the backward pass instead of stored (only layer inputs stay in
    memory); `opts.unroll_layers` trades compile time for less per-layer loop overhead."""
    graphdef, state = nnx.split(stacked)
    state = jax.tree.map(lambda a: a[start:end], state)
    step = lambda h, s: layer(h, nnx.merge(graphdef, s))  # noqa: E731
    fn = jax.checkpoint(step, prevent_cse=False) if opts.remat else step
    x, _ = jax.lax.scan(lambda h, s: (fn(h, s), None), x, state, unroll=opts.unroll_layers)
    return x


def cast_floats(tree: Any, dtype: jnp.dtype) -> Any:
    return jax.tree.map(lambda a: a.astype(dtype) if jnp.issubdtype(a.dtype, jnp.floating) else a, tree)
