"""Architecture of Qwen2.5-VL as its config.json describes it (`Qwen25VLConfig`), read by every side of the system.

`Qwen25VLConfig.from_hf` reads both config.json layouts: the flat Hub form (text keys at top level, `rope_scaling`,
nested `vision_config`) used by the released checkpoints, and the nested transformers-5 form (`text_config`,
`rope_parameters`). Configs are frozen and hashable so they can be static arguments of `jax.jit`.
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping


@dataclass(frozen=True)
class VisionConfig:
    depth: int
    hidden_size: int
    intermediate_size: int
    num_heads: int
    out_hidden_size: int
    fullatt_block_indexes: tuple[int, ...]
    window_size: int = 112
    patch_size: int = 14
    temporal_patch_size: int = 2
    spatial_merge_size: int = 2
    in_channels: int = 3
    rope_theta: float = 10000.0
    tokens_per_second: int = 2

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def patch_dim(self) -> int:
        return self.in_channels * self.temporal_patch_size * self.patch_size**2

    @property
    def merge_unit(self) -> int:
        return self.spatial_merge_size**2

    @property
    def window_units(self) -> int:
        """Side of an attention window, in merged (2x2) units."""
        return self.window_size // self.spatial_merge_size // self.patch_size


@dataclass(frozen=True)
class TextConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    mrope_section: tuple[int, ...]
    rope_theta: float = 1_000_000.0
    rms_norm_eps: float = 1e-6

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads


@dataclass(frozen=True)
class Qwen25VLConfig:
    text: TextConfig
    vision: VisionConfig
    tie_word_embeddings: bool
    image_token_id: int
    video_token_id: int
    vision_start_token_id: int

    @staticmethod
    def from_hf(source: str | Path | Mapping[str, Any]) -> "Qwen25VLConfig":
        """From a checkpoint directory, a config.json path, or its parsed dict (flat Hub or nested form)."""
        if isinstance(source, Mapping):
            raw = dict(source)
        else:
            path = Path(source)
            path = path / "config.json" if path.is_dir() else path
            raw = json.loads(path.read_text())
        if raw.get("model_type", "qwen2_5_vl") != "qwen2_5_vl":
            raise ValueError(f"expected model_type 'qwen2_5_vl', got {raw.get('model_type')!r}")
        text = dict(raw.get("text_config") or raw)
        vis = dict(raw["vision_config"])
        for name, section in (("text", text), ("vision", vis)):
            act = section.get("hidden_act", "silu")
            if act != "silu":
                raise ValueError(f"{name} hidden_act {act!r} is not supported (expected 'silu')")
        rope = text.get("rope_parameters") or text.get("rope_scaling") or {}
        if "mrope_section" not in rope:
            raise ValueError("config has no mrope_section (expected in rope_scaling or rope_parameters)")
        heads = text["num_attention_heads"]
        text_cfg = TextConfig(
            vocab_size=text["vocab_size"],
            hidden_size=text["hidden_size"],
            intermediate_size=text["intermediate_size"],
            num_layers=text["num_hidden_layers"],
            num_heads=heads,
            num_kv_heads=text.get("num_key_value_heads") or heads,
            mrope_section=tuple(rope["mrope_section"]),
            rope_theta=float(rope.get("rope_theta", text.get("rope_theta", 1_000_000.0))),
            rms_norm_eps=float(text.get("rms_norm_eps", 1e-6)),
        )
        if 2 * sum(text_cfg.mrope_section) != text_cfg.head_dim:
            raise ValueError(f"mrope_section {text_cfg.mrope_section} must sum to head_dim/2 = {text_cfg.head_dim // 2}")
        vis_rope = vis.get("rope_parameters") or {}
        vision_cfg = VisionConfig(
            depth=vis["depth"],
            hidden_size=vis["hidden_size"],
            intermediate_size=vis["intermediate_size"],
            num_heads=vis["num_heads"],
            out_hidden_size=vis["out_hidden_size"],
            fullatt_block_indexes=tuple(vis["fullatt_block_indexes"]),
            window_size=vis.get("window_size", 112),
            patch_size=vis.get("patch_size", 14),
            temporal_patch_size=vis.get("temporal_patch_size", 2),
            spatial_merge_size=vis.get("spatial_merge_size", 2),
            in_channels=vis.get("in_channels", vis.get("in_chans", 3)),
            rope_theta=float(vis_rope.get("rope_theta", 10000.0)),
            tokens_per_second=vis.get("tokens_per_second", 2),
        )
        if vision_cfg.out_hidden_size != text_cfg.hidden_size:
            raise ValueError(
                f"vision out_hidden_size {vision_cfg.out_hidden_size} != text hidden_size {text_cfg.hidden_size}"
            )
        tie = raw.get("tie_word_embeddings", text.get("tie_word_embeddings", False))
        return Qwen25VLConfig(
            text=text_cfg,
            vision=vision_cfg,
            tie_word_embeddings=bool(tie),
            image_token_id=raw["image_token_id"],
            video_token_id=raw["video_token_id"],
            vision_start_token_id=raw["vision_start_token_id"],
        )

    def replace(self, **changes: Any) -> "Qwen25VLConfig":
        return dataclasses.replace(self, **changes)
