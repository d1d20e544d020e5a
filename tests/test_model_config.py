"""`Qwen25VLConfig.from_hf` on the flat Hub config.json and on the nested transformers-5 form."""
from __future__ import annotations

import json

import pytest
from transformers import AutoConfig

from learner_jax.models.config import ModelOptions, Qwen25VLConfig


def test_flat_and_nested_forms_agree(tiny_ckpt):
    flat = json.loads(open(f"{tiny_ckpt}/config.json").read())
    assert "text_config" not in flat and "rope_scaling" in flat
    nested = AutoConfig.from_pretrained(tiny_ckpt).to_dict()
    assert "text_config" in nested and "rope_parameters" in nested["text_config"]
    a, b = Qwen25VLConfig.from_hf(tiny_ckpt), Qwen25VLConfig.from_hf(nested)
    assert a == b and hash(a) == hash(b)
    assert a.text.head_dim == 32 and a.text.mrope_section == (4, 6, 6) and a.text.num_kv_heads == 2
    assert a.vision.window_units == 2 and a.vision.fullatt_block_indexes == (1, 3) and a.vision.rope_theta == 10000.0
    assert a.image_token_id == flat["image_token_id"] and a.tie_word_embeddings is False


def test_released_3b_layout():
    # The text/vision keys of Qwen2.5-VL-3B-Instruct's config.json (flat, tied, no vision rope_theta).
    raw = {
        "model_type": "qwen2_5_vl", "hidden_size": 2048, "intermediate_size": 11008, "num_hidden_layers": 36,
        "num_attention_heads": 16, "num_key_value_heads": 2, "rms_norm_eps": 1e-6, "rope_theta": 1000000.0,
        "rope_scaling": {"type": "mrope", "mrope_section": [16, 24, 24]}, "tie_word_embeddings": True,
        "vocab_size": 151936, "image_token_id": 151655, "video_token_id": 151656, "vision_start_token_id": 151652,
        "vision_config": {"depth": 32, "hidden_act": "silu", "hidden_size": 1280, "intermediate_size": 3420,
                          "num_heads": 16, "in_chans": 3, "out_hidden_size": 2048, "patch_size": 14,
                          "spatial_merge_size": 2, "spatial_patch_size": 14, "window_size": 112,
                          "fullatt_block_indexes": [7, 15, 23, 31], "tokens_per_second": 2, "temporal_patch_size": 2},
    }  # fmt: skip
    cfg = Qwen25VLConfig.from_hf(raw)
    assert cfg.text.head_dim == 128 and cfg.vision.head_dim == 80 and cfg.vision.window_units == 4
    assert cfg.vision.patch_dim == 1176 and cfg.tie_word_embeddings


@pytest.mark.parametrize(
    "change, message",
    [
        ({"rope_scaling": {"type": "mrope", "mrope_section": [4, 6, 7]}}, "must sum to head_dim/2"),
        ({"rope_scaling": None}, "no mrope_section"),
        ({"model_type": "qwen2_vl"}, "expected model_type"),
        ({"hidden_act": "gelu"}, "not supported"),
    ],
)
def test_bad_configs_are_named(tiny_ckpt, change, message):
    raw = {**json.loads(open(f"{tiny_ckpt}/config.json").read()), **change}
    with pytest.raises(ValueError, match=message):
        Qwen25VLConfig.from_hf(raw)


def test_options_are_validated():
    with pytest.raises(ValueError, match="expected one of"):
        ModelOptions(dtype="float16")
    with pytest.raises(ValueError, match="expected one of"):
        ModelOptions(attention="flash")
