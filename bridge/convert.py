"""The learner's parameter tree <-> HF-named tensors, driven by the model's name table (`shared.models.qwen2_5_vl_params`) alone.

Learner side (no torch). Each HF tensor is one name-table `Entry`: a Flax leaf, a slice index for stacked
layers, a layout (transpose / reshape). Where the tensor comes from decides where its layout is applied:

- host memory (numpy leaves, or a single-device CPU jax array, viewed without a copy): the slice is sent in Flax
  layout and the engine relayouts it inside the copy it makes anyway (see `payload`), or, for routes that carry
  plain HF tensors, relaid here by a cache-friendly tiled copy;
- device memory (accelerators, sharded arrays): one jitted call per tensor slices the stacked leaf, applies the
  layout and casts on the device, so only the finished tensor, in the engine's dtype, crosses to the host.

The critic's value head is never part of the policy. Tied models have no `lm_head.weight` (as their checkpoints).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterator, Mapping, Optional, Sequence

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np

from shared.models.qwen2_5_vl_config import Qwen25VLConfig
from shared.models.qwen2_5_vl_params import Entry, Params, fused_group, hf_to_flax, name_table

from .payload import LAYOUTS, WireTensor

DTYPES = {"float32": np.dtype(np.float32), "bfloat16": np.dtype(ml_dtypes.bfloat16), "float16": np.dtype(np.float16)}


def resolve_dtype(dtype: Any) -> Optional[np.dtype]:
    """None (keep the params' dtype), a name in DTYPES, or a numpy / jax dtype."""
    if dtype is None:
        return None
    d = DTYPES.get(dtype) if isinstance(dtype, str) else np.dtype(dtype)
    if d is None or d.name not in DTYPES:
        raise ValueError(f"wire dtype {dtype!r}: expected one of {sorted(DTYPES)} or None")
    return d


def policy_entries(cfg: Qwen25VLConfig) -> list[Entry]:
    """Every tensor an engine holds, in name-table order (layer by layer): the table without the value head."""
    return name_table(cfg, include_value_head=False)


def to_flax(tensors: Mapping[str, np.ndarray], cfg: Qwen25VLConfig, dtype=np.float32) -> Params:
    """HF tensors (Hub names) -> params tree; see `qwen2_5_vl_params.hf_to_flax` for the checks."""
    return hf_to_flax(tensors, cfg, dtype=dtype)


def leaf_at(params: Params, entry: Entry) -> Any:
    node: Any = params
    for key in entry.flax_path:
        if not isinstance(node, Mapping) or key not in node:
            raise KeyError(f"params have no leaf {'/'.join(entry.flax_path)} (needed for {entry.hf_name})")
        node = node[key]
    if tuple(node.shape) != entry.flax_shape:
        raise ValueError(f"{'/'.join(entry.flax_path)}: shape {tuple(node.shape)}, the name table expects "
                         f"{entry.flax_shape} for this config")  # fmt: skip
    return node


# --------------------------------------------------------------------------- buckets


@dataclass(frozen=True)
class Bucket:
    entries: tuple[Entry, ...]
    nbytes: int


def plan_buckets(entries: Sequence[Entry], bucket_bytes: int, itemsize: Mapping[str, int]) -> list[Bucket]:
    """Greedy packing in table order into buckets of at most `bucket_bytes`, never splitting a fused group (a
    group larger than the bound gets a bucket of its own). `itemsize[hf_name]` is the wire element size."""
    if bucket_bytes <= 0:
        raise ValueError(f"bucket_bytes must be positive, got {bucket_bytes}")
    groups: dict[str, list[Entry]] = {}
    for e in entries:
        groups.setdefault(fused_group(e.hf_name), []).append(e)
    buckets: list[Bucket] = []
    cur: list[Entry] = []
    size = 0
    for group in groups.values():
        n = sum(int(np.prod(e.hf_shape)) * itemsize[e.hf_name] for e in group)
        if cur and size + n > bucket_bytes:
            buckets.append(Bucket(tuple(cur), size))
            cur, size = [], 0
        cur += group
        size += n
    if cur:
        buckets.append(Bucket(tuple(cur), size))
    return buckets


def wire_itemsizes(params: Params, entries: Sequence[Entry], dtype: Optional[np.dtype]) -> dict[str, int]:
    return {e.hf_name: (dtype or np.dtype(leaf_at(params, e).dtype)).itemsize for e in entries}


# --------------------------------------------------------------------------- gathering


def host_view(leaf: Any) -> Optional[np.ndarray]:
    """The leaf as a numpy array without a copy, when it already lives in host memory; else None."""
    if isinstance(leaf, np.ndarray):
        return leaf
    if isinstance(leaf, jax.Array) and leaf.is_fully_addressable:
        devices = leaf.sharding.device_set
        if all(d.platform == "cpu" for d in devices) and (len(devices) == 1 or leaf.is_fully_replicated):
            return np.asarray(leaf.addressable_data(0))
    return None


def _to_hf(leaf, index, *, stacked: bool, layout: str, hf_shape: tuple[int, ...], dtype: str):
    # The stacking axis is never sharded by the learner's rules, so each device slices its own shard locally.
    x = jax.lax.dynamic_index_in_dim(leaf, index, 0, keepdims=False) if stacked else leaf
    return LAYOUTS[layout].to_hf(x, hf_shape).astype(jnp.dtype(dtype))


_STATIC = ("stacked", "layout", "hf_shape", "dtype")
_to_hf_on_device = jax.jit(_to_hf, static_argnames=_STATIC)
_to_hf_replicated: dict[Any, Any] = {}  # mesh -> the same program with its output replicated on that mesh


def _converter(leaf: jax.Array):
    """The per-tensor program for `leaf`. A leaf spread over several processes (a multi-process learner) gets its
    output replicated, so every process holds the whole tensor locally; every process must run the same programs
    in the same order (`WeightSync` with `sender=False` on all but one)."""
    if leaf.is_fully_addressable:
        return _to_hf_on_device
    mesh = getattr(leaf.sharding, "mesh", None)
    if mesh is None:
        devices = sorted(leaf.sharding.device_set, key=lambda d: d.id)
        mesh = jax.sharding.Mesh(np.array(devices), ("all",))
    if mesh not in _to_hf_replicated:
        out = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
        _to_hf_replicated[mesh] = jax.jit(_to_hf, static_argnames=_STATIC, out_shardings=out)
    return _to_hf_replicated[mesh]


def gather(params: Params, entries: Sequence[Entry], dtype: Optional[np.dtype], *, on_device: bool = False,
           defer_layout: bool = True) -> list[WireTensor]:  # fmt: skip
    """The bucket's tensors. Host-resident leaves are sliced as views and cast; their layout is left to the engine
    with `defer_layout`, else applied here. Device leaves are converted on the device and fetched in one
    `jax.device_get` (or kept there with `on_device`, for device-to-device transports)."""
    out: list[WireTensor] = []
    pending: list[int] = []
    for e in entries:
        leaf = leaf_at(params, e)
        view = None if on_device else host_view(leaf)
        if view is not None:
            x = view if e.index is None else view[e.index]
            if dtype is not None and x.dtype != dtype:
                x = x.astype(dtype)
            w = WireTensor(e.hf_name, x, e.layout.name, e.hf_shape)
            out.append(w if defer_layout else WireTensor(e.hf_name, hf_layout(w), None, e.hf_shape))
            continue
        leaf = leaf if isinstance(leaf, jax.Array) else jnp.asarray(leaf)
        y = _converter(leaf)(leaf, e.index or 0, stacked=e.index is not None, layout=e.layout.name,
                             hf_shape=e.hf_shape, dtype=(dtype or np.dtype(leaf.dtype)).name)  # fmt: skip
        pending.append(len(out))
        out.append(WireTensor(e.hf_name, y, None, e.hf_shape))
    if pending and not on_device:
        fetched = jax.device_get([out[i].array for i in pending])
        for i, a in zip(pending, fetched):
            out[i].array = np.asarray(a)
    return out


def hf_layout(w: WireTensor, tile: tuple[int, int] = (256, 64)) -> np.ndarray:
    """The wire tensor as a contiguous host array in HF layout. A strided 2-D view (a transpose) is copied tile by
    tile, which keeps both sides in cache: about 4x faster than numpy's element-order copy."""
    a = np.asarray(w.array)
    v = a if w.layout is None else LAYOUTS[w.layout].to_hf(a, w.hf_shape)
    if v.flags.c_contiguous or v.ndim != 2:
        return np.ascontiguousarray(v)
    out = np.empty(v.shape, v.dtype)
    (rows, cols), (tr, tc) = v.shape, tile
    for r in range(0, rows, tr):
        for c in range(0, cols, tc):
            out[r:r + tr, c:c + tc] = v[r:r + tr, c:c + tc]
    return out


def to_hf(params: Params, cfg: Qwen25VLConfig, dtype: Any = None, *, include_value_head: bool = False,
          bucket_bytes: int = 256 << 20) -> Iterator[tuple[str, np.ndarray]]:  # fmt: skip
    """Params tree -> (HF name, contiguous array) in checkpoint order, gathered `bucket_bytes` at a time, so a
    sharded or device-resident tree is never copied to the host whole."""
    entries = name_table(cfg, include_value_head=include_value_head)
    d = resolve_dtype(dtype)
    for bucket in plan_buckets(entries, bucket_bytes, wire_itemsizes(params, entries, d)):
        for w in gather(params, bucket.entries, d):
            yield w.name, hf_layout(w)
