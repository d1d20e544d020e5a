"""The one table between Hugging Face tensor names (Hub layout) and our parameter pytree, used in both directions.

Each rule names an HF tensor, the Flax leaf it lives in, the layout change between the two, and whether the leaf
stacks one slice per decoder layer or vision block (axis 0, so layers can run under `lax.scan`). `hf_to_flax`
loads a checkpoint's tensors; `flax_to_hf` streams HF tensors back one at a time for the weight bridge and
export. The round trip is bit-exact: the layouts are transposes and reshapes only.

Flax tree (shapes without the stacking axis; `L` = text layers, `Lv` = vision blocks):

    text/embed/embedding [V, D]            text/layers/{q,k,v}/{kernel [D, *], bias}   text/layers/o/kernel
    text/layers/{input_norm,post_norm}/scale   text/layers/mlp/{gate,up,down}/kernel   text/norm/scale
    lm_head/kernel [D, V] (untied only)    value_head/kernel [D, 1] (critic only)
    visual/patch_embed/kernel [C*t*p*p, Dv]   visual/blocks/{norm1,norm2}/scale   visual/blocks/attn/{qkv,proj}
    visual/blocks/mlp/{gate,up,down}       visual/merger/{norm/scale, fc1, fc2}
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Iterator, Mapping, Optional

import numpy as np

from .config import Qwen25VLConfig

Params = dict[str, Any]
VALUE_HEAD_NAME = "score.weight"
LM_HEAD_NAME = "lm_head.weight"
EMBED_NAME = "model.embed_tokens.weight"


@dataclass(frozen=True)
class Layout:
    """How an HF tensor becomes a Flax leaf (slice) and back."""

    name: str
    to_flax: Callable[[np.ndarray], np.ndarray]
    to_hf: Callable[[np.ndarray, tuple[int, ...]], np.ndarray]  # (flax array, hf shape) -> hf array
    flax_shape: Callable[[tuple[int, ...]], tuple[int, ...]]


COPY = Layout("copy", lambda x: x, lambda x, shape: x, lambda s: s)
# torch Linear stores [out, in]; we multiply x @ kernel with kernel [in, out].
LINEAR = Layout("linear", lambda x: x.T, lambda x, shape: x.T, lambda s: s[::-1])
# Conv3d with kernel == stride over flattened patches is a matmul: [Dv, C, t, p, p] <-> [C*t*p*p, Dv].
PATCH = Layout(
    "patch",
    lambda x: x.reshape(x.shape[0], -1).T,
    lambda x, shape: x.T.reshape(shape),
    lambda s: (int(np.prod(s[1:])), s[0]),
)


@dataclass(frozen=True)
class Rule:
    hf: str  # "{i}" stands for the layer / block index
    flax: str  # "/"-separated path in the params tree
    layout: Layout
    shape: Callable[[Qwen25VLConfig], tuple[int, ...]]  # HF shape of one tensor
    stack: Optional[str] = None  # "text" (decoder layers) | "vision" (vision blocks)
    when: Optional[str] = None  # "untied" | "value_head": present only in those models


def _t(f):  # shape helper on the text config
    return lambda c: f(c.text)


def _v(f):
    return lambda c: f(c.vision)


def _vdim(v, which: str) -> int:  # "d": vision hidden size, "i": vision MLP width
    return v.hidden_size if which == "d" else v.intermediate_size


_QKV_OUT = {"q": lambda t: t.num_heads * t.head_dim, "k": lambda t: t.num_kv_heads * t.head_dim,
            "v": lambda t: t.num_kv_heads * t.head_dim}  # fmt: skip

RULES: tuple[Rule, ...] = (
    Rule(EMBED_NAME, "text/embed/embedding", COPY, _t(lambda t: (t.vocab_size, t.hidden_size))),
    *(
        r
        for p in ("q", "k", "v")
        for r in (
            Rule(f"model.layers.{{i}}.self_attn.{p}_proj.weight", f"text/layers/{p}/kernel", LINEAR,
                 _t(lambda t, p=p: (_QKV_OUT[p](t), t.hidden_size)), "text"),
            Rule(f"model.layers.{{i}}.self_attn.{p}_proj.bias", f"text/layers/{p}/bias", COPY,
                 _t(lambda t, p=p: (_QKV_OUT[p](t),)), "text"),
        )
    ),  # fmt: skip
    Rule("model.layers.{i}.self_attn.o_proj.weight", "text/layers/o/kernel", LINEAR,
         _t(lambda t: (t.hidden_size, t.num_heads * t.head_dim)), "text"),
    Rule("model.layers.{i}.mlp.gate_proj.weight", "text/layers/mlp/gate/kernel", LINEAR,
         _t(lambda t: (t.intermediate_size, t.hidden_size)), "text"),
    Rule("model.layers.{i}.mlp.up_proj.weight", "text/layers/mlp/up/kernel", LINEAR,
         _t(lambda t: (t.intermediate_size, t.hidden_size)), "text"),
    Rule("model.layers.{i}.mlp.down_proj.weight", "text/layers/mlp/down/kernel", LINEAR,
         _t(lambda t: (t.hidden_size, t.intermediate_size)), "text"),
    Rule("model.layers.{i}.input_layernorm.weight", "text/layers/input_norm/scale", COPY, _t(lambda t: (t.hidden_size,)),
         "text"),
    Rule("model.layers.{i}.post_attention_layernorm.weight", "text/layers/post_norm/scale", COPY,
         _t(lambda t: (t.hidden_size,)), "text"),
    Rule("model.norm.weight", "text/norm/scale", COPY, _t(lambda t: (t.hidden_size,))),
    Rule(LM_HEAD_NAME, "lm_head/kernel", LINEAR, _t(lambda t: (t.vocab_size, t.hidden_size)), when="untied"),
    Rule(VALUE_HEAD_NAME, "value_head/kernel", LINEAR, _t(lambda t: (1, t.hidden_size)), when="value_head"),
    Rule("visual.patch_embed.proj.weight", "visual/patch_embed/kernel", PATCH,
         _v(lambda v: (v.hidden_size, v.in_channels, v.temporal_patch_size, v.patch_size, v.patch_size))),
    Rule("visual.blocks.{i}.norm1.weight", "visual/blocks/norm1/scale", COPY, _v(lambda v: (v.hidden_size,)), "vision"),
    Rule("visual.blocks.{i}.norm2.weight", "visual/blocks/norm2/scale", COPY, _v(lambda v: (v.hidden_size,)), "vision"),
    Rule("visual.blocks.{i}.attn.qkv.weight", "visual/blocks/attn/qkv/kernel", LINEAR,
         _v(lambda v: (3 * v.hidden_size, v.hidden_size)), "vision"),
    Rule("visual.blocks.{i}.attn.qkv.bias", "visual/blocks/attn/qkv/bias", COPY, _v(lambda v: (3 * v.hidden_size,)),
         "vision"),
    Rule("visual.blocks.{i}.attn.proj.weight", "visual/blocks/attn/proj/kernel", LINEAR,
         _v(lambda v: (v.hidden_size, v.hidden_size)), "vision"),
    Rule("visual.blocks.{i}.attn.proj.bias", "visual/blocks/attn/proj/bias", COPY, _v(lambda v: (v.hidden_size,)),
         "vision"),
    *(
        r
        for p, out, inp in (("gate", "i", "d"), ("up", "i", "d"), ("down", "d", "i"))
        for r in (
            Rule(f"visual.blocks.{{i}}.mlp.{p}_proj.weight", f"visual/blocks/mlp/{p}/kernel", LINEAR,
                 _v(lambda v, o=out, n=inp: (_vdim(v, o), _vdim(v, n))), "vision"),
            Rule(f"visual.blocks.{{i}}.mlp.{p}_proj.bias", f"visual/blocks/mlp/{p}/bias", COPY,
                 _v(lambda v, o=out: (_vdim(v, o),)), "vision"),
        )
    ),  # fmt: skip
    Rule("visual.merger.ln_q.weight", "visual/merger/norm/scale", COPY, _v(lambda v: (v.hidden_size,))),
    Rule("visual.merger.mlp.0.weight", "visual/merger/fc1/kernel", LINEAR,
         _v(lambda v: (v.hidden_size * v.merge_unit,) * 2)),
    Rule("visual.merger.mlp.0.bias", "visual/merger/fc1/bias", COPY, _v(lambda v: (v.hidden_size * v.merge_unit,))),
    Rule("visual.merger.mlp.2.weight", "visual/merger/fc2/kernel", LINEAR,
         _v(lambda v: (v.out_hidden_size, v.hidden_size * v.merge_unit))),
    Rule("visual.merger.mlp.2.bias", "visual/merger/fc2/bias", COPY, _v(lambda v: (v.out_hidden_size,))),
)


@dataclass(frozen=True)
class Entry:
    """One HF tensor of a concrete model: its name, Flax leaf path, slice index in a stacked leaf, layout."""

    hf_name: str
    flax_path: tuple[str, ...]
    index: Optional[int]
    layout: Layout
    hf_shape: tuple[int, ...]
    stack_size: Optional[int]

    @property
    def flax_shape(self) -> tuple[int, ...]:
        """Shape of the whole Flax leaf (with the stacking axis)."""
        one = self.layout.flax_shape(self.hf_shape)
        return one if self.stack_size is None else (self.stack_size, *one)


def name_table(cfg: Qwen25VLConfig, include_value_head: bool = False) -> list[Entry]:
    """Every HF tensor of this model in table order, stacked rules expanded layer by layer (all tensors of
    layer i before layer i + 1, so a streaming consumer sees each fused group together)."""
    sizes = {"text": cfg.text.num_layers, "vision": cfg.vision.depth}
    present = {"untied": not cfg.tie_word_embeddings, "value_head": include_value_head, None: True}
    rules = [r for r in RULES if present[r.when]]
    entries: list[Entry] = []
    for k, rule in enumerate(rules):
        if rule.stack is None:
            entries.append(_entry(rule, cfg, None, None))
        elif all(r.stack != rule.stack for r in rules[:k]):  # first rule of a stack: emit it layer by layer
            group = [r for r in rules if r.stack == rule.stack]
            n = sizes[rule.stack]
            entries += [_entry(r, cfg, i, n) for i in range(n) for r in group]
    return entries


def _entry(rule: Rule, cfg: Qwen25VLConfig, i: Optional[int], n: Optional[int]) -> Entry:
    name = rule.hf.format(i=i) if i is not None else rule.hf
    return Entry(name, tuple(rule.flax.split("/")), i, rule.layout, rule.shape(cfg), n)


def abstract_params(cfg: Qwen25VLConfig, include_value_head: bool = False, dtype=np.float32) -> Params:
    """The params tree as `jax.ShapeDtypeStruct`s (for orbax restore, sharding rules, `jax.eval_shape`)."""
    import jax

    tree: Params = {}
    for e in name_table(cfg, include_value_head):
        _set(tree, e.flax_path, jax.ShapeDtypeStruct(e.flax_shape, dtype))
    return tree


def hf_to_flax(tensors: Mapping[str, np.ndarray], cfg: Qwen25VLConfig, dtype=np.float32) -> Params:
    """Build the params tree from HF tensors (Hub names). A value head is loaded when `score.weight` is present.

    Raises ValueError listing every missing, unknown or mis-shaped name. With tied embeddings a stored
    `lm_head.weight` is accepted only if it equals the embedding.
    """
    table = name_table(cfg, include_value_head=VALUE_HEAD_NAME in tensors)
    expected = {e.hf_name for e in table}
    given = set(tensors)
    if cfg.tie_word_embeddings and LM_HEAD_NAME in given:
        if EMBED_NAME in given and not np.array_equal(tensors[LM_HEAD_NAME], tensors[EMBED_NAME]):
            raise ValueError(f"config ties embeddings but {LM_HEAD_NAME} differs from {EMBED_NAME}")
        given.discard(LM_HEAD_NAME)
    missing, unknown = sorted(expected - given), sorted(given - expected)
    bad_shape = [f"{e.hf_name}: {tuple(tensors[e.hf_name].shape)} != {e.hf_shape}" for e in table
                 if e.hf_name in given and tuple(tensors[e.hf_name].shape) != e.hf_shape]  # fmt: skip
    if missing or unknown or bad_shape:
        tie = "tied" if cfg.tie_word_embeddings else "untied"
        raise ValueError(
            f"checkpoint does not match the Qwen2.5-VL config ({tie} lm_head): "
            f"missing {missing}; unknown {unknown}; wrong shape {bad_shape}"
        )
    params: Params = {}
    for e in table:
        x = e.layout.to_flax(np.asarray(tensors[e.hf_name])).astype(dtype)
        if e.index is None:
            _set(params, e.flax_path, np.ascontiguousarray(x))
            continue
        leaf = _get(params, e.flax_path, default=None)
        if leaf is None:
            leaf = np.empty(e.flax_shape, dtype)
            _set(params, e.flax_path, leaf)
        leaf[e.index] = x
    return params


def flax_to_hf(params: Params, cfg: Qwen25VLConfig,
               include_value_head: bool = False) -> Iterator[tuple[str, np.ndarray]]:  # fmt: skip
    """Yield (HF name, array) in checkpoint order, one tensor at a time (stacked leaves are sliced per layer).

    Arrays keep the params' dtype. Tied models yield no `lm_head.weight`, as their HF checkpoints.
    """
    for e in name_table(cfg, include_value_head):
        try:
            leaf = _get(params, e.flax_path)
        except KeyError:
            raise ValueError(f"params have no leaf {'/'.join(e.flax_path)} for {e.hf_name}") from None
        x = np.asarray(leaf if e.index is None else leaf[e.index])
        yield e.hf_name, np.ascontiguousarray(e.layout.to_hf(x, e.hf_shape))


def _get(tree: Params, path: tuple[str, ...], **kw: Any) -> Any:
    node: Any = tree
    for key in path:
        if key not in node:
            if "default" in kw:
                return kw["default"]
            raise KeyError("/".join(path))
        node = node[key]
    return node


def _set(tree: Params, path: tuple[str, ...], value: Any) -> None:
    for key in path[:-1]:
        tree = tree.setdefault(key, {})
    tree[path[-1]] = value
