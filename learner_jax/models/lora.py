"""LoRA adapters on the model's linear layers: which layers (`LoraSpec`), the adapter module, and the pure-dict
helpers that find, split off and restore adapter leaves.

An adapted `layers.Linear` at "text/layers/q" holds `lora = nnx.LoRA(in, r, out)`, so the params tree gains
`text/layers/q/lora/lora_a` [L, D, r] and `.../lora_b` [L, r, H*hd] beside the base kernel (stacked like it).
The forward functions run whatever the tree holds: without adapter leaves it is the plain base model, which is
how the reference policy (adapters off) shares the policy's base weights.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

from flax import nnx

Params = dict[str, Any]
LORA = "lora"  # the attribute, hence the path component, of an adapter inside its Linear
LEAVES = ("lora_a", "lora_b")


@dataclass(frozen=True)
class LoraSpec:
    """Rank-`rank` adapters on the Linear modules at `targets` (module paths: "text/layers/q",
    "text/layers/mlp/gate", "visual/blocks/attn/qkv"); the update is scaled by alpha / rank."""

    rank: int
    alpha: float
    targets: frozenset[str]

    def __post_init__(self) -> None:
        if self.rank < 1:
            raise ValueError(f"LoRA rank must be >= 1, got {self.rank}")
        object.__setattr__(self, "targets", frozenset(self.targets))

    @property
    def scale(self) -> float:
        return self.alpha / self.rank


def make_lora(spec: LoraSpec, kernel_axes: tuple[Optional[str], ...], d_in: int, d_out: int,
              rngs: nnx.Rngs) -> nnx.LoRA:  # fmt: skip
    """Flax's LoRA layer for a kernel [d_in, d_out] with logical axes `kernel_axes`: A [in, r] splits like the
    kernel's input, B [r, out] like its output, so tensor parallelism needs no gather for the adapter. Flax's
    default init (he-uniform A, zero B): a fresh adapter leaves the model unchanged."""
    meta = lambda axes: {"out_sharding": axes, "eager_sharding": False}  # noqa: E731
    return nnx.LoRA(d_in, spec.rank, d_out, rngs=rngs, a_metadata=meta((kernel_axes[0], None)),
                    b_metadata=meta((None, kernel_axes[1])))  # fmt: skip


def adapted_modules(params: Params) -> dict[str, int]:
    """{module path: rank} of every adapter in a params tree (rank read from lora_a's last axis)."""
    found: dict[str, int] = {}

    def walk(node: Any, path: tuple[str, ...]) -> None:
        if not isinstance(node, dict):
            return
        if path and path[-1] == LORA and "lora_a" in node:
            found["/".join(path[:-1])] = int(node["lora_a"].shape[-1])
            return
        for k, v in node.items():
            walk(v, (*path, k))

    walk(params, ())
    return found


def split_lora(params: Params) -> tuple[Params, Params]:
    """(base tree, adapters-only tree): the two halves of a params tree, both nested like it."""

    def split(node: Any) -> tuple[Any, Any]:
        base, adapters = {}, {}
        for k, v in node.items():
            if k == LORA:
                adapters[k] = v
            elif isinstance(v, dict):
                b, a = split(v)
                base[k] = b
                if a:
                    adapters[k] = a
            else:
                base[k] = v
        return base, adapters

    return split(params)


def merge_lora(base: Params, adapters: Params) -> Params:
    """Inverse of `split_lora`: the base tree with the adapter leaves put back (neither input is modified)."""
    out = dict(base)
    for k, v in adapters.items():
        out[k] = merge_lora(out.get(k, {}), v) if isinstance(v, dict) and k != LORA else v
    return out
