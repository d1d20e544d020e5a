"""Per-token log-probabilities and entropies without materialising the [tokens, vocab] logits.

Tokens are processed in chunks under `lax.scan`; each chunk's [chunk, V] logits live only inside a rematerialised
step, so memory holds one chunk's temporaries at a time (logits, probabilities and their gradient: about four
float32 [chunk, V] blocks in the backward pass), independent of the sequence length. At V = 152k that is
~2.5 GB for chunk = 1024, ~1.2 GB for 512.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp


def token_logprobs(hidden_BTD: jnp.ndarray, head_DV: jnp.ndarray, targets_BT: jnp.ndarray, chunk: int = 1024,
                   temperature: float = 1.0) -> tuple[jnp.ndarray, jnp.ndarray]:  # fmt: skip
    """log p(targets) and the entropy of the softmax over `hidden @ head / temperature`, both [B, T] float32.

    Logits accumulate in float32 whatever the input dtype.
    """
    B, T, D = hidden_BTD.shape
    N = B * T
    chunk = max(1, min(chunk, N))
    n_chunks = -(-N // chunk)
    pad = n_chunks * chunk - N
    h_NCD = jnp.pad(hidden_BTD.reshape(N, D), ((0, pad), (0, 0))).reshape(n_chunks, chunk, D)
    t_NC = jnp.pad(targets_BT.reshape(N).astype(jnp.int32), (0, pad)).reshape(n_chunks, chunk)

    @jax.checkpoint
    def step(h_CD, t_C):
        logits_CV = jnp.dot(h_CD, head_DV, preferred_element_type=jnp.float32) / temperature
        logp_CV = jax.nn.log_softmax(logits_CV, axis=-1)
        target_C = jnp.take_along_axis(logp_CV, t_C[:, None], axis=-1)[:, 0]
        # -sum p log p on normalised log-probabilities: no cancellation between two large terms.
        return target_C, -jnp.sum(jnp.exp(logp_CV) * logp_CV, axis=-1)

    _, (logp_NC, ent_NC) = jax.lax.scan(lambda c, xs: (c, step(*xs)), None, (h_NCD, t_NC))
    return logp_NC.reshape(-1)[:N].reshape(B, T), ent_NC.reshape(-1)[:N].reshape(B, T)
