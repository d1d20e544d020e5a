import math

import jax
import jax.numpy as jnp
import numpy as np
import optax

from learner_jax.optim import cosine_with_min_lr, make_optimizer
from shared.config import OptimConfig


def test_schedule_is_the_reference_cosine_with_min_lr():
    cfg = OptimConfig(lr=1e-6, warmup_ratio=0.03, min_lr_ratio=0.1)
    total = 5038
    sched = cosine_with_min_lr(cfg, total)
    warmup = math.ceil(0.03 * total)  # 152, as the reference's ceil(0.03 * max_steps)
    assert float(sched(0)) == 0.0
    np.testing.assert_allclose(float(sched(76)), 1e-6 * 76 / warmup, rtol=1e-6)
    np.testing.assert_allclose(float(sched(warmup)), 1e-6, rtol=1e-6)
    mid = warmup + (total - warmup) / 2
    np.testing.assert_allclose(float(sched(mid)), 1e-7 + 0.5 * 9e-7, rtol=1e-5)
    np.testing.assert_allclose(float(sched(total)), 1e-7, rtol=1e-5)


def test_frozen_prefixes_do_not_move_nor_count_in_the_gradient_norm():
    params = {"visual": {"w": jnp.ones((2, 2))}, "text": {"w": jnp.ones((2, 2)), "norm": jnp.ones(2)}}
    cfg = OptimConfig(lr=0.1, warmup_ratio=0.0, max_norm=1.0, weight_decay=0.5)
    tx, _ = make_optimizer(cfg, 10, params, frozen=lambda name: name.startswith("visual"))
    state = tx.init(params)
    grads = {"visual": {"w": jnp.full((2, 2), 100.0)}, "text": {"w": jnp.full((2, 2), 0.1), "norm": jnp.zeros(2)}}
    updates, _ = tx.update(grads, state, params)
    new = optax.apply_updates(params, updates)
    np.testing.assert_array_equal(new["visual"]["w"], params["visual"]["w"])
    # The unfrozen gradient has norm 0.2 < max_norm: unclipped, Adam's first step moves by ~lr, plus decoupled decay.
    np.testing.assert_allclose(new["text"]["w"], 1 - 0.1 - 0.1 * 0.5, rtol=1e-4)
    np.testing.assert_allclose(new["text"]["norm"], 1.0)  # zero grad, no decay on norms
    assert all(jnp.isfinite(x).all() for x in jax.tree.leaves(new))
