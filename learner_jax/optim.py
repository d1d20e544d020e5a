"""AdamW with the reference's schedule (`cosine_with_min_lr`: linear warmup, cosine decay to min_lr_ratio * lr),
global-norm gradient clipping, weight decay off norms and biases, and frozen parameter prefixes.
"""
from __future__ import annotations

import math
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import optax

from shared.config import OptimConfig


def cosine_with_min_lr(cfg: OptimConfig, total_steps: int) -> Callable[[jax.Array], jax.Array]:
    warmup = math.ceil(cfg.warmup_ratio * total_steps)
    peak, floor = cfg.lr, cfg.lr * cfg.min_lr_ratio

    def schedule(step):
        step = jnp.asarray(step, jnp.float32)
        warm = peak * step / max(warmup, 1)
        progress = jnp.clip((step - warmup) / max(total_steps - warmup, 1), 0.0, 1.0)
        decay = floor + (peak - floor) * 0.5 * (1.0 + jnp.cos(jnp.pi * progress))
        return jnp.where(step < warmup, warm, decay)

    return schedule


def _path_str(path: tuple) -> str:
    return "/".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in path)


def label_tree(params: Any, frozen: Callable[[str], bool]) -> Any:
    """'frozen' for parameters whose path is frozen, 'decay' for matrices, 'no_decay' for norms and biases."""

    def label(path, leaf):
        name = _path_str(path)
        if frozen(name):
            return "frozen"
        return "no_decay" if leaf.ndim <= 1 or "norm" in name or name.endswith("bias") else "decay"

    return jax.tree_util.tree_map_with_path(label, params)


class Optimizer(NamedTuple):
    """An optax transformation (`init`, `update`: the whole chain) that also gives its two halves: `pre`, the
    stateless gradient processing (frozen leaves zeroed, global-norm clip), and `post`, AdamW per label. The chain's
    state is `(*pre_state, *post_state)`, split at `split`. `sharding.TrainStep` runs the halves as two programs, so
    the clipped gradient overwrites the gradient sum instead of being a parameter-sized temporary."""

    init: Callable
    update: Callable
    pre: optax.GradientTransformation
    post: optax.GradientTransformation
    split: int


def make_optimizer(
    cfg: OptimConfig, total_steps: int, params: Any, frozen: Callable[[str], bool] = lambda name: False
) -> tuple[Optimizer, Callable]:
    """Returns the optimizer and its schedule. `frozen(path)` gets a '/'-joined parameter path."""
    schedule = cosine_with_min_lr(cfg, total_steps)
    b1, b2 = cfg.betas

    def adamw(wd: float) -> optax.GradientTransformation:
        return optax.adamw(schedule, b1=b1, b2=b2, eps=1e-8, weight_decay=wd)

    labels = label_tree(params, frozen)
    # Frozen gradients are zeroed before clipping so they do not count in the global norm.
    pre = (
        optax.masked(optax.set_to_zero(), jax.tree.map(lambda lab: lab == "frozen", labels)),
        optax.clip_by_global_norm(cfg.max_norm),
    )
    post = (
        optax.multi_transform(
            {"decay": adamw(cfg.weight_decay), "no_decay": adamw(0.0), "frozen": optax.set_to_zero()}, labels
        ),
    )
    tx = optax.chain(*pre, *post)
    return Optimizer(tx.init, tx.update, optax.chain(*pre), optax.chain(*post), len(pre)), schedule
