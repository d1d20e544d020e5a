"""Qwen2.5-VL forward pass on a params pytree (see `hf_names` for its layout): vision tower, image features
scattered into the `<|image_pad|>` positions, decoder with multimodal RoPE, LM head and optional value head.

Entry points for the trainer:
    forward(params, batch, cfg, opts, return_hidden=True) -> {"hidden_BTD" | "logits_BTV", "values_BT"?}
    forward_logprobs(params, batch, cfg, opts, chunk, temperature) -> {"logprobs_BL", "entropy_BL", "values_BT"?}
Batches come from `batch.build_batch`. Both functions are pure and jit-able with `cfg` and `opts` static.
"""
from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from .config import ModelOptions, Qwen25VLConfig
from .layers import cast_floats
from .logprobs import token_logprobs
from .rope import text_cos_sin
from .text import decoder
from .vision import vision_tower
from .vision_plan import PLAN_KEYS, make_plan

Params = dict[str, Any]


def lm_head_DV(params: Params, cfg: Qwen25VLConfig) -> jnp.ndarray:
    """The output projection [D, V]: the transposed embedding when tied."""
    return params["text"]["embed"]["embedding"].T if cfg.tie_word_embeddings else params["lm_head"]["kernel"]


def init_value_head(key: jax.Array, cfg: Qwen25VLConfig) -> Params:
    """A fresh critic head, N(0, 1/(D+1)) as OpenRLHF initialises `score`."""
    D = cfg.text.hidden_size
    return {"kernel": jax.random.normal(key, (D, 1), jnp.float32) / np.sqrt(D + 1.0)}


def _plan(batch: dict[str, Any], cfg: Qwen25VLConfig) -> dict[str, Any]:
    if all(k in batch for k in PLAN_KEYS):
        return {k: batch[k] for k in PLAN_KEYS}
    grid = batch["image_grid_thw_N3"]
    if isinstance(grid, jax.core.Tracer):
        raise ValueError(f"batch lacks the vision plan {PLAN_KEYS}; build it on host with batch.build_batch")
    return make_plan(np.asarray(grid), cfg.vision, batch["pixel_values_PC"].shape[0])


def embed_inputs(params: Params, batch: dict[str, Any], cfg: Qwen25VLConfig, opts: ModelOptions) -> jnp.ndarray:
    """Token embeddings [B, T, D] with the image features written over the `<|image_pad|>` tokens, in order."""
    ids_BT = batch["input_ids_BT"]
    x_BTD = params["text"]["embed"]["embedding"][ids_BT]
    if batch["pixel_values_PC"].shape[0] == 0:
        return x_BTD
    feats_MD = vision_tower(params["visual"], batch["pixel_values_PC"], _plan(batch, cfg), cfg.vision, opts)
    is_img_BT = ids_BT == cfg.image_token_id
    src_BT = batch.get("image_feature_idx_BT")
    if src_BT is None:  # every sample its own images: the k-th image token of the batch takes feature k
        src_BT = jnp.clip((jnp.cumsum(is_img_BT.reshape(-1)) - 1).reshape(ids_BT.shape), 0)
    return jnp.where(is_img_BT[..., None], feats_MD[src_BT].astype(x_BTD.dtype), x_BTD)


def forward(params: Params, batch: dict[str, Any], cfg: Qwen25VLConfig, opts: ModelOptions = ModelOptions(), *,
            return_hidden: bool = True) -> dict[str, jnp.ndarray]:  # fmt: skip
    """Run the model. Returns `hidden_BTD` (final-normed, compute dtype) or, with `return_hidden=False`, the full
    `logits_BTV` (float32; small models and tests only). `values_BT` (float32) when params hold a value head.

    batch: input_ids_BT, attention_mask_BT (left padding), position_ids_3BT, pixel_values_PC (all images of
    the batch concatenated; may be padded), image_grid_thw_N3, and the `vision_*` plan arrays. Under jit every
    shape comes from `build_batch`'s buckets, which bound how many variants compile (see `batch`).
    """
    p = cast_floats(params, jnp.dtype(opts.dtype))
    x_BTD = embed_inputs(p, batch, cfg, opts)
    cos_BTK, sin_BTK = text_cos_sin(batch["position_ids_3BT"], cfg.text)
    h_BTD = decoder(p["text"], x_BTD, cos_BTK, sin_BTK, batch["attention_mask_BT"], cfg.text, opts)
    out: dict[str, jnp.ndarray] = {}
    if return_hidden:
        out["hidden_BTD"] = h_BTD
    else:
        out["logits_BTV"] = jnp.dot(h_BTD, lm_head_DV(p, cfg), preferred_element_type=jnp.float32)
    if "value_head" in p:
        out["values_BT"] = jnp.dot(h_BTD, p["value_head"]["kernel"], preferred_element_type=jnp.float32)[..., 0]
    return out


def forward_logprobs(params: Params, batch: dict[str, Any], cfg: Qwen25VLConfig, opts: ModelOptions = ModelOptions(),
                     *, chunk: int = 1024, temperature: float = 1.0, window: int | None = None) -> dict[str, jnp.ndarray]:  # fmt: skip
    """Next-token log-probabilities and entropies [B, L]: position t scores input_ids[t + 1] given the prefix up to
    t (OpenRLHF's `logits[:, :-1]` against `sequences[:, 1:]`). L = T - 1, or the last `window` positions only:
    responses end at T - 1, so the LM head need not run over prompt positions. Plus `values_BT` for a critic."""
    out = forward(params, batch, cfg, opts, return_hidden=True)
    head_DV = lm_head_DV(params, cfg).astype(out["hidden_BTD"].dtype)
    T = batch["input_ids_BT"].shape[1]
    start = T - 1 - (T - 1 if window is None else window)
    logp, ent = token_logprobs(out.pop("hidden_BTD")[:, start:-1], head_DV, batch["input_ids_BT"][:, start + 1:], chunk,
                               temperature)  # fmt: skip
    return {"logprobs_BL": logp, "entropy_BL": ent, **out}
