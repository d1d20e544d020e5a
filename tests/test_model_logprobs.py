"""Chunked per-token log-probabilities and entropies: values against torch, and the memory bound that lets a
152k vocabulary at 8k tokens fit."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import torch

from learner_jax.models.logprobs import token_logprobs


def test_values_and_gradients_match_torch():
    rng = np.random.default_rng(0)
    h = rng.standard_normal((3, 11, 16)).astype(np.float32)
    w = rng.standard_normal((16, 50)).astype(np.float32)
    t = rng.integers(0, 50, (3, 11))

    def ours(h, w):
        logp, ent = token_logprobs(h, w, jnp.asarray(t), chunk=7, temperature=0.7)  # 7 does not divide 33
        return (logp + 0.3 * ent).sum(), (logp, ent)

    (_, (logp, ent)), (gh, gw) = jax.value_and_grad(ours, argnums=(0, 1), has_aux=True)(h, w)
    th, tw = torch.tensor(h, requires_grad=True), torch.tensor(w, requires_grad=True)
    ref_all = torch.log_softmax(th @ tw / 0.7, -1)
    ref_logp = ref_all.gather(-1, torch.from_numpy(t)[..., None])[..., 0]
    ref_ent = -(ref_all.exp() * ref_all).sum(-1)
    (ref_logp + 0.3 * ref_ent).sum().backward()
    np.testing.assert_allclose(logp, ref_logp.detach().numpy(), atol=1e-5)
    np.testing.assert_allclose(ent, ref_ent.detach().numpy(), atol=1e-5)
    np.testing.assert_allclose(gh, th.grad.numpy(), atol=1e-4)
    np.testing.assert_allclose(gw, tw.grad.numpy(), atol=1e-4)


def test_152k_vocab_at_8k_tokens_never_holds_the_full_logits():
    D, V, chunk = 64, 152_064, 1024

    def temp_bytes(T):
        def loss(h, w, t):
            logp, ent = token_logprobs(h, w, t, chunk=chunk)
            return logp.sum() + ent.sum()

        args = (jax.ShapeDtypeStruct((1, T, D), jnp.float32), jax.ShapeDtypeStruct((D, V), jnp.float32),
                jax.ShapeDtypeStruct((1, T), jnp.int32))  # fmt: skip
        return jax.jit(jax.grad(loss, argnums=(0, 1))).lower(*args).compile().memory_analysis().temp_size_in_bytes

    full_logits_bytes = 8192 * V * 4  # 5 GB
    at_2k, at_8k = temp_bytes(2048), temp_bytes(8192)
    assert at_8k < 1.05 * at_2k  # does not grow with the number of tokens
    assert at_8k < 5 * chunk * V * 4 < full_logits_bytes
