"""Advantage estimators as LMM-R1 (an OpenRLHF fork) defines them.

Pipeline: shape the scalar reward per prompt group -> clip -> per-token reward (-beta*kl on every response
token, the scalar on the last one) -> returns-to-go or GAE -> token-level whitening over the whole batch.
Rewards arrive as [num_prompts * n], the n samples of a prompt contiguous. Positions outside `mask_BT` are
zero in every output.
"""
from __future__ import annotations

from typing import Callable, Optional

import jax
import jax.numpy as jnp

from shared.config import GROUP_ESTIMATORS

# LMM-R1 head whitens every estimator but these: GRPO already normalises per group, Dr. GRPO keeps the raw scale.
UNWHITENED_BY_REFERENCE = ("group_norm", "dr_grpo")


def _grouped(rewards_B: jax.Array, n: int) -> jax.Array:
    if rewards_B.shape[0] % n:
        raise ValueError(f"rewards: expected num_prompts * {n} entries grouped by prompt, got {rewards_B.shape[0]}")
    return rewards_B.reshape(-1, n)


def _identity(rewards_B: jax.Array, n: int) -> jax.Array:
    return rewards_B


def _rloo(rewards_B: jax.Array, n: int) -> jax.Array:
    r_GN = _grouped(rewards_B, n)
    baseline_GN = (r_GN.sum(-1, keepdims=True) - r_GN) / (n - 1)
    return (r_GN - baseline_GN).reshape(-1)


def _mean_baseline(rewards_B: jax.Array, n: int) -> jax.Array:
    r_GN = _grouped(rewards_B, n)
    return (r_GN - r_GN.mean(-1, keepdims=True)).reshape(-1)


def _group_norm(rewards_B: jax.Array, n: int) -> jax.Array:
    r_GN = _grouped(rewards_B, n)
    std_G1 = r_GN.std(-1, keepdims=True, ddof=1)  # torch's unbiased std, as the reference
    return ((r_GN - r_GN.mean(-1, keepdims=True)) / (std_G1 + 1e-9)).reshape(-1)


# Scalar shaping per estimator: (rewards_B, n) -> shaped rewards_B.
ESTIMATORS: dict[str, Callable[[jax.Array, int], jax.Array]] = {
    "gae": _identity,
    "reinforce": _identity,
    "rloo": _rloo,
    "reinforce_baseline": _mean_baseline,
    "group_norm": _group_norm,
    "dr_grpo": _mean_baseline,
}


def token_rewards(reward_B: jax.Array, kl_BT: jax.Array, mask_BT: jax.Array, kl_coef) -> jax.Array:
    """r_t = -kl_coef * kl_t on every valid token, plus the scalar reward on the last valid one."""
    mask_BT = mask_BT.astype(bool)
    T = mask_BT.shape[1]
    last_B = T - 1 - jnp.argmax(mask_BT[:, ::-1], axis=1)
    is_last_BT = jnp.arange(T)[None, :] == last_B[:, None]
    r_BT = -kl_coef * kl_BT + jnp.where(is_last_BT, reward_B[:, None], 0.0)
    return jnp.where(mask_BT, r_BT, 0.0)


def _reverse_linear_scan(x_BT: jax.Array, decay: float) -> jax.Array:
    """y_t = x_t + decay * y_{t+1}, y after the end = 0; an associative scan keeps the depth O(log T)."""

    def combine(a, b):  # compose the affine maps y -> d + c*y, `a` nearer the end of the sequence
        c_a, d_a = a
        c_b, d_b = b
        return c_a * c_b, d_b + c_b * d_a

    c_BT = jnp.full_like(x_BT, decay)
    _, y_BT = jax.lax.associative_scan(combine, (c_BT, x_BT), reverse=True, axis=1)
    return y_BT


def returns_to_go(r_BT: jax.Array, mask_BT: jax.Array, gamma: float) -> jax.Array:
    mask_BT = mask_BT.astype(bool)
    return jnp.where(mask_BT, _reverse_linear_scan(jnp.where(mask_BT, r_BT, 0.0), gamma), 0.0)


def gae(r_BT: jax.Array, values_BT: jax.Array, mask_BT: jax.Array, gamma: float, lambd: float):
    """(advantages_BT, returns_BT): delta_t = r_t + gamma*V_{t+1} - V_t, A_t = sum_l (gamma*lambd)^l delta_{t+l}."""
    mask_BT = mask_BT.astype(bool)
    v_BT = jnp.where(mask_BT, values_BT, 0.0)
    r_BT = jnp.where(mask_BT, r_BT, 0.0)
    next_v_BT = jnp.concatenate([v_BT[:, 1:], jnp.zeros_like(v_BT[:, :1])], axis=1)
    delta_BT = r_BT + gamma * next_v_BT - v_BT
    adv_BT = _reverse_linear_scan(delta_BT, gamma * lambd)
    return jnp.where(mask_BT, adv_BT, 0.0), jnp.where(mask_BT, adv_BT + v_BT, 0.0)


def whiten(adv_BT: jax.Array, mask_BT: jax.Array, scale: bool = True) -> jax.Array:
    """(A - mean) * rsqrt(max(var, 1e-8)) over all valid tokens of the batch; `scale=False` only centres."""
    m_BT = mask_BT.astype(adv_BT.dtype)
    count = jnp.maximum(m_BT.sum(), 1.0)
    mean = (adv_BT * m_BT).sum() / count
    centred_BT = adv_BT - mean
    if scale:
        var = (centred_BT**2 * m_BT).sum() / count
        centred_BT = centred_BT * jax.lax.rsqrt(jnp.maximum(var, 1e-8))
    return centred_BT * m_BT


def whitening_mode(rule: str, estimator: str) -> Optional[str]:
    """What `AlgoConfig.advantage_whitening` asks for this estimator: "scale", "center" or None."""
    if rule == "reference":
        return None if estimator in UNWHITENED_BY_REFERENCE else "scale"
    modes = {"on": "scale", "center": "center", "off": None}
    if rule not in modes:
        raise ValueError(f"advantage_whitening: expected reference, on, off or center, got {rule!r}")
    return modes[rule]


def compute_advantages(
    cfg_algo,
    rewards_B: jax.Array,
    kl_BT: jax.Array,
    mask_BT: jax.Array,
    values_BT: Optional[jax.Array] = None,
    *,
    n_samples: int,
    kl_coef=None,
) -> tuple[jax.Array, jax.Array]:
    """(advantages_BT, returns_BT) for one rollout batch, following `cfg_algo` (an `AlgoConfig`).

    `kl_BT` is the per-token KL estimate against the reference policy; `kl_coef` (default
    `cfg_algo.init_kl_coef`, a traced scalar is fine) is the controller's current value. With `use_kl_loss`
    the KL is a loss term instead, so none enters the reward. `cfg_algo` and `n_samples` are static under jit.
    """
    estimator = cfg_algo.advantage_estimator
    if estimator not in ESTIMATORS:
        raise ValueError(f"advantage_estimator: expected one of {', '.join(ESTIMATORS)}, got {estimator!r}")
    if estimator in GROUP_ESTIMATORS and n_samples < 2:
        raise ValueError(f"{estimator} needs groups of at least 2 samples per prompt, got n_samples={n_samples}")
    if estimator == "gae" and values_BT is None:
        raise ValueError("gae needs values_BT from the critic")
    mode = whitening_mode(cfg_algo.advantage_whitening, estimator)

    dtype = jnp.result_type(rewards_B.dtype, jnp.float32)
    rewards_B = rewards_B.astype(dtype)
    kl_BT = kl_BT.astype(dtype)
    beta = 0.0 if cfg_algo.use_kl_loss else (cfg_algo.init_kl_coef if kl_coef is None else kl_coef)

    shaped_B = ESTIMATORS[estimator](rewards_B, n_samples)
    low, high = cfg_algo.reward_clip_range
    r_BT = token_rewards(jnp.clip(shaped_B, low, high), kl_BT, mask_BT, beta)

    if estimator == "gae":
        adv_BT, ret_BT = gae(r_BT, values_BT.astype(dtype), mask_BT, cfg_algo.gamma, cfg_algo.lambd)
    else:
        gamma = 1.0 if estimator in GROUP_ESTIMATORS else cfg_algo.gamma  # the reference forces 1 for groups
        ret_BT = returns_to_go(r_BT, mask_BT, gamma)
        adv_BT = ret_BT
    if mode is not None:
        adv_BT = whiten(adv_BT, mask_BT, scale=mode == "scale")
    return adv_BT, ret_BT
