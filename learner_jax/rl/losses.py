"""PPO policy and value losses, KL and entropy terms, and their aggregation over tokens.

Every per-token quantity is selected with `mask_BT` before an exp or a square, so padding positions holding
arbitrary log-probs cannot leak inf/NaN into values or gradients. Each loss returns (scalar, metrics dict).
"""
from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp

from learner_jax.rl.kl import approx_kl


def masked_mean(x_BT: jax.Array, mask_BT: jax.Array) -> jax.Array:
    m_BT = mask_BT.astype(x_BT.dtype)
    return (x_BT * m_BT).sum() / jnp.maximum(m_BT.sum(), 1.0)


def aggregate(loss_BT: jax.Array, mask_BT: jax.Array, mode: str, num_tokens=None) -> jax.Array:
    """Reduce per-token losses to a scalar.

    seq_mean_token_mean: mean over sequences (with >= 1 token) of each one's token mean (LMM-R1 paper era).
    token_mean: mean over the micro-batch's tokens (LMM-R1 head); micro-batches are then averaged.
    global_token_mean: token sum / `num_tokens`, the valid-token count of the whole optimizer step on all
    devices, so summing the micro-batch losses gives the step's exact token mean (current OpenRLHF).
    """
    m_BT = mask_BT.astype(loss_BT.dtype)
    masked_BT = jnp.where(mask_BT.astype(bool), loss_BT, 0.0)
    if mode == "token_mean":
        return masked_BT.sum() / jnp.maximum(m_BT.sum(), 1.0)
    if mode == "seq_mean_token_mean":
        tokens_B = m_BT.sum(-1)
        seq_B = masked_BT.sum(-1) / jnp.maximum(tokens_B, 1.0)
        return seq_B.sum() / jnp.maximum((tokens_B > 0).sum(), 1)
    if mode == "global_token_mean":
        if num_tokens is None:
            raise ValueError("global_token_mean needs num_tokens, the valid-token count of the whole optimizer step")
        return masked_BT.sum() / jnp.maximum(num_tokens, 1)
    raise ValueError(f"loss_agg: expected seq_mean_token_mean, token_mean or global_token_mean, got {mode!r}")


def policy_loss(
    logp_BT: jax.Array,
    old_logp_BT: jax.Array,
    adv_BT: jax.Array,
    mask_BT: jax.Array,
    *,
    eps_low: float = 0.2,
    eps_high: Optional[float] = None,
    dual_clip: Optional[float] = None,
    rollout_logp_BT: Optional[jax.Array] = None,
    tis_cap: Optional[float] = None,
    correction: str = "tis",
    agg: str = "token_mean",
    num_tokens=None,
) -> tuple[jax.Array, dict]:
    """PPO-clip: -min(rho*A, clip(rho, 1-eps_low, 1+eps_high)*A), rho = pi/pi_old.

    dual_clip c > 1 bounds the loss of negative-advantage tokens by -c*A. pi_old is the learner's own policy before
    the update (the proximal policy); the engine that sampled the tokens (the behaviour policy: a stale version
    under asynchronous rollouts, or the same weights in another precision) is corrected for by weighting each
    token's loss by pi_old/pi_engine, without gradient: "tis" truncates the weight at `tis_cap` and applies it only
    when a cap is set; "decoupled" always applies it, truncated only if `tis_cap` is set (decoupled PPO).
    """
    eps_high = eps_low if eps_high is None else eps_high
    valid_BT = mask_BT.astype(bool)
    log_ratio_BT = jnp.where(valid_BT, logp_BT - old_logp_BT, 0.0)
    adv_BT = jnp.where(valid_BT, adv_BT, 0.0)
    ratio_BT = jnp.exp(log_ratio_BT)
    surr1_BT = ratio_BT * adv_BT
    surr2_BT = jnp.clip(ratio_BT, 1.0 - eps_low, 1.0 + eps_high) * adv_BT
    clipped_BT = jnp.minimum(surr1_BT, surr2_BT)
    if dual_clip is not None:
        if dual_clip <= 1.0:
            raise ValueError(f"dual_clip: expected > 1, got {dual_clip}")
        clipped_BT = jnp.where(adv_BT < 0, jnp.maximum(clipped_BT, dual_clip * adv_BT), clipped_BT)
    loss_BT = -clipped_BT
    metrics = {
        "clip_frac": masked_mean((surr2_BT < surr1_BT).astype(loss_BT.dtype), mask_BT),
        "approx_kl": masked_mean(-log_ratio_BT, mask_BT),
        "ratio_mean": masked_mean(ratio_BT, mask_BT),
    }
    if correction not in ("tis", "decoupled"):
        raise ValueError(f"correction: expected tis or decoupled, got {correction!r}")
    if tis_cap is not None or correction == "decoupled":
        if rollout_logp_BT is None:
            raise ValueError("an importance weight needs rollout_logp_BT, the rollout engine's log-probs")
        engine_gap_BT = jnp.where(valid_BT, old_logp_BT - rollout_logp_BT, 0.0)
        weight_BT = jnp.exp(engine_gap_BT) if tis_cap is None else jnp.minimum(jnp.exp(engine_gap_BT), tis_cap)
        weight_BT = jax.lax.stop_gradient(weight_BT)
        loss_BT = loss_BT * weight_BT
        metrics["tis_weight_mean"] = masked_mean(weight_BT, mask_BT)
    return aggregate(loss_BT, mask_BT, agg, num_tokens), metrics


def value_loss(
    values_BT: jax.Array,
    old_values_BT: jax.Array,
    returns_BT: jax.Array,
    mask_BT: jax.Array,
    *,
    value_clip: Optional[float] = 0.2,
    agg: str = "token_mean",
    num_tokens=None,
) -> tuple[jax.Array, dict]:
    """0.5 * max((V_clip - R)^2, (V - R)^2) with V_clip = V_old + clip(V - V_old, +-value_clip)."""
    valid_BT = mask_BT.astype(bool)
    values_BT, old_values_BT, returns_BT = (jnp.where(valid_BT, x, 0.0) for x in (values_BT, old_values_BT, returns_BT))
    unclipped_BT = (values_BT - returns_BT) ** 2
    if value_clip is None:
        loss_BT = unclipped_BT
        clip_frac = jnp.zeros((), values_BT.dtype)
    else:
        v_clip_BT = old_values_BT + jnp.clip(values_BT - old_values_BT, -value_clip, value_clip)
        clipped_BT = (v_clip_BT - returns_BT) ** 2
        loss_BT = jnp.maximum(clipped_BT, unclipped_BT)
        clip_frac = masked_mean((clipped_BT > unclipped_BT).astype(values_BT.dtype), mask_BT)
    metrics = {"value_clip_frac": clip_frac, "values_mean": masked_mean(values_BT, mask_BT)}
    return 0.5 * aggregate(loss_BT, mask_BT, agg, num_tokens), metrics


def kl_loss(
    logp_BT: jax.Array,
    ref_logp_BT: jax.Array,
    mask_BT: jax.Array,
    *,
    estimator: str = "k3",
    agg: str = "token_mean",
    num_tokens=None,
) -> jax.Array:
    """KL to the reference policy as a loss term (`use_kl_loss`, GRPO style); gradient flows through logp_BT."""
    return aggregate(approx_kl(logp_BT, jax.lax.stop_gradient(ref_logp_BT), mask_BT, estimator), mask_BT, agg, num_tokens)


def token_entropy(logits_BTV: jax.Array) -> jax.Array:
    """Entropy of each token's distribution; for long sequences compute it chunk-wise in the model instead."""
    logp_BTV = jax.nn.log_softmax(logits_BTV.astype(jnp.float32), axis=-1)
    # -inf logits (banned tokens) contribute 0, also to the gradient
    logp_BTV = jnp.where(jnp.isfinite(logp_BTV), logp_BTV, 0.0)
    return -(jnp.exp(logp_BTV) * logp_BTV).sum(-1)


def actor_loss(
    cfg_algo,
    logp_BT: jax.Array,
    old_logp_BT: jax.Array,
    adv_BT: jax.Array,
    mask_BT: jax.Array,
    *,
    ref_logp_BT: Optional[jax.Array] = None,
    rollout_logp_BT: Optional[jax.Array] = None,
    entropy_BT: Optional[jax.Array] = None,
    kl_coef=None,
    num_tokens=None,
) -> tuple[jax.Array, dict]:
    """policy + kl_coef * KL loss (if `use_kl_loss`) - entropy_coef * entropy, as `cfg_algo` (AlgoConfig) says."""
    agg = cfg_algo.loss_agg
    loss, metrics = policy_loss(
        logp_BT,
        old_logp_BT,
        adv_BT,
        mask_BT,
        eps_low=cfg_algo.eps_clip,
        eps_high=cfg_algo.eps_clip_high,
        dual_clip=cfg_algo.dual_clip,
        rollout_logp_BT=rollout_logp_BT,
        tis_cap=cfg_algo.tis_cap,
        correction=cfg_algo.off_policy_correction,
        agg=agg,
        num_tokens=num_tokens,
    )
    metrics["policy_loss"] = loss
    if cfg_algo.use_kl_loss:
        if ref_logp_BT is None:
            raise ValueError("use_kl_loss needs ref_logp_BT, the reference policy's log-probs")
        kl = kl_loss(logp_BT, ref_logp_BT, mask_BT, estimator=cfg_algo.kl_estimator, agg=agg, num_tokens=num_tokens)
        loss = loss + (cfg_algo.init_kl_coef if kl_coef is None else kl_coef) * kl
        metrics["kl_loss"] = kl
    if cfg_algo.entropy_coef:
        if entropy_BT is None:
            raise ValueError("entropy_coef > 0 needs entropy_BT, the per-token entropy of the policy")
        entropy = aggregate(entropy_BT, mask_BT, agg, num_tokens)
        loss = loss - cfg_algo.entropy_coef * entropy
        metrics["entropy"] = entropy
    return loss, metrics


def critic_loss(
    cfg_algo, values_BT, old_values_BT, returns_BT, mask_BT, *, num_tokens=None
) -> tuple[jax.Array, dict]:
    loss, metrics = value_loss(
        values_BT,
        old_values_BT,
        returns_BT,
        mask_BT,
        value_clip=cfg_algo.value_clip,
        agg=cfg_algo.loss_agg,
        num_tokens=num_tokens,
    )
    metrics["value_loss"] = loss
    return loss, metrics
