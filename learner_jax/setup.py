"""Everything a run holds besides the loop: placement, models and optimizers, data, reward workers, the update
phase, weight pushes, logging, checkpoints. `trainer.train` drives it; tests can drive the parts.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Optional

import jax
import numpy as np

from shared.config import Config, derive
from shared.data import PromptRow, PromptSampler, load_rows
from shared.rewards import make_scorer

from .checkpoint import Checkpointer
from .experience import Experience
from .export import export_hf
from .metrics import MetricsLogger, PhaseTimer
from .models.config import ModelOptions
from .models.hf_io import load_checkpoint
from .models.hf_names import name_table
from .models.qwen2_5_vl import init_value_head
from .optim import make_optimizer
from .placement import spawn, start_ray
from .ppo import PPOLearner, TrainState, partition
from .rl.kl import make_kl_controller
from .sharding import Strategy


def frozen_predicate(model_cfg, prefixes: list[str]):
    """Maps HF-name prefixes (e.g. 'visual') to Flax leaves. A stacked leaf is frozen only if all its layers are."""
    if not prefixes:
        return lambda path: False
    names: dict[str, list[str]] = {}
    for e in name_table(model_cfg):
        names.setdefault("/".join(e.flax_path), []).append(e.hf_name)
    frozen = set()
    for path, hf in names.items():
        hit = [any(n.startswith(p) for p in prefixes) for n in hf]
        if all(hit):
            frozen.add(path)
        elif any(hit):
            raise ValueError(f"model.freeze_prefixes {prefixes} covers only some layers of the stacked leaf {path}")
    if not frozen:
        raise ValueError(f"model.freeze_prefixes {prefixes} match no parameter")
    return lambda path: path in frozen


@dataclass
class Run:
    cfg: Config
    model_cfg: Any
    learner: PPOLearner
    actor: TrainState
    critic: Optional[TrainState]
    ref_params: Any
    tx_actor: Any
    tx_critic: Any
    lr_actor: Any
    sampler: PromptSampler
    rollout: Any  # proxy of rollout_torch.service.RolloutService in a Ray actor
    sync: Any
    scorer: Any
    kl_ctl: Any
    ckpt: Checkpointer
    logger: MetricsLogger
    rng: np.random.Generator
    total_rollouts: int
    iteration: int = 0
    version: int = 0
    bad_steps: int = 0

    # ------------------------------------------------------------- per-iteration helpers

    @property
    def micro_batch(self) -> int:
        """Samples per micro-batch across the mesh: the config's size is per data-parallel rank."""
        return self.cfg.train.micro_train_batch_size * self.learner.strategy.data_parallel_size

    def new_timer(self) -> PhaseTimer:
        return PhaseTimer()

    def sampling_seed(self, it: int) -> int:
        return (self.cfg.train.seed * 1_000_003 + it) % (1 << 31)

    def row_record(self, row: PromptRow, it: int, k: int) -> dict:
        return {"messages": row.messages, "label": row.label, "uid": it * self.cfg.rollout.rollout_batch_size + k}

    def old_logprobs(self, exp: Experience, parts) -> np.ndarray:
        return self._logprobs(self.actor.params, exp, parts)

    def ref_logprobs(self, exp: Experience, parts) -> Optional[np.ndarray]:
        return self._logprobs(self.ref_params, exp, parts) if self.cfg.uses_reference else None

    def _logprobs(self, params, exp: Experience, parts) -> np.ndarray:
        """Old-policy and reference passes run one and the same program, so their KL is 0 before any update."""
        if self.cfg.train.exact_old_logprobs:
            return self.learner.logprobs_exact(params, exp, parts, with_ref=self.cfg.uses_reference)
        return self.learner.logprobs(params, exp, parts)[0]

    def update(self, exp: Experience, order, old_logp, ref_logp, adv, values, returns) -> dict:
        t, mask = self.cfg.train, exp.action_mask_BL
        stats: dict[str, list[float]] = {}

        def record(m: dict) -> None:
            for k, v in m.items():
                stats.setdefault(k, []).append(v)

        for epoch in range(t.max_epochs):
            perm = order if epoch == 0 else self.rng.permutation(exp.size)
            steps = [perm[i : i + t.train_batch_size] for i in range(0, exp.size, t.train_batch_size)]
            if self.critic is not None:
                for idx in steps:
                    self.critic, m = self.learner.step(
                        self.critic, self.tx_critic, self.learner.critic_grad, exp,
                        partition(idx, self.micro_batch),
                        {"old_values": values, "returns": returns, "mask": mask})  # fmt: skip
                    record({f"critic/{k}": v for k, v in m.items()})
            for idx in steps:
                self.actor, m = self.learner.step(
                    self.actor, self.tx_actor, self.learner.actor_grad, exp, partition(idx, self.micro_batch),
                    {"old_logp": old_logp, "adv": adv, "mask": mask, "ref_logp": ref_logp,
                     "rollout_logp": exp.rollout_logp_BL}, extra=(np.float32(self.kl_ctl.value),))  # fmt: skip
                record({f"actor/{k}": v for k, v in m.items()})
                self._check_finite(m)
        return {k: float(np.mean(v)) for k, v in stats.items()}

    def _check_finite(self, m: dict) -> None:
        if m.get("skipped"):
            self.bad_steps += 1
            if self.bad_steps >= self.cfg.train.max_bad_steps:
                raise FloatingPointError(
                    f"{self.bad_steps} consecutive optimizer steps had non-finite gradients; stopping with the last "
                    f"good checkpoint in {self.ckpt.directory} intact"
                )
        else:
            self.bad_steps = 0

    def push_weights(self, it: int) -> dict:
        """Push the policy as the next version; every `train.verify_every` rollouts (and on the first) check the
        checksums of what the engines hold. A mismatch raises with the names of the tensors that differ."""
        self.version += 1
        report = self.sync.push(self.actor.params, self.version)
        out = {"sync/bytes": float(report.bytes), "sync/seconds": float(report.seconds)}
        every = self.cfg.train.verify_every
        if every and (it % every == 0):
            out["sync/verified_tensors"] = float(self.sync.verify(self.actor.params)["tensors"])
        return out

    def log(self, it, timer, exp, scores, stats, kl_mean, old_logp) -> dict:
        mask = exp.action_mask_BL
        n_tok = max(mask.sum(), 1.0)
        gen_tokens = float(exp.response_lengths.sum())
        m = {
            "reward/mean": float(np.mean([s.total for s in scores])),
            "reward/format": float(np.mean([s.format for s in scores])),
            "reward/accuracy": float(np.mean([s.accuracy for s in scores])),
            "reward/errors": float(sum(s.error is not None for s in scores)),
            "response/length": float(exp.response_lengths.mean()),
            "response/truncated": float(exp.finish_length_B.mean()),
            "kl/mean": kl_mean,
            "kl/coef": float(self.kl_ctl.value),
            "engine_gap/abs_logp_diff": float((np.abs(exp.rollout_logp_BL - old_logp) * mask).sum() / n_tok),
            "lr/actor": float(self.lr_actor(self.actor.step)),
            "policy_version": float(self.version),
            "skipped_steps": float(self.bad_steps),
            **stats,
            **timer.metrics(),
        }
        if "generate" in timer.seconds:
            m["throughput/generate_tokens_per_s"] = gen_tokens / max(timer.seconds["generate"], 1e-9)
        if "update" in timer.seconds:
            m["throughput/update_tokens_per_s"] = float(sum(map(len, exp.token_ids))) / max(timer.seconds["update"], 1e-9)
        self.logger.log(it, m)
        return m

    # ------------------------------------------------------------- checkpoints

    def state_arrays(self) -> dict:
        arrays = {"actor": {"params": self.actor.params, "opt": self.actor.opt_state}}
        if self.critic is not None:
            arrays["critic"] = {"params": self.critic.params, "opt": self.critic.opt_state}
        return arrays

    def save(self, iteration: int) -> None:
        meta = {
            "iteration": iteration, "version": self.version, "actor_step": self.actor.step,
            "critic_step": self.critic.step if self.critic else 0, "sampler": self.sampler.state_dict(),
            "rng": _jsonable(self.rng.bit_generator.state), "kl_coef": float(self.kl_ctl.value),
        }  # fmt: skip
        self.ckpt.save(iteration, self.state_arrays(), meta)

    def restore(self) -> None:
        arrays, meta, _ = self.ckpt.restore(self.state_arrays())
        self.actor = TrainState(arrays["actor"]["params"], arrays["actor"]["opt"], meta["actor_step"])
        if self.critic is not None:
            self.critic = TrainState(arrays["critic"]["params"], arrays["critic"]["opt"], meta["critic_step"])
        self.sampler.load_state_dict(meta["sampler"])
        self.rng.bit_generator.state = meta["rng"]
        self.kl_ctl.value = meta["kl_coef"]
        self.iteration, self.version = meta["iteration"], meta["version"]
        self.sync.push(self.actor.params, self.version)  # engines start from the checkpoint, not model.path
        self.sync.verify(self.actor.params)

    def evaluate(self, iteration: int) -> None:
        from .evaluate import evaluate_files

        evaluate_files(self.cfg, self.rollout, self.cfg.data.eval_files, step=iteration, logger=self.logger)

    def finish(self) -> None:
        if self.cfg.train.export_dir:
            export_hf(self.actor.params, self.model_cfg, self.cfg.model.path, self.cfg.train.export_dir)
        self.logger.close()
        self.ckpt.close()
        self.rollout.close()
        if hasattr(self.scorer, "close"):
            self.scorer.close()


def place_opt_state(strategy, tx, params) -> Any:
    """Optimizer state created directly in the strategy's layout (sharded for ZeRO, on host when offloaded)."""
    shardings = strategy.opt_shardings(jax.eval_shape(tx.init, params))
    return jax.jit(tx.init, out_shardings=shardings)(params)


def _jsonable(x: Any) -> Any:
    return json.loads(json.dumps(x, default=int))


def build_run(cfg: Config, resume: bool = False) -> Run:
    from bridge.sync import WeightSync
    from bridge.targets import ServiceTarget

    start_ray(cfg.ray)
    model_cfg, params = load_checkpoint(cfg.model.path)
    opts = ModelOptions(dtype=cfg.model.dtype, remat=cfg.model.remat, attention=cfg.model.attention)
    d = cfg.data
    datasets = [load_rows(f, max_rows=d.max_samples, input_key=d.input_key, label_key=d.label_key,
                          min_pixels=d.min_pixels, max_pixels=d.max_pixels) for f in d.train_files]  # fmt: skip
    sampler = PromptSampler(datasets, d.train_probs, seed=cfg.train.seed)
    r, t = cfg.rollout, cfg.train
    planned = derive(cfg, sampler.total)
    total_steps = max(planned["total_optimizer_steps"], 1)  # the schedule follows the plan, not an early stop
    total_rollouts = max(planned["total_rollouts"], 1)
    if t.max_rollouts is not None:
        total_rollouts = min(total_rollouts, t.max_rollouts)

    strategy = Strategy.from_config(cfg.sharding, model_cfg)
    if t.train_batch_size % (t.micro_train_batch_size * strategy.data_parallel_size):
        raise ValueError(f"train.train_batch_size {t.train_batch_size} does not divide into micro-batches of "
                         f"{t.micro_train_batch_size} x {strategy.data_parallel_size} data-parallel ranks")  # fmt: skip
    frozen = frozen_predicate(model_cfg, cfg.model.freeze_prefixes)
    params = strategy.place(params, strategy.param_shardings(params))
    tx_actor, lr_actor = make_optimizer(cfg.actor, total_steps, params, frozen)
    actor = TrainState(params, place_opt_state(strategy, tx_actor, params))
    critic, tx_critic = None, None
    if cfg.uses_critic:
        critic_params = load_checkpoint(cfg.model.critic_path)[1] if cfg.model.critic_path else params
        critic_params = {**critic_params, "value_head": init_value_head(jax.random.key(cfg.train.seed), model_cfg)}
        critic_params = strategy.place(critic_params, strategy.param_shardings(critic_params))
        tx_critic, _ = make_optimizer(cfg.critic, total_steps, critic_params, frozen)
        critic = TrainState(critic_params, place_opt_state(strategy, tx_critic, critic_params))

    rollout = spawn("rollout_torch.service:RolloutService", cfg.to_dict(), num_cpus=0)
    pad = rollout.token_info()["pad_token_id"]
    run = Run(
        cfg=cfg, model_cfg=model_cfg, learner=PPOLearner(model_cfg, opts, cfg.algo, pad, strategy=strategy),
        actor=actor,
        critic=critic, ref_params=params if cfg.uses_reference else None, tx_actor=tx_actor, tx_critic=tx_critic,
        lr_actor=lr_actor, sampler=sampler, rollout=rollout, sync=WeightSync(ServiceTarget(rollout, r.backend), model_cfg, dtype=r.dtype),
        scorer=make_scorer(cfg.reward), kl_ctl=make_kl_controller(cfg.algo),
        ckpt=Checkpointer(t.ckpt_dir, t.max_ckpts),
        logger=MetricsLogger(t.log_dir, t.wandb_project, cfg.name, cfg.to_dict()),
        rng=np.random.default_rng(t.seed), total_rollouts=total_rollouts,
    )  # fmt: skip
    if resume:
        if run.ckpt.latest_step() is None:
            raise FileNotFoundError(f"--load_checkpoint: no checkpoint in {run.ckpt.directory}")
        run.restore()
    elif run.ckpt.latest_step() is not None:
        raise FileExistsError(
            f"{run.ckpt.directory} holds checkpoints of an earlier run; resume with --load_checkpoint or choose "
            f"another train.ckpt_dir"
        )
    return run
