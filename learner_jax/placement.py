"""Ray placement for the learner: start or join Ray, and host torch-side objects in actors by import path.

The learner process never imports torch, so it cannot hold a `rollout_torch` class; `spawn("module:Class", ...)`
builds the object inside a Ray actor and returns a proxy whose method calls are remote and synchronous.
"""
from __future__ import annotations

import importlib
import os
from typing import Any, Optional

import ray

from shared.config import RayConfig

from .net import wait_for_port

# Facts of the machines every worker needs (README): offline hub, single-process vLLM, no Ray token auth.
WORKER_ENV = {
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
    "TOKENIZERS_PARALLELISM": "false",
    "RAY_AUTH_MODE": "disabled",
    # vLLM warns on every image request that its CPU worker ignores torch.set_num_threads; errors still show.
    "VLLM_LOGGING_LEVEL": "ERROR",
}


def start_ray(cfg: RayConfig) -> None:
    """Start a local Ray, or join `cfg.address` ("host:port" of a head node, or "auto"); an address that does not
    answer within `cfg.connect_timeout_s` raises ConnectionError naming it instead of waiting."""
    if ray.is_initialized():
        return
    if cfg.address not in (None, "auto", "local") and not cfg.address.startswith("ray://"):
        check_reachable(cfg.address, cfg.connect_timeout_s)
    for key, value in WORKER_ENV.items():
        os.environ.setdefault(key, value)
    env = {k: os.environ[k] for k in WORKER_ENV} | {
        k: v for k, v in os.environ.items() if k.startswith(("VLLM_", "XLA_", "JAX_"))
    }
    ray.init(
        address=cfg.address, num_cpus=cfg.num_cpus if cfg.address is None else None, include_dashboard=False,
        _temp_dir=cfg.temp_dir if cfg.address is None else None, log_to_driver=True,
        runtime_env={"env_vars": env},
    )  # fmt: skip


def check_reachable(address: str, timeout_s: float) -> None:
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        raise ValueError(f"ray.address {address!r}: expected host:port of a Ray head node, or auto")
    if (exc := wait_for_port(address, timeout_s)) is not None:
        raise ConnectionError(f"ray.address {address}: no Ray head answers there ({exc}) after {timeout_s:.0f} s; "
                              f"start one with `ray start --head --port={port}` or fix the address")


@ray.remote
class _Host:
    def __init__(self, target: str, args: tuple, kwargs: dict):
        module, name = target.split(":")
        self.obj = getattr(importlib.import_module(module), name)(*args, **kwargs)

    def call(self, method: str, args: tuple, kwargs: dict) -> Any:
        return getattr(self.obj, method)(*args, **kwargs)


class Remote:
    """Synchronous proxy of an object living in a Ray actor."""

    def __init__(self, handle: ray.actor.ActorHandle):
        self.handle = handle

    def __getattr__(self, method: str):
        def call(*args: Any, **kwargs: Any) -> Any:
            return ray.get(self.handle.call.remote(method, args, kwargs))

        return call

    def submit(self, method: str, *args: Any, **kwargs: Any) -> ray.ObjectRef:
        return self.handle.call.remote(method, args, kwargs)

    def close(self) -> None:
        """Let the object release what it holds (`shutdown()` if it has one), then end the actor."""
        try:
            ray.get(self.handle.call.remote("shutdown", (), {}))
        finally:
            ray.kill(self.handle)


def spawn(target: str, *args: Any, num_cpus: float = 0, name: Optional[str] = None, **kwargs: Any) -> Remote:
    options: dict[str, Any] = {"num_cpus": num_cpus, "max_concurrency": 1}
    if name:
        options["name"] = name
    return Remote(_Host.options(**options).remote(target, args, kwargs))
