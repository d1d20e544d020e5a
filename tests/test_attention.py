"""The fused (cuDNN) attention wrappers' own logic, run on CPU with XLA's kernel in cuDNN's place: the same
length semantics (tokens [0, len) valid, causal from the top left), so the row rotation, the padding and the
gradients are checked against the masked softmax; and which implementation `auto` picks where."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from learner_jax.models import attention as A

B, T, H, G, K = 3, 9, 4, 2, 8
LENGTHS = [9, 5, 0]  # full, padded, empty


@pytest.fixture
def xla_for_cudnn(monkeypatch):
    real = jax.nn.dot_product_attention

    def dpa(*args, implementation=None, **kwargs):
        assert implementation == "cudnn"  # what the wrappers ask for on GPU
        return real(*args, implementation="xla", **kwargs)

    monkeypatch.setattr(jax.nn, "dot_product_attention", dpa)


def _qkv(seed=0):
    rng = np.random.default_rng(seed)
    return [jnp.asarray(rng.normal(size=(B, T, h, K)), jnp.float32) for h in (H, G, G)]


def _rows(side):
    valid = np.zeros((B, T), bool)
    for b, n in enumerate(LENGTHS):
        valid[b, slice(T - n, T) if side == "left" else slice(0, n)] = True
    return valid


@pytest.mark.parametrize("side", ["left", "right"])
def test_causal_rows_equal_the_masked_softmax_with_gradients(xla_for_cudnn, side):
    q, k, v = _qkv()
    valid = _rows(side)
    mask = jnp.asarray(np.tril(np.ones((T, T), bool))[None] & valid[:, None, :])
    keep = jnp.asarray(valid)[:, :, None, None]

    def ref(q, k, v):
        return jnp.where(keep, A.softmax_attention(q, k, v, mask), 0.0)

    def fused(q, k, v):
        return A.cudnn_causal_attention(q, k, v, jnp.asarray(valid))

    np.testing.assert_allclose(fused(q, k, v), ref(q, k, v), atol=1e-6)
    assert float(jnp.abs(jnp.where(keep, 0.0, fused(q, k, v))).max()) == 0.0  # padding queries give zeros
    loss = lambda f: lambda *x: (f(*x) ** 2).sum()  # noqa: E731
    for g_fused, g_ref in zip(jax.grad(loss(fused), (0, 1, 2))(q, k, v), jax.grad(loss(ref), (0, 1, 2))(q, k, v)):
        np.testing.assert_allclose(g_fused, g_ref, atol=1e-5)


def test_padded_groups_equal_the_masked_softmax(xla_for_cudnn):
    q, k, v = _qkv(1)
    valid = _rows("right")  # the vision plan fills each group from slot 0
    mask = jnp.asarray(np.broadcast_to(valid[:, None, :], (B, T, T)))
    ref = jnp.where(jnp.asarray(valid)[:, :, None, None], A.softmax_attention(q, k, v, mask), 0.0)
    np.testing.assert_allclose(A.cudnn_padded_attention(q, k, v, jnp.asarray(valid)), ref, atol=1e-6)


@pytest.mark.parametrize("dtype, platform, kv_heads, tensor, expected", [
    ("bfloat16", None, None, 1, "softmax"),  # this machine: CPU
    ("bfloat16", "gpu", 2, 1, "cudnn"),
    ("float32", "gpu", 2, 1, "dot_product"),  # cuDNN flash attention takes 16-bit inputs only
    ("bfloat16", "gpu", 2, 4, "dot_product"),  # 2 KV heads over 4 tensor ranks: q and k/v sharded unlike
    ("bfloat16", "tpu", 2, 1, "dot_product"),
])  # fmt: skip
def test_auto_picks_by_platform_dtype_and_layout(dtype, platform, kv_heads, tensor, expected):
    assert A.resolve_attention("auto", dtype, (128, 80), platform=platform, num_kv_heads=kv_heads,
                               tensor=tensor) == expected  # fmt: skip
    assert A.resolve_attention("softmax", dtype, (128, 80), platform=platform) == "softmax"
    assert not A.cudnn_supports("bfloat16", (100,))  # head dims must be multiples of 8
