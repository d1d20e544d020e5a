"""Collective route: one broadcast group per engine, rank 0 a sender, ranks 1..k that engine's workers.

    CPU  `GlooTransport` ("collective" on CPU): the learner never imports torch, so rank 0 is a bridge sender
         process, `CollectiveSender`, a Ray actor. Each bucket goes to it through Ray's object store (one `ray.put` of
         HF-layout arrays, as the object-store route) and it broadcasts the tensors over gloo into every engine's
         group at once, while each engine, called through the target's ordinary calls, receives them into tensors
         allocated from the announced metadata and loads them through its normal reload path.
    GPU  `bridge.nccl.NcclTransport` ("collective" with a CUDA learner): the learner itself is rank 0 of one NCCL
         communicator per engine, the engines' workers join through vLLM's NCCL weight-transfer engine.

Why one group per engine: vLLM numbers a worker's rank inside its own engine (data-parallel index x world size +
rank), so the workers of independent single-GPU engines all take the same rank and no single group of the sender
plus every engine's workers can form. Groups are named per engine and per join; an engine actor the pool restarted
reports no group (`collective_group`), and is joined into a fresh one before the next push. An engine whose group
disappears in the middle of a push fails the push with an error naming it.

Bucket protocol (shared by both forms; see `rollout_torch.engine.RolloutEngine.collective_*`):
    join       engine.collective_world_size() -> sender opens a group of that size -> engine.collective_join(info)
               while the sender joins as rank 0
    bucket     engines.collective_receive(meta, version, final=False) while the sender broadcasts the tensors in
               `meta` order; a bucket an engine rejects is still received (drained), so the group stays in step
    final      target.finish_update(version): the engines close their reload session and take the version (the
               rollout pool records it too)
How each kind of target is reached: `EngineCalls`. Learner side: importable without torch.
"""
from __future__ import annotations

import uuid
import warnings
from typing import Any, Optional

from .payload import WireTensor, to_wire
from .transport import Transport, is_local_engine

DEFAULT_TIMEOUT_S = 300.0


class EngineCalls:
    """The target's engines, one call at a time or all at once, through the calls the target already has:
    `ServiceTarget` -> `RolloutService.pool_call("call"/"call_all", ...)`; a `RolloutPool` (any class defining
    `call(k, method, *args)` and `call_all(method, *args)`) -> those; a local engine or an engine actor proxy
    (`bridge.receiver.EngineHost`) -> its own methods (one engine)."""

    def __init__(self, target: Any):
        from .targets import ServiceTarget

        self.target = target
        if isinstance(target, ServiceTarget):
            self.kind = "service"
        elif all(callable(getattr(type(target), m, None)) for m in ("call", "call_all")):  # not a proxy's __getattr__
            self.kind = "pool"
        else:
            self.kind = "local" if is_local_engine(target) else "engine"

    def call(self, k: int, method: str, *args: Any) -> Any:
        if self.kind == "service":
            return self.target.service.pool_call("call", k, method, *args)
        if self.kind == "pool":
            return self.target.call(k, method, *args)
        if k != 0:
            raise IndexError(f"the target holds one engine, asked for engine {k}")
        return getattr(self.target, method)(*args)

    def call_all(self, method: str, *args: Any) -> list:
        if self.kind == "service":
            return list(self.target.service.pool_call("call_all", method, *args))
        if self.kind == "pool":
            return list(self.target.call_all(method, *args))
        return [getattr(self.target, method)(*args)]


def bucket_meta(wire: list[tuple]) -> list[tuple[str, str, tuple[int, ...]]]:
    """(hf_name, dtype name, shape) per tensor of a `payload.to_wire` bucket, in broadcast order."""
    out = []
    for name, array, dtype_name, layout, hf_shape in wire:
        if layout is not None:
            raise ValueError(f"{name}: the collective route sends HF layout; got pending layout {layout}")
        out.append((name, dtype_name, tuple(int(s) for s in hf_shape)))
    return out


class CollectiveSender:
    """Rank 0 of every engine's gloo group; lives in a Ray actor of its own (threaded: joins and the broadcasts
    into several groups overlap). torch is imported here only."""

    def __init__(self, timeout_s: float = DEFAULT_TIMEOUT_S):
        import ray

        self.timeout_s = float(timeout_s)
        self.host = ray.util.get_node_ip_address()
        self.stores: dict[str, Any] = {}
        self.groups: dict[str, Any] = {}
        self.sizes: dict[str, int] = {}

    def open(self, name: str, world_size: int) -> dict:
        """Host the group's rendezvous store; returns what the engine's workers need to join."""
        from rollout_torch.collective import host_store

        if world_size < 2:
            raise ValueError(f"group {name}: world size {world_size}, need the sender and at least one worker")
        self.stores[name] = host_store(world_size, self.timeout_s)
        self.sizes[name] = int(world_size)
        return {"name": name, "host": self.host, "port": int(self.stores[name].port), "world_size": int(world_size),
                "timeout_s": self.timeout_s}  # fmt: skip

    def join(self, name: str) -> int:
        """Join as rank 0; returns once every worker of the group has joined."""
        from rollout_torch.collective import Group

        store = self.stores[name]
        self.groups[name] = Group(name, self.host, store.port, 0, self.sizes[name], self.timeout_s, store=store)
        return 0

    def broadcast(self, pairs: list, names: list[str]) -> int:
        """Broadcast the bucket (`(hf_name, array)` pairs, as resolved from the object store) into every group in
        `names`, all groups at once; returns the bytes sent per group."""
        import numpy as np
        import torch

        missing = [n for n in names if n not in self.groups]
        if missing:
            raise RuntimeError(f"sender: no weight group {missing} (closed after a failure?)")
        with warnings.catch_warnings():  # object-store arrays are read-only; a broadcast only reads its source
            warnings.simplefilter("ignore", UserWarning)
            tensors = [torch.from_numpy(np.ascontiguousarray(a)) for _, a in pairs]
        works = [w for n in names for w in self.groups[n].broadcast(tensors)]
        for w in works:
            w.wait()
        return int(sum(t.numel() * t.element_size() for t in tensors))

    def describe(self) -> dict[str, dict]:
        return {n: {"rank": g.rank, "world_size": g.world_size, "port": g.port} for n, g in self.groups.items()}

    def close(self, names: Optional[list[str]] = None) -> None:
        for n in list(self.stores) if names is None else names:
            g = self.groups.pop(n, None)
            if g is not None:
                g.close()
            self.stores.pop(n, None)
            self.sizes.pop(n, None)


class GlooTransport(Transport):
    """The collective route on CPU machines (see the module docstring). `timeout_s` bounds every rendezvous and
    broadcast (a peer that never arrives fails the push after it)."""

    name = "collective"

    def __init__(self, target: Any = None, *, timeout_s: float = DEFAULT_TIMEOUT_S):
        import ray

        if not ray.is_initialized():
            raise RuntimeError("transport 'collective' needs Ray: call ray.init (learner_jax.placement.start_ray) first")
        self.timeout_s = float(timeout_s)
        self._sender: Any = None
        self.groups: dict[int, str] = {}  # engine index -> its group's name
        self.ranks: dict[int, list[int]] = {}  # engine index -> ranks its workers took
        self._in_push: Optional[int] = None  # version of the push under way

    # -- set-up
    @property
    def sender(self) -> Any:
        if self._sender is None:
            import ray
            from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

            here = ray.get_runtime_context().get_node_id()  # next to the learner: buckets cross no network to it
            self._sender = ray.remote(CollectiveSender).options(
                num_cpus=0, max_concurrency=16,
                scheduling_strategy=NodeAffinitySchedulingStrategy(here, soft=True),
            ).remote(self.timeout_s)  # fmt: skip
        return self._sender

    def check_target(self, target: Any) -> None:
        if is_local_engine(target):
            return  # an engine in the learner's process joins from there; the sender is still a process of its own
        for method in ("update_weights", "finish_update"):
            if not callable(getattr(target, method, None)):
                raise TypeError(f"transport 'collective': target {type(target).__name__} has no {method}")

    def connect(self, target: Any) -> dict[int, str]:
        """Join every engine that holds no current group into a fresh one (also done at each push's first
        bucket); returns engine index -> group name."""
        self._ensure_groups(EngineCalls(target), None)
        return dict(self.groups)

    def describe(self) -> dict:
        """Groups as both sides see them: {engine index: {name, sender_rank, world_size, engine_ranks}}."""
        import ray

        sender = ray.get(self.sender.describe.remote())
        return {k: {"name": n, "sender_rank": sender[n]["rank"], "world_size": sender[n]["world_size"],
                    "engine_ranks": self.ranks[k]} for k, n in self.groups.items() if n in sender}  # fmt: skip

    def _ensure_groups(self, engines: EngineCalls, version: Optional[int]) -> int:
        """Rejoin engines without a current group; returns the number of engines."""
        held = engines.call_all("collective_group")
        stale = [k for k, name in enumerate(held) if name is None or name != self.groups.get(k)]
        if stale and version is not None and self._in_push == version:
            self._in_push = None
            raise RuntimeError(f"transport 'collective': engine(s) {stale} lost their weight group during the push of "
                               f"version {version} (restarted by the pool?); they hold a partial update. Push again: "
                               f"the next push joins them into fresh groups")  # fmt: skip
        for k in stale:
            self._join(engines, k)
        return len(held)

    def _join(self, engines: EngineCalls, k: int) -> None:
        import ray

        if (old := self.groups.pop(k, None)) is not None:
            ray.get(self.sender.close.remote([old]))
        world = int(engines.call(k, "collective_world_size"))
        name = f"lmmrl-e{k}-{uuid.uuid4().hex[:8]}"
        info = ray.get(self.sender.open.remote(name, world))
        joined = self.sender.join.remote(name)
        try:
            ranks = engines.call(k, "collective_join", info)
        except Exception as exc:
            raise RuntimeError(f"transport 'collective': engine {k} could not join its weight group {name} "
                               f"(sender at {info['host']}:{info['port']})") from exc  # fmt: skip
        ray.get(joined, timeout=self.timeout_s)
        self.groups[k], self.ranks[k] = name, [int(r) for r in ranks]

    # -- buckets
    def prepare(self, items: list[WireTensor]) -> tuple[Any, list, Any]:
        import ray

        wire = to_wire(items)  # bfloat16 as its bits: the sender needs no ml_dtypes
        # and the bucket as the object-store route ships it, for the pool to replay into an engine it restarts
        replay = ray.put([(w.name, w.array) for w in items])
        return ray.put([(w[0], w[1]) for w in wire]), bucket_meta(wire), replay

    def send(self, target: Any, payload: tuple[Any, list, Any], version: int, final: bool) -> None:
        import ray

        ref, meta, replay = payload
        engines = EngineCalls(target)
        n = self._ensure_groups(engines, version)
        self._in_push = version
        names = [self.groups[k] for k in range(n)]
        sent = self.sender.broadcast.remote(ref, names)  # the object store hands the sender the arrays
        try:
            engines.call_all("collective_receive", meta, version, False)
        except Exception as exc:
            self._in_push = None
            healthy = self._settle(sent)
            raise RuntimeError(f"transport 'collective': the engines failed to receive a bucket of version {version}"
                               + ("" if healthy else "; the weight groups were closed and will be rebuilt at the "
                                  "next push")) from exc  # fmt: skip
        try:
            ray.get(sent, timeout=self.timeout_s)
        except Exception as exc:
            self._in_push = None
            self._drop_groups()
            raise RuntimeError(f"transport 'collective': the sender failed to broadcast a bucket of version "
                               f"{version}") from exc  # fmt: skip
        if callable(keep := getattr(target, "retain_for_restarts", None)):  # a pool restarts engines: it replays
            keep([replay], version)
        if final:
            self._in_push = None
            target.finish_update(version)

    def _settle(self, sent: Any) -> bool:
        """After an engine failed: did the broadcast still complete (the engines drained)? Otherwise the groups
        are out of step and are dropped."""
        import ray

        try:
            ray.get(sent, timeout=self.timeout_s + 10)
            return True
        except Exception:
            self._drop_groups()
            return False

    def _drop_groups(self) -> None:
        import ray

        if self._sender is not None and self.groups:
            try:
                ray.get(self.sender.close.remote(list(self.groups.values())), timeout=30)
            except Exception:
                pass
        self.groups.clear()
        self.ranks.clear()

    def release(self, payload: tuple[Any, list, Any]) -> None:
        pass  # the object is freed once no one holds its ref

    def close(self) -> None:
        import ray

        self._drop_groups()
        if self._sender is not None:
            ray.kill(self._sender)
            self._sender = None
