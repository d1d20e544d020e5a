"""Prompt and image preprocessing: the resize rule, LMM-R1 messages to prompts, vision inputs (no engines here)."""
from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from rollout_torch.engine import EngineConfig, checkpoint_shapes, stop_token_ids, to_torch
from rollout_torch.processing import (
    load_image,
    load_processor,
    messages_to_prompt,
    process,
    smart_resize,
    vision_inputs,
)
from shared.records import Prompt


@pytest.mark.parametrize("bounds", [(4 * 28 * 28, 16384 * 28 * 28), (56 * 56, 112 * 112), (100 * 28 * 28, 200 * 28 * 28)])
def test_smart_resize_matches_transformers_rule(bounds):
    from transformers.models.qwen2_vl.image_processing_qwen2_vl import smart_resize as reference

    lo, hi = bounds
    for h, w in [(60, 80), (100, 50), (1000, 30), (28, 28), (513, 1025), (3000, 4000), (41, 39)]:
        ours = smart_resize(h, w, lo, hi)
        assert ours == reference(h, w, factor=28, min_pixels=lo, max_pixels=hi)
        assert ours[0] % 28 == 0 and ours[1] % 28 == 0 and lo <= ours[0] * ours[1]
        assert ours[0] * ours[1] <= hi or min(ours) == 28  # a side never goes below one 28-pixel unit


def test_smart_resize_rejects_bad_input():
    with pytest.raises(ValueError, match="aspect ratio"):
        smart_resize(10, 3000, 3136, 10**6)
    with pytest.raises(ValueError, match="min_pixels"):
        smart_resize(100, 100, 10**6, 3136)


def test_load_image_resizes_to_the_rule_and_accepts_file_uris(tmp_path):
    path = tmp_path / "a.png"
    Image.new("L", (80, 60), 128).save(path)
    img = load_image(f"file://{path}", 3136, 28 * 28 * 4)
    assert img.mode == "RGB" and (img.height, img.width) == smart_resize(60, 80, 3136, 28 * 28 * 4) == (28, 56)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_image(str(tmp_path / "missing.png"), 3136, 10**6)
    with pytest.raises(ValueError, match="local paths"):
        load_image("https://example.org/x.png", 3136, 10**6)


def test_messages_to_prompt_uses_the_chat_template_and_collects_images(tiny_ckpt, rollout_images):
    proc = load_processor(tiny_ckpt)
    system = "Solve the question."
    messages = json.dumps([
        {"role": "system", "content": system},
        {"role": "user", "content": [{"type": "text", "text": "What is shown?"},
                                     {"type": "image", "image": rollout_images[0], "min_pixels": 3136, "max_pixels": 50176}]},
    ])  # fmt: skip
    p = messages_to_prompt(proc, messages, label="$\\boxed{3}$", uid=7)
    assert p.text == (
        f"<|im_start|>system\n{system}<|im_end|>\n<|im_start|>user\nWhat is shown?"
        "<|vision_start|><|image_pad|><|vision_end|><|im_end|>\n<|im_start|>assistant\n"
    )
    assert p.image_paths == [rollout_images[0]] and (p.min_pixels, p.max_pixels) == (3136, 50176)
    assert p.label == "$\\boxed{3}$" and p.uid == 7
    text_only = messages_to_prompt(proc, [{"role": "user", "content": "Hi"}], min_pixels=1000, max_pixels=2000)
    assert text_only.image_paths == [] and text_only.text.startswith("<|im_start|>system\nYou are a helpful assistant.")
    with pytest.raises(ValueError, match="role"):
        messages_to_prompt(proc, [{"content": "no role"}])


def test_vision_inputs_shapes_follow_the_grid(tiny_ckpt, rollout_prompts):
    proc = load_processor(tiny_ckpt)
    two = rollout_prompts[2]  # two images: 100x50 and 90x140
    vi = vision_inputs(proc, two)
    grids = [[1, h // 14, w // 14] for h, w in (smart_resize(100, 50, two.min_pixels, two.max_pixels),
                                               smart_resize(90, 140, two.min_pixels, two.max_pixels))]  # fmt: skip
    assert vi.image_grid_thw.tolist() == grids
    assert vi.pixel_values.shape == (sum(t * h * w for t, h, w in grids), 3 * 2 * 14 * 14)
    assert vi.pixel_values.dtype == np.float32 and vi.image_grid_thw.dtype == np.int64
    empty = vision_inputs(proc, rollout_prompts[1])
    assert empty.pixel_values.shape == (0, 3 * 2 * 14 * 14) and empty.image_grid_thw.shape == (0, 3)
    # The processor expands each placeholder to one token per merged 2x2 patch group.
    ids = process(proc, [two])["input_ids"][0].tolist()
    assert ids.count(proc.tokenizer.convert_tokens_to_ids("<|image_pad|>")) == sum(t * h * w // 4 for t, h, w in grids)


def test_placeholder_count_must_match_the_images(tiny_ckpt, rollout_images):
    proc = load_processor(tiny_ckpt)
    bad = Prompt(text="<|im_start|>user\nno placeholder<|im_end|>\n", image_paths=[rollout_images[0]])
    with pytest.raises(ValueError, match="0 <\\|image_pad\\|> placeholders but 1 image"):
        vision_inputs(proc, bad)


def test_engine_config_and_checkpoint_helpers(tiny_ckpt):
    from shared.config import Config

    cfg = Config()
    cfg.model.path = tiny_ckpt
    cfg.rollout.kv_cache_gib = 0.5
    ec = EngineConfig.from_config(cfg, dtype="float32")
    assert ec.model_path == tiny_ckpt and ec.dtype == "float32" and ec.seed == cfg.train.seed
    assert ec.max_model_len == cfg.data.prompt_max_len + cfg.rollout.generate_max_len
    assert ec.kv_cache_bytes == 1 << 29 and ec.enable_prefix_caching
    with pytest.raises(ValueError, match="logprobs_mode"):
        EngineConfig(tiny_ckpt, logprobs_mode="weird")
    with pytest.raises(FileNotFoundError, match="checkpoint directory"):
        EngineConfig("/nonexistent")
    shapes = checkpoint_shapes(tiny_ckpt)
    assert shapes["model.layers.0.self_attn.q_proj.weight"] == (128, 128)
    proc = load_processor(tiny_ckpt)
    tok = proc.tokenizer
    assert stop_token_ids(tiny_ckpt, tok, [5]) == sorted({5, tok.convert_tokens_to_ids("<|im_end|>"),
                                                          tok.convert_tokens_to_ids("<|endoftext|>")})  # fmt: skip


def test_to_torch_keeps_bfloat16_and_copies_read_only_arrays():
    ml_dtypes = pytest.importorskip("ml_dtypes")
    import torch

    a = np.array([1.5, -2.25], dtype=ml_dtypes.bfloat16)
    t = to_torch(a)
    assert t.dtype == torch.bfloat16 and t.float().tolist() == [1.5, -2.25]
    ro = np.arange(4, dtype=np.float32)
    ro.flags.writeable = False
    assert to_torch(ro).tolist() == [0, 1, 2, 3]
