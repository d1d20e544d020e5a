"""Host-side index computations against transformers: 3-D position ids (`get_rope_index`), the vision window
order (`get_vision_window_index`) and patch positions (`get_vision_position_ids`); and the batch builder."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VLModel
from transformers.vision_utils import get_vision_position_ids, get_vision_window_index

from learner_jax.models.batch import build_batch
from learner_jax.models.config import Qwen25VLConfig
from learner_jax.models.rope import get_rope_index
from learner_jax.models.vision_plan import bucket, make_plan, patch_positions, window_index
from shared.records import VisionInputs

GRIDS = np.array([[1, 6, 10], [1, 8, 8], [1, 4, 6], [1, 14, 10], [1, 2, 2]])


def _sequence(cfg, grids, rng):
    """Text with each image as <|vision_start|> pads <|vision_end|>, random text lengths between them."""
    ids = list(rng.integers(0, 400, rng.integers(1, 6)))
    for t, h, w in grids:
        ids += [cfg.vision_start_token_id] + [cfg.image_token_id] * (t * h * w // 4) + [cfg.vision_start_token_id + 1]
        ids += list(rng.integers(0, 400, rng.integers(1, 6)))
    return [int(i) for i in ids]


class _Stub:  # the reference method reads only `self.config` and `self.get_vision_position_ids`
    get_vision_position_ids = Qwen2_5_VLModel.get_vision_position_ids

    def __init__(self, hf_config):
        self.config = hf_config


def test_position_ids_match_transformers(tiny_ckpt):
    from transformers import AutoConfig

    cfg = Qwen25VLConfig.from_hf(tiny_ckpt)
    rng = np.random.default_rng(0)
    per_sample = [GRIDS[:0], GRIDS[:1], GRIDS[1:4], GRIDS[4:]]
    seqs = [_sequence(cfg, g, rng) for g in per_sample]
    T = max(map(len, seqs)) + 3
    ids = np.zeros((len(seqs), T), np.int64)
    mask = np.zeros_like(ids)
    for b, s in enumerate(seqs):  # left padding
        ids[b, T - len(s):], mask[b, T - len(s):] = s, 1
    grid = np.concatenate(per_sample)
    ours = get_rope_index(ids, grid, mask, cfg)
    ids_t = torch.from_numpy(ids)
    ref, _ = Qwen2_5_VLModel.get_rope_index(
        _Stub(AutoConfig.from_pretrained(tiny_ckpt)), ids_t, (ids_t == cfg.image_token_id).int() * torch.from_numpy(mask),
        image_grid_thw=torch.from_numpy(grid), attention_mask=torch.from_numpy(mask),
    )  # fmt: skip
    np.testing.assert_array_equal(ours, ref.numpy())

    with pytest.raises(ValueError, match="image_grid_thw has 5 rows but the batch has 4"):
        get_rope_index(ids[:3], grid, mask[:3], cfg)
    with pytest.raises(ValueError, match="needs"):
        get_rope_index(ids, grid[::-1], mask, cfg)


@pytest.mark.parametrize("window_size", [56, 112])
def test_window_order_and_patch_positions_match_transformers(tiny_ckpt, window_size):
    cfg = Qwen25VLConfig.from_hf(tiny_ckpt).vision
    cfg = type(cfg)(**{**cfg.__dict__, "window_size": window_size})
    order, bounds = window_index(GRIDS, cfg)
    ref_order, ref_bounds = get_vision_window_index(torch.from_numpy(GRIDS), 2, window_size, 14)
    np.testing.assert_array_equal(order, ref_order.numpy())
    np.testing.assert_array_equal(bounds, ref_bounds.numpy())
    np.testing.assert_array_equal(patch_positions(GRIDS, cfg), get_vision_position_ids(torch.from_numpy(GRIDS), 2).numpy())


def test_plan_groups_cover_every_real_patch_once(tiny_ckpt):
    cfg = Qwen25VLConfig.from_hf(tiny_ckpt).vision
    real = int(np.prod(GRIDS, axis=1).sum())
    plan = make_plan(GRIDS, cfg, num_patches=real + 36)
    P = real + 36
    for key in ("vision_window_idx_GS", "vision_image_idx_GS"):
        idx = plan[key][plan[key] < P]
        np.testing.assert_array_equal(np.sort(idx), np.arange(real))
    assert plan["vision_image_idx_GS"].shape == (bucket(len(GRIDS)), bucket(140))
    np.testing.assert_array_equal(np.sort(plan["vision_perm_P"]), np.arange(P))
    with pytest.raises(ValueError, match="multiple of 4"):
        make_plan(GRIDS, cfg, num_patches=real + 2)


def test_bucket_has_three_significant_bits():
    assert [bucket(n) for n in (0, 1, 7, 8, 9, 17, 100, 1000)] == [0, 1, 7, 8, 10, 20, 112, 1024]
    assert all(n <= bucket(n) <= 1.25 * n + 1 for n in range(1, 5000))


def test_build_batch_left_pads_and_checks_image_tokens(tiny_ckpt):
    cfg = Qwen25VLConfig.from_hf(tiny_ckpt)
    rng = np.random.default_rng(1)
    grids = [GRIDS[:1], GRIDS[:0]]
    seqs = [_sequence(cfg, g, rng) for g in grids]
    vision = [VisionInputs(np.ones((int(np.prod(g, axis=1).sum()), 1176), np.float32), g) for g in grids]
    batch = build_batch(seqs, vision, cfg, pad_token_id=0, seq_len=40)
    assert batch["input_ids_BT"].shape == (2, 40) and batch["input_ids_BT"].dtype == np.int32
    assert batch["attention_mask_BT"][1].tolist() == [0] * (40 - len(seqs[1])) + [1] * len(seqs[1])
    assert batch["input_ids_BT"][0, -len(seqs[0]):].tolist() == seqs[0]
    assert batch["pixel_values_PC"].shape == (bucket(60), 1176) and batch["pixel_values_PC"][60:].sum() == 0
    with pytest.raises(ValueError, match="sample 0: 15 image tokens in its prompt, but its grids"):
        build_batch(seqs, [vision[1], vision[1]], cfg, pad_token_id=0)
    with pytest.raises(ValueError, match="more than seq_len"):
        build_batch(seqs, vision, cfg, pad_token_id=0, seq_len=10)


def _with_response(cfg, prompt, rng):
    """A response sampled into vision and other special tokens: a run of `<|image_pad|>` as long as an image's,
    `<|video_pad|>`, `<|vision_start|>` ... `<|vision_end|>` around more pads, text between."""
    pad, vs = cfg.image_token_id, cfg.vision_start_token_id
    resp = [int(i) for i in rng.integers(0, 400, 3)] + [pad] * 15 + [7, cfg.video_token_id, vs, pad, pad, vs + 1, 9, pad]
    return prompt + resp, len(prompt)


def test_response_tokens_are_text_whatever_their_id(tiny_ckpt):
    """transformers' rule with mm_token_type_ids = 1 on the prompts' image tokens only (what its generate() does:
    decode positions are text positions + rope_deltas) equals ours given the prompt lengths."""
    from transformers import AutoConfig

    cfg = Qwen25VLConfig.from_hf(tiny_ckpt)
    rng = np.random.default_rng(2)
    per_sample = [GRIDS[:0], GRIDS[:1], GRIDS[1:3]]
    seqs, prompt_lens = zip(*(_with_response(cfg, _sequence(cfg, g, rng), rng) for g in per_sample))
    T = max(map(len, seqs)) + 2
    ids, mask, prompt = (np.zeros((len(seqs), T), np.int64) for _ in range(3))
    for b, (s, n) in enumerate(zip(seqs, prompt_lens)):
        ids[b, T - len(s):], mask[b, T - len(s):] = s, 1
        prompt[b, T - len(s):T - len(s) + n] = 1
    grid = np.concatenate(per_sample)
    ours = get_rope_index(ids, grid, mask, cfg, prompt)
    ids_t = torch.from_numpy(ids)
    ref, _ = Qwen2_5_VLModel.get_rope_index(
        _Stub(AutoConfig.from_pretrained(tiny_ckpt)), ids_t,
        (ids_t == cfg.image_token_id).int() * torch.from_numpy(mask * prompt),
        image_grid_thw=torch.from_numpy(grid), attention_mask=torch.from_numpy(mask),
    )  # fmt: skip
    np.testing.assert_array_equal(ours, ref.numpy())
    for b, n in enumerate(prompt_lens):  # the response continues the prompt's last position, 1-D
        resp = ours[:, b, T - len(seqs[b]) + n:]
        last = ours[:, b, T - len(seqs[b]) + n - 1]
        np.testing.assert_array_equal(resp, np.broadcast_to(last[:, None] + 1 + np.arange(resp.shape[1]), resp.shape))
    # Without a prompt mask every token is a prompt token, as before: the response's tokens are refused.
    with pytest.raises(ValueError, match="video tokens in a prompt"):
        get_rope_index(ids, grid, mask, cfg)
    no_video = np.where(ids == cfg.video_token_id, 7, ids)
    with pytest.raises(ValueError, match="more image-token runs|needs"):
        get_rope_index(no_video, grid, mask, cfg)


def test_build_batch_counts_and_fills_only_the_prompts_image_tokens(tiny_ckpt):
    cfg = Qwen25VLConfig.from_hf(tiny_ckpt)
    rng = np.random.default_rng(3)
    grids = [GRIDS[:1], GRIDS[:0]]
    seqs, prompt_lens = zip(*(_with_response(cfg, _sequence(cfg, g, rng), rng) for g in grids))
    vision = [VisionInputs(np.ones((int(np.prod(g, axis=1).sum()), 1176), np.float32), g) for g in grids]
    batch = build_batch(seqs, vision, cfg, pad_token_id=0, prompt_lengths=prompt_lens)
    T = batch["input_ids_BT"].shape[1]
    is_pad = batch["input_ids_BT"] == cfg.image_token_id
    in_prompt = np.zeros_like(is_pad)
    for b, (s, n) in enumerate(zip(seqs, prompt_lens)):
        in_prompt[b, T - len(s):T - len(s) + n] = True
    np.testing.assert_array_equal(batch["image_mask_BT"], is_pad & in_prompt)
    assert batch["image_mask_BT"].sum() == 15 and (is_pad & ~in_prompt).sum() == 2 * 18
    assert batch["image_feature_idx_BT"][0][batch["image_mask_BT"][0]].tolist() == list(range(15))
    assert not batch["image_feature_idx_BT"][~batch["image_mask_BT"]].any()
    np.testing.assert_array_equal(batch["position_ids_3BT"],
                                  get_rope_index(batch["input_ids_BT"], GRIDS[:1], batch["attention_mask_BT"], cfg,
                                                 in_prompt))  # fmt: skip
    with pytest.raises(ValueError, match="sample 0: 33 image tokens in its prompt"):  # no prompt lengths: all prompt
        build_batch(seqs, vision, cfg, pad_token_id=0)
    with pytest.raises(ValueError, match="prompt_lengths"):
        build_batch(seqs, vision, cfg, pad_token_id=0, prompt_lengths=[len(seqs[0]) + 1, 0])
