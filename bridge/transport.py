"""How a bucket reaches `target.update_weights(tensors, version, final)`: one small interface, three host routes,
and the collective route (`bridge.collective`: a broadcast group per engine, gloo on CPU, NCCL on GPU via
`bridge.nccl`).

    direct        the bucket object itself (`payload.Tensors`): an engine in this process, or pickled along with
                  the call to an engine actor
    object_store  one `ray.put` of plain (hf_name, array) pairs, passed as `[ref]` (Ray resolves only top-level
                  ObjectRef arguments); the rollout service's pool fans the same object out to every engine,
                  which maps the arrays zero-copy, and keeps it to replay into a restarted engine
    shm           a safetensors file in /dev/shm (`payload.ShmTensors`) that same-host engines memory-map;
                  deleted once the call returns

`direct` and `shm` leave transposes to the engine's load copy (see `payload`); `object_store` ships HF layout.
`prepare` (the copy into the route) runs in `WeightSync`'s gather thread, overlapping the engine's load of the
previous bucket; `send` hands the payload over and returns once the target has loaded it.
"""
from __future__ import annotations

import os
import sys
import tempfile
import uuid
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any, Optional

from .payload import ShmTensors, Tensors, WireTensor, write_safetensors

TRANSPORTS = ("direct", "object_store", "shm", "collective", "nccl")


class Transport(ABC):
    name: str = ""
    on_device: bool = False  # wants the tensors left on the learner's device (device-to-device routes)
    defers_layout: bool = False  # the receiver applies pending layouts (payload containers)

    def prepare(self, items: list[WireTensor]) -> Any:
        """Put one bucket into the route; the result is what `send` delivers."""
        return items

    @abstractmethod
    def send(self, target: Any, payload: Any, version: int, final: bool) -> None:
        """Deliver one prepared bucket; returns once the target has loaded it."""

    def release(self, payload: Any) -> None:
        """Free what `prepare` made (called after `send`, or when a push is abandoned)."""

    def check_target(self, target: Any) -> None:
        """Raise early if this route cannot reach `target`."""

    def close(self) -> None:
        pass


def is_local_engine(target: Any) -> bool:
    engine = sys.modules.get("rollout_torch.engine")  # imported wherever an engine object exists
    return engine is not None and isinstance(target, engine.RolloutEngine)


class DirectTransport(Transport):
    name = "direct"
    defers_layout = True

    def prepare(self, items: list[WireTensor]) -> Tensors:
        return Tensors(items)

    def send(self, target: Any, payload: Tensors, version: int, final: bool) -> None:
        target.update_weights(payload, version, final)


class ObjectStoreTransport(Transport):
    name = "object_store"

    def __init__(self) -> None:
        import ray

        if not ray.is_initialized():
            raise RuntimeError("transport 'object_store' needs Ray: call ray.init (learner_jax.placement.start_ray) "
                               "first")  # fmt: skip

    def check_target(self, target: Any) -> None:
        if is_local_engine(target):
            raise TypeError("transport 'object_store' sends an ObjectRef, which a local engine cannot read; use "
                            "'direct' or 'shm' for an engine in this process")  # fmt: skip

    def prepare(self, items: list[WireTensor]) -> Any:
        import ray

        return ray.put([(w.name, w.array) for w in items])

    def send(self, target: Any, payload: Any, version: int, final: bool) -> None:
        target.update_weights([payload], version, final)  # the object is freed once no one holds the ref


class ShmTransport(Transport):
    name = "shm"
    defers_layout = True

    def __init__(self, directory: Optional[str] = None) -> None:
        default = "/dev/shm" if os.path.isdir("/dev/shm") else tempfile.gettempdir()
        self.directory = Path(directory or default)
        if not self.directory.is_dir():
            raise FileNotFoundError(f"transport 'shm': directory {self.directory} does not exist")

    def prepare(self, items: list[WireTensor]) -> ShmTensors:
        path = self.directory / f"lmmrl_bridge_{os.getpid()}_{uuid.uuid4().hex[:12]}.safetensors"
        try:
            write_safetensors(path, items)
        except BaseException:
            path.unlink(missing_ok=True)
            raise
        return ShmTensors(str(path), len(items))

    def send(self, target: Any, payload: ShmTensors, version: int, final: bool) -> None:
        target.update_weights(payload, version, final)

    def release(self, payload: ShmTensors) -> None:
        Path(payload.path).unlink(missing_ok=True)


def make_transport(transport: str | Transport, target: Any = None, **options: Any) -> Transport:
    """A transport by name (`TRANSPORTS`) or an instance passed through. "collective" is NCCL when the learner's
    arrays are on CUDA GPUs (`bridge.nccl`), else gloo through a sender actor (`bridge.collective`); options: see
    those modules. "nccl" forces the GPU form. The engines start for the same form from the same fact: the run
    config's learner platform (`shared.config.LearnerConfig.platform`, read by `EngineConfig.from_config`), to
    which `learner_jax.launch.process_env` pins the learner's JAX."""
    if isinstance(transport, Transport):
        return transport
    if transport == "direct":
        return DirectTransport()
    if transport == "object_store":
        return ObjectStoreTransport()
    if transport == "shm":
        return ShmTransport(**options)
    if transport == "collective":
        import jax

        if any(d.platform == "gpu" for d in jax.devices()):
            transport = "nccl"
        elif "cuda" in os.environ.get("JAX_PLATFORMS", "").split(","):
            # JAX skips a CUDA it cannot see even when asked for it; the engines were started for NCCL.
            raise RuntimeError(f"transport 'collective': the learner is configured to compute on GPUs "
                               f"(JAX_PLATFORMS={os.environ['JAX_PLATFORMS']}, from learner.num_gpus_per_process or "
                               f"learner.gpu_memory_fraction), so the engines take NCCL, but JAX sees no GPU "
                               f"({jax.devices()[0].platform} only); check CUDA_VISIBLE_DEVICES")  # fmt: skip
        else:
            from .collective import GlooTransport

            return GlooTransport(target, **options)
    if transport == "nccl":
        from .nccl import NcclTransport

        return NcclTransport(options.pop("client", target), **options)
    raise ValueError(f"transport {transport!r}: expected one of {TRANSPORTS} or a Transport instance")
