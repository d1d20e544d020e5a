"""Weight pushes into real engines (vLLM and transformers, fp32, CPU) after a training-like update of the Flax params:
the engines' logprobs on an image prompt equal the learner's, the checksums of what they hold match, and a tensor
corrupted in transit is caught by name. The shared session engines get their original weights back afterwards."""
from __future__ import annotations

import time

import jax
import numpy as np
import pytest

from bridge.sync import WeightSync
from bridge.transport import DirectTransport
from bridge.verify import LogprobProbe, WeightMismatch, verify_logprobs, verify_weights
from learner_jax.probe import learner_logprobs
from learner_jax.models.hf_io import load_checkpoint
from rollout_torch.processing import load_processor, messages_to_prompt, process, vision_inputs

RESPONSE = "<think> There are 3 squares. </think><answer> The answer is $\\boxed{3}$ </answer>"


def noisy(params, seed: int, scale: float = 0.05):
    """A training-like update: every leaf moves by noise proportional to its own spread."""
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda x: (x + scale * np.std(x) * rng.standard_normal(x.shape)).astype(np.float32), params)


def make_probe(ckpt: str, image: str) -> LogprobProbe:
    proc = load_processor(ckpt)
    content = [{"type": "image", "image": image}, {"type": "text", "text": "How many squares are in the image?"}]
    prompt = messages_to_prompt(proc, [{"role": "user", "content": content}])
    ids = process(proc, [prompt])["input_ids"][0].tolist()  # placeholders expanded as the engines do
    response = proc.tokenizer.encode(RESPONSE + "<|im_end|>", add_special_tokens=False)
    return LogprobProbe(prompt, ids, response, vision_inputs(proc, prompt), proc.tokenizer.pad_token_id)


@pytest.fixture(scope="module")
def learner(tiny_ckpt):
    return load_checkpoint(tiny_ckpt)


@pytest.fixture(scope="module")
def probe(tiny_ckpt, rollout_images):
    return make_probe(tiny_ckpt, rollout_images[2])


@pytest.fixture(scope="module")
def engines(vllm_engine, hf_engine, learner):
    """The suite's shared engines; restored to the checkpoint's weights and their version at the end."""
    cfg, params = learner
    before = {e: e.policy_version() for e in (vllm_engine, hf_engine)}
    yield {"vllm": vllm_engine, "transformers": hf_engine}
    for engine, version in before.items():
        WeightSync(engine, cfg, transport="direct").push(params, version)
        verify_weights(engine, params, cfg)


def corrupt_one(transport_cls):
    """A `transport_cls` that flips the sign of the tensor named `name` on its way to the engines."""

    class CorruptOne(transport_cls):
        def __init__(self, name: str, **kw):
            super().__init__(**kw)
            self.name_to_flip = name

        def prepare(self, items):
            for w in items:
                if w.name == self.name_to_flip:
                    w.array = -w.array
            return super().prepare(items)

    return CorruptOne


@pytest.mark.parametrize("backend", ["vllm", "transformers"])
def test_pushed_update_matches_learner_logprobs_and_checksums(engines, learner, probe, backend):
    engine = engines[backend]
    cfg, params = learner
    before = np.array(engine.score(probe.prompt, probe.response_ids))
    updated = noisy(params, seed=1)
    report = WeightSync(engine, cfg, transport="direct", bucket_bytes=512 << 10).push(updated, version=11)
    assert report.version == 11 and report.engine_versions == [11] and engine.policy_version() == 11
    assert report.buckets > 4 and report.max_bucket_bytes <= 512 << 10
    assert report.bytes == sum(int(np.asarray(x).nbytes) for x in jax.tree.leaves(params))
    assert verify_weights(engine, updated, cfg) == (63 if backend == "vllm" else 81)
    after = np.array(engine.score(probe.prompt, probe.response_ids))
    ours = learner_logprobs(updated, cfg, probe)
    print(f"\n{backend}: max |engine - learner| logprob {np.abs(after - ours).max():.2e} over {len(ours)} tokens; "
          f"moved by the update {np.abs(after - before).max():.3f}")
    assert np.abs(after - before).max() > 0.05  # the push changed the policy the engine scores with
    assert np.abs(after - ours).max() <= 1e-3
    assert verify_logprobs(engine, learner_logprobs(updated, cfg, probe), probe) <= 1e-3
    with pytest.raises(WeightMismatch):
        verify_weights(engine, params, cfg)  # the old weights are no longer what the engine holds


@pytest.mark.parametrize("backend", ["vllm", "transformers"])
def test_shm_transport_pushes_the_same_weights(engines, learner, probe, backend):
    engine = engines[backend]
    cfg, params = learner
    updated = noisy(params, seed=2)
    report = WeightSync(engine, cfg, transport="shm", bucket_bytes=1 << 20).push(updated, version=12)
    assert report.transport == "shm" and report.engine_versions == [12]
    verify_weights(engine, updated, cfg)
    assert verify_logprobs(engine, learner_logprobs(updated, cfg, probe), probe) <= 1e-3


@pytest.mark.parametrize("backend,flipped,named", [
    ("vllm", "model.layers.1.mlp.up_proj.weight", "language_model.model.layers.1.mlp.gate_up_proj.weight"),
    ("transformers", "visual.blocks.2.attn.qkv.bias", "model.visual.blocks.2.attn.qkv.bias"),
])  # fmt: skip
def test_a_tensor_corrupted_in_transit_is_named(engines, learner, backend, flipped, named):
    engine = engines[backend]
    cfg, params = learner
    updated = noisy(params, seed=3)
    WeightSync(engine, cfg, transport=corrupt_one(DirectTransport)(flipped), bucket_bytes=1 << 20).push(updated, version=13)
    with pytest.raises(WeightMismatch) as err:
        verify_weights(engine, updated, cfg)
    assert list(err.value.differences) == [named]
    assert named in str(err.value)


def test_bfloat16_wire_is_what_the_engine_holds(engines, learner):
    engine = engines["vllm"]
    cfg, params = learner
    updated = noisy(params, seed=4)
    report = WeightSync(engine, cfg, transport="direct", dtype="bfloat16").push(updated, version=14)
    assert report.dtype == "bfloat16" and report.bytes * 2 == sum(x.nbytes for x in jax.tree.leaves(params))
    verify_weights(engine, updated, cfg, dtype="bfloat16")  # bf16-rounded values, bit for bit
    with pytest.raises(WeightMismatch):
        verify_weights(engine, updated, cfg)  # not the fp32 values


def test_tied_model_push_keeps_lm_head_tied(tiny_ckpt_tied, rollout_images, rollout_engine_config):
    from rollout_torch.hf_engine import HFEngine

    engine = HFEngine(rollout_engine_config(tiny_ckpt_tied))
    cfg, params = load_checkpoint(tiny_ckpt_tied)
    probe = make_probe(tiny_ckpt_tied, rollout_images[0])
    updated = noisy(params, seed=5)
    WeightSync(engine, cfg, transport="direct").push(updated, version=1)
    verify_weights(engine, updated, cfg)  # includes lm_head.weight == the new embedding
    assert verify_logprobs(engine, learner_logprobs(updated, cfg, probe), probe) <= 1e-3


def test_object_store_push_to_an_engine_actor(rollout_ray, tiny_ckpt, learner, probe):
    from learner_jax.placement import spawn

    cfg, params = learner
    actor = spawn("bridge.receiver:EngineHost", "transformers", {"model_path": tiny_ckpt, "kv_cache_bytes": 64 << 20})
    try:
        updated = noisy(params, seed=6)
        report = WeightSync(actor, cfg, transport="object_store", bucket_bytes=1 << 20).push(updated, version=3)
        assert report.transport == "object_store" and report.engine_versions == [3]
        verify_weights(actor, updated, cfg)
        assert verify_logprobs(actor, learner_logprobs(updated, cfg, probe), probe) <= 1e-3
    finally:
        rollout_ray.kill(actor.handle)


@pytest.mark.slow
def test_object_store_push_through_the_rollout_service(rollout_ray, tiny_ckpt, learner, probe):
    """The learner's production route: service actor -> pool -> vLLM engine actor."""
    from bridge.targets import ServiceTarget
    from learner_jax.placement import spawn
    from shared.config import Config

    cfg, params = learner
    run = Config()
    run.model.path = tiny_ckpt
    run.rollout.backend, run.rollout.num_engines, run.rollout.dtype = "vllm", 1, "float32"
    run.rollout.kv_cache_gib, run.data.prompt_max_len, run.rollout.generate_max_len = 0.0625, 1024, 512
    service = spawn("rollout_torch.service:RolloutService", run.to_dict())
    try:
        target = ServiceTarget(service, run.rollout.backend)
        updated = noisy(params, seed=7)
        report = WeightSync(target, cfg, transport="object_store", bucket_bytes=1 << 20).push(updated, version=4)
        assert report.engine_versions == [4]
        verify_weights(target, updated, cfg)
        assert verify_logprobs(target, learner_logprobs(updated, cfg, probe), probe) <= 1e-3
    finally:
        service.shutdown()
        rollout_ray.kill(service.handle)


# ---------------------------------------------------------------- the engines' versions, asked of the engines


def _fake_engine_actor():
    """A Ray actor class answering the pool's calls as an `EngineActor` does; `lags` engines ignore finish_update
    (as an engine whose load silently failed, or one restarted without the replay, would keep its old version)."""
    import os

    import ray

    class FakeEngine:  # local class: pickled by value into the worker
        def __init__(self, engine_id: int, lags: bool = False):
            self.engine_id, self.lags, self.version, self.tensors = engine_id, lags, 0, 0

        def ready(self) -> int:
            return os.getpid()

        def update_weights(self, named, version, final):
            self.tensors += len(named)

        def finish_update(self, version):
            if not self.lags:
                self.version = version

        def call(self, method, *args):
            assert method == "policy_version", method
            return self.version

    return ray.remote(num_cpus=0)(FakeEngine)


def kill_and_wait(ray, actor, timeout_s: float = 30.0) -> None:
    """Kill an actor and return once calls to it fail (`ray.kill` is asynchronous: a call right after it may still
    be served)."""
    ray.kill(actor, no_restart=True)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            ray.get(actor.ready.remote(), timeout=timeout_s)
        except ray.exceptions.RayActorError:
            return
        time.sleep(0.05)
    raise TimeoutError("the killed actor still answers")


def fake_pool(num_engines: int, lagging=()):
    """A real `RolloutPool` (its fan-out, replay, restart and version code) over fake engine actors."""
    from rollout_torch.pool import EngineStats, RolloutPool

    actor_cls = _fake_engine_actor()
    pool = RolloutPool.__new__(RolloutPool)
    pool.backend, pool.cfg, pool.max_restarts, pool._pg, pool._resources = "vllm", None, 3, None, {}
    pool._new_actor = lambda engine: actor_cls.remote(engine)  # a restarted engine does not lag
    pool.actors = [actor_cls.remote(i, i in lagging) for i in range(num_engines)]
    pool._wait_ready(pool.actors)
    pool.stats = [EngineStats(i) for i in range(num_engines)]
    pool._buckets, pool._version, pool._pending, pool.restarts = [], 0, None, 0
    return pool


def service_over(pool, tiny_ckpt):
    """The rollout service's own code (`RolloutService`) in this process, holding `pool`."""
    from rollout_torch.service import RolloutService
    from shared.config import Config

    run = Config()
    run.model.path = tiny_ckpt
    service = RolloutService(run)
    service._pool = pool
    return service


def test_a_lagging_engine_fails_the_version_check_of_a_push(rollout_ray, tiny_ckpt, learner):
    """Before, the check compared the pool's own record of the last push with the version pushed, so it could not
    fail; now every engine is asked. Engine 1 keeps version 0 after the push of version 1."""
    from bridge.sync import engine_versions
    from bridge.targets import ServiceTarget

    cfg, params = learner
    pool = fake_pool(2, lagging={1})
    try:
        target = ServiceTarget(service_over(pool, tiny_ckpt), "vllm")
        sync = WeightSync(target, cfg, transport="object_store", bucket_bytes=4 << 20)
        with pytest.raises(RuntimeError, match=r"after pushing version 1 the engines report versions \[1, 0\]: "
                                               r"engine\(s\) \[1\] do not hold it"):  # fmt: skip
            sync.push(params, version=1)
        assert target.policy_version() == 1  # the pool's record, which the old check compared with itself
        assert engine_versions(target) == engine_versions(pool) == [1, 0]
    finally:
        pool.shutdown()


def test_engines_holding_the_push_pass_and_a_dead_one_is_restarted_and_counted(rollout_ray, tiny_ckpt, learner):
    cfg, params = learner
    pool = fake_pool(2)
    try:
        target = __import__("bridge.targets", fromlist=["ServiceTarget"]).ServiceTarget(
            service_over(pool, tiny_ckpt), "vllm")
        sync = WeightSync(target, cfg, transport="object_store", bucket_bytes=4 << 20)
        report = sync.push(params, version=3)
        assert report.engine_versions == [3, 3]  # one per engine
        assert pool.engine_restarts() == 0
        kill_and_wait(rollout_ray, pool.actors[0])  # dies between pushes
        report = sync.push(params, version=4)  # the fan-out restarts it; the replay brings it to the push
        assert report.engine_versions == [4, 4]
        assert pool.engine_restarts() == 1 and pool.stats[0].restarts == 1
        kill_and_wait(rollout_ray, pool.actors[1])
        assert pool.engine_versions() == [4, 4]  # asked of a dead engine: restarted, replayed, asked again
        assert target.service.pool_call("engine_restarts") == 2  # cumulative, what rollout/engine_restarts logs
    finally:
        pool.shutdown()
