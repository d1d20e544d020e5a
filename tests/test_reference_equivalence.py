"""compute_advantages against an independent NumPy restatement of the recipe note (section 4.1), per sample.

The restatement is written from the note's formulas, one sample at a time in float64, and shares no code with
the JAX implementation; JAX runs in float64 here so that 1e-6 is a statement about the formulas.
"""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from learner_jax.rl.advantages import compute_advantages
from shared.config import ADVANTAGE_ESTIMATORS, AlgoConfig

GROUP = ("rloo", "reinforce_baseline", "group_norm", "dr_grpo")


def shaped_reward(estimator, rewards, i, n):
    """Step 1, for sample i: its group's rewards are the n around it."""
    g = rewards[(i // n) * n : (i // n + 1) * n]
    r = rewards[i]
    if estimator == "rloo":
        return r - (g.sum() - r) / (n - 1)
    if estimator in ("reinforce_baseline", "dr_grpo"):
        return r - g.mean()
    if estimator == "group_norm":
        return (r - g.mean()) / (g.std(ddof=1) + 1e-9)
    return r  # reinforce, gae


def sample_advantage(cfg, estimator, reward, kl, mask, values, beta):
    """Steps 2-3 for one sample: token rewards, then returns-to-go or GAE. Returns (adv, ret) over all T."""
    T = len(mask)
    valid = [t for t in range(T) if mask[t]]
    r_clipped = min(max(reward, cfg.reward_clip_range[0]), cfg.reward_clip_range[1])
    rt = np.zeros(T)
    for t in valid:
        rt[t] = -beta * kl[t]
    if valid:
        rt[valid[-1]] += r_clipped
    adv, ret = np.zeros(T), np.zeros(T)
    if estimator == "gae":
        v = np.array([values[t] if mask[t] else 0.0 for t in range(T)])
        last = 0.0
        for t in reversed(range(T)):
            next_v = v[t + 1] if t + 1 < T else 0.0
            delta = rt[t] + cfg.gamma * next_v - v[t]
            last = delta + cfg.gamma * cfg.lambd * last
            if mask[t]:
                adv[t], ret[t] = last, last + v[t]
        return adv, ret
    gamma = 1.0 if estimator in GROUP else cfg.gamma
    g = 0.0
    for t in reversed(range(T)):
        g = rt[t] + gamma * g
        if mask[t]:
            ret[t] = g
    return ret.copy(), ret


def reference_advantages(cfg, rewards, kl, mask, values, n, beta):
    estimator = cfg.advantage_estimator
    B, T = mask.shape
    adv, ret = np.zeros((B, T)), np.zeros((B, T))
    for i in range(B):
        r = shaped_reward(estimator, rewards, i, n)
        adv[i], ret[i] = sample_advantage(cfg, estimator, r, kl[i], mask[i], None if values is None else values[i], beta)
    # Step 4: token-level whitening over all valid tokens, skipped for group_norm and dr_grpo (LMM-R1 head).
    if estimator not in ("group_norm", "dr_grpo"):
        tokens = adv[mask > 0]
        mean = tokens.mean()
        rstd = 1.0 / np.sqrt(max(((tokens - mean) ** 2).mean(), 1e-8))
        adv = np.where(mask > 0, (adv - mean) * rstd, 0.0)
    return adv, ret


def random_rollout(rng, num_prompts, n, T):
    lengths = rng.integers(1, T + 1, size=num_prompts * n)
    mask = (np.arange(T)[None, :] < lengths[:, None]).astype(np.float64)
    if rng.random() < 0.5:
        rewards = rng.choice([0.0, 0.5, 1.0, 1.5], size=num_prompts * n)  # ties and identical groups
    else:
        rewards = rng.normal(scale=6.0, size=num_prompts * n)  # some beyond the clip range
    kl = rng.normal(scale=0.05, size=(num_prompts * n, T))
    values = rng.normal(size=(num_prompts * n, T))
    return rewards, kl, mask, values


@pytest.mark.parametrize("estimator", ADVANTAGE_ESTIMATORS)
@pytest.mark.parametrize("seed", range(3))
def test_matches_the_restated_reference(estimator, seed):
    rng = np.random.default_rng(seed)
    n = 1 if estimator in ("reinforce", "gae") and seed == 2 else int(rng.integers(2, 5))
    rewards, kl, mask, values = random_rollout(rng, int(rng.integers(1, 4)), n, int(rng.integers(3, 12)))
    cfg = dataclasses.replace(
        AlgoConfig(),
        advantage_estimator=estimator,
        gamma=float(rng.choice([1.0, 0.97])),
        lambd=float(rng.choice([1.0, 0.95])),
        reward_clip_range=[-5.0, 5.0],
    )
    beta = float(rng.choice([0.0, 0.001, 0.3]))
    if estimator != "gae":
        values = None
    expected_adv, expected_ret = reference_advantages(cfg, rewards, kl, mask, values, n, beta)
    with jax.enable_x64(True):
        fn = jax.jit(lambda r, k, m, v, b: compute_advantages(cfg, r, k, m, v, n_samples=n, kl_coef=b))
        adv, ret = fn(jnp.asarray(rewards), jnp.asarray(kl), jnp.asarray(mask), values, beta)
        adv, ret = np.asarray(adv), np.asarray(ret)
    assert adv.dtype == np.float64
    np.testing.assert_allclose(adv, expected_adv, rtol=0, atol=1e-6)
    np.testing.assert_allclose(ret, expected_ret, rtol=0, atol=1e-6)
