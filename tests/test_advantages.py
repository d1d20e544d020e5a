"""Advantage estimators on small hand-computed rollouts."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from learner_jax.rl.advantages import ESTIMATORS, compute_advantages, gae, returns_to_go
from shared.config import ADVANTAGE_ESTIMATORS, AlgoConfig


def cfg(**kw):
    return dataclasses.replace(AlgoConfig(), **kw)


def run(estimator, rewards, mask, kl=None, values=None, n=2, **kw):
    mask = np.asarray(mask, np.float32)
    kl = np.zeros_like(mask) if kl is None else np.asarray(kl, np.float32)
    c = cfg(advantage_estimator=estimator, **kw)
    values = None if values is None else jnp.asarray(values, jnp.float32)
    adv, ret = compute_advantages(c, jnp.asarray(rewards, jnp.float32), jnp.asarray(kl), jnp.asarray(mask), values, n_samples=n)
    return np.asarray(adv), np.asarray(ret)


FULL = np.ones((4, 3))
REWARDS = [1.0, 0.0, 0.5, 0.5]  # group 1 differs, group 2 identical


def test_registry_matches_the_config_names():
    assert tuple(ESTIMATORS) == ADVANTAGE_ESTIMATORS


@pytest.mark.parametrize(
    "estimator,shaped",
    [
        ("reinforce", [1.0, 0.0, 0.5, 0.5]),
        ("rloo", [1.0, -1.0, 0.0, 0.0]),  # R_i minus the mean of the others
        ("reinforce_baseline", [0.5, -0.5, 0.0, 0.0]),
        ("dr_grpo", [0.5, -0.5, 0.0, 0.0]),
        ("group_norm", [0.5 / np.sqrt(0.5), -0.5 / np.sqrt(0.5), 0.0, 0.0]),  # unbiased std of {1, 0} = sqrt(.5)
    ],
)
def test_group_shaping_without_whitening(estimator, shaped):
    adv, ret = run(estimator, REWARDS, FULL, advantage_whitening="off")
    expected = np.repeat(np.asarray(shaped, np.float32)[:, None], 3, axis=1)  # gamma 1: the reward at every token
    np.testing.assert_allclose(ret, expected, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(adv, expected, rtol=1e-6, atol=1e-7)


def test_reference_whitening_of_reinforce_baseline():
    # tokens: 0.5 x3, -0.5 x3, 0 x6 -> mean 0, var 0.125
    adv, ret = run("reinforce_baseline", REWARDS, FULL)
    np.testing.assert_allclose(adv[:, 0], [0.5 / np.sqrt(0.125), -0.5 / np.sqrt(0.125), 0, 0], rtol=1e-6)
    np.testing.assert_allclose(ret[:, 0], [0.5, -0.5, 0, 0])  # returns stay unwhitened


@pytest.mark.parametrize("estimator,whitened", [("group_norm", False), ("dr_grpo", False), ("rloo", True), ("reinforce", True)])
def test_reference_rule_skips_group_norm_and_dr_grpo(estimator, whitened):
    mask = np.array([[1, 1, 0], [1, 0, 0], [1, 1, 1], [1, 1, 1]], np.float32)
    adv, ret = run(estimator, [2.0, 0.0, 1.0, 3.0], mask)
    valid = adv[mask > 0]
    if whitened:
        assert abs(valid.mean()) < 1e-6 and abs(valid.std() - 1) < 1e-5
    else:
        np.testing.assert_allclose(adv, ret)


@pytest.mark.parametrize("rule", ["on", "center", "off"])
def test_whitening_rules_apply_to_every_estimator(rule):
    mask = np.array([[1, 1, 0], [1, 0, 0], [1, 1, 1], [1, 1, 1]], np.float32)
    adv, ret = run("group_norm", [2.0, 0.0, 1.0, 3.0], mask, advantage_whitening=rule)
    valid, raw = adv[mask > 0], ret[mask > 0]
    if rule == "off":
        np.testing.assert_allclose(valid, raw)
    else:
        assert abs(valid.mean()) < 1e-6
        if rule == "on":
            assert abs(valid.std() - 1) < 1e-5
        else:
            np.testing.assert_allclose(valid, raw - raw.mean(), atol=1e-6)


def test_kl_in_reward_and_discounting():
    # r = [-beta*kl0, R - beta*kl1, (masked)] with beta 0.5, R 1
    mask, kl = [[1, 1, 0]], [[0.1, 0.2, 0.3]]
    _, ret = run("reinforce", [1.0], mask, kl=kl, n=1, init_kl_coef=0.5, advantage_whitening="off")
    np.testing.assert_allclose(ret, [[0.85, 0.9, 0.0]], rtol=1e-6)
    _, ret = run("reinforce", [1.0], mask, kl=kl, n=1, init_kl_coef=0.5, gamma=0.5, advantage_whitening="off")
    np.testing.assert_allclose(ret, [[-0.05 + 0.5 * 0.9, 0.9, 0.0]], rtol=1e-6)


def test_group_estimators_force_gamma_one():
    kl = [[0.1, 0.2], [0.0, 0.0]]
    _, ret = run("rloo", [1.0, 0.0], [[1, 1], [1, 1]], kl=kl, init_kl_coef=1.0, gamma=0.5, advantage_whitening="off")
    np.testing.assert_allclose(ret[0], [1.0 - 0.1 - 0.2, 1.0 - 0.2], rtol=1e-6)


def test_kl_coef_argument_and_kl_loss_mode():
    kl = jnp.full((2, 2), 0.5)
    rewards, mask = jnp.array([1.0, 0.0]), jnp.ones((2, 2))
    c = cfg(advantage_estimator="reinforce", advantage_whitening="off")
    _, ret = compute_advantages(c, rewards, kl, mask, n_samples=1, kl_coef=0.2)
    np.testing.assert_allclose(ret[1], [-0.2, -0.1], rtol=1e-6)
    _, ret = compute_advantages(dataclasses.replace(c, use_kl_loss=True), rewards, kl, mask, n_samples=1, kl_coef=0.2)
    np.testing.assert_allclose(ret, [[1.0, 1.0], [0.0, 0.0]])  # KL is a loss term, not a reward


def test_reward_clipping_after_shaping():
    _, ret = run("rloo", [30.0, 0.0], [[1], [1]], advantage_whitening="off")
    np.testing.assert_allclose(ret[:, 0], [10.0, -10.0])
    _, ret = run("reinforce", [-20.0], [[1]], n=1, reward_clip_range=[-5.0, 5.0], advantage_whitening="off")
    np.testing.assert_allclose(ret[:, 0], [-5.0])


@pytest.mark.parametrize("estimator", ADVANTAGE_ESTIMATORS)
def test_identical_rewards_give_finite_zero_advantages(estimator):
    values = np.zeros((4, 3)) if estimator == "gae" else None
    adv, ret = run(estimator, [1.0] * 4, FULL, values=values)
    assert np.isfinite(adv).all() and np.isfinite(ret).all()
    if estimator not in ("reinforce", "gae"):
        np.testing.assert_allclose(adv, 0.0, atol=1e-6)


@pytest.mark.parametrize("estimator", ["reinforce", "gae"])
def test_single_sample_groups(estimator):
    values = np.full((3, 2), 0.25) if estimator == "gae" else None
    adv, ret = run(estimator, [1.0, 0.0, 0.5], np.ones((3, 2)), values=values, n=1)
    assert np.isfinite(adv).all()
    assert abs(adv.mean()) < 1e-6  # whitened by the reference rule


@pytest.mark.parametrize("estimator", ["rloo", "reinforce_baseline", "group_norm", "dr_grpo"])
def test_group_estimators_refuse_single_samples(estimator):
    with pytest.raises(ValueError, match="at least 2 samples"):
        run(estimator, [1.0, 0.0], np.ones((2, 2)), n=1)


def test_rewards_must_fill_whole_groups():
    with pytest.raises(ValueError, match="num_prompts \\* 4"):
        run("rloo", [1.0, 0.0, 1.0], np.ones((3, 2)), n=4)


@pytest.mark.parametrize("estimator", ADVANTAGE_ESTIMATORS)
def test_masked_rows_and_all_masked_batches_stay_finite(estimator):
    mask = np.array([[1, 1, 0], [0, 0, 0], [1, 0, 0], [0, 0, 0]], np.float32)
    kl = np.where(mask > 0, 0.1, np.inf)  # garbage outside the mask must not leak
    values = np.where(mask > 0, 0.3, np.nan) if estimator == "gae" else None
    adv, ret = run(estimator, [1.0, 0.0, 0.5, 1.0], mask, kl=kl, values=values)
    assert np.isfinite(adv).all() and np.isfinite(ret).all()
    assert (adv[mask == 0] == 0).all() and (ret[mask == 0] == 0).all()
    adv, ret = run(estimator, [1.0, 0.0, 0.5, 1.0], np.zeros((4, 3)), values=values)
    assert (adv == 0).all() and (ret == 0).all()


def _gae_loop(r, v, mask, gamma, lambd):
    r, v = r * mask, v * mask
    adv = np.zeros_like(r)
    for b in range(r.shape[0]):
        last = 0.0
        for t in reversed(range(r.shape[1])):
            next_v = v[b, t + 1] if t + 1 < r.shape[1] else 0.0
            last = r[b, t] + gamma * next_v - v[b, t] + gamma * lambd * last
            adv[b, t] = last
    return adv * mask, (adv + v) * mask


@pytest.mark.parametrize("gamma,lambd", [(1.0, 1.0), (0.99, 0.95), (0.9, 0.0)])
def test_gae_matches_a_hand_loop(gamma, lambd):
    rng = np.random.default_rng(0)
    r, v = rng.normal(size=(3, 6)), rng.normal(size=(3, 6))
    mask = (np.arange(6)[None, :] < np.array([[6], [3], [1]])).astype(np.float64)
    adv, ret = gae(jnp.asarray(r, jnp.float32), jnp.asarray(v, jnp.float32), jnp.asarray(mask), gamma, lambd)
    exp_adv, exp_ret = _gae_loop(r, v, mask, gamma, lambd)
    np.testing.assert_allclose(adv, exp_adv, atol=1e-5)
    np.testing.assert_allclose(ret, exp_ret, atol=1e-5)


def test_gae_with_unit_gamma_lambda_is_reward_minus_future_kl_minus_value():
    # A_t = (R - beta * sum_{s>=t} kl_s) - V_t
    mask, kl, values = [[1, 1, 1]], [[0.1, 0.2, 0.3]], [[0.5, 0.4, 0.2]]
    adv, ret = run("gae", [2.0], mask, kl=kl, values=values, n=1, init_kl_coef=1.0, advantage_whitening="off")
    future_kl = np.array([0.6, 0.5, 0.3])
    np.testing.assert_allclose(adv[0], 2.0 - future_kl - np.array(values[0]), rtol=1e-6)
    np.testing.assert_allclose(ret[0], 2.0 - future_kl, rtol=1e-6)


def test_returns_to_go_ignore_positions_outside_the_mask():
    r = jnp.array([[1.0, 2.0, 100.0]])
    np.testing.assert_allclose(returns_to_go(r, jnp.array([[1, 1, 0]]), 1.0), [[3.0, 2.0, 0.0]])


def test_gae_needs_values_and_unknown_names_are_errors():
    with pytest.raises(ValueError, match="values_BT"):
        run("gae", [1.0], [[1]], n=1)
    with pytest.raises(ValueError, match="advantage_estimator: expected one of"):
        run("ppo", [1.0], [[1]], n=1)
    with pytest.raises(ValueError, match="advantage_whitening"):
        run("reinforce", [1.0], [[1]], n=1, advantage_whitening="sometimes")


def test_jit_with_a_traced_kl_coef():
    c = cfg(advantage_estimator="reinforce_baseline")
    fn = jax.jit(lambda r, kl, m, beta: compute_advantages(c, r, kl, m, n_samples=2, kl_coef=beta))
    rewards, kl, mask = jnp.array([1.0, 0.0]), jnp.full((2, 3), 0.1), jnp.ones((2, 3))
    adv, ret = fn(rewards, kl, mask, 0.5)
    eager_adv, eager_ret = compute_advantages(c, rewards, kl, mask, n_samples=2, kl_coef=0.5)
    np.testing.assert_allclose(adv, eager_adv, rtol=1e-6)
    np.testing.assert_allclose(ret, eager_ret, rtol=1e-6)
