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
    with pytest.raises(ValueError, match="sample 0: 15 image tokens, but its grids"):
        build_batch(seqs, [vision[1], vision[1]], cfg, pad_token_id=0)
    with pytest.raises(ValueError, match="more than seq_len"):
        build_batch(seqs, vision, cfg, pad_token_id=0, seq_len=10)
