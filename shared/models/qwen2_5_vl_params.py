"""The parameter table of Qwen2.5-VL: the one place that spells its tensors' names.

One row per Hugging Face (Hub-named) tensor: its path in the Flax module, the layout change between the two, its
HF shape, the stacked-layer axis (text decoder layers or vision blocks, run under `lax.scan`), the logical
tensor-parallel axis of each Flax dimension, and how vLLM fuses it (q/k/v into qkv_proj, gate/up into
gate_up_proj). Everything else reads it: the checkpoint loader and export (`hf_to_flax`, `flax_to_hf`), the
Flax modules' parameter shapes and sharding annotations (`leaf`), the learner's partition rules, the weight
bridge and the engines' names (`engine_name`, `hub_name`, `fused_group`), LoRA targets (`lora_modules`) and the
tiny checkpoint builder. numpy only: every side of the system imports it.

Flax tree (shapes without the stacking axis; `L` = text layers, `Lv` = vision blocks):

    text/embed/embedding [V, D]            text/layers/{q,k,v}/{kernel [D, *], bias}   text/layers/o/kernel
    text/layers/{input_norm,post_norm}/scale   text/layers/mlp/{gate,up,down}/kernel   text/norm/scale
    lm_head/kernel [D, V] (untied only)    value_head/kernel [D, 1] (critic only)
    visual/patch_embed/kernel [C*t*p*p, Dv]   visual/blocks/{norm1,norm2}/scale   visual/blocks/attn/{qkv,proj}
    visual/blocks/mlp/{gate,up,down}       visual/merger/{norm/scale, fc1, fc2}
"""
from __future__ import annotations

import fnmatch
import re
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator, Mapping, Optional

import numpy as np

from .qwen2_5_vl_config import Qwen25VLConfig

Params = dict[str, Any]
Axes = tuple[Optional[str], ...]


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

# vLLM's fused layers: (fused module name, order of the parts' rows).
FUSIONS = {"qkv": ("qkv_proj", ("q", "k", "v")), "gate_up": ("gate_up_proj", ("gate", "up"))}


@dataclass(frozen=True)
class Rule:
    hf: str  # "{i}" stands for the layer / block index
    flax: str  # "/"-separated path in the params tree
    layout: Layout
    shape: Callable[[Qwen25VLConfig], tuple[int, ...]]  # HF shape of one tensor
    axes: Axes  # logical tensor-parallel axis per Flax dimension (after the stacking axis); None: never split
    stack: Optional[str] = None  # "text" (decoder layers) | "vision" (vision blocks)
    when: Optional[str] = None  # "untied" | "value_head": present only in those models
    fuse: Optional[tuple[str, str]] = None  # (FUSIONS key, this tensor's part) in vLLM


def _t(f):  # shape helper on the text config
    return lambda c: f(c.text)


def _v(f):
    return lambda c: f(c.vision)


def _vdim(v, which: str) -> int:  # "d": vision hidden size, "i": vision MLP width
    return v.hidden_size if which == "d" else v.intermediate_size


_QKV_OUT = {"q": lambda t: t.num_heads * t.head_dim, "k": lambda t: t.num_kv_heads * t.head_dim,
            "v": lambda t: t.num_kv_heads * t.head_dim}  # fmt: skip
_QKV_AXIS = {"q": "heads", "k": "kv_heads", "v": "kv_heads"}
# Megatron layout: q/k/v/gate/up column-parallel, o/down row-parallel, vocabulary-parallel embedding and head.
# The vision qkv output is laid out (3, heads, head_dim): a contiguous split would cut across q, k and v, so
# vision attention is not tensor-parallel (FSDP still splits it; it is 5.6% of the 3B model's parameters).
RULES: tuple[Rule, ...] = (
    Rule("model.embed_tokens.weight", "text/embed/embedding", COPY, _t(lambda t: (t.vocab_size, t.hidden_size)),
         ("vocab", None)),
    *(
        r
        for p in ("q", "k", "v")
        for r in (
            Rule(f"model.layers.{{i}}.self_attn.{p}_proj.weight", f"text/layers/{p}/kernel", LINEAR,
                 _t(lambda t, p=p: (_QKV_OUT[p](t), t.hidden_size)), (None, _QKV_AXIS[p]), "text",
                 fuse=("qkv", p)),
            Rule(f"model.layers.{{i}}.self_attn.{p}_proj.bias", f"text/layers/{p}/bias", COPY,
                 _t(lambda t, p=p: (_QKV_OUT[p](t),)), (_QKV_AXIS[p],), "text", fuse=("qkv", p)),
        )
    ),
    Rule("model.layers.{i}.self_attn.o_proj.weight", "text/layers/o/kernel", LINEAR,
         _t(lambda t: (t.hidden_size, t.num_heads * t.head_dim)), ("heads", None), "text"),
    Rule("model.layers.{i}.mlp.gate_proj.weight", "text/layers/mlp/gate/kernel", LINEAR,
         _t(lambda t: (t.intermediate_size, t.hidden_size)), (None, "mlp"), "text", fuse=("gate_up", "gate")),
    Rule("model.layers.{i}.mlp.up_proj.weight", "text/layers/mlp/up/kernel", LINEAR,
         _t(lambda t: (t.intermediate_size, t.hidden_size)), (None, "mlp"), "text", fuse=("gate_up", "up")),
    Rule("model.layers.{i}.mlp.down_proj.weight", "text/layers/mlp/down/kernel", LINEAR,
         _t(lambda t: (t.hidden_size, t.intermediate_size)), ("mlp", None), "text"),
    Rule("model.layers.{i}.input_layernorm.weight", "text/layers/input_norm/scale", COPY,
         _t(lambda t: (t.hidden_size,)), (None,), "text"),
    Rule("model.layers.{i}.post_attention_layernorm.weight", "text/layers/post_norm/scale", COPY,
         _t(lambda t: (t.hidden_size,)), (None,), "text"),
    Rule("model.norm.weight", "text/norm/scale", COPY, _t(lambda t: (t.hidden_size,)), (None,)),
    Rule("lm_head.weight", "lm_head/kernel", LINEAR, _t(lambda t: (t.vocab_size, t.hidden_size)), (None, "vocab"),
         when="untied"),
    Rule("score.weight", "value_head/kernel", LINEAR, _t(lambda t: (1, t.hidden_size)), (None, None),
         when="value_head"),
    Rule("visual.patch_embed.proj.weight", "visual/patch_embed/kernel", PATCH,
         _v(lambda v: (v.hidden_size, v.in_channels, v.temporal_patch_size, v.patch_size, v.patch_size)),
         (None, None)),
    Rule("visual.blocks.{i}.norm1.weight", "visual/blocks/norm1/scale", COPY, _v(lambda v: (v.hidden_size,)),
         (None,), "vision"),
    Rule("visual.blocks.{i}.norm2.weight", "visual/blocks/norm2/scale", COPY, _v(lambda v: (v.hidden_size,)),
         (None,), "vision"),
    Rule("visual.blocks.{i}.attn.qkv.weight", "visual/blocks/attn/qkv/kernel", LINEAR,
         _v(lambda v: (3 * v.hidden_size, v.hidden_size)), (None, None), "vision"),
    Rule("visual.blocks.{i}.attn.qkv.bias", "visual/blocks/attn/qkv/bias", COPY, _v(lambda v: (3 * v.hidden_size,)),
         (None,), "vision"),
    Rule("visual.blocks.{i}.attn.proj.weight", "visual/blocks/attn/proj/kernel", LINEAR,
         _v(lambda v: (v.hidden_size, v.hidden_size)), (None, None), "vision"),
    Rule("visual.blocks.{i}.attn.proj.bias", "visual/blocks/attn/proj/bias", COPY, _v(lambda v: (v.hidden_size,)),
         (None,), "vision"),
    *(
        r
        for p, out, inp, axes, fuse in (("gate", "i", "d", (None, "mlp"), ("gate_up", "gate")),
                                        ("up", "i", "d", (None, "mlp"), ("gate_up", "up")),
                                        ("down", "d", "i", ("mlp", None), None))
        for r in (
            Rule(f"visual.blocks.{{i}}.mlp.{p}_proj.weight", f"visual/blocks/mlp/{p}/kernel", LINEAR,
                 _v(lambda v, o=out, n=inp: (_vdim(v, o), _vdim(v, n))), axes, "vision", fuse=fuse),
            Rule(f"visual.blocks.{{i}}.mlp.{p}_proj.bias", f"visual/blocks/mlp/{p}/bias", COPY,
                 _v(lambda v, o=out: (_vdim(v, o),)), (axes[1],), "vision", fuse=fuse),
        )
    ),
    Rule("visual.merger.ln_q.weight", "visual/merger/norm/scale", COPY, _v(lambda v: (v.hidden_size,)), (None,)),
    Rule("visual.merger.mlp.0.weight", "visual/merger/fc1/kernel", LINEAR,
         _v(lambda v: (v.hidden_size * v.merge_unit,) * 2), (None, "mlp")),
    Rule("visual.merger.mlp.0.bias", "visual/merger/fc1/bias", COPY, _v(lambda v: (v.hidden_size * v.merge_unit,)),
         ("mlp",)),
    Rule("visual.merger.mlp.2.weight", "visual/merger/fc2/kernel", LINEAR,
         _v(lambda v: (v.out_hidden_size, v.hidden_size * v.merge_unit)), ("mlp", None)),
    Rule("visual.merger.mlp.2.bias", "visual/merger/fc2/bias", COPY, _v(lambda v: (v.out_hidden_size,)), (None,)),
)  # fmt: skip

_BY_FLAX = {r.flax: r for r in RULES}
EMBED = next(r.hf for r in RULES if r.flax == "text/embed/embedding")
LM_HEAD = next(r.hf for r in RULES if r.when == "untied")
VALUE_HEAD = next(r.hf for r in RULES if r.when == "value_head")
STACK_PREFIXES = {"text": "text/layers/", "vision": "visual/blocks/"}

# How each engine prefixes Hub names: (Hub prefix, engine prefix), first match wins. transformers 5 nests the
# towers under `model.`; vLLM puts the decoder and its head under `language_model.`.
ENGINE_PREFIXES: dict[str, tuple[tuple[str, str], ...]] = {
    "hub": (),
    "transformers": (("model.", "model.language_model."), ("visual.", "model.visual.")),
    "vllm": (("model.", "language_model.model."), ("lm_head.", "language_model.lm_head.")),
}
NAMINGS = ("transformers", "vllm")


@dataclass(frozen=True)
class Leaf:
    """One Flax parameter of a concrete model, as the modules create it."""

    path: str
    shape: tuple[int, ...]  # without the stacking axis
    stack: Optional[str]
    stack_size: Optional[int]
    axes: Axes

    @property
    def full_shape(self) -> tuple[int, ...]:
        return self.shape if self.stack_size is None else (self.stack_size, *self.shape)


def _stack_size(cfg: Qwen25VLConfig, stack: Optional[str]) -> Optional[int]:
    return None if stack is None else {"text": cfg.text.num_layers, "vision": cfg.vision.depth}[stack]


def leaf(cfg: Qwen25VLConfig, path: str) -> Leaf:
    """Shape, stacking and tensor-parallel axes of the Flax parameter at `path` ("text/layers/q/kernel")."""
    if path not in _BY_FLAX:
        raise KeyError(f"no Qwen2.5-VL parameter at {path!r}")
    r = _BY_FLAX[path]
    return Leaf(path, tuple(r.layout.flax_shape(r.shape(cfg))), r.stack, _stack_size(cfg, r.stack), r.axes)


@dataclass(frozen=True)
class Entry:
    """One HF tensor of a concrete model: its name, Flax leaf path, slice index in a stacked leaf, layout."""

    hf_name: str
    flax_path: tuple[str, ...]
    index: Optional[int]
    layout: Layout
    hf_shape: tuple[int, ...]
    stack_size: Optional[int]
    rule: Rule

    @property
    def flax_shape(self) -> tuple[int, ...]:
        """Shape of the whole Flax leaf (with the stacking axis)."""
        one = self.layout.flax_shape(self.hf_shape)
        return one if self.stack_size is None else (self.stack_size, *one)


def name_table(cfg: Qwen25VLConfig, include_value_head: bool = False) -> list[Entry]:
    """Every HF tensor of this model in table order, stacked rules expanded layer by layer (all tensors of
    layer i before layer i + 1, so a streaming consumer sees each fused group together)."""
    present = {"untied": not cfg.tie_word_embeddings, "value_head": include_value_head, None: True}
    rules = [r for r in RULES if present[r.when]]
    entries: list[Entry] = []
    for k, rule in enumerate(rules):
        if rule.stack is None:
            entries.append(_entry(rule, cfg, None))
        elif all(r.stack != rule.stack for r in rules[:k]):  # first rule of a stack: emit it layer by layer
            group = [r for r in rules if r.stack == rule.stack]
            entries += [_entry(r, cfg, i) for i in range(_stack_size(cfg, rule.stack)) for r in group]
    return entries


def _entry(rule: Rule, cfg: Qwen25VLConfig, i: Optional[int]) -> Entry:
    name = rule.hf.format(i=i) if i is not None else rule.hf
    return Entry(name, tuple(rule.flax.split("/")), i, rule.layout, rule.shape(cfg), _stack_size(cfg, rule.stack), rule)


def hf_to_flax(tensors: Mapping[str, np.ndarray], cfg: Qwen25VLConfig, dtype=np.float32) -> Params:
    """Build the params tree from HF tensors (Hub names). A value head is loaded when `score.weight` is present.

    Raises ValueError listing every missing, unknown or mis-shaped name. With tied embeddings a stored
    `lm_head.weight` is accepted only if it equals the embedding.
    """
    table = name_table(cfg, include_value_head=VALUE_HEAD in tensors)
    expected = {e.hf_name for e in table}
    given = set(tensors)
    if cfg.tie_word_embeddings and LM_HEAD in given:
        if EMBED in given and not np.array_equal(tensors[LM_HEAD], tensors[EMBED]):
            raise ValueError(f"config ties embeddings but {LM_HEAD} differs from {EMBED}")
        given.discard(LM_HEAD)
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
            set_path(params, e.flax_path, np.ascontiguousarray(x))
            continue
        leaf_ = get_path(params, e.flax_path, default=None)
        if leaf_ is None:
            leaf_ = np.empty(e.flax_shape, dtype)
            set_path(params, e.flax_path, leaf_)
        leaf_[e.index] = x
    return params


def flax_to_hf(params: Params, cfg: Qwen25VLConfig,
               include_value_head: bool = False) -> Iterator[tuple[str, np.ndarray]]:  # fmt: skip
    """Yield (HF name, array) in checkpoint order, one tensor at a time (stacked leaves are sliced per layer).

    Arrays keep the params' dtype. Tied models yield no `lm_head.weight`, as their HF checkpoints.
    """
    for e in name_table(cfg, include_value_head):
        try:
            x = get_path(params, e.flax_path)
        except KeyError:
            raise ValueError(f"params have no leaf {'/'.join(e.flax_path)} for {e.hf_name}") from None
        x = np.asarray(x if e.index is None else x[e.index])
        yield e.hf_name, np.ascontiguousarray(e.layout.to_hf(x, e.hf_shape))


# --------------------------------------------------------------------------- engine names


def fused_group(hf_name: str) -> str:
    """The vLLM layer an HF tensor lands in. Tensors of one group (q/k/v with their biases, gate/up, a weight with
    its bias) must reach an engine in the same call: vLLM re-processes a layer once all of its tensors arrived."""
    base, _, _ = _fused(hf_name)
    return base.rsplit(".", 1)[0]


_FUSE_BY_TEMPLATE = [(re.compile(re.escape(r.hf).replace(r"\{i\}", r"\d+") + "$"), r.fuse) for r in RULES if r.fuse]


def _fused(hf_name: str) -> tuple[str, str, tuple[str, ...]]:
    """(vLLM name without prefix, this tensor's part key, the fused tensor's part order); ("", ("",)) unfused."""
    for pattern, (kind, part) in _FUSE_BY_TEMPLATE:
        if pattern.match(hf_name):
            fused, order = FUSIONS[kind]
            module, leaf_name = hf_name.rsplit(".", 1)
            return module.rsplit(".", 1)[0] + "." + fused + "." + leaf_name, part, order
    return hf_name, "", ("",)


def engine_name(naming: str, hf_name: str) -> str:
    """The name an engine with `naming` gives the tensor holding `hf_name` (fused for vLLM)."""
    base = _fused(hf_name)[0] if naming == "vllm" else hf_name
    for hub, engine in ENGINE_PREFIXES[naming]:
        if base.startswith(hub):
            return engine + base[len(hub):]
    return base


def hub_name(naming: str, name: str) -> str:
    """Inverse of `engine_name`'s prefixing (not of vLLM's fusion): the Hub name of an unfused engine tensor."""
    for hub, engine in ENGINE_PREFIXES[naming]:
        if name.startswith(engine):
            return hub + name[len(engine):]
    return name


@dataclass(frozen=True)
class EngineTensor:
    """One tensor as an engine holds it: rows of `parts` (HF names) concatenated in order."""

    name: str
    parts: tuple[str, ...]


def engine_tensors(naming: str, hf_names: Iterable[str], tied: bool) -> list[EngineTensor]:
    """The engine tensors covering `hf_names` (in first-appearance order), each with its HF parts in row order.

    `tied`: the model ties lm_head to the embedding; both engines still hold an `lm_head.weight`, which must
    equal the embedding, so it is listed (a broken tie is caught)."""
    if naming not in NAMINGS:
        raise ValueError(f"engine naming {naming!r}: expected one of {NAMINGS}")
    hf_names = list(hf_names)
    if tied and EMBED in hf_names and LM_HEAD not in hf_names:
        hf_names.append(LM_HEAD)
    parts: dict[str, dict[str, str]] = {}
    orders: dict[str, tuple[str, ...]] = {}
    for name in hf_names:
        source = EMBED if tied and name == LM_HEAD else name
        _, part, order = _fused(name) if naming == "vllm" else (name, "", ("",))
        target = engine_name(naming, name)
        parts.setdefault(target, {})[part] = source
        orders[target] = order
    result = []
    for target, got in parts.items():
        if missing := [p for p in orders[target] if p not in got]:
            raise ValueError(f"{target}: fused tensor is missing its {missing} parts")
        result.append(EngineTensor(target, tuple(got[p] for p in orders[target])))
    return result


# --------------------------------------------------------------------------- LoRA targets


def lora_candidates(cfg: Qwen25VLConfig) -> dict[str, list[str]]:
    """Linear layers LoRA may adapt: Flax module path -> the HF module names it stands for (one per layer).
    Heads (lm_head, value head) and the embedding are excluded, as PEFT's `all-linear` does."""
    out: dict[str, list[str]] = {}
    for e in name_table(cfg):
        if e.layout is LINEAR and e.rule.when is None:
            out.setdefault(e.rule.flax.rsplit("/", 1)[0], []).append(e.hf_name.rsplit(".", 1)[0])
    return out


# Named groups of LoRA targets, so configs need not spell module names.
LORA_GROUPS = {"language_model": ("model.layers.*",), "vision_tower": ("visual.*",),
               "all-linear": ("model.layers.*", "visual.*")}  # fmt: skip


def lora_modules(cfg: Qwen25VLConfig, targets: Iterable[str]) -> frozenset[str]:
    """Flax module paths adapted by `targets`: each a group of `LORA_GROUPS`, a PEFT-style module-name suffix
    ("q_proj"), or a glob over HF module names ("model.layers.*.mlp.*", "visual.blocks.*.attn.qkv"). A target
    that matches nothing, or only some layers of a stacked module (stacked layers share one adapter shape),
    raises ValueError."""
    candidates = lora_candidates(cfg)
    chosen: set[str] = set()
    for target in [t for group in targets for t in LORA_GROUPS.get(group, (group,))]:
        hit = False
        for path, names in candidates.items():
            match = [n == target or n.endswith("." + target) or fnmatch.fnmatchcase(n, target) for n in names]
            if any(match) and not all(match):
                raise ValueError(f"LoRA target {target!r} matches only some layers of {path} ({sum(match)} of "
                                 f"{len(match)}); adapters cover every layer of a stack")  # fmt: skip
            if all(match):
                chosen.add(path)
                hit = True
        if not hit:
            raise ValueError(f"LoRA target {target!r} matches no linear layer; examples of module names: "
                             f"{[names[0] for names in candidates.values()][:6]}")  # fmt: skip
    return frozenset(chosen)


# --------------------------------------------------------------------------- nested dicts


def get_path(tree: Params, path: tuple[str, ...], **kw: Any) -> Any:
    node: Any = tree
    for key in path:
        if key not in node:
            if "default" in kw:
                return kw["default"]
            raise KeyError("/".join(path))
        node = node[key]
    return node


def set_path(tree: Params, path: tuple[str, ...], value: Any) -> None:
    for key in path[:-1]:
        tree = tree.setdefault(key, {})
    tree[path[-1]] = value
