"""The parameter tree as abstract arrays, from the model's parameter table (for orbax restore, sharding rules,
memory planning and `jax.eval_shape`)."""
from __future__ import annotations

import jax
import numpy as np

from shared.models.qwen2_5_vl_params import Params, name_table, set_path

from .config import Qwen25VLConfig


def abstract_params(cfg: Qwen25VLConfig, include_value_head: bool = False, dtype=np.float32) -> Params:
    tree: Params = {}
    for e in name_table(cfg, include_value_head):
        set_path(tree, e.flax_path, jax.ShapeDtypeStruct(e.flax_shape, dtype))
    return tree
