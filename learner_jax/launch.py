"""Start the learner: one process in the driver, or `learner.num_processes` Ray actors forming one JAX runtime.

    launch(cfg, resume=False) -> the last iteration's metrics (process 0's)

One process that reserves no Ray resources (the demo, whose engines hold both cores): `trainer.train` runs in the
driver; nothing else starts, so the console shows only the progress bar. Otherwise the learner runs in actors
holding the resources it declares, one per process, as below.

N processes: the driver starts or joins Ray (`placement.start_ray`), reserves a placement group of N bundles of
{CPU: num_cpus_per_process, GPU: num_gpus_per_process, **resources_per_process} (one byte of "memory" when all
are 0), PACK when one node can hold all N bundles, else SPREAD (one process per node where possible), and waits
for it at most `ray.connect_timeout_s`: resources the cluster does not have fail there with what is missing. Then
one `LearnerActor` per bundle. Actor 0 picks a free port on its node and reports "ip:port"; every actor sets its
environment before JAX touches a device (simulated CPU devices with `devices_per_process`, CPU only without GPUs), joins the runtime through
`sharding.initialize_distributed` (gloo collectives on CPU, `learner.coordinator_timeout_s`) and runs
`trainer.train`, where process 0 alone owns engines, rewards, metrics, evaluation and the progress bar. An actor
that fails ends the run: the driver raises its error (naming the coordinator) and kills the others.
`learner.cpu_collectives: gloo` takes this path for one process too, so that its sums run in gloo's order.
"""
from __future__ import annotations

import os
import socket

import ray
from ray.util.placement_group import placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from shared.config import Config

from .placement import start_ray


IDLE_BUNDLE = {"memory": 1.0}


def launch(cfg: Config, resume: bool = False) -> dict:
    lc = cfg.learner
    if lc.num_processes == 1 and bundle(cfg) == IDLE_BUNDLE and lc.cpu_collectives == "auto":  # no actor needed
        from .trainer import train

        return train(cfg, resume=resume)
    start_ray(cfg.ray)
    return launch_actors(cfg, resume)


def process_env(cfg: Config) -> dict[str, str]:
    """Environment a learner process needs before JAX first touches a device (given to the learner actors, and set
    in the driver by `learner_jax.main`). JAX is pinned to the learner's platform as the config fixes it
    (`LearnerConfig.platform`): the engines start for the collective route's NCCL or gloo form from the same fact
    (`rollout_torch.engine.EngineConfig.from_config`), and the bridge picks the form from the learner's devices.
    GPU memory (jaxlib 0.10.2 `generate_pjrt_gpu_plugin_options`, read once when the GPU backend starts):
    learner.gpu_memory_fraction -> XLA_CLIENT_MEM_FRACTION, learner.gpu_preallocate false ->
    XLA_PYTHON_CLIENT_PREALLOCATE=false. The deprecated XLA_PYTHON_CLIENT_MEM_FRACTION is never set, and with the
    key set it is a ConfigError in this environment (jaxlib raises when both names are set), as is an
    XLA_CLIENT_MEM_FRACTION holding another fraction."""
    lc = cfg.learner
    env: dict[str, str] = {}
    if lc.platform == "cpu":
        env["JAX_PLATFORMS"] = "cpu"  # a process that reserved no accelerator, nor shares the engines', takes none
    elif lc.platform == "gpu":
        env["JAX_PLATFORMS"] = "cuda,cpu"  # a JAX without CUDA fails at start instead of computing on the CPU
    if lc.gpu_memory_fraction is not None:
        from shared.config import ConfigError

        fraction = str(float(lc.gpu_memory_fraction))
        if deprecated := os.environ.get("XLA_PYTHON_CLIENT_MEM_FRACTION", ""):
            raise ConfigError(f"learner.gpu_memory_fraction sets XLA_CLIENT_MEM_FRACTION={fraction}, and the "
                              f"environment has its deprecated alias XLA_PYTHON_CLIENT_MEM_FRACTION={deprecated}: "
                              f"jaxlib 0.10.2 raises ValueError when both are set; unset "
                              f"XLA_PYTHON_CLIENT_MEM_FRACTION (the key replaces it)")  # fmt: skip
        held = os.environ.get("XLA_CLIENT_MEM_FRACTION", "")
        try:
            agrees = not held or float(held) == lc.gpu_memory_fraction
        except ValueError:
            agrees = False
        if not agrees:
            raise ConfigError(f"learner.gpu_memory_fraction {fraction} and the environment's "
                              f"XLA_CLIENT_MEM_FRACTION={held} disagree; unset the variable (the key replaces it)")
        env["XLA_CLIENT_MEM_FRACTION"] = fraction
    if not lc.gpu_preallocate:
        env["XLA_PYTHON_CLIENT_PREALLOCATE"] = "false"
    if lc.devices_per_process is not None:
        from .sharding import simulated_cpu_env

        env.update(simulated_cpu_env(lc.devices_per_process))
    return env


def bundle(cfg: Config) -> dict[str, float]:
    lc = cfg.learner
    out = {k: float(v) for k, v in (("CPU", lc.num_cpus_per_process), ("GPU", lc.num_gpus_per_process)) if v > 0}
    out.update({k: float(v) for k, v in lc.resources_per_process.items() if v > 0})
    # A process that reserves neither (the demo's learner, beside engines holding every core) still needs a
    # non-empty bundle: one byte of Ray's memory resource places it without taking a CPU from anyone.
    return out or IDLE_BUNDLE


def placement_strategy(want: dict[str, float], count: int) -> str:
    """PACK when one alive node can hold all `count` bundles, else SPREAD (one process per node where possible)."""
    for node in ray.nodes():
        if node.get("Alive") and all(node.get("Resources", {}).get(k, 0.0) >= v * count for k, v in want.items()):
            return "PACK"
    return "SPREAD"


def reserve(cfg: Config):
    """The learner's placement group, ready; a clear error within `ray.connect_timeout_s` if Ray cannot place it."""
    n, want = cfg.learner.num_processes, bundle(cfg)
    strategy = placement_strategy(want, n)
    pg = placement_group([dict(want) for _ in range(n)], strategy=strategy, name="")
    try:
        ray.get(pg.ready(), timeout=cfg.ray.connect_timeout_s)
    except ray.exceptions.GetTimeoutError:
        remove_placement_group(pg)
        total, free = ray.cluster_resources(), ray.available_resources()
        missing = {k: f"asks {v * n:g} in all, the cluster has {total.get(k, 0.0):g} ({free.get(k, 0.0):g} free)"
                   for k, v in want.items() if total.get(k, 0.0) < v * n or free.get(k, 0.0) < v * n}  # fmt: skip
        why = "; ".join(f"{k}: {m}" for k, m in missing.items()) or "the nodes' shapes do not fit the bundles"
        raise RuntimeError(
            f"Ray cannot place {n} learner process(es) asking {want} each ({strategy}) within "
            f"ray.connect_timeout_s={cfg.ray.connect_timeout_s:g}s: {why}. Lower learner.num_processes, "
            f"learner.num_cpus_per_process, learner.num_gpus_per_process or learner.resources_per_process, or add "
            f"nodes with those resources"
        ) from None
    return pg


def launch_actors(cfg: Config, resume: bool = False) -> dict:
    lc = cfg.learner
    pg = reserve(cfg)
    env = process_env(cfg)
    actors = []
    try:
        for k in range(lc.num_processes):
            actors.append(LearnerActor.options(
                num_cpus=lc.num_cpus_per_process, num_gpus=lc.num_gpus_per_process,
                resources={k: v for k, v in lc.resources_per_process.items() if v > 0} or None,
                scheduling_strategy=PlacementGroupSchedulingStrategy(pg, placement_group_bundle_index=k),
                runtime_env={"env_vars": env},
            ).remote(cfg, k, env))  # fmt: skip
        coordinator = ray.get(actors[0].coordinator.remote(), timeout=cfg.ray.connect_timeout_s + 60)
        pending = {a.run.remote(coordinator, resume): k for k, a in enumerate(actors)}
        result: dict = {}
        while pending:  # the first failure ends the run (the others would wait in a collective forever)
            done, _ = ray.wait(list(pending), num_returns=1)
            k = pending.pop(done[0])
            try:
                out = ray.get(done[0])
            except Exception as exc:
                raise RuntimeError(f"learner process {k}/{lc.num_processes} failed (JAX coordinator "
                                   f"{coordinator}): {exc}") from exc  # fmt: skip
            if k == 0:
                result = out
        return result
    finally:
        for a in actors:
            ray.kill(a)
        remove_placement_group(pg)


@ray.remote
class LearnerActor:
    """One learner process. Imports JAX only once its environment is set (`run`)."""

    def __init__(self, cfg: Config, process_id: int, env: dict[str, str]):
        os.environ.update(env)  # also given as the actor's runtime_env; set here too in case the worker was reused
        self.cfg, self.process_id = cfg, process_id

    def coordinator(self) -> str:
        """ "ip:port" of a port free on this node, for the JAX coordination service (process 0 only)."""
        ip = ray.util.get_node_ip_address()
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.bind(("", 0))
            return f"{ip}:{s.getsockname()[1]}"

    def run(self, coordinator: str, resume: bool) -> dict:
        from .sharding import initialize_distributed

        cfg = self.cfg
        lc = cfg.learner
        if lc.num_processes > 1 or lc.cpu_collectives == "gloo":
            initialize_distributed(coordinator, lc.num_processes, self.process_id, timeout_s=lc.coordinator_timeout_s)
        import jax

        if lc.devices_per_process is not None and len(jax.local_devices()) != lc.devices_per_process:
            raise RuntimeError(f"learner process {self.process_id} has {len(jax.local_devices())} devices, "
                               f"learner.devices_per_process asks {lc.devices_per_process} (JAX was initialised "
                               f"before the environment was set)")  # fmt: skip
        from .trainer import train

        return train(cfg, resume=resume)
