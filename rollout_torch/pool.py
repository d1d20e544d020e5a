"""A pool of rollout engines, one Ray actor each.

Prompts are split over the engines in contiguous shards balanced by count and come back in prompt order. A weight
push fans out to every engine. The pool keeps the pushed buckets in Ray's object store (a bucket is dropped once
every tensor in it has been pushed again), so an engine actor that dies is replaced by a fresh one, brought to the
current weights by replaying them, and its unfinished shard is run again. Ray is started by the caller.
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from typing import Any, Iterable, Optional, Union

import numpy as np
import ray
from ray.exceptions import GetTimeoutError, RayActorError
from ray.util.placement_group import placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from rollout_torch.engine import EngineConfig, NamedTensors, make_engine, to_numpy
from shared.records import Prompt, Sample, SamplingSpec

_ENV_PREFIXES = ("VLLM_", "HF_", "TRANSFORMERS_", "TOKENIZERS_", "OMP_")
START_TIMEOUT_S = 600.0  # bounds placement and engine start: an engine Ray cannot place would wait forever


class EngineActor:
    """Holds one engine; every method runs in the actor's process."""

    def __init__(self, backend: str, cfg: EngineConfig, engine_id: int):
        if cfg.cpu_affinity:  # before the backend starts its compute threads, which inherit it
            pin_process(cfg.cpu_affinity)
        self.engine = make_engine(backend, cfg, engine_id)

    def ready(self) -> int:
        return os.getpid()

    def node(self) -> str:
        """The Ray node this engine runs on."""
        return ray.get_runtime_context().get_node_id()

    def threads(self) -> int:
        """Compute threads torch uses in this engine's process."""
        import torch

        return torch.get_num_threads()

    def generate(self, prompts: list[Prompt], sampling: SamplingSpec) -> list[list[Sample]]:
        return self.engine.generate(prompts, sampling)

    def update_weights(self, named: list, version: int, final: bool) -> None:
        self.engine.update_weights(named, version, final)

    def finish_update(self, version: int) -> None:
        self.engine.finish_update(version)

    def call(self, method: str, *args: Any) -> Any:
        """policy_version, score, named_weights, weight_checksums, sleep, wake, stats."""
        return getattr(self.engine, method)(*args)


_REMOTE_ENGINE = ray.remote(EngineActor)


def pin_process(cpus: Iterable[int]) -> None:
    """Every thread of this process onto `cpus` (Ray's own threads already run; new ones inherit the mask)."""
    cpus = set(cpus)
    for tid in os.listdir("/proc/self/task"):
        try:
            os.sched_setaffinity(int(tid), cpus)
        except (ProcessLookupError, PermissionError):  # a thread that ended meanwhile
            pass


@dataclass
class _Bucket:
    ref: ray.ObjectRef
    names: frozenset
    version: int


@dataclass
class EngineStats:
    engine_id: int
    prompts: int = 0
    generated_tokens: int = 0
    seconds: float = 0.0  # wall time of this engine's shards, queueing included
    restarts: int = 0
    last: dict = field(default_factory=dict)  # the latest generate call

    def as_dict(self) -> dict:
        tps = self.generated_tokens / self.seconds if self.seconds > 0 else 0.0
        return {
            "engine_id": self.engine_id, "prompts": self.prompts, "generated_tokens": self.generated_tokens,
            "seconds": round(self.seconds, 3), "tokens_per_s": round(tps, 2), "restarts": self.restarts,
            "last": self.last,
        }  # fmt: skip


def shard_bounds(n_items: int, n_shards: int) -> list[tuple[int, int]]:
    """Contiguous [start, stop) ranges whose sizes differ by at most one; empty ranges are left out."""
    base, extra = divmod(n_items, n_shards)
    bounds, start = [], 0
    for i in range(n_shards):
        stop = start + base + (1 if i < extra else 0)
        if stop > start:
            bounds.append((start, stop))
        start = stop
    return bounds


class RolloutPool:
    """`rollout.num_engines` engines of `rollout.backend`, each in the bundle of a Ray placement group holding
    `rollout.engine_resources` (CPU, GPU or custom resources such as a node label; with CUDA and no GPU named,
    `rollout.tensor_parallel_size` GPUs), packed onto few nodes or spread over many (`rollout.placement`). A
    restarted engine takes its bundle again, so it stays where the config put it."""

    def __init__(self, cfg, *, max_restarts: int = 3, **engine_overrides):
        import torch

        r = cfg.rollout
        resources = dict(r.engine_resources)
        if torch.cuda.is_available() and "GPU" not in resources:
            resources["GPU"] = float(r.tensor_parallel_size)
        threads = None if resources.get("GPU") else r.cpu_threads_per_engine or max(1, (os.cpu_count() or 1) // r.num_engines)
        self._start(r.backend, EngineConfig.from_config(cfg, **engine_overrides), r.num_engines, resources,
                    max_restarts, threads, r.placement, cfg.ray.connect_timeout_s)  # fmt: skip

    @classmethod
    def from_engine_config(
        cls, backend: str, cfg: EngineConfig, num_engines: int = 1, num_cpus_per_engine: float = 1.0,
        num_gpus_per_engine: float = 0.0, max_restarts: int = 3, threads: Optional[int] = None,
        placement: str = "pack",
    ) -> "RolloutPool":  # fmt: skip
        pool = cls.__new__(cls)
        pool._start(backend, cfg, num_engines, {"CPU": num_cpus_per_engine, "GPU": num_gpus_per_engine},
                    max_restarts, threads, placement)  # fmt: skip
        return pool

    def _start(self, backend: str, cfg: EngineConfig, num_engines: int, resources: dict[str, float],
               max_restarts: int, threads: Optional[int] = None, placement: str = "pack",
               place_timeout_s: float = START_TIMEOUT_S) -> None:  # fmt: skip
        if not ray.is_initialized():
            raise RuntimeError("RolloutPool needs a running Ray (call ray.init first)")
        if num_engines < 1:
            raise ValueError(f"num_engines must be >= 1, got {num_engines}")
        self.backend, self.cfg = backend, cfg
        self.max_restarts = max_restarts
        env = {k: v for k, v in os.environ.items() if k.startswith(_ENV_PREFIXES)}
        if threads:
            env["OMP_NUM_THREADS"] = str(threads)
        self._resources = {k: float(v) for k, v in resources.items() if v > 0}
        custom = {k: v for k, v in self._resources.items() if k not in ("CPU", "GPU")}
        self._actor_options = dict(
            num_cpus=self._resources.get("CPU", 0), num_gpus=self._resources.get("GPU", 0), resources=custom or None,
            max_restarts=0, runtime_env={"env_vars": env} if env else None,
        )  # fmt: skip
        self._pg = self._place(num_engines, placement, min(place_timeout_s, START_TIMEOUT_S))
        self.actors = [self._new_actor(i) for i in range(num_engines)]
        self._wait_ready(self.actors)
        self.stats = [EngineStats(i) for i in range(num_engines)]
        self.restarts = 0  # engine actors replaced, all engines, since the pool started
        self._buckets: list[_Bucket] = []
        self._version = 0
        self._pending: Optional[int] = None

    @property
    def num_engines(self) -> int:
        return len(self.actors)

    def policy_version(self) -> int:
        """The version of the last push the pool completed (its own record, not asked of the engines: see
        `engine_versions`)."""
        return self._version

    def engine_versions(self) -> list[int]:
        """The policy version each engine actor reports holding, asked of the engines themselves: what the bridge
        compares with the version it pushed. An actor found dead is restarted first (which replays the pushes
        kept for it, as after any death) and asked again."""
        refs = [a.call.remote("policy_version") for a in self.actors]
        out = []
        for i, ref in enumerate(refs):
            try:
                out.append(int(ray.get(ref)))
            except RayActorError:
                self._restart(i)
                out.append(int(self.call(i, "policy_version")))
        return out

    def engine_restarts(self) -> int:
        """Engine actors the pool has replaced since it started (cumulative, all engines): `rollout/engine_restarts`."""
        return self.restarts

    # -- generation
    def generate(self, prompts: list[Prompt], sampling: SamplingSpec) -> list[list[Sample]]:
        if self._pending is not None:
            raise RuntimeError(f"the push of version {self._pending} is unfinished; call finish_update first")
        out: list[Optional[list[Sample]]] = [None] * len(prompts)
        running: dict[ray.ObjectRef, tuple[int, int, int, float]] = {}

        def submit(engine: int, start: int, stop: int) -> None:
            ref = self.actors[engine].generate.remote(prompts[start:stop], sampling)
            running[ref] = (engine, start, stop, time.perf_counter())

        for engine, (start, stop) in enumerate(shard_bounds(len(prompts), self.num_engines)):
            submit(engine, start, stop)
        restarts = 0
        last: dict[int, dict] = {}
        while running:
            done, _ = ray.wait(list(running), num_returns=1)
            engine, start, stop, t0 = running.pop(done[0])
            try:
                groups = ray.get(done[0])
            except RayActorError:
                restarts += 1
                if restarts > self.max_restarts:
                    raise RuntimeError(f"engine actors died {restarts} times during one generate call") from None
                self._restart(engine)
                submit(engine, start, stop)
                continue
            out[start:stop] = groups
            seconds = time.perf_counter() - t0
            tokens = sum(len(s.response_ids) for g in groups for s in g)
            st = self.stats[engine]
            st.prompts += stop - start
            st.generated_tokens += tokens
            st.seconds += seconds
            last[engine] = {"prompts": stop - start, "generated_tokens": tokens, "seconds": round(seconds, 3),
                            "tokens_per_s": round(tokens / seconds, 2) if seconds > 0 else 0.0}  # fmt: skip
        for engine, d in last.items():
            self.stats[engine].last = d
        return out  # type: ignore[return-value]

    def engine_stats(self) -> list[dict]:
        return [s.as_dict() for s in self.stats]

    # -- weights
    def update_weights(
        self, named_tensors: Union[NamedTensors, ray.ObjectRef], version: int, final: bool = True
    ) -> None:
        """Fan a bucket out to every engine. `named_tensors` may be an ObjectRef to a list of (name, array) pairs
        already in the object store (the bridge's), else it is put there once and shared by all engines."""
        if self._pending is not None and self._pending != version:
            raise RuntimeError(f"the push of version {self._pending} is unfinished, got version {version}")
        if isinstance(named_tensors, ray.ObjectRef):
            ref = named_tensors
            names = frozenset(n for n, _ in ray.get(ref))
        else:
            pairs = [(n, t if isinstance(t, np.ndarray) else to_numpy(t)) for n, t in named_tensors]
            ref, names = ray.put(pairs), frozenset(n for n, _ in pairs)
        before = (list(self._buckets), self._pending)
        self._pending = version
        self._retain(_Bucket(ref, names, version))  # first: an engine restarted during the fan-out replays it
        try:
            self._fan_out(lambda a: a.update_weights.remote(ref, version, False))
        except Exception:
            self._buckets, self._pending = before  # engines validate before loading: a rejected bucket changed nothing
            raise
        if final:
            self.finish_update(version)

    def retain_for_restarts(self, refs: list, version: int) -> None:
        """Keep buckets that reached the engines another way (the collective route) for replay into a restarted
        engine, as pushes through the pool are kept. `refs`: ObjectRefs of (name, array) lists, in a list so Ray
        passes them unresolved."""
        for ref in refs:
            self._retain(_Bucket(ref, frozenset(n for n, _ in ray.get(ref)), version))

    def finish_update(self, version: int) -> None:
        if self._pending not in (None, version):
            raise RuntimeError(f"finish_update({version}) during the push of version {self._pending}")
        self._version, self._pending = version, None  # first: an engine restarted during the fan-out finishes it
        self._fan_out(lambda a: a.finish_update.remote(version))

    def _retain(self, bucket: _Bucket) -> None:
        kept, later = [], set(bucket.names)
        for b in reversed(self._buckets):
            if not b.names <= later:
                kept.append(b)
            later |= b.names
        self._buckets = list(reversed(kept)) + [bucket]

    def _fan_out(self, call) -> None:
        refs = {call(a): i for i, a in enumerate(self.actors)}
        for ref, i in refs.items():
            try:
                ray.get(ref)
            except RayActorError:
                self._restart(i)  # the restored engine already holds this push

    def _place(self, num_engines: int, placement: str, timeout_s: float):
        """One bundle per engine; None when engines ask for nothing (a bundle must hold some resource)."""
        if not self._resources:
            return None
        pg = placement_group([dict(self._resources) for _ in range(num_engines)],
                             strategy="PACK" if placement == "pack" else "SPREAD")  # fmt: skip
        try:
            ray.get(pg.ready(), timeout=timeout_s)
        except GetTimeoutError:
            remove_placement_group(pg)
            raise RuntimeError(
                f"Ray cannot place {num_engines} engine(s) asking {self._resources} each ({placement}) within "
                f"{timeout_s:.0f} s: the cluster has {ray.cluster_resources()}, {ray.available_resources()} free. "
                f"Lower rollout.num_engines or rollout.engine_resources, or add nodes with those resources"
            ) from None
        return pg

    def _new_actor(self, engine: int):
        options = dict(self._actor_options)
        if self._pg is not None:
            options["scheduling_strategy"] = PlacementGroupSchedulingStrategy(self._pg, placement_group_bundle_index=engine)
        return _REMOTE_ENGINE.options(**options).remote(self.backend, self.cfg, engine)

    def engine_nodes(self) -> list[str]:
        """The Ray node id of each engine."""
        return ray.get([a.node.remote() for a in self.actors])

    def _wait_ready(self, actors: list) -> None:
        refs = [a.ready.remote() for a in actors]
        ready, pending = ray.wait(refs, num_returns=len(refs), timeout=START_TIMEOUT_S)
        if pending:
            for a in actors:
                ray.kill(a, no_restart=True)
            raise RuntimeError(
                f"{len(pending)} engine actor(s) did not start within {START_TIMEOUT_S:.0f} s; each asks Ray for "
                f"{self._resources}, Ray has {ray.available_resources()} free"
            )
        ray.get(ready)  # raises the actor's own error if its engine failed to build

    def _restart(self, engine: int) -> None:
        ray.kill(self.actors[engine], no_restart=True)
        actor = self._new_actor(engine)
        self._wait_ready([actor])
        open_version = None
        for b in self._buckets:
            if open_version is not None and b.version != open_version:
                ray.get(actor.finish_update.remote(open_version))
            ray.get(actor.update_weights.remote(b.ref, b.version, False))
            open_version = b.version
        if open_version is not None and open_version != self._pending:
            ray.get(actor.finish_update.remote(open_version))
        self.actors[engine] = actor
        self.stats[engine].restarts += 1
        self.restarts += 1

    # -- per-engine calls
    def call(self, engine: int, method: str, *args: Any) -> Any:
        """Run an engine method on one engine: policy_version, score, named_weights, weight_checksums, sleep, wake,
        stats."""
        return ray.get(self.actors[engine].call.remote(method, *args))

    def call_all(self, method: str, *args: Any) -> list[Any]:
        return ray.get([a.call.remote(method, *args) for a in self.actors])

    def named_weights(self, names: Optional[Iterable[str]] = None, engine: int = 0) -> dict[str, np.ndarray]:
        """What one engine holds, in its own naming (see the engine classes)."""
        return self.call(engine, "named_weights", None if names is None else list(names))

    def score(self, prompt: Prompt, response_ids: list[int], engine: int = 0) -> list[float]:
        return self.call(engine, "score", prompt, list(response_ids))

    def shutdown(self) -> None:
        for a in self.actors:
            ray.kill(a, no_restart=True)
        self.actors = []
        if getattr(self, "_pg", None) is not None:
            remove_placement_group(self._pg)
            self._pg = None
