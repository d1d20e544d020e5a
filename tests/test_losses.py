"""Policy/value losses, KL estimators and controllers, aggregation, on hand-computed values."""
import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from learner_jax.rl.kl import AdaptiveKLController, FixedKLController, approx_kl, make_kl_controller
from learner_jax.rl.losses import actor_loss, aggregate, critic_loss, kl_loss, policy_loss, token_entropy, value_loss
from shared.config import AlgoConfig

ONE = jnp.ones((1, 1))


def ppo_token(ratio, adv, **kw):
    loss, _ = policy_loss(jnp.log(jnp.array([[ratio]])), jnp.zeros((1, 1)), jnp.array([[adv]]), ONE, **kw)
    return float(loss)


@pytest.mark.parametrize(
    "ratio,adv,expected",
    [
        (1.5, 1.0, -1.2),  # min(1.5, 1.2): the clip stops further increase
        (1.5, -1.0, 1.5),  # min(-1.5, -1.2): no clip when it would help
        (0.5, 1.0, -0.5),
        (0.5, -1.0, 0.8),  # min(-0.5, -0.8)
        (1.1, 2.0, -2.2),  # inside the trust region: plain ratio * A
    ],
)
def test_ppo_clip(ratio, adv, expected):
    assert ppo_token(ratio, adv) == pytest.approx(expected, rel=1e-6)


def test_asymmetric_clip():
    assert ppo_token(1.5, 1.0, eps_low=0.2, eps_high=0.28) == pytest.approx(-1.28, rel=1e-6)
    assert ppo_token(0.5, -1.0, eps_low=0.1, eps_high=0.28) == pytest.approx(0.9, rel=1e-6)


def test_dual_clip_bounds_negative_advantages_only():
    assert ppo_token(5.0, -1.0) == pytest.approx(5.0, rel=1e-6)
    assert ppo_token(5.0, -1.0, dual_clip=3.0) == pytest.approx(3.0, rel=1e-6)
    assert ppo_token(2.0, -1.0, dual_clip=3.0) == pytest.approx(2.0, rel=1e-6)
    assert ppo_token(5.0, 1.0, dual_clip=3.0) == pytest.approx(-1.2, rel=1e-6)
    with pytest.raises(ValueError, match="dual_clip"):
        ppo_token(1.0, 1.0, dual_clip=1.0)


def test_policy_metrics():
    logp = jnp.log(jnp.array([[1.5, 1.0, 0.9, 7.0]]))
    adv = jnp.array([[1.0, 1.0, -1.0, 1.0]])
    mask = jnp.array([[1, 1, 1, 0]])
    _, m = policy_loss(logp, jnp.zeros((1, 4)), adv, mask)
    assert float(m["clip_frac"]) == pytest.approx(1 / 3)  # only the first token is clipped
    assert float(m["ratio_mean"]) == pytest.approx((1.5 + 1.0 + 0.9) / 3, rel=1e-6)
    assert float(m["approx_kl"]) == pytest.approx(-(math.log(1.5) + math.log(0.9)) / 3, rel=1e-5)


def test_truncated_importance_weight():
    logp = jnp.zeros((1, 2))
    old = jnp.zeros((1, 2))
    rollout = jnp.log(jnp.array([[1 / 3, 2.0]]))  # engine/learner gaps: weights 3 (capped to 2) and 0.5
    adv = jnp.ones((1, 2))

    def loss_fn(lp, ro):
        return policy_loss(lp, old, adv, jnp.ones((1, 2)), rollout_logp_BT=ro, tis_cap=2.0)[0]

    assert float(loss_fn(logp, rollout)) == pytest.approx(-(2.0 + 0.5) / 2, rel=1e-6)
    g_logp, g_rollout = jax.grad(loss_fn, argnums=(0, 1))(logp, rollout)
    np.testing.assert_allclose(g_logp, [[-1.0, -0.25]], rtol=1e-6)  # d(-ratio*A*w)/dlogp / 2 tokens
    np.testing.assert_allclose(g_rollout, 0.0)
    with pytest.raises(ValueError, match="rollout_logp_BT"):
        policy_loss(logp, old, adv, jnp.ones((1, 2)), tis_cap=2.0)


def test_masked_garbage_gives_finite_values_and_gradients():
    logp = jnp.array([[0.0, 500.0]])
    old = jnp.array([[0.0, -500.0]])
    adv = jnp.array([[1.0, jnp.nan]])
    mask = jnp.array([[1, 0]])
    loss, grad = jax.value_and_grad(lambda lp: policy_loss(lp, old, adv, mask, dual_clip=3.0)[0])(logp)
    assert float(loss) == -1.0 and np.isfinite(np.asarray(grad)).all()
    grad = jax.grad(lambda lp: kl_loss(lp, old, mask, estimator="k3"))(logp)
    assert np.isfinite(np.asarray(grad)).all()
    values = jnp.array([[0.5, jnp.inf]])
    loss, grad = jax.value_and_grad(lambda v: value_loss(v, jnp.zeros((1, 2)), adv, mask)[0])(values)
    assert np.isfinite(float(loss)) and np.isfinite(np.asarray(grad)).all()


@pytest.mark.parametrize(
    "v,old,ret,expected",
    [
        (1.0, 0.0, 1.0, 0.5 * 0.8**2),  # V moved past the clip: the clipped error (0.2 - 1)^2 dominates
        (0.1, 0.0, 1.0, 0.5 * 0.9**2),  # inside the clip range: both terms equal
        (-1.0, 0.0, -1.0, 0.5 * 0.8**2),
        (2.0, 0.0, 0.0, 0.5 * 4.0),  # unclipped error is larger: max keeps it
    ],
)
def test_value_clip(v, old, ret, expected):
    loss, _ = value_loss(jnp.array([[v]]), jnp.array([[old]]), jnp.array([[ret]]), ONE, value_clip=0.2)
    assert float(loss) == pytest.approx(expected, rel=1e-6)


def test_value_loss_without_clip_and_metrics():
    loss, m = value_loss(jnp.array([[1.0, 3.0]]), jnp.zeros((1, 2)), jnp.zeros((1, 2)), jnp.array([[1, 0]]), value_clip=None)
    assert float(loss) == pytest.approx(0.5)
    assert float(m["values_mean"]) == pytest.approx(1.0)


LOSS = jnp.array([[1.0, 2.0, 3.0, 4.0], [5.0, 0.0, 0.0, 0.0], [9.0, 9.0, 9.0, 9.0]])
MASK = jnp.array([[1, 1, 1, 0], [1, 0, 0, 0], [0, 0, 0, 0]])


def test_aggregation_modes():
    assert float(aggregate(LOSS, MASK, "token_mean")) == pytest.approx((1 + 2 + 3 + 5) / 4)
    # the empty third row is not a sequence of the mean
    assert float(aggregate(LOSS, MASK, "seq_mean_token_mean")) == pytest.approx((2.0 + 5.0) / 2)
    assert float(aggregate(LOSS, MASK, "global_token_mean", num_tokens=10)) == pytest.approx(11 / 10)
    with pytest.raises(ValueError, match="num_tokens"):
        aggregate(LOSS, MASK, "global_token_mean")
    with pytest.raises(ValueError, match="loss_agg"):
        aggregate(LOSS, MASK, "sum")
    assert float(aggregate(LOSS, jnp.zeros_like(MASK), "token_mean")) == 0.0


def test_micro_batch_accumulation_equals_the_global_token_mean():
    rng = np.random.default_rng(0)
    logp, old, adv = (jnp.asarray(rng.normal(size=(6, 5)) * s, jnp.float32) for s in (0.3, 0.3, 1.0))
    mask = jnp.asarray(np.arange(5)[None, :] < rng.integers(0, 6, size=(6, 1)))
    total = mask.sum()

    def step_loss(lp, agg, rows, num_tokens=None):
        return policy_loss(lp[rows], old[rows], adv[rows], mask[rows], agg=agg, num_tokens=num_tokens)[0]

    def accumulated(lp):  # each micro-batch knows only its rows and the step's token count
        return sum(step_loss(lp, "global_token_mean", rows, total) for rows in (slice(0, 2), slice(2, 3), slice(3, 6)))

    full, g_full = jax.jit(jax.value_and_grad(lambda lp: step_loss(lp, "token_mean", slice(None))))(logp)
    summed, g_sum = jax.jit(jax.value_and_grad(accumulated))(logp)
    assert float(summed) == pytest.approx(float(full), rel=1e-5)
    np.testing.assert_allclose(g_sum, g_full, rtol=1e-5, atol=1e-7)


def test_kl_estimators_on_known_log_ratios():
    l = np.array([[math.log(2), -math.log(2), 0.0, 1.0]])
    ref = jnp.zeros((1, 4))
    mask = jnp.array([[1, 1, 1, 0]])
    np.testing.assert_allclose(approx_kl(jnp.asarray(l), ref, mask, "k1"), [[math.log(2), -math.log(2), 0, 0]], rtol=1e-6)
    np.testing.assert_allclose(approx_kl(jnp.asarray(l), ref, mask, "k2"), [[math.log(2) ** 2 / 2] * 2 + [0, 0]], rtol=1e-6)
    k3 = [0.5 - 1 + math.log(2), 2 - 1 - math.log(2), 0, 0]  # exp(-l) - 1 + l
    np.testing.assert_allclose(approx_kl(jnp.asarray(l), ref, mask, "k3"), [k3], rtol=1e-6, atol=1e-7)
    with pytest.raises(ValueError, match="k1, k2, k3"):
        approx_kl(ref, ref, mask, "k4")


def test_kl_loss_value_and_gradient():
    logp = jnp.array([[math.log(2), 0.0]])
    loss, grad = jax.value_and_grad(lambda lp: kl_loss(lp, jnp.zeros((1, 2)), jnp.ones((1, 2)), estimator="k3"))(logp)
    assert float(loss) == pytest.approx((math.log(2) - 0.5) / 2, rel=1e-6)
    np.testing.assert_allclose(grad, [[(1 - 0.5) / 2, 0.0]], rtol=1e-6)  # d k3/dl = 1 - exp(-l)


def test_kl_controllers():
    fixed = FixedKLController(0.001)
    fixed.update(5.0, 4096)
    assert fixed.value == 0.001
    adaptive = AdaptiveKLController(0.1, target=0.05, horizon=10000)
    adaptive.update(0.1, 1000)  # KL twice the target: error clipped to +0.2
    assert adaptive.value == pytest.approx(0.1 * (1 + 0.2 * 1000 / 10000))
    adaptive.update(0.045, 1000)  # 10% under target
    assert adaptive.value == pytest.approx(0.102 * (1 - 0.1 * 0.1))
    assert isinstance(make_kl_controller(AlgoConfig()), FixedKLController)
    ctl = make_kl_controller(dataclasses.replace(AlgoConfig(), kl_target=0.1, kl_horizon=500))
    assert (ctl.value, ctl.target, ctl.horizon) == (0.001, 0.1, 500)


def test_token_entropy():
    logits = jnp.array([[[0.0, 0.0, 0.0, 0.0], [0.0, -jnp.inf, 0.0, -jnp.inf]]])
    np.testing.assert_allclose(token_entropy(logits), [[math.log(4), math.log(2)]], rtol=1e-6)


def test_actor_loss_combines_terms_from_the_config():
    c = dataclasses.replace(
        AlgoConfig(), use_kl_loss=True, init_kl_coef=0.5, kl_estimator="k2", entropy_coef=0.1, loss_agg="token_mean"
    )
    logp, old, ref = jnp.array([[0.2]]), jnp.zeros((1, 1)), jnp.zeros((1, 1))
    adv, entropy = jnp.array([[1.0]]), jnp.array([[2.0]])
    loss, m = actor_loss(c, logp, old, adv, ONE, ref_logp_BT=ref, entropy_BT=entropy)
    policy = -min(math.exp(0.2), 1.2)
    assert float(loss) == pytest.approx(policy + 0.5 * 0.2**2 / 2 - 0.1 * 2.0, rel=1e-6)
    assert set(m) >= {"policy_loss", "kl_loss", "entropy", "clip_frac", "approx_kl", "ratio_mean"}
    loss, _ = actor_loss(c, logp, old, adv, ONE, ref_logp_BT=ref, entropy_BT=entropy, kl_coef=0.0)
    assert float(loss) == pytest.approx(policy - 0.2, rel=1e-6)
    with pytest.raises(ValueError, match="ref_logp_BT"):
        actor_loss(c, logp, old, adv, ONE, entropy_BT=entropy)
    with pytest.raises(ValueError, match="entropy_BT"):
        actor_loss(c, logp, old, adv, ONE, ref_logp_BT=ref)


def test_actor_loss_reads_clip_settings():
    c = dataclasses.replace(AlgoConfig(), eps_clip=0.1, eps_clip_high=0.3, dual_clip=2.0, loss_agg="global_token_mean")
    logp = jnp.log(jnp.array([[2.0, 0.5, 4.0]]))
    adv = jnp.array([[1.0, -1.0, -1.0]])
    loss, _ = actor_loss(c, logp, jnp.zeros((1, 3)), adv, jnp.ones((1, 3)), num_tokens=6)
    assert float(loss) == pytest.approx((-1.3 + 0.9 + 2.0) / 6, rel=1e-6)  # this micro-batch holds half the step


def test_critic_loss_reads_the_config():
    c = dataclasses.replace(AlgoConfig(), value_clip=0.5, loss_agg="seq_mean_token_mean")
    loss, m = critic_loss(c, jnp.array([[1.0]]), jnp.zeros((1, 1)), jnp.array([[1.0]]), ONE)
    assert float(loss) == pytest.approx(0.5 * 0.25)
    assert float(m["value_loss"]) == float(loss)
