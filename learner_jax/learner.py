"""The learner's compiled programs for one rollout: logprob and value passes, KL with advantages, and the actor and
critic optimizer steps (`sharding.TrainStep`: sharded, donated, accumulated on device).

A rollout's samples are ordered by prompt group (groups shuffled), so the micro-batches of the first epoch are
contiguous slices and every group's samples sit together: a micro-batch holds few distinct prompts, and the vision
tower encodes each distinct image once. `RolloutBatches` builds and places each micro-batch once per partition;
every pass and epoch that uses the partition reuses it. Per-sample arrays stay on the devices between passes.

The first optimizer step of a rollout is exactly on-policy by construction: its old log-probabilities are the
update's own, gradient stopped. The old-policy pass runs only when something else needs it (KL in the reward,
later optimizer steps of the same rollout).
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Any, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np

from shared.config import AlgoConfig

from .experience import Experience
from .models.config import ModelOptions, Qwen25VLConfig
from .models.lora import LoraSpec
from .models.qwen2_5_vl import forward, forward_logprobs
from .rl.advantages import compute_advantages
from .rl.kl import approx_kl
from .rl.losses import actor_loss, critic_loss, masked_mean
from .sharding import Strategy, TrainStep

Params = Any


@dataclass
class TrainState:
    params: Params
    opt_state: Any
    step: int = 0


class ActorInputs(NamedTuple):
    """Per-sample arrays of one actor micro-batch [mb, L]."""

    mask_BL: jax.Array
    adv_BL: jax.Array
    rollout_logp_BL: jax.Array  # the engine's log-probs (truncated importance sampling, engine-gap metric)
    old_logp_BL: Optional[jax.Array] = None  # None: no old-policy pass ran; every step uses its own
    ref_logp_BL: Optional[jax.Array] = None  # for a KL loss


class ActorScalars(NamedTuple):
    num_tokens: jax.Array  # valid tokens of the whole optimizer step (global_token_mean)
    kl_coef: jax.Array
    on_policy: jax.Array  # True on the first step of a rollout: old log-probs = the step's own


class CriticInputs(NamedTuple):
    mask_BL: jax.Array
    old_values_BL: jax.Array
    returns_BL: jax.Array


class CriticScalars(NamedTuple):
    num_tokens: jax.Array


class RolloutBatches:
    """The model inputs of a rollout's micro-batches, built and placed once per partition of its samples."""

    def __init__(self, exp: Experience, micro_batch: int, model_cfg: Qwen25VLConfig, pad: int, strategy: Strategy):
        self.exp, self.micro_batch, self.cfg, self.pad, self.strategy = exp, micro_batch, model_cfg, pad, strategy
        self._placed: dict[bytes, list[dict[str, jax.Array]]] = {}
        self.builds = 0  # micro-batches built so far (a test checks that passes reuse them)

    def parts(self, perm: np.ndarray) -> np.ndarray:
        return np.asarray(perm).reshape(-1, self.micro_batch)

    def get(self, perm: np.ndarray) -> list[dict[str, jax.Array]]:
        key = np.asarray(perm, np.int64).tobytes()
        if key not in self._placed:
            s = self.strategy
            out = []
            for idx in self.parts(perm):
                batch = self.exp.micro_batch(idx, self.cfg, self.pad)
                out.append(s.place(batch, s.batch_sharding(batch)))
                self.builds += 1
            self._placed[key] = out
        return self._placed[key]


def group_permutation(rng: np.random.Generator, num_samples: int, n: int) -> np.ndarray:
    """Sample order with the prompt groups (n contiguous samples) shuffled and kept whole."""
    return (rng.permutation(num_samples // n)[:, None] * n + np.arange(n)).reshape(-1)


class Learner:
    """Compiled passes and steps of one run (built once); the arrays they act on live in the loop's state."""

    def __init__(self, model_cfg: Qwen25VLConfig, opts: ModelOptions, algo: AlgoConfig, strategy: Strategy,
                 pad_token_id: int, n_samples: int, tx_actor, actor_params, tx_critic=None, critic_params=None,
                 logprob_chunk: int = 1024, actor_frozen=None, lora: Optional[LoraSpec] = None):  # fmt: skip
        """With LoRA (`lora`), `actor_frozen` holds the base weights and `actor_params` the adapters only."""
        self.model_cfg, self.opts, self.algo, self.strategy, self.lora = model_cfg, opts, algo, strategy, lora
        self.pad_token_id, self.chunk = pad_token_id, logprob_chunk
        self.actor_step = TrainStep(strategy, self._actor_loss, tx_actor, actor_params, frozen=actor_frozen)
        self.critic_step = TrainStep(strategy, self._critic_loss, tx_critic, critic_params) if tx_critic else None
        self._logp = jax.jit(lambda p, b, window: self._logp_entropy(p, b, window)[0], static_argnums=2)
        self._values = jax.jit(self._values_fn, static_argnums=2)
        self._split = jax.jit(_split_parts, static_argnums=2)
        self._unsplit = jax.jit(_unsplit_parts)
        self._advantages = jax.jit(partial(_kl_and_advantages, algo, n_samples))

    # ------------------------------------------------------------------ the programs

    def _logp_entropy(self, params, batch, window: int):
        out = forward_logprobs(params, batch, self.model_cfg, self.opts, chunk=self.chunk, window=window,
                               lora=self.lora)  # fmt: skip
        return out["logprobs_BL"], out["entropy_BL"]

    def _values_fn(self, params, batch, window: int):
        return forward(params, batch, self.model_cfg, self.opts, return_hidden=True)["values_BT"][:, -window - 1:-1]

    def _actor_loss(self, params, batch, x: ActorInputs, s: ActorScalars):
        logp_BL, ent_BL = self._logp_entropy(params, batch, x.mask_BL.shape[1])
        own_BL = jax.lax.stop_gradient(logp_BL)
        old_BL = own_BL if x.old_logp_BL is None else jnp.where(s.on_policy, own_BL, x.old_logp_BL)
        loss, m = actor_loss(self.algo, logp_BL, old_BL, x.adv_BL, x.mask_BL, ref_logp_BT=x.ref_logp_BL,
                             rollout_logp_BT=x.rollout_logp_BL, entropy_BT=ent_BL, kl_coef=s.kl_coef,
                             num_tokens=s.num_tokens)  # fmt: skip
        valid = x.mask_BL.astype(bool)
        m["entropy"] = masked_mean(ent_BL, x.mask_BL)
        m["log_ratio_abs_max"] = jnp.max(jnp.where(valid, jnp.abs(logp_BL - old_BL), 0.0))
        m["engine_gap"] = masked_mean(jnp.abs(jnp.where(valid, own_BL - x.rollout_logp_BL, 0.0)), x.mask_BL)
        return loss, m

    def _critic_loss(self, params, batch, x: CriticInputs, s: CriticScalars):
        v_BL = self._values_fn(params, batch, x.mask_BL.shape[1])
        return critic_loss(self.algo, v_BL, x.old_values_BL, x.returns_BL, x.mask_BL, num_tokens=s.num_tokens)

    # ------------------------------------------------------------------ passes without gradients

    def logprobs(self, params: Params, batches: list[dict], window: int) -> list[jax.Array]:
        """Per-micro-batch log-probs on the response window [mb, L], left on the devices (no host round trip)."""
        return [self._logp(params, b, window) for b in batches]

    def values(self, params: Params, batches: list[dict], window: int) -> list[jax.Array]:
        return [self._values(params, b, window) for b in batches]

    # ------------------------------------------------------------------ per-sample arrays

    def per_sample(self, exp: Experience) -> dict[str, jax.Array]:
        """The rollout's own per-sample arrays on the devices, in experience order."""
        rep = self.strategy.replicated
        put = lambda x: jax.device_put(np.asarray(x, np.float32), rep)  # noqa: E731
        return {"mask_BL": put(exp.action_mask_BL), "rollout_logp_BL": put(exp.rollout_logp_BL),
                "rewards_B": put(exp.rewards_B)}  # fmt: skip

    def gather(self, parts: list[jax.Array], perm: np.ndarray) -> jax.Array:
        """Per-micro-batch outputs of partition `perm` back in experience order [B, L]."""
        return self._unsplit(tuple(parts), jnp.asarray(perm, jnp.int32))

    def split(self, tree: Any, perm: np.ndarray, micro_batch: int) -> list[Any]:
        """A tree of [B, ...] arrays cut into the micro-batches of partition `perm`, each split over the mesh."""
        parts = self._split(tree, jnp.asarray(perm, jnp.int32), micro_batch)
        s = self.strategy
        return [jax.tree.map(lambda a: jax.device_put(a, s.sample_sharding(a, micro_batch)), p) for p in parts]

    def kl_and_advantages(self, rewards_B, mask_BL, old_BL, ref_BL, values_BL, kl_coef: float):
        """(kl_BL, advantages_BL, returns_BL, kl_mean) in one compiled function."""
        return self._advantages(rewards_B, mask_BL, old_BL, ref_BL, values_BL, jnp.float32(kl_coef))


def _split_parts(tree: Any, perm: jax.Array, micro_batch: int) -> list[Any]:
    taken = jax.tree.map(lambda a: a[perm], tree)
    n = perm.shape[0] // micro_batch
    return [jax.tree.map(lambda a: a[k * micro_batch:(k + 1) * micro_batch], taken) for k in range(n)]


def _unsplit_parts(parts: tuple, perm: jax.Array) -> jax.Array:
    stacked = jnp.concatenate(parts, axis=0)
    return jnp.zeros_like(stacked).at[perm].set(stacked)


def _kl_and_advantages(algo: AlgoConfig, n_samples: int, rewards_B, mask_BL, old_BL, ref_BL, values_BL, kl_coef):
    if old_BL is None or ref_BL is None:
        kl_BL = jnp.zeros_like(mask_BL)
    else:
        kl_BL = approx_kl(old_BL, ref_BL, mask_BL, algo.kl_estimator)
    adv_BL, ret_BL = compute_advantages(algo, rewards_B, kl_BL, mask_BL, values_BL, n_samples=n_samples,
                                        kl_coef=kl_coef)  # fmt: skip
    return kl_BL, adv_BL, ret_BL, masked_mean(kl_BL, mask_BL)
