"""Engine-side calls of the bridge: what an engine process runs to report the weights it holds.

`engine_naming(engine)` names the scheme of an engine's weights; the engine fingerprints the tensors it computes
with itself (`RolloutEngine.weight_checksums`, block by block, so no float32 copy of the model is made or moved).
`EngineHost` puts an engine and these calls in one object for a Ray actor, whose remote methods must be its own
(`learner_jax.placement.spawn("bridge.receiver:EngineHost", ...)`); a pool of engine actors exposes the same two
calls per engine. No jax here.
"""
from __future__ import annotations

import sys
from typing import Any

from shared.checksum import Checksum
from .payload import to_torch

_ENGINES = (
    ("rollout_torch.vllm_engine", "VllmEngine", "vllm"),
    ("rollout_torch.hf_engine", "HFEngine", "transformers"),
)


def engine_naming(engine: Any) -> str:
    """The naming scheme (`shared.models.qwen2_5_vl_params.NAMINGS`) of a rollout engine's `named_weights`."""
    for module, cls, naming in _ENGINES:
        m = sys.modules.get(module)  # an engine's class is imported wherever the engine exists
        if m is not None and isinstance(engine, getattr(m, cls)):
            return naming
    raise TypeError(f"{type(engine).__name__} is not a known rollout engine (expected one of "
                    f"{[c for _, c, _ in _ENGINES]})")  # fmt: skip


class EngineHost:
    """A rollout engine with the bridge's receiver calls; everything else is forwarded to the engine."""

    def __init__(self, backend: str, cfg: Any, engine_id: int = 0):
        from rollout_torch.engine import EngineConfig, make_engine

        self.engine = make_engine(backend, cfg if isinstance(cfg, EngineConfig) else EngineConfig(**cfg), engine_id)

    def update_weights(self, named: Any, version: int, final: bool = True) -> None:
        """Also takes the object-store route's `[ObjectRef]`: its arrays are read-only views of the object store,
        handed to the engine as tensors without a copy (the engine's load copies them once)."""
        if isinstance(named, list) and len(named) == 1 and not isinstance(named[0], tuple):
            import ray

            named = [(n, to_torch(a, a.dtype.name, None, a.shape)) for n, a in ray.get(named[0])]
        self.engine.update_weights(named, version, final)

    def weight_naming(self) -> str:
        return engine_naming(self.engine)

    def weight_checksums(self, names: list[str]) -> dict[str, Checksum]:
        return self.engine.weight_checksums(names)

    def __getattr__(self, name: str) -> Any:
        if name == "engine":
            raise AttributeError(name)
        return getattr(self.engine, name)
