"""Qwen2.5-VL as a Flax NNX module (`Qwen25VL`: vision tower, image features scattered into the `<|image_pad|>`
positions, decoder with multimodal RoPE, LM head, optional value head), and the pure functions the trainer calls
on the params pytree (the pure dict of the module's `nnx.Param` state; layout in `shared.models.qwen2_5_vl_params`):

    forward(params, batch, cfg, opts, return_hidden=True) -> {"hidden_BTD" | "logits_BTV", "values_BT"?}
    forward_logprobs(params, batch, cfg, opts, chunk, temperature) -> {"logprobs_BL", "entropy_BL", "values_BT"?}

Each call merges a cached graphdef with the given leaves inside the trace, so the functions stay pure and jit-able
with `cfg` and `opts` static; the graphdef is keyed by the tree's structure (value head, LoRA adapters present).
Batches come from `batch.build_batch`.
"""
from __future__ import annotations

from functools import lru_cache
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from shared.models import qwen2_5_vl_params as table

from .config import ModelOptions, Qwen25VLConfig
from .layers import Head, cast_floats
from .logprobs import token_logprobs
from .lora import LoraSpec, adapted_modules, split_lora
from .rope import text_cos_sin
from .text import TextModel
from .vision import VisionTower
from .vision_plan import PLAN_KEYS, make_plan

Params = dict[str, Any]


def _plan(batch: dict[str, Any], cfg: Qwen25VLConfig) -> dict[str, Any]:
    if all(k in batch for k in PLAN_KEYS):
        return {k: batch[k] for k in PLAN_KEYS}
    grid = batch["image_grid_thw_N3"]
    if isinstance(grid, jax.core.Tracer):
        raise ValueError(f"batch lacks the vision plan {PLAN_KEYS}; build it on host with batch.build_batch")
    return make_plan(np.asarray(grid), cfg.vision, batch["pixel_values_PC"].shape[0])


class Qwen25VL(nnx.Module):
    def __init__(self, cfg: Qwen25VLConfig, *, rngs: nnx.Rngs, value_head: bool = False,
                 lora: Optional[LoraSpec] = None):  # fmt: skip
        if lora is not None and (unknown := lora.targets - set(table.lora_candidates(cfg))):
            raise ValueError(f"LoRA targets {sorted(unknown)} are not linear layers of the model")
        self.cfg = cfg
        self.text = TextModel(cfg, rngs=rngs, lora=lora)
        self.visual = VisionTower(cfg, rngs=rngs, lora=lora)
        self.lm_head = None if cfg.tie_word_embeddings else Head(cfg, "lm_head", rngs=rngs)
        self.value_head = Head(cfg, "value_head", rngs=rngs) if value_head else None

    def lm_head_DV(self) -> jnp.ndarray:
        """The output projection [D, V]: the transposed embedding when tied."""
        return self.text.embed.embedding[...].T if self.lm_head is None else self.lm_head.kernel[...]

    def embed(self, batch: dict[str, Any], opts: ModelOptions) -> jnp.ndarray:
        """Token embeddings [B, T, D] with the image features written over the image placeholders, in order: the
        batch's `image_mask_BT` (the prompts' `<|image_pad|>` tokens), else every `<|image_pad|>`."""
        ids_BT = batch["input_ids_BT"]
        x_BTD = self.text.embed(ids_BT)
        if batch["pixel_values_PC"].shape[0] == 0:
            return x_BTD
        feats_MD = self.visual(batch["pixel_values_PC"], _plan(batch, self.cfg), opts)
        # The prompts' placeholders (`build_batch`): a sampled <|image_pad|> in a response is text, as for vLLM.
        is_img_BT = batch.get("image_mask_BT")
        is_img_BT = ids_BT == self.cfg.image_token_id if is_img_BT is None else is_img_BT.astype(bool)
        src_BT = batch.get("image_feature_idx_BT")
        if src_BT is None:  # every sample its own images: the k-th image token of the batch takes feature k
            src_BT = jnp.clip((jnp.cumsum(is_img_BT.reshape(-1)) - 1).reshape(ids_BT.shape), 0)
        return jnp.where(is_img_BT[..., None], feats_MD[src_BT].astype(x_BTD.dtype), x_BTD)

    def __call__(self, batch: dict[str, Any], opts: ModelOptions, *,
                 return_hidden: bool = True) -> dict[str, jnp.ndarray]:  # fmt: skip
        x_BTD = self.embed(batch, opts)
        cos_BTK, sin_BTK = text_cos_sin(batch["position_ids_3BT"], self.cfg.text)
        h_BTD = self.text(x_BTD, cos_BTK, sin_BTK, batch["attention_mask_BT"], opts)
        out: dict[str, jnp.ndarray] = {}
        if return_hidden:
            out["hidden_BTD"] = h_BTD
        else:
            out["logits_BTV"] = jnp.dot(h_BTD, self.lm_head_DV(), preferred_element_type=jnp.float32)
        if self.value_head is not None:
            out["values_BT"] = self.value_head(h_BTD)[..., 0]
        return out


# --------------------------------------------------------------------------- the module as pure functions


@lru_cache(maxsize=None)
def _abstract(cfg: Qwen25VLConfig, value_head: bool, lora: Optional[LoraSpec]) -> tuple[nnx.GraphDef, nnx.State]:
    """Graphdef and abstract state (ShapeDtypeStructs in annotated Params) of one model structure; no weights
    are allocated."""
    model = nnx.eval_shape(lambda: Qwen25VL(cfg, rngs=nnx.Rngs(0), value_head=value_head, lora=lora))
    return nnx.split(model)


def _structure(params: Params, lora: Optional[LoraSpec]) -> tuple[bool, Optional[LoraSpec]]:
    """(value head present, the LoRA spec of the adapters the tree holds, or None: the plain base model)."""
    adapted = adapted_modules(params)
    if not adapted:
        return "value_head" in params, None
    if lora is None:
        raise ValueError(f"params hold LoRA adapters on {sorted(adapted)}; pass lora=LoraSpec(...) for their scale")
    if set(adapted) != lora.targets or set(adapted.values()) != {lora.rank}:
        raise ValueError(f"params' LoRA adapters {adapted} (path: rank) do not match {lora}")
    return "value_head" in params, lora


def _state(abstract: nnx.State, params: Params) -> nnx.State:
    """A copy of `abstract` holding the leaves of `params` (same paths, checked)."""
    flat = dict(nnx.traversals.flatten_mapping(params))
    want = nnx.to_flat_state(abstract)
    if set(flat) != {path for path, _ in want}:
        have = {"/".join(p) for p in flat}
        need = {"/".join(p) for p, _ in want}
        raise ValueError(f"params do not match the model: missing {sorted(need - have)}; unknown {sorted(have - need)}")
    return nnx.from_flat_state([(path, var.replace(flat[path])) for path, var in want])


def bind(params: Params, cfg: Qwen25VLConfig, lora: Optional[LoraSpec] = None) -> Qwen25VL:
    """The module holding `params` (arrays or tracers, used as given): call it inside the traced function."""
    graphdef, abstract = _abstract(cfg, *_structure(params, lora))
    return nnx.merge(graphdef, _state(abstract, params))


def model_abstract_state(cfg: Qwen25VLConfig, value_head: bool = False, lora: Optional[LoraSpec] = None) -> Params:
    """The params tree as float32 `jax.ShapeDtypeStruct`s (orbax restore, sharding, `jax.eval_shape`)."""
    return nnx.to_pure_dict(_abstract(cfg, value_head, lora)[1])


def logical_axes(cfg: Qwen25VLConfig, value_head: bool = False, lora: Optional[LoraSpec] = None) -> Params:
    """The params tree of tuples: each leaf's logical tensor-parallel axis per dimension, from its Param's
    sharding metadata (stacked leaves lead with None, their layer axis)."""
    state = _abstract(cfg, value_head, lora)[1]
    return nnx.to_pure_dict(state, extract_fn=lambda v: tuple(v.get_metadata("out_sharding")))


def lm_head_DV(params: Params, cfg: Qwen25VLConfig) -> jnp.ndarray:
    """The output projection [D, V]: the transposed embedding when tied."""
    return bind(split_lora(params)[0], cfg).lm_head_DV()  # the head is never adapted: bind the base tree


def init_value_head(key: jax.Array, cfg: Qwen25VLConfig) -> Params:
    """A fresh critic head, N(0, 1/(D+1)) as OpenRLHF initialises `score`."""
    D = cfg.text.hidden_size
    return {"kernel": jax.random.normal(key, (D, 1), jnp.float32) / np.sqrt(D + 1.0)}


def init_lora(key: jax.Array, cfg: Qwen25VLConfig, lora: LoraSpec) -> Params:
    """Fresh adapters from the model's own `nnx.LoRA` layers (he-uniform A, zero B), as a tree holding only the
    adapter leaves (add them to the base with `lora.merge_lora`). Built under jit, so the base weights' init is
    dead code and never allocated."""

    @jax.jit
    def init(key):
        return nnx.to_pure_dict(nnx.state(Qwen25VL(cfg, rngs=nnx.Rngs(key), lora=lora), nnx.LoRAParam))

    return init(key)


def embed_inputs(params: Params, batch: dict[str, Any], cfg: Qwen25VLConfig, opts: ModelOptions, *,
                 lora: Optional[LoraSpec] = None) -> jnp.ndarray:  # fmt: skip
    """Token embeddings [B, T, D] with the image features written over the `<|image_pad|>` tokens, in order."""
    return bind(params, cfg, lora).embed(batch, opts)


def forward(params: Params, batch: dict[str, Any], cfg: Qwen25VLConfig, opts: ModelOptions = ModelOptions(), *,
            return_hidden: bool = True, lora: Optional[LoraSpec] = None) -> dict[str, jnp.ndarray]:  # fmt: skip
    """Run the model. Returns `hidden_BTD` (final-normed, compute dtype) or, with `return_hidden=False`, the full
    `logits_BTV` (float32; small models and tests only). `values_BT` (float32) when params hold a value head.
    Parameters are cast to `opts.dtype` first. LoRA adapters in `params` need their `lora` spec (for alpha); a
    tree without them runs the base model whatever `lora` says.

    batch: input_ids_BT, attention_mask_BT (left padding), position_ids_3BT, pixel_values_PC (all images of
    the batch concatenated; may be padded), image_grid_thw_N3, and the `vision_*` plan arrays. Under jit every
    shape comes from `build_batch`'s buckets, which bound how many variants compile (see `batch`).
    """
    return bind(cast_floats(params, jnp.dtype(opts.dtype)), cfg, lora)(batch, opts, return_hidden=return_hidden)


def forward_logprobs(params: Params, batch: dict[str, Any], cfg: Qwen25VLConfig, opts: ModelOptions = ModelOptions(),
                     *, chunk: int = 1024, temperature: float = 1.0, window: int | None = None,
                     lora: Optional[LoraSpec] = None) -> dict[str, jnp.ndarray]:  # fmt: skip
    """Next-token log-probabilities and entropies [B, L]: position t scores input_ids[t + 1] given the prefix up to
    t (OpenRLHF's `logits[:, :-1]` against `sequences[:, 1:]`). L = T - 1, or the last `window` positions only:
    responses end at T - 1, so the LM head need not run over prompt positions. Plus `values_BT` for a critic."""
    model = bind(cast_floats(params, jnp.dtype(opts.dtype)), cfg, lora)
    out = model(batch, opts, return_hidden=True)
    T = batch["input_ids_BT"].shape[1]
    start = T - 1 - (T - 1 if window is None else window)
    logp, ent = token_logprobs(out.pop("hidden_BTD")[:, start:-1], model.lm_head_DV(),
                               batch["input_ids_BT"][:, start + 1:], chunk, temperature)  # fmt: skip
    return {"logprobs_BL": logp, "entropy_BL": ent, **out}
