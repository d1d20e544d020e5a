"""Supervised warm start: cross-entropy on response tokens, with the RL learner's model, optimizer and export.

RL from a random model finds no reward; the demo first teaches a small model the answer format on worked
solutions (`solution` field of the synthetic rows), briefly, so that accuracy stays below its ceiling.
"""
from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from tqdm import trange

from shared.config import OptimConfig
from shared.data import PromptRow

from .experience import Experience
from .models.config import ModelOptions, Qwen25VLConfig
from .models.qwen2_5_vl import forward_logprobs
from .models.vision_plan import bucket
from .optim import make_optimizer


def sft_experience(encoded: list[tuple[list[int], list[int], Any]]) -> Experience:
    token_ids = [p + r for p, r, _ in encoded]
    T = bucket(max(map(len, token_ids)))
    mask = np.zeros((len(encoded), T - 1), np.float32)
    for b, (_, r, _) in enumerate(encoded):
        mask[b, T - 1 - len(r):] = 1.0
    zeros = np.zeros(len(encoded), np.float32)
    return Experience(token_ids, [v for _, _, v in encoded], mask, np.zeros_like(mask), zeros, T,
                      np.array([len(r) for _, r, _ in encoded]), zeros)  # fmt: skip


def sft(params: Any, model_cfg: Qwen25VLConfig, rollout: Any, rows: list[PromptRow], *, steps: int, batch_size: int,
        lr: float, pad_token_id: int, seed: int = 0, opts: ModelOptions = ModelOptions()) -> tuple[Any, list[float]]:  # fmt: skip
    """Train on `rows` (each with extra['solution']) for `steps` steps; returns new params and the loss curve."""
    records = [{"messages": r.messages, "label": r.label, "uid": i} for i, r in enumerate(rows)]
    prompts = rollout.prompts(records)
    encoded = rollout.encode(prompts, [r.extra["solution"] for r in rows])
    tx, _ = make_optimizer(OptimConfig(lr=lr, warmup_ratio=0.05, min_lr_ratio=0.1, weight_decay=0.0), steps, params)
    opt_state = tx.init(params)

    def loss_fn(p, batch, mask):
        logp = forward_logprobs(p, batch, model_cfg, opts, window=mask.shape[1])["logprobs_BL"]
        return -jnp.sum(logp * mask) / jnp.maximum(mask.sum(), 1.0)

    @jax.jit
    def step(p, s, batch, mask):
        loss, g = jax.value_and_grad(loss_fn)(p, batch, mask)
        updates, s = tx.update(g, s, p)
        return optax.apply_updates(p, updates), s, loss

    rng = np.random.default_rng(seed)
    losses = []
    for _ in (bar := trange(steps, desc="warm start (SFT)")):
        idx = rng.choice(len(encoded), size=batch_size, replace=False)
        exp = sft_experience([encoded[i] for i in idx])
        params, opt_state, loss = step(params, opt_state, exp.micro_batch(range(batch_size), model_cfg, pad_token_id),
                                       exp.action_mask_BL)  # fmt: skip
        losses.append(float(loss))
        bar.set_postfix(loss=f"{losses[-1]:.3f}")
    return params, losses
