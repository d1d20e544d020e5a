"""The collective weight route on CPU (gloo): one broadcast group per engine with the bridge's sender actor as rank 0,
the engine's worker(s) as ranks 1..k; pushes after a training-like update leave the engines holding exactly the
pushed weights at the new version; a corrupted bucket is caught by the checksums; an engine the pool restarted is
joined into a fresh group at the next push. The NCCL form shares everything here but the broadcast itself."""
from __future__ import annotations

import threading

import numpy as np
import pytest
import torch

from bridge.collective import EngineCalls, GlooTransport
from bridge.sync import WeightSync
from bridge.targets import ServiceTarget
from bridge.transport import make_transport
from bridge.verify import WeightMismatch, verify_weights
from learner_jax.models.hf_io import load_checkpoint

from test_bridge_sync import corrupt_one, noisy

TIMEOUT_S = 60.0


@pytest.fixture(scope="module")
def learner(tiny_ckpt):
    return load_checkpoint(tiny_ckpt)


CorruptOne = corrupt_one(GlooTransport)  # flips one tensor's sign on its way into the object store


class LocalService:
    """`RolloutService`'s weight and pool calls over a pool in this process (the service minus its actor)."""

    def __init__(self, pool):
        self.pool = pool

    def update_weights(self, named, version, final=True):
        self.pool.update_weights(named[0] if isinstance(named, list) else named, version, final=final)

    def pool_call(self, method, *args):
        return getattr(self.pool, method)(*args)


class LocalEngines:
    """Engines of this process behind the pool's calls (`call`, `call_all`, `finish_update`); `swap` replaces an
    engine after the n-th bucket, as a pool restart in the middle of a push would."""

    def __init__(self, engines):
        self.engines = list(engines)
        self.swap = None  # (after_buckets, index, new engine)
        self.buckets = 0

    def call(self, k, method, *args):
        return getattr(self.engines[k], method)(*args)

    def call_all(self, method, *args):
        """Every engine at once, as the pool's actors run (a broadcast group waits for all its ranks)."""
        out, errors = [None] * len(self.engines), []

        def run(k, engine):
            try:
                out[k] = getattr(engine, method)(*args)
            except Exception as exc:
                errors.append(exc)

        threads = [threading.Thread(target=run, args=(k, e)) for k, e in enumerate(self.engines)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        if errors:
            raise errors[0]
        if method == "collective_receive":
            self.buckets += 1
            if self.swap and self.buckets == self.swap[0]:
                self.engines[self.swap[1]] = self.swap[2]
                self.swap = None
        return out

    def update_weights(self, named, version, final=True):
        for e in self.engines:
            e.update_weights(named, version, final)

    def finish_update(self, version):
        for e in self.engines:
            e.finish_update(version)

    def policy_version(self):
        return [e.policy_version() for e in self.engines]


def test_group_broadcast_of_every_dtype_between_threads():
    """rollout_torch.collective: a group of 3 ranks in one process; bfloat16 travels as its bits."""
    from rollout_torch.collective import Group, allocate, host_store, join_info, receive

    store = host_store(3, timeout_s=TIMEOUT_S)
    info = {"name": "t", "host": "127.0.0.1", "port": store.port, "world_size": 3, "timeout_s": TIMEOUT_S}
    meta = [("a", "float32", (3, 4)), ("b", "bfloat16", (5,)), ("c", "float16", (2, 2, 2))]
    sent = [torch.randn(s).to(getattr(torch, d)) for _, d, s in meta]
    got: dict[int, list] = {}

    def worker(rank):
        g = join_info(info, rank)
        got[rank] = receive(g, meta, f"rank {rank}")

    threads = [threading.Thread(target=worker, args=(r,)) for r in (1, 2)]
    for t in threads:
        t.start()
    g0 = Group("t", "127.0.0.1", store.port, 0, 3, TIMEOUT_S, store=store)
    for w in g0.broadcast(sent):
        w.wait()
    for t in threads:
        t.join(TIMEOUT_S)
    for rank in (1, 2):
        assert [n for n, _ in got[rank]] == ["a", "b", "c"]
        for (_, t), s in zip(got[rank], sent):
            assert t.dtype == s.dtype and torch.equal(t, s)
    assert [t.shape for _, t in allocate(meta)] == [torch.Size(s) for _, _, s in meta]
    with pytest.raises(ValueError, match="outside"):
        join_info(info, 3)


def test_push_into_an_in_process_vllm_engine(rollout_ray, vllm_engine, learner):
    """The worker extension joins next to vLLM's own torch.distributed group in the same process; the engine holds
    the pushed weights bit for bit at the new version; a corrupted bucket is caught; the weights are restored."""
    cfg, params = learner
    before = vllm_engine.policy_version()
    transport = make_transport("collective", vllm_engine, timeout_s=TIMEOUT_S)
    assert isinstance(transport, GlooTransport)
    try:
        updated = noisy(params, seed=21)
        report = WeightSync(vllm_engine, cfg, transport=transport, bucket_bytes=1 << 20).push(updated, version=31)
        assert report.transport == "collective" and report.buckets > 1 and report.engine_versions == [31]
        groups = transport.describe()
        assert list(groups) == [0] and groups[0]["sender_rank"] == 0 and groups[0]["engine_ranks"] == [1]
        assert groups[0]["world_size"] == vllm_engine.collective_world_size() == 2
        assert vllm_engine.collective_group() == groups[0]["name"]
        assert verify_weights(vllm_engine, updated, cfg) == 63
        assert vllm_engine.policy_version() == 31

        flipped, named = "model.layers.0.mlp.down_proj.weight", "language_model.model.layers.0.mlp.down_proj.weight"
        corrupt = CorruptOne(flipped, timeout_s=TIMEOUT_S)
        try:
            WeightSync(vllm_engine, cfg, transport=corrupt, bucket_bytes=1 << 20).push(updated, version=32)
        finally:
            corrupt.close()
        with pytest.raises(WeightMismatch) as err:
            verify_weights(vllm_engine, updated, cfg)
        assert list(err.value.differences) == [named]
        assert vllm_engine.collective_group() != groups[0]["name"]  # the second transport opened its own group
    finally:
        transport.close()
        WeightSync(vllm_engine, cfg, transport="direct").push(params, before)
        verify_weights(vllm_engine, params, cfg)


def test_rejected_bucket_is_drained_and_the_group_stays_usable(rollout_ray, hf_engine, learner):
    """An engine that refuses a bucket (a push of another version is open) still receives it, so the sender's
    broadcast completes and the next push goes through the same group."""
    cfg, params = learner
    transport = GlooTransport(timeout_s=TIMEOUT_S)
    try:
        updated = noisy(params, seed=22)
        WeightSync(hf_engine, cfg, transport=transport, bucket_bytes=1 << 20).push(updated, version=41)
        name = hf_engine.collective_group()
        hf_engine._pending = 99  # an unfinished push of another version
        with pytest.raises(RuntimeError, match="failed at bucket 1") as err:
            WeightSync(hf_engine, cfg, transport=transport, bucket_bytes=1 << 20).push(params, version=42)
        assert "unfinished" in str(err.value.__cause__.__cause__)
        hf_engine._pending = None
        verify_weights(hf_engine, updated, cfg)  # the rejected bucket changed nothing
        WeightSync(hf_engine, cfg, transport=transport, bucket_bytes=1 << 20).push(params, version=0)
        assert hf_engine.collective_group() == name
        verify_weights(hf_engine, params, cfg)
    finally:
        transport.close()


def test_two_engines_get_two_groups_and_a_replaced_engine_rejoins(rollout_ray, vllm_engine, hf_engine, learner,
                                                                   tiny_ckpt, rollout_engine_config):  # fmt: skip
    """Two engines (vLLM and transformers, in this process) reached through pool-style calls: 2 groups, the sender
    rank 0 of each and each engine's worker rank 1; a push reaches both at the new version; an engine replaced in the
    middle of a push fails it with an error naming the engine, and the next push joins it into a fresh group."""
    from rollout_torch.hf_engine import HFEngine

    cfg, params = learner
    before = [e.policy_version() for e in (vllm_engine, hf_engine)]
    target = LocalEngines([vllm_engine, hf_engine])
    transport = make_transport("collective", target, timeout_s=TIMEOUT_S)
    sync = WeightSync(target, cfg, transport=transport, bucket_bytes=1 << 20)
    try:
        groups = transport.connect(target)
        assert sorted(groups) == [0, 1] and groups[0] != groups[1]
        info = transport.describe()
        assert all(info[k]["sender_rank"] == 0 and info[k]["engine_ranks"] == [1] and info[k]["world_size"] == 2
                   for k in (0, 1))  # fmt: skip
        assert [vllm_engine.collective_group(), hf_engine.collective_group()] == [groups[0], groups[1]]

        updated = noisy(params, seed=26)
        report = sync.push(updated, version=51)
        assert report.engine_versions == [51, 51] and report.buckets > 2
        assert verify_weights(vllm_engine, updated, cfg) == 63 and verify_weights(hf_engine, updated, cfg) == 81

        # An aborted push is retried with its version; a vLLM engine cannot take a layer twice in one reload
        # session, so the engine replaced mid-push sits next to transformers engines only.
        fresh = [HFEngine(rollout_engine_config(tiny_ckpt)) for _ in range(3)]  # as restarted: no group, version 0
        target.engines = fresh[:2]
        sync.push(updated, version=51)  # both join groups of their own
        groups = transport.connect(target)
        target.swap, target.buckets = (1, 1, fresh[2]), 0
        with pytest.raises(RuntimeError, match="push of version 52 failed at bucket 2") as err:
            sync.push(noisy(params, seed=27), version=52)
        assert "engine(s) [1] lost their weight group during the push of version 52" in str(err.value.__cause__)
        again = noisy(params, seed=28)
        sync.push(again, version=52)  # the unfinished version again: rejoins engine 1, then a whole push
        after = transport.connect(target)
        assert after[0] == groups[0] and after[1] not in (groups[1], None)
        assert target.policy_version() == [52, 52]
        verify_weights(fresh[0], again, cfg)
        verify_weights(fresh[2], again, cfg)
    finally:
        transport.close()
        for engine, version in zip((vllm_engine, hf_engine), before):
            WeightSync(engine, cfg, transport="direct").push(params, version)
            verify_weights(engine, params, cfg)


@pytest.mark.slow
def test_two_engine_actors_get_two_groups_and_a_restarted_engine_rejoins(rollout_ray, tiny_ckpt, learner,
                                                                         rollout_engine_config):  # fmt: skip
    """A pool of two engine actors behind the service's calls: 2 groups, the sender rank 0 of each, every engine's
    worker rank 1; pushes reach both; an engine the pool restarted gets a fresh group at the next push."""
    from rollout_torch.pool import RolloutPool

    cfg, params = learner
    pool = RolloutPool.from_engine_config("transformers", rollout_engine_config(tiny_ckpt), num_engines=2,
                                          num_cpus_per_engine=1.0, threads=1)  # fmt: skip
    target = ServiceTarget(LocalService(pool), "transformers")
    transport = make_transport("collective", target, timeout_s=TIMEOUT_S)
    try:
        sync = WeightSync(target, cfg, transport=transport, bucket_bytes=1 << 20)
        groups = transport.connect(target)
        assert sorted(groups) == [0, 1] and groups[0] != groups[1]
        info = transport.describe()
        assert all(info[k]["sender_rank"] == 0 and info[k]["engine_ranks"] == [1] and info[k]["world_size"] == 2
                   for k in (0, 1))  # fmt: skip
        assert EngineCalls(target).call_all("collective_group") == [groups[0], groups[1]]

        updated = noisy(params, seed=23)
        report = sync.push(updated, version=5)
        assert report.engine_versions == [5, 5] and pool.call_all("policy_version") == [5, 5]
        assert verify_weights(target, updated, cfg) == 81  # every engine, tensor by tensor

        pool._restart(1)  # as after the actor died: a fresh engine, no group, the last push replayed by the pool
        assert pool.call(1, "collective_group") is None
        assert pool.call_all("policy_version") == [5, 5] and verify_weights(target, updated, cfg) == 81
        again = noisy(params, seed=24)
        sync.push(again, version=6)
        after = transport.connect(target)
        assert after[0] == groups[0] and after[1] != groups[1]
        assert pool.call_all("policy_version") == [6, 6]
        verify_weights(target, again, cfg)
    finally:
        transport.close()
        pool.shutdown()


@pytest.mark.slow
def test_collective_push_through_the_rollout_service_into_two_vllm_engines(rollout_ray, tiny_ckpt, learner):
    """The production route: the service actor's pool of two vLLM engine actors, each its own group."""
    from learner_jax.placement import spawn
    from shared.config import Config

    cfg, params = learner
    run = Config()
    run.model.path = tiny_ckpt
    run.rollout.backend, run.rollout.num_engines, run.rollout.dtype = "vllm", 2, "float32"
    run.rollout.weight_transport = "collective"
    run.rollout.kv_cache_gib, run.data.prompt_max_len, run.rollout.generate_max_len = 0.0625, 1024, 512
    service = spawn("rollout_torch.service:RolloutService", run.to_dict())
    target = ServiceTarget(service, run.rollout.backend)
    transport = make_transport(run.rollout.weight_transport, target, timeout_s=TIMEOUT_S)
    try:
        sync = WeightSync(target, cfg, transport=transport, bucket_bytes=1 << 20, dtype=run.rollout.dtype)
        updated = noisy(params, seed=25)
        report = sync.push(updated, version=7)
        assert report.transport == "collective" and report.engine_versions == [7, 7]
        info = transport.describe()
        assert sorted(info) == [0, 1] and info[0]["name"] != info[1]["name"]
        assert all(info[k]["sender_rank"] == 0 and info[k]["engine_ranks"] == [1] for k in (0, 1))
        assert service.pool_call("call_all", "policy_version") == [7, 7]
        assert verify_weights(target, updated, cfg) == 63
    finally:
        transport.close()
        service.shutdown()
        rollout_ray.kill(service.handle)
