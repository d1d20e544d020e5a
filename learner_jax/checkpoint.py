"""Orbax checkpoints of the whole training state: arrays (policy, critic, optimizer states) plus JSON metadata
(step, data position, RNG state, policy version, metrics history).

Orbax writes each step into a temporary directory and renames it when complete, so a crash mid-save leaves the
previous checkpoint as the newest loadable one; `cleanup_tmp_directories` removes the debris on the next start.
Restoring against an abstract tree with shardings places arrays directly into another strategy's layout.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import jax
import orbax.checkpoint as ocp


class Checkpointer:
    def __init__(self, directory: str | Path, max_to_keep: int = 3):
        self.directory = Path(directory).resolve()
        options = ocp.CheckpointManagerOptions(
            max_to_keep=max_to_keep, create=True, cleanup_tmp_directories=True, enable_async_checkpointing=False
        )
        self.manager = ocp.CheckpointManager(self.directory, options=options)

    def latest_step(self) -> Optional[int]:
        return self.manager.latest_step()

    def save(self, step: int, arrays: Any, meta: dict) -> None:
        self.manager.save(
            step, args=ocp.args.Composite(arrays=ocp.args.StandardSave(arrays), meta=ocp.args.JsonSave(meta))
        )
        self.manager.wait_until_finished()

    def restore(self, abstract_arrays: Any, step: Optional[int] = None) -> tuple[Any, dict, int]:
        """Restore into the structure, dtypes and shardings of `abstract_arrays` (arrays or ShapeDtypeStructs)."""
        step = self.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"no checkpoint in {self.directory}")
        target = jax.tree.map(_abstract, abstract_arrays)
        out = self.manager.restore(
            step, args=ocp.args.Composite(arrays=ocp.args.StandardRestore(target), meta=ocp.args.JsonRestore())
        )
        return out["arrays"], out["meta"], step

    def meta(self, step: Optional[int] = None) -> dict:
        """The JSON metadata of a checkpoint (loop counters, data position, the resolved config) without its arrays."""
        step = self.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"no checkpoint in {self.directory}")
        return self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]

    def close(self) -> None:
        self.manager.close()


def _abstract(x: Any) -> Any:
    if isinstance(x, jax.ShapeDtypeStruct):
        return x
    sharding = getattr(x, "sharding", None)
    return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding)
