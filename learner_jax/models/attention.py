"""Attention kernels, chosen by name. One signature serves the causal text model and the grouped vision attention:

    attn(q_BTHK, k_BSGK, v_BSGK, mask_BTS) -> o_BTHK     (G key/value heads, H = G * r query heads)

`mask_BTS` is True where query t may attend to key s. Fully masked rows (padding queries) return finite values.

The fused kernel ("cudnn": cuDNN flash attention, `jax.nn.dot_product_attention(..., implementation="cudnn")`)
takes no [B, T, S] mask; it masks from per-row lengths (and causality), so its callers pass the row validity
`valid_BT` instead (`cudnn_causal_attention`, `cudnn_padded_attention`). Its saved state is O(T) per head (one
float32 log-sum-exp per query); the other two keep the [T, S] probabilities of every head for the backward pass.
"""
from __future__ import annotations

from typing import Callable, Optional, Sequence

import jax
import jax.numpy as jnp
from jax.extend import backend as jax_backend

AttentionFn = Callable[[jnp.ndarray, jnp.ndarray, jnp.ndarray, jnp.ndarray], jnp.ndarray]

# cuDNN flash attention (jax 0.10.2, jax/_src/cudnn/fused_attention_stablehlo.py): check_layout takes fp16/bf16
# (and fp8) only; check_is_flash_attention takes head dims that are multiples of 8, at most 128 below compute
# capability 9.0 and at most 256 from 9.0 on.
CUDNN_DTYPES = ("bfloat16", "float16")


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
    """`jax.nn.dot_product_attention` without `implementation`: XLA's composition (jax/_src/nn/functions.py
    _dot_product_attention_xla), which materialises the [B, H, T, S] logits and probabilities on every backend."""
    return jax.nn.dot_product_attention(q_BTHK, k_BSGK, v_BSGK, mask=mask_BTS[:, None])


def _lengths(valid_BT: jnp.ndarray) -> jnp.ndarray:
    # int32 is what jax.nn.dot_product_attention checks; a row without a token keeps one (zero) slot, so cuDNN
    # never sees a length of 0; its output is zeroed by the caller's validity mask.
    return jnp.maximum(valid_BT.sum(axis=-1, dtype=jnp.int32), 1)


def cudnn_padded_attention(q_BTHK, k_BTGK, v_BTGK, valid_BT):
    """Non-causal self-attention of rows whose valid tokens come first (the vision plan's groups): cuDNN's
    PADDING mask from the row lengths. Slots past a row's length return zeros."""
    lengths_B = _lengths(valid_BT)
    o_BTHK = jax.nn.dot_product_attention(q_BTHK, k_BTGK, v_BTGK, query_seq_lengths=lengths_B,
                                          key_value_seq_lengths=lengths_B, implementation="cudnn")  # fmt: skip
    return jnp.where(valid_BT[:, :, None, None], o_BTHK, jnp.zeros((), o_BTHK.dtype))


def cudnn_causal_attention(q_BTHK, k_BTGK, v_BTGK, valid_BT):
    """Causal self-attention of rows whose valid tokens are one contiguous run (left padding, as `build_batch`
    makes, or right padding). cuDNN's PADDING_CAUSAL mask counts a row's tokens from position 0, so each row is
    rotated to start at its first valid token, attended on the row lengths, and rotated back. RoPE is already in
    q and k, so the rotation changes the layout only. Padding queries return zeros."""
    T = valid_BT.shape[1]
    lengths_B = _lengths(valid_BT)
    start_B = jnp.argmax(valid_BT, axis=1).astype(jnp.int32)  # first valid token (0 for an empty row)
    t_T = jnp.arange(T, dtype=jnp.int32)
    to_front_BT = (t_T[None] + start_B[:, None]) % T
    to_back_BT = (t_T[None] - start_B[:, None]) % T
    take = lambda x, idx_BT: jnp.take_along_axis(x, idx_BT[:, :, None, None], axis=1)  # noqa: E731
    o_BTHK = jax.nn.dot_product_attention(
        take(q_BTHK, to_front_BT), take(k_BTGK, to_front_BT), take(v_BTGK, to_front_BT), is_causal=True,
        query_seq_lengths=lengths_B, key_value_seq_lengths=lengths_B, implementation="cudnn",
    )  # fmt: skip
    return jnp.where(valid_BT[:, :, None, None], take(o_BTHK, to_back_BT), jnp.zeros((), o_BTHK.dtype))


def _cuda_backend() -> bool:
    backend = jax_backend.get_backend()
    return backend.platform == "gpu" and "cuda" in backend.platform_version


def _cudnn_head_dim_max() -> int:
    cc = getattr(jax.devices()[0], "compute_capability", "0.0")
    return 256 if tuple(int(x) for x in str(cc).split(".")[:2]) >= (9, 0) else 128


def cudnn_supports(dtype: str, head_dims: Sequence[int], head_dim_max: int = 128) -> bool:
    """Whether cuDNN flash attention accepts this compute dtype and these head dims (see CUDNN_DTYPES)."""
    return jnp.dtype(dtype).name in CUDNN_DTYPES and all(h % 8 == 0 and h <= head_dim_max for h in head_dims)


def resolve_attention(name: str, dtype: str, head_dims: Sequence[int], platform: Optional[str] = None,
                      num_kv_heads: Optional[int] = None, tensor: int = 1) -> str:  # fmt: skip
    """The implementation `name` stands for. "auto": softmax on CPU; cudnn on CUDA GPUs when the compute dtype and
    the head dims fit cuDNN and tensor parallelism splits the key/value heads like the query heads (cuDNN's
    partitioner wants q, k and v sharded alike); else dot_product. `platform` ("cpu" | "gpu" | "tpu") plans for
    another machine (the memory planner) and then assumes CUDA with the pre-Hopper head-dim limit."""
    if name != "auto":
        return name
    planning = platform is not None
    platform = platform or jax.default_backend()
    if platform == "cpu":
        return "softmax"
    kv_split = num_kv_heads is None or tensor <= 1 or num_kv_heads % tensor == 0
    if platform == "gpu" and kv_split and (planning or _cuda_backend()):
        if cudnn_supports(dtype, head_dims, 128 if planning else _cudnn_head_dim_max()):
            return "cudnn"
    return "dot_product"


def get_attention(name: str) -> AttentionFn:
    """A masked implementation by name ("auto": softmax on CPU, dot_product elsewhere). The fused one ("cudnn") takes
    row validity instead of a mask: call `cudnn_causal_attention` / `cudnn_padded_attention`."""
    if name == "auto":
        name = "softmax" if jax.default_backend() == "cpu" else "dot_product"
    impls = {"softmax": softmax_attention, "dot_product": dot_product_attention}
    if name == "cudnn":
        raise ValueError("attention 'cudnn' takes row validity, not a mask: use cudnn_causal_attention or "
                         "cudnn_padded_attention")  # fmt: skip
    if name not in impls:
        raise ValueError(f"attention {name!r}: expected softmax, dot_product, cudnn or auto")
    return impls[name]
