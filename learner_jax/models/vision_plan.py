"""Host-side index plan of the vision tower for a concatenation of images, computed in numpy from image_grid_thw.

The tower reorders patches so that each attention window is contiguous (transformers' `get_window_index`), runs
windowed attention in most blocks and per-image attention in the `fullatt_block_indexes` blocks, then undoes the
order after the 2x2 merger. On device both attentions are *group* attention: a [G, S] table of patch indices
(padded with the out-of-range index P) gathers each window or image into a row of S slots, so the cost is
G*S^2 instead of P^2 and every shape is static. Padded patches (beyond the real ones) belong to no group and no
merged token reads them.

Shapes are rounded up by `bucket` (at most 25% slack, four sizes per octave), so the number of compiled
variants grows with the log of the largest batch, not with the variety of image sizes.
"""
from __future__ import annotations

import numpy as np

from .config import VisionConfig

PLAN_KEYS = ("vision_perm_P", "vision_pos_P2", "vision_window_idx_GS", "vision_image_idx_GS", "vision_unperm_M")


def bucket(n: int) -> int:
    """Round n up to a number with three significant bits (4, 5, 6, 7 times a power of two)."""
    shift = max(0, int(n).bit_length() - 3)
    return -(-int(n) // (1 << shift)) << shift


def window_index(grid_thw_N3: np.ndarray, cfg: VisionConfig) -> tuple[np.ndarray, np.ndarray]:
    """Merged-unit order that makes windows contiguous, and the window boundaries in patches (cumulative)."""
    m, win = cfg.spatial_merge_size, cfg.window_units
    order, bounds, offset = [], [0], 0
    for t, h, w in np.asarray(grid_thw_N3, dtype=np.int64).reshape(-1, 3):
        gh, gw = h // m, w // m
        idx = np.arange(t * gh * gw).reshape(t, gh, gw)
        nh, nw = -(-gh // win), -(-gw // win)
        padded = np.full((t, nh * win, nw * win), -1, np.int64)
        padded[:, :gh, :gw] = idx
        tiles = padded.reshape(t, nh, win, nw, win).transpose(0, 1, 3, 2, 4).reshape(t * nh * nw, win * win)
        for tile in tiles:
            units = tile[tile >= 0]
            order.append(units + offset)
            bounds.append(bounds[-1] + len(units) * cfg.merge_unit)
        offset += t * gh * gw
    order_M = np.concatenate(order) if order else np.zeros(0, np.int64)
    return order_M, np.asarray(bounds, np.int64)


def patch_positions(grid_thw_N3: np.ndarray, cfg: VisionConfig) -> np.ndarray:
    """(row, col) of every patch [P, 2] in the processor's order (2x2 merge blocks contiguous)."""
    m, out = cfg.spatial_merge_size, []
    for t, h, w in np.asarray(grid_thw_N3, dtype=np.int64).reshape(-1, 3):
        hh, ww = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
        blocks = (h // m, m, w // m, m)
        rows, cols = (a.reshape(blocks).transpose(0, 2, 1, 3).ravel() for a in (hh, ww))
        out.append(np.tile(np.stack([rows, cols], -1), (t, 1)))
    return np.concatenate(out) if out else np.zeros((0, 2), np.int64)


def _groups(bounds: np.ndarray, num_patches: int, rows: int, width: int) -> np.ndarray:
    """[rows, width] patch indices of the segments [bounds[i], bounds[i+1]), padded with `num_patches`."""
    lengths = np.diff(bounds)
    lengths = lengths[lengths > 0]
    starts = np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int64)
    idx_GS = np.full((rows, width), num_patches, np.int64)
    slot = np.arange(width)
    for g, (s, n) in enumerate(zip(starts, lengths)):
        idx_GS[g, :n] = s + slot[:n]
    return idx_GS


def make_plan(grid_thw_N3: np.ndarray, cfg: VisionConfig, num_patches: int | None = None) -> dict[str, np.ndarray]:
    """Index arrays (int32) for `vision_tower`; `num_patches` >= the real patch count pads P (multiple of 4)."""
    grid_thw_N3 = np.asarray(grid_thw_N3, dtype=np.int64).reshape(-1, 3)
    real = int(np.prod(grid_thw_N3, axis=1).sum())
    P = real if num_patches is None else int(num_patches)
    if P < real or P % cfg.merge_unit:
        raise ValueError(f"num_patches {P} must be >= {real} real patches and a multiple of {cfg.merge_unit}")
    unit_order, win_bounds = window_index(grid_thw_N3, cfg)
    mu = cfg.merge_unit
    pad_units = np.arange(real // mu, P // mu)
    unit_order = np.concatenate([unit_order, pad_units])
    perm_P = (unit_order[:, None] * mu + np.arange(mu)).ravel()
    pos_P2 = np.concatenate([patch_positions(grid_thw_N3, cfg), np.zeros((P - real, 2), np.int64)])[perm_P]

    win_lengths = np.diff(win_bounds)
    img_bounds = np.concatenate([[0], np.cumsum(np.repeat(grid_thw_N3[:, 1] * grid_thw_N3[:, 2], grid_thw_N3[:, 0]))])
    max_window = cfg.window_units**2 * mu
    n_win = int((win_lengths > 0).sum())
    n_img = len(img_bounds) - 1
    max_img = int(np.diff(img_bounds).max()) if n_img else 0
    plan = {
        "vision_perm_P": perm_P,
        "vision_pos_P2": pos_P2,
        "vision_window_idx_GS": _groups(win_bounds, P, bucket(n_win), max_window),
        "vision_image_idx_GS": _groups(img_bounds, P, bucket(n_img), bucket(max_img)),
        "vision_unperm_M": np.argsort(unit_order, kind="stable"),
    }
    return {k: v.astype(np.int32) for k, v in plan.items()}
