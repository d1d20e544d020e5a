"""The Ray pool of vLLM engines: order, grouping, weight fan-out, and recovery from a killed engine actor."""
from __future__ import annotations


import numpy as np
import pytest

from rollout_torch.pool import RolloutPool, shard_bounds
from shared.records import SamplingSpec

GREEDY = SamplingSpec(temperature=0.0, max_tokens=12)


def tokens(results):
    return [[s.response_ids for s in g] for g in results]


def assert_greedy_paths_agree(a, b, tol=1e-3):
    """Greedy answers computed with different float summation orders (other thread counts, cached prefixes): equal
    tokens with logprobs within `tol`, except that a path may fork where its two best tokens tie within `tol`."""
    for ga, gb in zip(a, b):
        x, y = ga[0], gb[0]
        same = next((i for i, (s, t) in enumerate(zip(x.response_ids, y.response_ids)) if s != t), None)
        n = same if same is not None else min(len(x.response_ids), len(y.response_ids))
        assert same is not None or len(x.response_ids) == len(y.response_ids)
        assert max((abs(p - q) for p, q in zip(x.logprobs[:n], y.logprobs[:n])), default=0.0) < tol
        if same is not None:
            assert abs(x.logprobs[same] - y.logprobs[same]) < tol, f"paths fork at token {same} without a tie"


def kill_once_in_flight(pool, engine: int, kill):
    """Stand in for an engine's handle: its next `generate` is submitted, then `kill(actor)` ends the actor that
    runs it (deterministic: the shard is always in flight). Returns the victim's handle."""
    victim = pool.actors[engine]

    class KilledOnceItsShardIsInFlight:
        def __getattr__(self, name):
            method = getattr(victim, name)
            if name != "generate":
                return method

            class Remote:
                @staticmethod
                def remote(*args, **kwargs):
                    ref = method.remote(*args, **kwargs)
                    pool.actors[engine] = victim  # the pool's own handle again, for its restart logic
                    kill(victim)
                    return ref

            return Remote

    pool.actors[engine] = KilledOnceItsShardIsInFlight()
    return victim


@pytest.fixture(scope="module")
def pool(rollout_ray, tiny_ckpt, rollout_engine_config):
    pool = RolloutPool.from_engine_config("vllm", rollout_engine_config(tiny_ckpt), num_engines=2, num_cpus_per_engine=1)
    yield pool
    pool.shutdown()


@pytest.fixture(scope="module")
def prompts(rollout_prompts):
    return [p for _ in range(2) for p in rollout_prompts][:7]  # odd count: shards of 4 and 3


@pytest.fixture(scope="module")
def base(pool, prompts):
    return pool.generate(prompts, GREEDY)


def test_shard_bounds_balance_by_count():
    assert shard_bounds(7, 2) == [(0, 4), (4, 7)]
    assert shard_bounds(2, 3) == [(0, 1), (1, 2)]
    assert shard_bounds(0, 2) == []
    sizes = [b - a for a, b in shard_bounds(103, 8)]
    assert sum(sizes) == 103 and max(sizes) - min(sizes) <= 1


def test_results_come_back_in_prompt_order_from_both_engines(pool, prompts, base, vllm_engine):
    assert [g[0].uid for g in base] == [p.uid for p in prompts]
    assert [g[0].engine_id for g in base] == [0, 0, 0, 0, 1, 1, 1]
    # A single in-process engine on the same weights gives the same greedy answers.
    assert_greedy_paths_agree(base, vllm_engine.generate(prompts, GREEDY))
    stats = pool.engine_stats()
    assert [s["prompts"] >= n for s, n in zip(stats, (4, 3))] == [True, True]
    assert all(s["generated_tokens"] > 0 and s["tokens_per_s"] > 0 for s in stats)


def test_n_samples_stay_grouped_with_their_prompt(pool, prompts):
    spec = SamplingSpec(n=3, temperature=1.0, max_tokens=6, seed=11)
    first, again = pool.generate(prompts, spec), pool.generate(prompts, spec)
    assert [len(g) for g in first] == [3] * len(prompts)
    assert all({s.uid for s in g} == {p.uid} for g, p in zip(first, prompts))
    assert tokens(first) == tokens(again)  # per-request seeds: the split over engines does not matter


def test_weight_push_fans_out_and_restores_exactly(pool, rollout_ray, prompts, base, weights, scaled):
    pool.update_weights(scaled.items(), version=1)
    changed = pool.generate(prompts, GREEDY)
    assert tokens(changed) != tokens(base)
    assert {s.policy_version for g in changed for s in g} == {1}
    assert pool.call_all("policy_version") == [1, 1]
    # The bridge may hand over an ObjectRef to the tensors it already put in the object store.
    pool.update_weights(rollout_ray.put(list(weights.items())), version=2)
    restored = pool.generate(prompts, GREEDY)
    assert tokens(restored) == tokens(base)
    assert [g[0].logprobs for g in restored] == [g[0].logprobs for g in base]


@pytest.mark.slow  # a fresh engine actor starts inside it
def test_killed_engine_is_restarted_with_current_weights_and_its_prompts_rerun(pool, rollout_ray, prompts, scaled, weights):
    pool.update_weights(scaled.items(), version=3)
    long = SamplingSpec(temperature=0.0, max_tokens=256)
    want = pool.generate(prompts, long)
    restarts = pool.stats[0].restarts
    victim = kill_once_in_flight(pool, 0, rollout_ray.kill)
    got = pool.generate(prompts, long)
    assert pool.stats[0].restarts == restarts + 1
    assert pool.actors[0] is not victim
    # Nothing lost, and the new engine answers with the pushed weights (a warm prefix cache may move float sums).
    assert_greedy_paths_agree(got, want)
    assert {s.policy_version for g in got for s in g} == {3}
    pool.update_weights(weights.items(), version=4)


def test_an_engine_ray_cannot_place_fails_with_a_clear_error(rollout_ray, tiny_ckpt, rollout_engine_config, monkeypatch):
    import rollout_torch.pool as pool_module

    monkeypatch.setattr(pool_module, "START_TIMEOUT_S", 2.0)
    with pytest.raises(RuntimeError, match=r"Ray cannot place 1 engine\(s\) asking \{'CPU': 64.0\} each .* within 2 s"):
        RolloutPool.from_engine_config("vllm", rollout_engine_config(tiny_ckpt), num_cpus_per_engine=64)


def test_a_rejected_bucket_leaves_the_pool_unchanged(pool, weights):
    version = pool.policy_version()
    with pytest.raises(Exception, match="whole fused groups"):
        pool.update_weights([("model.layers.0.self_attn.q_proj.weight", weights["model.layers.0.self_attn.q_proj.weight"])], 99)
    assert pool.policy_version() == version and pool.call_all("policy_version") == [version, version]
    pool.update_weights(weights.items(), version=version)  # the pool still takes pushes


def test_unfinished_push_blocks_generation(pool, prompts, weights):
    layer0 = [(k, v) for k, v in weights.items() if k.startswith("model.layers.0.")]
    pool.update_weights(layer0, version=5, final=False)
    with pytest.raises(RuntimeError, match="unfinished"):
        pool.generate(prompts, GREEDY)
    pool.finish_update(5)
    assert pool.policy_version() == 5 and pool.call_all("policy_version") == [5, 5]


@pytest.mark.slow  # starts another engine actor
def test_bf16_vllm_engine_gives_finite_logprobs(rollout_ray, tiny_ckpt, rollout_engine_config, prompts):
    # The module's pool holds both CPUs of the test cluster; this engine asks for none.
    cfg = rollout_engine_config(tiny_ckpt, dtype="bfloat16")
    bf16 = RolloutPool.from_engine_config("vllm", cfg, num_engines=1, num_cpus_per_engine=0)
    try:
        out = bf16.generate(prompts[:2], SamplingSpec(n=2, temperature=1.0, max_tokens=4, seed=0))
        assert [len(g) for g in out] == [2, 2]
        assert all(np.isfinite(s.logprobs).all() and len(s.logprobs) == len(s.response_ids) for g in out for s in g)
    finally:
        bf16.shutdown()


def test_an_engine_gets_the_threads_it_is_given_not_rays_one(rollout_ray, tiny_ckpt, rollout_engine_config):
    """Ray pins an actor holding one CPU to one thread; a CPU engine is given the cores the idle learner leaves."""
    import ray

    pool = RolloutPool.from_engine_config("vllm", rollout_engine_config(tiny_ckpt), num_cpus_per_engine=0, threads=2)
    try:
        assert ray.get(pool.actors[0].threads.remote()) == 2
    finally:
        pool.shutdown()


def test_pin_process_moves_every_thread_of_the_process(tmp_path):
    """`rollout.cpu_affinity`: the engine actor pins all its threads, those already running included."""
    import subprocess
    import sys

    script = (
        "import os, threading, time\n"
        "from rollout_torch.pool import pin_process\n"
        "t = threading.Thread(target=time.sleep, args=(5,), daemon=True); t.start()\n"
        "pin_process([0])\n"
        "print(sorted({min(os.sched_getaffinity(int(tid))) for tid in os.listdir('/proc/self/task')}),"
        " sorted({len(os.sched_getaffinity(int(tid))) for tid in os.listdir('/proc/self/task')}))\n"
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, check=True)
    assert out.stdout.split("\n")[0] == "[0] [1]"
