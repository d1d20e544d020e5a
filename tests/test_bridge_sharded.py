"""Pushes from parameters sharded over a mesh of 8 CPU devices (ZeRO-3 / FSDP layout of the learner's rules): each
tensor is sliced, relaid and fetched from its shards, and the engine ends up holding exactly the learner's values."""
from __future__ import annotations

import json
import os
import subprocess
import sys

SCRIPT = r"""
import json, sys
import jax, numpy as np
from jax.sharding import PartitionSpec
from bridge.convert import to_hf
from bridge.sync import WeightSync
from bridge.verify import verify_weights, WeightMismatch
from learner_jax.models.hf_io import load_checkpoint
from learner_jax.models.params import abstract_params
from learner_jax.sharding import Strategy
from rollout_torch.engine import EngineConfig, make_engine
from shared.config import ShardingConfig

ckpt = sys.argv[1]
cfg, host = load_checkpoint(ckpt)
strategy = Strategy.from_config(ShardingConfig(strategy="zero3", fsdp=8, data=1), cfg)
params = strategy.place(host, strategy.param_shardings(abstract_params(cfg)))
noise = jax.jit(lambda p, k: jax.tree.map(lambda x: x + 0.05 * jax.numpy.std(x) * jax.random.normal(k, x.shape), p))
params = noise(params, jax.random.key(0))  # a training-like update that keeps the shardings
leaves = jax.tree.leaves(params)
sharded = [x for x in leaves if x.sharding.spec != PartitionSpec()]
stacked_split = [x for x in sharded if x.ndim == 3 and x.sharding.spec[0] is None and any(x.sharding.spec[1:])]
gathered = jax.device_get(params)
same = all(np.array_equal(a, b) for (_, a), (_, b) in zip(to_hf(params, cfg, bucket_bytes=200_000),
                                                         to_hf(gathered, cfg, bucket_bytes=200_000)))
engine = make_engine("transformers", EngineConfig(ckpt, kv_cache_bytes=64 << 20))
results = {"devices": len(jax.devices()), "sharded_leaves": len(sharded), "stacked_split": len(stacked_split),
           "leaves": len(leaves), "to_hf_same_as_gathered": same}
for k, transport in enumerate(["direct", "shm"]):
    report = WeightSync(engine, cfg, transport=transport, bucket_bytes=300_000).push(params, version=k + 1)
    results[transport] = {"buckets": report.buckets, "versions": report.engine_versions,
                          "checked": verify_weights(engine, params, cfg)}
moved = {**gathered, "text": {**gathered["text"], "norm": {"scale": gathered["text"]["norm"]["scale"] + 1}}}
try:
    verify_weights(engine, moved, cfg)
    results["mismatch_named"] = None
except WeightMismatch as e:
    results["mismatch_named"] = list(e.differences)
print("RESULT " + json.dumps(results))
"""


def test_push_from_params_sharded_over_eight_devices(tiny_ckpt):
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8", "JAX_PLATFORMS": "cpu"}
    out = subprocess.run([sys.executable, "-c", SCRIPT, tiny_ckpt], env=env, capture_output=True, text=True,
                         timeout=600)  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    line = next(x for x in out.stdout.splitlines() if x.startswith("RESULT "))
    r = json.loads(line[len("RESULT "):])
    assert r["devices"] == 8
    assert r["sharded_leaves"] > r["leaves"] // 2 and r["stacked_split"] > 0
    assert r["to_hf_same_as_gathered"]
    for transport in ("direct", "shm"):
        assert r[transport]["checked"] == 81 and r[transport]["buckets"] > 3
    assert r["direct"]["versions"] == [1] and r["shm"]["versions"] == [2]
    assert r["mismatch_named"] == ["model.language_model.norm.weight"]
