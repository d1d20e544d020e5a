"""Vision tower of Qwen2.5-VL: patch embedding, windowed / full-attention blocks with 2-D RoPE, 2x2 merger.

Runs on one concatenation of the batch's images, ordered and grouped by a host-side plan (see `vision_plan`).
"""
from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp
from flax import nnx

from .attention import AttentionFn, cudnn_padded_attention, get_attention, resolve_attention
from .config import ModelOptions, Qwen25VLConfig, VisionConfig
from .layers import Linear, RMSNorm, SwiGLU, param, scan_layers, stack
from .lora import LoraSpec
from .rope import apply_rope, vision_cos_sin

_EPS = 1e-6  # fixed in the reference vision tower, not configurable
BLOCKS = "visual/blocks"


def group_attention(q_PHK, k_PHK, v_PHK, idx_GS, attn: Optional[AttentionFn]):
    """Attention inside each group of patch indices (a row of `idx_GS`; index P marks an empty slot). The plan
    fills each row from slot 0 (`vision_plan._groups`), so a row's valid slots are its first ones: `attn` None
    runs cuDNN on the row lengths instead of a [G, S, S] mask."""
    P = q_PHK.shape[0]
    valid_GS = idx_GS < P
    take = lambda x: x.at[idx_GS].get(mode="fill", fill_value=0)  # noqa: E731
    if attn is None:
        o_GSHK = cudnn_padded_attention(take(q_PHK), take(k_PHK), take(v_PHK), valid_GS)
        return jnp.zeros_like(q_PHK).at[idx_GS].set(o_GSHK, mode="drop")
    mask_GSS = jnp.broadcast_to(valid_GS[:, None, :], (*idx_GS.shape, idx_GS.shape[1]))
    o_GSHK = attn(take(q_PHK), take(k_PHK), take(v_PHK), mask_GSS)
    return jnp.zeros_like(q_PHK).at[idx_GS].set(o_GSHK, mode="drop")


class VisionAttention(nnx.Module):
    """Fused qkv projection, 2-D RoPE on q and k, attention within the plan's groups, output projection."""

    def __init__(self, cfg: Qwen25VLConfig, *, rngs: nnx.Rngs, lora: Optional[LoraSpec] = None):
        self.num_heads, self.head_dim = cfg.vision.num_heads, cfg.vision.head_dim
        self.qkv = Linear(cfg, f"{BLOCKS}/attn/qkv", rngs=rngs, lora=lora)
        self.proj = Linear(cfg, f"{BLOCKS}/attn/proj", rngs=rngs, lora=lora)

    def __call__(self, h_PD, cos_PK, sin_PK, idx_GS, attn: Optional[AttentionFn]) -> jnp.ndarray:
        P = h_PD.shape[0]
        qkv_P3HK = self.qkv(h_PD).reshape(P, 3, self.num_heads, self.head_dim)
        # RoPE in float32 then back to the compute dtype, as the reference does.
        rope = lambda t: apply_rope(t.astype(jnp.float32), cos_PK, sin_PK).astype(h_PD.dtype)  # noqa: E731
        o_PHK = group_attention(rope(qkv_P3HK[:, 0]), rope(qkv_P3HK[:, 1]), qkv_P3HK[:, 2], idx_GS, attn)
        return self.proj(o_PHK.reshape(P, -1))


class VisionBlock(nnx.Module):
    def __init__(self, cfg: Qwen25VLConfig, *, rngs: nnx.Rngs, lora: Optional[LoraSpec] = None):
        self.norm1 = RMSNorm(cfg, f"{BLOCKS}/norm1", _EPS, rngs=rngs)
        self.attn = VisionAttention(cfg, rngs=rngs, lora=lora)
        self.norm2 = RMSNorm(cfg, f"{BLOCKS}/norm2", _EPS, rngs=rngs)
        self.mlp = SwiGLU(cfg, f"{BLOCKS}/mlp", rngs=rngs, lora=lora)

    def __call__(self, x_PD, cos_PK, sin_PK, idx_GS, attn: Optional[AttentionFn]) -> jnp.ndarray:
        x_PD = x_PD + self.attn(self.norm1(x_PD), cos_PK, sin_PK, idx_GS, attn)
        return x_PD + self.mlp(self.norm2(x_PD))


class PatchEmbed(nnx.Module):
    """The reference's Conv3d with kernel == stride, as a matmul over flattened patches [P, C*t*p*p]."""

    def __init__(self, cfg: Qwen25VLConfig, *, rngs: nnx.Rngs):
        self.kernel = param(cfg, "visual/patch_embed/kernel", nnx.initializers.lecun_normal(), rngs)

    def __call__(self, pixels_PC: jnp.ndarray) -> jnp.ndarray:
        kernel = self.kernel[...]
        return pixels_PC.astype(kernel.dtype) @ kernel


class PatchMerger(nnx.Module):
    """RMSNorm, then each 2x2 group of neighbouring patches concatenated and sent through a GELU MLP."""

    def __init__(self, cfg: Qwen25VLConfig, *, rngs: nnx.Rngs, lora: Optional[LoraSpec] = None):
        self.unit_dim = cfg.vision.hidden_size * cfg.vision.merge_unit
        self.norm = RMSNorm(cfg, "visual/merger/norm", _EPS, rngs=rngs)
        self.fc1 = Linear(cfg, "visual/merger/fc1", rngs=rngs, lora=lora)
        self.fc2 = Linear(cfg, "visual/merger/fc2", rngs=rngs, lora=lora)

    def __call__(self, x_PD: jnp.ndarray) -> jnp.ndarray:
        h_MU = self.norm(x_PD).reshape(-1, self.unit_dim)
        return self.fc2(jax.nn.gelu(self.fc1(h_MU), approximate=False))


def _runs(cfg: VisionConfig) -> list[tuple[int, int, bool]]:
    """Maximal runs [start, end) of consecutive blocks with the same attention kind (full or windowed)."""
    full = [i in cfg.fullatt_block_indexes for i in range(cfg.depth)]
    runs, start = [], 0
    for i in range(1, cfg.depth + 1):
        if i == cfg.depth or full[i] != full[start]:
            runs.append((start, i, full[start]))
            start = i
    return runs


class VisionTower(nnx.Module):
    def __init__(self, cfg: Qwen25VLConfig, *, rngs: nnx.Rngs, lora: Optional[LoraSpec] = None):
        self.cfg = cfg.vision
        self.patch_embed = PatchEmbed(cfg, rngs=rngs)
        self.blocks = stack(lambda r: VisionBlock(cfg, rngs=r, lora=lora), cfg.vision.depth, rngs)
        self.merger = PatchMerger(cfg, rngs=rngs, lora=lora)

    def __call__(self, pixels_PC, plan: dict[str, jnp.ndarray], opts: ModelOptions) -> jnp.ndarray:
        """Merged image features [P / 4, out_hidden] in the processor's (and the `<|image_pad|>` tokens') order."""
        # Patch embedding acts row by row, so reordering the pixels first equals reordering its output.
        x_PD = self.patch_embed(pixels_PC[plan["vision_perm_P"]])
        cos_PK, sin_PK = vision_cos_sin(plan["vision_pos_P2"], self.cfg)
        fused = resolve_attention(opts.attention, opts.dtype, (self.cfg.head_dim,)) == "cudnn"
        attn = None if fused else get_attention(opts.attention)
        # One scan per run of same-kind blocks: full-attention blocks group by image, the others by window.
        for start, end, full in _runs(self.cfg):
            idx_GS = plan["vision_image_idx_GS"] if full else plan["vision_window_idx_GS"]
            block = lambda x, mod, idx_GS=idx_GS: mod(x, cos_PK, sin_PK, idx_GS, attn)  # noqa: E731
            x_PD = scan_layers(block, x_PD, self.blocks, opts, start, end)
        return self.merger(x_PD)[plan["vision_unperm_M"]]
