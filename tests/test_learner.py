"""The learner's rollout-level flow without engines: micro-batches built once and reused by every pass, the first
optimizer step exactly on-policy, the old-policy pass only where needed, KL and advantages in one compiled function
equal to the eager estimator, per-sample arrays cut and put back in order."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from learner_jax.experience import make_experience
from learner_jax.learner import Learner, TrainState, group_permutation
from learner_jax.models.config import ModelOptions
from learner_jax.models.hf_io import load_checkpoint
from learner_jax.optim import make_optimizer
from learner_jax.rl.advantages import compute_advantages
from learner_jax.rl.kl import approx_kl, make_kl_controller
from learner_jax.setup import LoopState, Run
from learner_jax.sharding import Strategy
from shared.config import ShardingConfig, load_config
from shared.records import Sample, VisionInputs

N = 4  # samples per prompt


def _rollout(cfg, rng, prompts=4):
    """Prompt groups of N samples; odd prompts carry an image (one object shared by the group, as the pool sends)."""
    groups, vision = [], []
    for p in range(prompts):
        prompt = rng.integers(0, 400, 6).tolist()
        v = None
        if p % 2:
            prompt = prompt[:2] + [cfg.vision_start_token_id, *[cfg.image_token_id] * 4, cfg.vision_start_token_id + 1]
            v = VisionInputs(rng.normal(size=(16, cfg.vision.patch_dim)).astype(np.float32), np.array([[1, 4, 4]]))
        group = []
        for _ in range(N):
            r = int(rng.integers(2, 8))
            group.append(Sample(uid=p, prompt_ids=prompt, response_ids=rng.integers(0, 400, r).tolist(),
                                logprobs=(-rng.random(r)).tolist(), text="", finish_reason="stop", policy_version=0))
        groups.append(group)
        vision.append(v if v is not None else VisionInputs.empty(cfg.vision.patch_dim))
    return make_experience(groups, vision, rng.integers(0, 2, prompts * N).astype(np.float32))


def _run(ckpt, **sets):
    overrides = {"rollout.n_samples_per_prompt": N, "rollout.rollout_batch_size": 4, "train.train_batch_size": 16,
                 "train.micro_train_batch_size": 4, "actor.warmup_ratio": 0.0, **sets}  # fmt: skip
    cfg = load_config("demo", [f"{k}={v}" for k, v in overrides.items()])
    model_cfg, params = load_checkpoint(ckpt)
    strategy = Strategy.from_config(ShardingConfig("replicated"), model_cfg, jax.devices()[:1])
    params = strategy.place(params, strategy.param_shardings(params))
    tx, lr = make_optimizer(cfg.actor, 10, params)
    learner = Learner(model_cfg, ModelOptions(attention="softmax"), cfg.algo, strategy, 0, N, tx, params,
                      logprob_chunk=64)  # fmt: skip
    run = Run(cfg=cfg, model_cfg=model_cfg, learner=learner, ref_params=jax.tree.map(jnp.copy, params), lr_actor=lr,
              rollout=None, sync=None, scorer=None, ckpt=None, logger=None, total_rollouts=1)  # fmt: skip
    state = LoopState(actor=TrainState(params, learner.actor_step.init_opt_state(params)), critic=None, sampler=None,
                      kl_ctl=make_kl_controller(cfg.algo), rng=np.random.default_rng(0))  # fmt: skip
    return run, state


def _iteration(run, state, exp):
    perm = group_permutation(state.rng, exp.size, N)
    batches = run.batches(exp)
    arrays = {**run.learner.per_sample(exp), **run.passes(state, batches, perm)}
    kl, arrays["adv_BL"], arrays["returns_BL"], kl_mean = run.learner.kl_and_advantages(
        arrays["rewards_B"], arrays["mask_BL"], arrays["old_logp_BL"], arrays["ref_logp_BL"], arrays["values_BL"],
        state.kl_ctl.value)  # fmt: skip
    return perm, batches, arrays, kl, kl_mean


@pytest.mark.parametrize("epochs", [1, 2])
def test_micro_batches_are_built_once_per_partition_and_step_zero_is_on_policy(tiny_ckpt, epochs):
    run, state = _run(tiny_ckpt, **{"train.max_epochs": epochs})
    exp = _rollout(run.model_cfg, np.random.default_rng(0))
    perm, batches, arrays, kl, kl_mean = _iteration(run, state, exp)
    assert batches.builds == 4  # the old-policy and reference passes share the placed micro-batches
    assert float(kl_mean) == 0.0 and float(jnp.abs(kl).max()) == 0.0  # one program, same weights
    stats = run.update(state, batches, perm, arrays)
    assert batches.builds == 4 * epochs  # epoch 0 reuses the passes' micro-batches; a new epoch, a new partition
    assert state.actor.step == epochs
    assert stats["actor/grad_norm"] > 0
    if epochs == 1:
        assert stats["actor/log_ratio_abs_max"] == 0.0  # the step's own log-probs are the old ones
    else:  # the second epoch's step sees the first update: its log-ratio is no longer zero
        assert stats["actor/log_ratio_abs_max"] > 0.0


def test_old_policy_pass_runs_only_when_needed(tiny_ckpt):
    assert _run(tiny_ckpt)[0].needs_old_pass  # k1 KL in the reward needs the old log-probs before the update
    assert not _run(tiny_ckpt, **{"algo.use_kl_loss": "true", "algo.kl_estimator": "k3"})[0].needs_old_pass
    assert not _run(tiny_ckpt, **{"algo.init_kl_coef": 0.0})[0].needs_old_pass
    assert _run(tiny_ckpt, **{"algo.init_kl_coef": 0.0, "train.train_batch_size": 8})[0].needs_old_pass
    run, state = _run(tiny_ckpt, **{"algo.use_kl_loss": "true", "algo.kl_estimator": "k3"})
    exp = _rollout(run.model_cfg, np.random.default_rng(1))
    perm, batches, arrays, _, _ = _iteration(run, state, exp)
    assert arrays["old_logp_BL"] is None and arrays["ref_logp_BL"] is not None
    stats = run.update(state, batches, perm, arrays)
    assert stats["actor/log_ratio_abs_max"] == 0.0 and np.isfinite(stats["actor/kl_loss"])


def test_kl_and_advantages_in_one_program_equal_the_eager_estimators(tiny_ckpt):
    run, state = _run(tiny_ckpt, **{"algo.init_kl_coef": 0.05})
    rng = np.random.default_rng(2)
    exp = _rollout(run.model_cfg, rng)
    mask = jnp.asarray(exp.action_mask_BL)
    old = jnp.asarray(rng.normal(size=mask.shape).astype(np.float32)) * mask
    ref = jnp.asarray(rng.normal(size=mask.shape).astype(np.float32)) * mask
    rewards = jnp.asarray(exp.rewards_B)
    kl, adv, ret, kl_mean = run.learner.kl_and_advantages(rewards, mask, old, ref, None, 0.05)
    want_kl = approx_kl(old, ref, mask, "k1")
    want_adv, want_ret = compute_advantages(run.cfg.algo, rewards, want_kl, mask, None, n_samples=N, kl_coef=0.05)
    np.testing.assert_allclose(np.asarray(kl), np.asarray(want_kl), rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(np.asarray(adv), np.asarray(want_adv), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.asarray(ret), np.asarray(want_ret), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(float(kl_mean), float((want_kl * mask).sum() / mask.sum()), rtol=1e-5)


def test_per_sample_arrays_are_cut_by_partition_and_put_back_in_order(tiny_ckpt):
    run, _ = _run(tiny_ckpt)
    x = jnp.arange(16 * 3, dtype=jnp.float32).reshape(16, 3)
    perm = group_permutation(np.random.default_rng(3), 16, N)
    assert sorted(perm.tolist()) == list(range(16))
    assert all(len(set(perm[i:i + N] // N)) == 1 for i in range(0, 16, N))  # groups stay whole
    parts = run.learner.split({"x": x}, perm, 4)
    np.testing.assert_array_equal(np.asarray(parts[1]["x"]), np.asarray(x)[perm[4:8]])
    np.testing.assert_array_equal(np.asarray(run.learner.gather([p["x"] for p in parts], perm)), np.asarray(x))


def test_a_group_encodes_its_image_once_per_micro_batch(tiny_ckpt):
    run, state = _run(tiny_ckpt)
    exp = _rollout(run.model_cfg, np.random.default_rng(4))
    batches = run.batches(exp)
    placed = batches.get(np.arange(exp.size))  # contiguous: micro-batch k is prompt k's group of 4
    assert [int(b["image_grid_thw_N3"].shape[0]) for b in placed] == [0, 1, 0, 1]
