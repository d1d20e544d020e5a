"""The learner's compiled pieces: logprob/value passes over micro-batches and PPO optimizer steps with
micro-batch gradient accumulation. The loop over micro-batches is on the host; each piece is one jit.

The logprob pass and the first update of a rollout use the same micro-batch partition, so before any update
the policy/old log-ratio is exactly zero (row results depend on their micro-batch's padding buckets).
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax

from shared.config import AlgoConfig, ShardingConfig

from .experience import Experience
from .models.config import ModelOptions, Qwen25VLConfig
from .models.qwen2_5_vl import forward, forward_logprobs
from .rl.losses import actor_loss, critic_loss
from .sharding import Strategy

Params = Any


@dataclass
class TrainState:
    params: Params
    opt_state: Any
    step: int = 0


def partition(order: np.ndarray, size: int) -> list[np.ndarray]:
    return [order[i : i + size] for i in range(0, len(order), size)]


class PPOLearner:
    def __init__(self, model_cfg: Qwen25VLConfig, opts: ModelOptions, algo: AlgoConfig, pad_token_id: int,
                 logprob_chunk: int = 1024, strategy: Optional[Strategy] = None):  # fmt: skip
        self.cfg, self.opts, self.algo, self.pad = model_cfg, opts, algo, pad_token_id
        self.chunk = logprob_chunk
        self.strategy = strategy or Strategy.from_config(ShardingConfig(), model_cfg)

        def logp_fn(params, batch):
            out = forward_logprobs(params, batch, model_cfg, opts, chunk=logprob_chunk)
            return out["logprobs_BL"], out["entropy_BL"]

        def values_fn(params, batch):
            return forward(params, batch, model_cfg, opts, return_hidden=True)["values_BT"][:, :-1]

        def actor_fn(params, batch, old_logp, adv, mask, ref_logp, rollout_logp, num_tokens, kl_coef):
            logp, ent = logp_fn(params, batch)
            loss, m = actor_loss(algo, logp, old_logp, adv, mask, ref_logp_BT=ref_logp, rollout_logp_BT=rollout_logp,
                                 entropy_BT=ent, kl_coef=kl_coef, num_tokens=num_tokens)  # fmt: skip
            m["entropy"] = jnp.sum(ent * mask) / jnp.maximum(mask.sum(), 1.0)
            m["log_ratio_abs_max"] = jnp.max(jnp.abs(logp - old_logp) * mask)
            return loss, (m, logp)

        def critic_fn(params, batch, old_values, returns, mask, num_tokens):
            v = values_fn(params, batch)
            return critic_loss(algo, v, old_values, returns, mask, num_tokens=num_tokens)

        self.logp = jax.jit(logp_fn)
        self.values = jax.jit(values_fn)
        self.actor_grad = jax.jit(jax.value_and_grad(actor_fn, has_aux=True))
        self.critic_grad = jax.jit(jax.value_and_grad(critic_fn, has_aux=True))

    # ----------------------------------------------------------------- passes without gradients

    def batches(self, exp: Experience, parts: list[np.ndarray]):
        """Micro-batches split over the data-parallel devices (images and the vision plan are replicated)."""
        for idx in parts:
            batch = exp.micro_batch(idx, self.cfg, self.pad)
            yield idx, self.strategy.place(batch, self.strategy.batch_sharding(batch))

    def logprobs(self, params: Params, exp: Experience, parts: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        logp = np.zeros(exp.action_mask_BL.shape, np.float32)
        ent = np.zeros_like(logp)
        for idx, batch in self.batches(exp, parts):
            lp, e = self.logp(params, batch)
            logp[idx], ent[idx] = np.asarray(lp), np.asarray(e)
        return logp * exp.action_mask_BL, ent

    def logprobs_exact(self, params: Params, exp: Experience, parts: list[np.ndarray], with_ref: bool) -> np.ndarray:
        """Old-policy logprobs from the very program the update runs (its gradients are discarded): XLA fuses a
        forward-only program differently, so this is what makes the first update exactly on-policy."""
        logp = np.zeros(exp.action_mask_BL.shape, np.float32)
        zeros = np.zeros_like(logp)
        for idx, batch in self.batches(exp, parts):
            mask = exp.action_mask_BL[idx]
            (_, (_, lp)), _ = self.actor_grad(params, batch, zeros[idx], zeros[idx], mask,
                                              zeros[idx] if with_ref else None, exp.rollout_logp_BL[idx],
                                              jnp.float32(max(mask.sum(), 1.0)), np.float32(0.0))  # fmt: skip
            logp[idx] = np.asarray(lp)
        return logp * exp.action_mask_BL

    def value_pass(self, params: Params, exp: Experience, parts: list[np.ndarray]) -> np.ndarray:
        out = np.zeros(exp.action_mask_BL.shape, np.float32)
        for idx, batch in self.batches(exp, parts):
            out[idx] = np.asarray(self.values(params, batch))
        return out * exp.action_mask_BL

    # ----------------------------------------------------------------- optimizer steps

    def step(self, state: TrainState, tx: optax.GradientTransformation, grad_fn: Callable, exp: Experience,
             parts: list[np.ndarray], per_sample: dict[str, Optional[np.ndarray]], extra: tuple = ()) -> tuple[TrainState, dict]:  # fmt: skip
        """One optimizer step over the micro-batches `parts`; skipped (state unchanged) when not finite.

        `per_sample` holds the grad function's array arguments after `batch`, in order, sliced per micro-batch.
        """
        mask = exp.action_mask_BL
        idx_all = np.concatenate(parts)
        num_tokens = jnp.float32(max(mask[idx_all].sum(), 1.0))
        grads, sums = None, {}
        for idx, batch in self.batches(exp, parts):
            args = [None if v is None else v[idx] for v in per_sample.values()]
            (_, aux), g = grad_fn(state.params, batch, *args, num_tokens, *extra)
            m = aux[0] if isinstance(aux, tuple) else aux
            grads = g if grads is None else jax.tree.map(jnp.add, grads, g)
            for k, v in m.items():
                sums[k] = sums.get(k, 0.0) + float(v)
        if self.algo.loss_agg != "global_token_mean":  # per-micro-batch means, averaged as data parallel does
            grads = jax.tree.map(lambda x: x / len(parts), grads)
        metrics = {k: v / len(parts) for k, v in sums.items()}
        s = self.strategy
        grads = s.place(grads, s.grad_shardings(grads))  # ZeRO-2/3: each device keeps only its gradient shard
        new_state, gnorm, finite = _apply(tx, state.params, state.opt_state, grads)
        new_state = (s.place(new_state[0], s.param_shardings(new_state[0])),
                     s.place(new_state[1], s.opt_shardings(new_state[1])))  # fmt: skip
        metrics["grad_norm"] = float(gnorm)
        if not bool(finite):
            metrics["skipped"] = 1.0
            return state, metrics
        return TrainState(new_state[0], new_state[1], state.step + 1), metrics


@partial(jax.jit, static_argnums=0)
def _apply(tx, params, opt_state, grads):
    gnorm = optax.global_norm(grads)
    finite = jnp.isfinite(gnorm)
    updates, new_opt = tx.update(grads, opt_state, params)
    return (optax.apply_updates(params, updates), new_opt), gnorm, finite
