"""Asynchronous rollouts (`rollout.max_staleness`) and colocated engines (`rollout.colocate`) in the real loop:
samples one policy version old are trained on with the importance weight, a resumed asynchronous run equals the
uninterrupted one, a too-old sample is refused by name, and colocated engines sleep and wake every iteration and
hold exactly the pushed weights after waking."""
from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest

from shared.config import ConfigError, load_config
from shared.records import Sample

from test_trainer import metrics, ray_session, tiny_run_config  # noqa: F401  (ray_session is a fixture)

ASYNC = {"rollout.max_staleness": 1, "algo.tis_cap": 2.0}
GAE = "gae"  # the tiny model earns no reward: a critic's advantages give the policy gradients to move on
KEYS = ("reward/mean", "actor/policy_loss", "kl/mean", "response/length", "actor/grad_norm")


def test_one_version_old_samples_are_trained_on_with_the_importance_weight(ray_session, tiny_ckpt, synth_data,
                                                                            tmp_path):  # fmt: skip
    from learner_jax.trainer import train

    cfg = tiny_run_config(tmp_path, tiny_ckpt, synth_data, "async", GAE, **ASYNC, **{"train.max_rollouts": 3,
                                                                              "train.save_steps": 10})  # fmt: skip
    train(cfg)
    rows = metrics(cfg)
    samples = cfg.rollout.rollout_batch_size * cfg.rollout.n_samples_per_prompt
    # iteration 0 is generated from the start weights; later ones while the learner was one update ahead
    assert [(r["rollout/staleness_0"], r["rollout/staleness_1"]) for r in rows] == [(samples, 0)] + [(0, samples)] * 2
    assert all("actor/tis_weight_mean" in r and np.isfinite(r["actor/tis_weight_mean"]) for r in rows)
    assert rows[0]["actor/grad_norm"] > 0 and rows[1]["actor/tis_weight_mean"] != 1.0  # behaviour != learner
    assert all(0.0 <= r["overlap/engines_idle_fraction"] <= 1.0 for r in rows)


@pytest.mark.slow
def test_a_resumed_asynchronous_run_equals_the_uninterrupted_one(ray_session, tiny_ckpt, synth_data, tmp_path):
    from learner_jax.trainer import train

    sets = {**ASYNC, "train.save_steps": 2}
    full = tiny_run_config(tmp_path, tiny_ckpt, synth_data, "full", GAE, **sets, **{"train.max_rollouts": 4})
    train(full)
    train(tiny_run_config(tmp_path, tiny_ckpt, synth_data, "part", GAE, **sets, **{"train.max_rollouts": 2}))
    more = tiny_run_config(tmp_path, tiny_ckpt, synth_data, "part", GAE, **sets, **{"train.max_rollouts": 4})
    train(more, resume=True)
    a, b = metrics(full), metrics(more)
    assert [r["step"] for r in b] == [0, 1, 2, 3]
    # the window stops at the checkpoint: iteration 2 is generated after it, from the newest weights
    assert a[2]["rollout/staleness_0"] > 0 and a[3]["rollout/staleness_1"] > 0
    for ra, rb in zip(a, b):
        for key in (*KEYS, "rollout/staleness_mean"):
            np.testing.assert_allclose(rb[key], ra[key], rtol=1e-5, atol=1e-7, err_msg=f"step {ra['step']} {key}")


def test_colocated_engines_sleep_and_wake_every_iteration_and_hold_the_pushed_weights(ray_session, tiny_ckpt,
                                                                                      synth_data, tmp_path,
                                                                                      monkeypatch):  # fmt: skip
    from learner_jax import setup
    from learner_jax.trainer import train

    seen = {}
    finish = setup.Run.finish

    def finish_and_record(run, state):
        seen["stats"] = run.rollout.pool_call("call_all", "stats")
        seen["memory_kinds"] = {x.sharding.memory_kind for x in __import__("jax").tree.leaves(state.actor.params)}
        return finish(run, state)

    monkeypatch.setattr(setup.Run, "finish", finish_and_record)
    cfg = tiny_run_config(tmp_path, tiny_ckpt, synth_data, "colocated", GAE, **{
        "rollout.colocate": True, "train.offload_between_phases": True, "train.verify_every": 1,
        "train.max_rollouts": 3})  # fmt: skip
    train(cfg)
    rows = metrics(cfg)
    # after each wake the push was verified against the engines' checksums of every tensor
    assert all(r["sync/verified_tensors"] > 0 for r in rows)
    for engine in seen["stats"]:  # in order, each iteration, holding the version pushed before it
        assert engine["lifecycle"] == [(call, v) for v in range(3) for call in ("sleep", "wake")]
    assert seen["memory_kinds"] == {"device"}  # back on the devices for the last iteration's export
    with_offload = [r["actor/grad_norm"] for r in rows]
    plain = tiny_run_config(tmp_path, tiny_ckpt, synth_data, "plain", GAE, **{"train.max_rollouts": 3})
    train(plain)
    assert with_offload == [r["actor/grad_norm"] for r in metrics(plain)]  # sleeping and offloading change nothing


def test_a_sample_older_than_max_staleness_is_refused_by_name():
    from learner_jax.rollouts import Batch, RolloutQueue

    queue = RolloutQueue.__new__(RolloutQueue)
    queue.k, queue.state = 1, SimpleNamespace(version=5)
    old = Sample(uid=42, prompt_ids=[1], response_ids=[2], logprobs=[-0.1], text="x", finish_reason="stop",
                 policy_version=3)  # fmt: skip
    with pytest.raises(RuntimeError, match=r"uid 42 .*policy version 3, 2 versions behind .*max_staleness is 1"):
        queue.check_staleness(Batch(7, [], groups=[[old]]))


@pytest.mark.parametrize("sets, message", [
    ({"rollout.max_staleness": -1}, "rollout.max_staleness"),
    ({"rollout.max_staleness": 1, "rollout.colocate": True}, "rollout.colocate"),
    ({"rollout.max_staleness": 1}, "algo.tis_cap"),  # off_policy_correction tis without a cap
    ({"algo.tis_cap": 0}, "algo.tis_cap"),
    ({"rollout.sleep_level": 3}, "rollout.sleep_level"),
    ({"train.offload_between_phases": True}, "train.offload_between_phases"),
])  # fmt: skip
def test_bad_asynchronous_settings_fail_at_load(sets, message):
    with pytest.raises(ConfigError, match=message):
        load_config("demo", [f"{k}={v}" for k, v in sets.items()])
    assert load_config("demo", ["rollout.max_staleness=2", "algo.off_policy_correction=decoupled"])
