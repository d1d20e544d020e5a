"""The released Qwen2.5-VL configs (config.json of Qwen/Qwen2.5-VL-{3B,7B}-Instruct, the fields the model reads).

The memory planner plans for them without the files, and `shared.tiny_checkpoint --like` writes random checkpoints
with their exact widths at a cut depth, so that shape bugs of the real models show on a CPU.
"""
from __future__ import annotations

import copy
from typing import Any

_VISION = {"depth": 32, "hidden_act": "silu", "hidden_size": 1280, "intermediate_size": 3420, "num_heads": 16,
           "in_chans": 3, "patch_size": 14, "spatial_merge_size": 2, "spatial_patch_size": 14,
           "temporal_patch_size": 2, "window_size": 112, "fullatt_block_indexes": [7, 15, 23, 31],
           "tokens_per_second": 2}  # fmt: skip
_IDS = {"bos_token_id": 151643, "eos_token_id": 151645, "vision_start_token_id": 151652,
        "vision_end_token_id": 151653, "vision_token_id": 151654, "image_token_id": 151655,
        "video_token_id": 151656}  # fmt: skip
_TEXT = {"model_type": "qwen2_5_vl", "architectures": ["Qwen2_5_VLForConditionalGeneration"], "hidden_act": "silu",
         "rms_norm_eps": 1e-6, "rope_theta": 1000000.0, "max_position_embeddings": 128000,
         "rope_scaling": {"type": "mrope", "mrope_section": [16, 24, 24]}, **_IDS}  # fmt: skip

PRESETS: dict[str, dict[str, Any]] = {
    "qwen2.5-vl-3b": {
        **_TEXT, "vocab_size": 151936, "hidden_size": 2048, "intermediate_size": 11008, "num_hidden_layers": 36,
        "num_attention_heads": 16, "num_key_value_heads": 2, "tie_word_embeddings": True,
        "vision_config": {**_VISION, "out_hidden_size": 2048},
    },
    "qwen2.5-vl-7b": {
        **_TEXT, "vocab_size": 152064, "hidden_size": 3584, "intermediate_size": 18944, "num_hidden_layers": 28,
        "num_attention_heads": 28, "num_key_value_heads": 4, "tie_word_embeddings": False,
        "vision_config": {**_VISION, "out_hidden_size": 3584},
    },
}  # fmt: skip


def preset(name: str) -> dict[str, Any]:
    """A copy of the preset's config.json dict; ValueError listing the presets for an unknown name."""
    if name.lower() not in PRESETS:
        raise ValueError(f"unknown architecture {name!r}; presets: {', '.join(PRESETS)}")
    return copy.deepcopy(PRESETS[name.lower()])
