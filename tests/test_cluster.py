"""A real two-node Ray cluster on this machine (`ray.cluster_utils.Cluster`: a head node and a second node with its
own resource): engines placed on the second node by `rollout.engine_resources`, generation and pushes crossing
nodes, an engine process killed mid-rollout losing nothing, the trainer joining the cluster by `ray.address`, and
a clear error for resources the cluster lacks."""
from __future__ import annotations

import os
import signal
import time

import pytest

from shared.config import load_config
from shared.records import SamplingSpec

from test_rollout_pool import assert_greedy_paths_agree, kill_once_in_flight
from test_trainer import metrics, tiny_run_config

pytestmark = pytest.mark.slow
ROLLOUT_NODE = {"CPU": 1, "rollout_node": 1}


@pytest.fixture(scope="module")
def cluster():
    import ray
    from ray.cluster_utils import Cluster

    from learner_jax.placement import WORKER_ENV

    ray.shutdown()
    for k, v in WORKER_ENV.items():
        os.environ.setdefault(k, v)
    c = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
    second = c.add_node(num_cpus=2, resources={"rollout_node": 2})
    c.wait_for_nodes()
    yield c, second
    ray.shutdown()
    c.shutdown()


def _connect(c):
    from learner_jax.placement import start_ray

    start_ray(load_config("demo", [f"ray.address={c.address}"]).ray)


def test_engines_on_the_second_node_survive_a_kill_mid_rollout(cluster, tiny_ckpt, rollout_prompts, weights,
                                                               rollout_engine_config):  # fmt: skip
    import ray

    from rollout_torch.pool import RolloutPool

    c, second = cluster
    _connect(c)
    cfg = load_config("demo", [f"model.path={tiny_ckpt}", "rollout.num_engines=2",
                               "rollout.engine_resources={CPU: 1, rollout_node: 1}", "rollout.placement=spread"])  # fmt: skip
    pool = RolloutPool.__new__(RolloutPool)
    pool._start("vllm", rollout_engine_config(tiny_ckpt), 2, dict(cfg.rollout.engine_resources), 3, 1,
                cfg.rollout.placement, 60.0)  # fmt: skip
    try:
        learner_node = ray.get_runtime_context().get_node_id()
        assert pool.engine_nodes() == [second.node_id] * 2 != [learner_node] * 2
        pool.update_weights(weights.items(), version=5)  # the bucket crosses from this node to the engines'
        prompts = [p for _ in range(3) for p in rollout_prompts][:8]
        sampling = SamplingSpec(n=2, temperature=0.0, max_tokens=200)
        want = pool.generate(prompts, sampling)
        pid = ray.get(pool.actors[1].ready.remote())
        victim = kill_once_in_flight(pool, 1, lambda actor: os.kill(pid, signal.SIGKILL))  # the engine's process
        got = pool.generate(prompts, sampling)
        assert pool.stats[1].restarts == 1 and pool.actors[1] is not victim
        assert [len(g) for g in got] == [2] * len(prompts)  # nothing lost
        assert_greedy_paths_agree(got, want)
        assert {s.policy_version for g in got for s in g} == {5}  # the new engine was brought to the pushed weights
        assert pool.engine_nodes() == [second.node_id] * 2  # restarted in its own bundle, on the second node
    finally:
        pool.shutdown()


def test_the_trainer_joins_the_cluster_by_address_with_engines_on_the_second_node(cluster, tiny_ckpt, synth_data,
                                                                                 tmp_path):  # fmt: skip
    from learner_jax.trainer import train

    c, _ = cluster
    cfg = tiny_run_config(tmp_path, tiny_ckpt, synth_data, "cluster", **{
        "ray.address": c.address, "rollout.num_engines": 2, "rollout.engine_resources": "{CPU: 1, rollout_node: 1}",
        "train.verify_every": 1})  # fmt: skip
    train(cfg)  # only the second node has `rollout_node`: the engines can run nowhere else
    rows = metrics(cfg)
    assert len(rows) == 2 and all(r["sync/verified_tensors"] > 0 for r in rows)
    assert rows[1]["policy_version"] == 2.0


def test_resources_the_cluster_lacks_fail_within_the_timeout(cluster, tiny_ckpt, rollout_engine_config):
    from rollout_torch.pool import RolloutPool

    _connect(cluster[0])
    t0 = time.monotonic()
    with pytest.raises(RuntimeError, match=r"cannot place 3 engine\(s\) asking .*'rollout_node': 1.0.* within 5 s"):
        RolloutPool.__new__(RolloutPool)._start("vllm", rollout_engine_config(tiny_ckpt), 3, ROLLOUT_NODE, 3, 1,
                                                "pack", 5.0)  # fmt: skip
    assert time.monotonic() - t0 < 30

