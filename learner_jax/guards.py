"""Guards on what leaves the learner: no NaN or Inf is ever saved in a checkpoint or pushed into the engines.

    check_finite(tree, "policy weights of version 7 (iteration 6)")   # raises NonFiniteError, else returns

One jitted program reduces every floating leaf on its devices to two flags (any NaN, any Inf); the [leaves, 2]
flags come back in one device-to-host read. Integer and boolean leaves (optimizer step counts) are finite by
construction and skipped. Sharded arrays are reduced where they live, and under several learner processes every
process runs the same program (call it from all of them, as `Run.save` and `Run.push_weights` are) and reads the
same replicated flags.
"""
from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np


class NonFiniteError(FloatingPointError):
    """NaN or Inf in a tree about to be saved or pushed; `paths` are the offending leaves, in tree order."""

    def __init__(self, what: str, paths: list[str], kinds: list[str], checked: int):
        self.what, self.paths = what, paths
        shown = ", ".join(f"{p} ({k})" for p, k in list(zip(paths, kinds))[:5])
        more = f" and {len(paths) - 5} more" if len(paths) > 5 else ""
        super().__init__(f"non-finite values in {what}: {len(paths)} of {checked} tensors, first {shown}{more}; "
                         f"refusing to save or push them")  # fmt: skip


@jax.jit
def _flags(leaves: tuple) -> jax.Array:
    """[len(leaves), 2] bool: (any NaN, any Inf) per leaf."""
    return jnp.stack([jnp.stack([jnp.isnan(x).any(), jnp.isinf(x).any()]) for x in leaves])


def check_finite(tree: Any, what: str) -> None:
    """Raise `NonFiniteError` naming `what` and the first non-finite leaves (tree paths) if any floating leaf
    of `tree` holds a NaN or an Inf."""
    flat = jax.tree_util.tree_flatten_with_path(tree)[0]
    # `.dtype` only: converting an array that spans other processes' devices to numpy is not possible
    floats = [(p, x) for p, x in flat if jnp.issubdtype(x.dtype if hasattr(x, "dtype") else np.asarray(x).dtype,
                                                        jnp.inexact)]  # fmt: skip
    if not floats:
        return
    flags = _flags(tuple(x for _, x in floats))
    if not flags.is_fully_addressable:  # inputs spread over processes: every process reads the same flags
        from jax.experimental import multihost_utils

        flags = multihost_utils.process_allgather(flags, tiled=True)
    flags = np.asarray(jax.device_get(flags))  # the one device-to-host read
    bad = np.flatnonzero(flags.any(axis=1))
    if not len(bad):
        return
    paths = [jax.tree_util.keystr(floats[i][0], simple=True, separator="/") for i in bad]
    kinds = ["NaN and Inf" if flags[i].all() else "NaN" if flags[i, 0] else "Inf" for i in bad]
    raise NonFiniteError(what, paths, kinds, len(floats))
