"""A run in two parts: `Run`, what is built once (compiled learner, engines, scorer, logger, checkpointer), and
`LoopState`, what the loop changes (actor, critic, optimizer states, policy version, iteration, sampler, KL
coefficient, RNG), which is exactly what a checkpoint holds. `trainer.train` drives both; tests drive the parts.

With several learner processes (`learner_jax.launch`) every process builds the same `Run` and `LoopState` and runs
the same compiled programs on one mesh over all their devices; only process 0 (`Run.leader`) holds the rollout
service, the scorer and the logger, and shares each rollout's samples and scores with the others (`Run.share`).
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np
import yaml

from shared.config import Config, derive
from shared.data import PromptRow, PromptSampler, load_options, load_rows_with_report, skip_metrics
from shared.models.qwen2_5_vl_params import name_table
from shared.rewards import is_timeout, make_scorer

from .adapters import fold, init_adapters, lora_spec
from .checkpoint import Checkpointer
from .experience import Experience, response_special_tokens
from .export import export_hf
from .guards import check_finite
from .learner import (ActorInputs, ActorScalars, CriticInputs, CriticScalars, Learner, RolloutBatches, TrainState,
                      group_permutation)  # fmt: skip
from .metrics import MetricsLogger, PhaseTimer
from .models.attention import resolve_attention
from .models.config import ModelOptions
from .models.hf_io import load_checkpoint
from .models.lora import LoraSpec, merge_lora
from .models.qwen2_5_vl import init_value_head
from .optim import make_optimizer
from .placement import spawn, start_ray
from .rl.kl import make_kl_controller
from .sharding import Strategy, broadcast_object, device_bytes, host_copy


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
class LoopState:
    """What the loop changes, and exactly what a checkpoint saves and restores."""

    actor: TrainState
    critic: Optional[TrainState]
    sampler: PromptSampler
    kl_ctl: Any
    rng: np.random.Generator
    version: int = 0
    iteration: int = 0
    bad_steps: int = 0

    def arrays(self) -> dict:
        out = {"actor": {"params": self.actor.params, "opt": self.actor.opt_state}}
        if self.critic is not None:
            out["critic"] = {"params": self.critic.params, "opt": self.critic.opt_state}
        return out

    def meta(self) -> dict:
        return {
            "iteration": self.iteration, "version": self.version, "bad_steps": self.bad_steps,
            "actor_step": self.actor.step, "critic_step": self.critic.step if self.critic else 0,
            "sampler": self.sampler.state_dict(), "rng": _jsonable(self.rng.bit_generator.state),
            "kl_coef": float(self.kl_ctl.value),
        }  # fmt: skip

    def load(self, arrays: dict, meta: dict) -> None:
        self.actor = TrainState(arrays["actor"]["params"], arrays["actor"]["opt"], meta["actor_step"])
        if self.critic is not None:
            self.critic = TrainState(arrays["critic"]["params"], arrays["critic"]["opt"], meta["critic_step"])
        self.sampler.load_state_dict(meta["sampler"])
        self.rng.bit_generator.state = meta["rng"]
        self.kl_ctl.value = meta["kl_coef"]
        self.iteration, self.version, self.bad_steps = meta["iteration"], meta["version"], meta.get("bad_steps", 0)


@dataclass
class Run:
    """What a run builds once: the compiled learner, the engines, the scorer, the logger, the checkpointer."""

    cfg: Config
    model_cfg: Any
    learner: Learner
    ref_params: Any
    lr_actor: Any
    rollout: Any  # proxy of rollout_torch.service.RolloutService in a Ray actor (None outside process 0)
    sync: Any
    scorer: Any  # None outside process 0
    ckpt: Checkpointer
    logger: Optional[MetricsLogger]  # None outside process 0
    total_rollouts: int
    lora: Optional[LoraSpec] = None
    leader: bool = True  # learner process 0: engines, rewards, metrics, evaluation, console
    data_skipped: dict = field(default_factory=dict)  # data/skipped_<reason>: rows the loader dropped

    def __post_init__(self) -> None:
        if self.lora is not None:
            scale = self.lora.scale
            base_shardings = self.learner.strategy.param_shardings(
                jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), self.learner.actor_step.frozen))
            self._fold = jax.jit(lambda base, ad: fold(merge_lora(base, ad), scale), out_shardings=base_shardings)

    # ------------------------------------------------------------- per-iteration helpers

    @property
    def micro_batch(self) -> int:
        """Samples per micro-batch across the mesh: the config's size is per data-parallel rank."""
        return self.cfg.train.micro_train_batch_size * self.learner.strategy.data_parallel_size

    @property
    def needs_old_pass(self) -> bool:
        """The first optimizer step uses its own log-probs as the old ones; a separate pass is needed only for
        KL in the reward or for later steps of the same rollout."""
        c = self.cfg
        steps = c.train.max_epochs * c.rollout.rollout_batch_size * c.rollout.n_samples_per_prompt
        return (c.uses_reference and not c.algo.use_kl_loss) or steps > c.train.train_batch_size

    def new_timer(self) -> PhaseTimer:
        return PhaseTimer()

    def sampling_seed(self, it: int) -> int:
        return (self.cfg.train.seed * 1_000_003 + it) % (1 << 31)

    def row_record(self, row: PromptRow, it: int, k: int) -> dict:
        return {"messages": row.messages, "label": row.label, "uid": it * self.cfg.rollout.rollout_batch_size + k}

    def share(self, *objs: Any) -> Any:
        """Process 0's objects (samples, vision inputs, scores) in every learner process; as given when alone."""
        return broadcast_object(objs if self.leader else None)

    def batches(self, exp: Experience) -> RolloutBatches:
        return RolloutBatches(exp, self.micro_batch, self.model_cfg, self.learner.pad_token_id, self.learner.strategy)

    def place_state(self, state: LoopState, memory_kind: str) -> None:
        """train.offload_between_phases: the actor's and critic's parameters and optimizer state to "pinned_host"
        memory while the colocated engines generate, and back to "device" for the learner's phases."""
        if not self.cfg.train.offload_between_phases:
            return

        def move(tree: Any) -> Any:
            return jax.tree.map(lambda x: jax.device_put(x, x.sharding.with_memory_kind(memory_kind)), tree)

        for name in ("actor", "critic"):
            ts = getattr(state, name)
            if ts is not None:
                setattr(state, name, TrainState(move(ts.params), move(ts.opt_state), ts.step))

    def passes(self, state: LoopState, batches: RolloutBatches, perm: np.ndarray) -> dict:
        """Old-policy, reference and critic passes on the partition the first update uses, [B, L] on device.
        The old and reference passes run one program, so their KL is exactly 0 before any update."""
        lr, mb, L = self.learner, batches.get(perm), batches.exp.action_mask_BL.shape[1]
        out = {"old_logp_BL": None, "ref_logp_BL": None, "values_BL": None}
        if self.needs_old_pass:
            out["old_logp_BL"] = lr.gather(lr.logprobs(self.policy(state), mb, L), perm)
        if self.cfg.uses_reference:
            out["ref_logp_BL"] = lr.gather(lr.logprobs(self.ref_params, mb, L), perm)
        if state.critic is not None:
            out["values_BL"] = lr.gather(lr.values(state.critic.params, mb, L), perm)
        return out

    def update(self, state: LoopState, batches: RolloutBatches, perm: np.ndarray, arrays: dict) -> dict:
        """Critic then actor PPO epochs; each optimizer step takes `train.train_batch_size` samples in
        micro-batches. `arrays` holds the rollout's per-sample arrays on the devices, in experience order."""
        t, lr, mb = self.cfg.train, self.learner, self.micro_batch
        exp = batches.exp
        per_step = t.train_batch_size // mb
        # global_token_mean losses are already divided by the step's tokens; the others average the micro-batches
        scale = 1.0 if self.cfg.algo.loss_agg == "global_token_mean" else 1.0 / per_step
        stats: dict[str, list[float]] = {}
        actor_x = {k: arrays[k] for k in ("mask_BL", "adv_BL", "rollout_logp_BL", "old_logp_BL", "ref_logp_BL")}
        first = True
        for epoch in range(t.max_epochs):
            order = perm if epoch == 0 else group_permutation(state.rng, exp.size, self.cfg.rollout.n_samples_per_prompt)
            model_in = batches.get(order)
            parts = batches.parts(order)
            tokens = [float(exp.action_mask_BL[idx].sum()) for idx in parts]
            if state.critic is not None:
                xs = lr.split({"mask_BL": arrays["mask_BL"], "old_values_BL": arrays["values_BL"],
                               "returns_BL": arrays["returns_BL"]}, order, mb)  # fmt: skip
                for k in range(0, len(parts), per_step):
                    n_tok = jnp.float32(max(sum(tokens[k:k + per_step]), 1.0))
                    micro = [(model_in[j], CriticInputs(**xs[j])) for j in range(k, k + per_step)]
                    c = state.critic
                    params, opt, m = lr.critic_step(c.params, c.opt_state, micro, CriticScalars(n_tok),
                                                    grad_scale=scale)  # fmt: skip
                    state.critic = TrainState(params, opt, c.step + (not m["skipped"]))
                    _record(stats, "critic/", m)
            xs = lr.split(actor_x, order, mb)
            for k in range(0, len(parts), per_step):
                n_tok = jnp.float32(max(sum(tokens[k:k + per_step]), 1.0))
                scalars = ActorScalars(n_tok, jnp.float32(state.kl_ctl.value), jnp.bool_(first))
                micro = [(model_in[j], ActorInputs(**xs[j])) for j in range(k, k + per_step)]
                a = state.actor
                params, opt, m = lr.actor_step(a.params, a.opt_state, micro, scalars, grad_scale=scale)
                state.actor = TrainState(params, opt, a.step + (not m["skipped"]))
                first = False
                _record(stats, "actor/", m)
                self._check_finite(state, m)
        return {k: float(np.mean(v)) for k, v in stats.items()}

    def _check_finite(self, state: LoopState, m: dict) -> None:
        if m.get("skipped"):
            state.bad_steps += 1
            if state.bad_steps >= self.cfg.train.max_bad_steps:
                raise FloatingPointError(
                    f"{state.bad_steps} consecutive optimizer steps had non-finite gradients; stopping with the last "
                    f"good checkpoint in {self.ckpt.directory} intact"
                )
        else:
            state.bad_steps = 0

    def policy(self, state: LoopState) -> Any:
        """The actor's whole params tree: with LoRA the frozen base and the trained adapters together."""
        return merge_lora(self.learner.actor_step.frozen, state.actor.params)

    def policy_weights(self, state: LoopState) -> Any:
        """What engines and exports receive: with LoRA the adapters folded into the base kernels (on device)."""
        if self.lora is None:
            return state.actor.params
        return self._fold(self.learner.actor_step.frozen, state.actor.params)

    def push_weights(self, state: LoopState, it: int) -> dict:
        """Push the policy as the next version; every `train.verify_every` rollouts (and on the first) check the
        checksums of what the engines hold. A mismatch raises with the names of the tensors that differ."""
        weights = self.policy_weights(state)
        check_finite(weights, f"the policy weights of version {state.version + 1} (iteration {it})")
        state.version += 1
        report = self.sync.push(weights, state.version)
        out = {"sync/bytes": float(report.bytes), "sync/seconds": float(report.seconds)}
        if self.rollout is not None:  # process 0; the push, queued behind any generation, has returned: idle now
            out["rollout/engine_restarts"] = float(self.rollout.pool_call("engine_restarts"))
        every = self.cfg.train.verify_every
        if every and (it % every == 0):
            out["sync/verified_tensors"] = float(self.sync.verify(weights)["tensors"])
        return out

    def log(self, state: LoopState, it, timer, exp, scores, stats, kl_mean) -> dict:
        m = {
            "reward/mean": float(np.mean([s.total for s in scores])),
            "reward/format": float(np.mean([s.format for s in scores])),
            "reward/accuracy": float(np.mean([s.accuracy for s in scores])),
            "reward/errors": float(sum(s.error is not None for s in scores)),  # timeouts included
            "reward/timeouts": float(sum(map(is_timeout, scores))),
            "response/length": float(exp.response_lengths.mean()),
            "prompt/length": float(np.mean([len(t) for t in exp.token_ids]) - exp.response_lengths.mean()),
            "response/truncated": float(exp.finish_length_B.mean()),
            # sampled special/vision tokens: text to the learner, as to the engine (the first added id is the pad)
            "response/special_tokens": float(response_special_tokens(exp, self.learner.pad_token_id)),
            "kl/mean": kl_mean,
            "kl/coef": float(state.kl_ctl.value),
            "engine_gap/abs_logp_diff": stats.pop("actor/engine_gap", 0.0),
            "lr/actor": float(self.lr_actor(state.actor.step)),
            "policy_version": float(state.version),
            "skipped_steps": float(state.bad_steps),
            **{f"memory/{k}_bytes_per_device": float(v) for k, v in self.memory(state).items()},
            **self.data_skipped,
            **stats,
            **timer.metrics(),
        }
        if "generate" in timer.seconds:
            m["throughput/generate_tokens_per_s"] = float(exp.response_lengths.sum()) / max(timer.seconds["generate"], 1e-9)
        if "update" in timer.seconds:
            m["throughput/update_tokens_per_s"] = float(sum(map(len, exp.token_ids))) / max(timer.seconds["update"], 1e-9)
        if self.logger is not None:
            self.logger.log(it, m)
        return m

    def memory(self, state: LoopState) -> dict[str, int]:
        """Per-device bytes of the actor's parameters, gradient accumulator and optimizer state, measured on the
        arrays the loop holds (the memory planner's figures are checked against these)."""
        return {"params": sum(device_bytes(self.policy(state)).values()),
                "grads": sum(self.learner.actor_step.grad_bytes.values()),
                "opt_state": sum(device_bytes(state.actor.opt_state).values())}  # fmt: skip

    # ------------------------------------------------------------- checkpoints

    def save(self, state: LoopState) -> None:
        arrays = state.arrays()
        check_finite(arrays, f"the checkpoint of iteration {state.iteration} (parameters and optimizer state)")
        self.ckpt.save(state.iteration, arrays, {**state.meta(), "config": self.cfg.to_dict()})

    def restore(self, state: LoopState, select: Any = None) -> None:
        arrays, meta, _ = self.ckpt.restore(state.arrays(), select=select)
        state.load(arrays, meta)
        weights = self.policy_weights(state)
        self.sync.push(weights, state.version)  # engines start from the checkpoint, not model.path
        self.sync.verify(weights)

    def evaluate(self, iteration: int) -> None:
        if not self.leader:  # engines only: no learner program runs, the other processes go on
            return
        from .evaluate import evaluate_files

        results = evaluate_files(self.cfg, self.rollout, self.cfg.data.eval_files, step=iteration, logger=self.logger)
        if self.logger is not None:
            self.logger.eval_summary(iteration, results)

    def finish(self, state: LoopState) -> None:
        if self.cfg.train.export_dir:
            weights, adapters = self.policy_weights(state), state.actor.params if self.lora else None
            if jax.process_count() > 1:  # params spread over processes: every process gathers, process 0 writes
                weights, adapters = host_copy((weights, adapters))
            if self.leader:
                export_hf(weights, self.model_cfg, self.cfg.model.path, self.cfg.train.export_dir, adapters=adapters,
                          lora=self.lora, dtype=self.cfg.train.export_dtype)  # fmt: skip
        if self.logger is not None:
            self.logger.close()
        self.ckpt.close()
        if self.sync is not None:
            self.sync.close()  # the collective route's sender actor
        if self.rollout is not None:
            self.rollout.close()
        if hasattr(self.scorer, "close"):
            self.scorer.close()


def _copy(tree: Any) -> Any:
    return jax.tree.map(jnp.copy, tree)


def _record(stats: dict[str, list[float]], prefix: str, m: dict) -> None:
    for k, v in m.items():
        stats.setdefault(prefix + k, []).append(v)


def _jsonable(x: Any) -> Any:
    return json.loads(json.dumps(x, default=int))


def build_run(cfg: Config, resume: bool = False) -> tuple[Run, LoopState]:
    from bridge.sync import WeightSync
    from bridge.targets import ServiceTarget

    start_ray(cfg.ray)  # joins the session when called inside a learner actor
    leader = jax.process_index() == 0
    model_cfg, params = load_checkpoint(cfg.model.path)
    # "auto" is resolved here, where the mesh's tensor axis is known (cuDNN wants q, k, v sharded alike).
    attention = resolve_attention(cfg.model.attention, cfg.model.dtype,
                                  (model_cfg.text.head_dim, model_cfg.vision.head_dim),
                                  num_kv_heads=model_cfg.text.num_kv_heads, tensor=cfg.sharding.tensor)  # fmt: skip
    opts = ModelOptions(dtype=cfg.model.dtype, remat=cfg.model.remat, attention=attention)
    d = cfg.data
    loaded = [load_rows_with_report(f, max_rows=d.max_samples, **load_options(cfg)) for f in d.train_files]
    datasets = [rows for rows, _ in loaded]
    for _, report in loaded:
        if leader and any(report.skipped.values()):  # data.on_bad_row: skip; counted in data/skipped_* too
            print(report.summary(), flush=True)
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
    lora = lora_spec(cfg.model.lora, model_cfg)
    base = None
    if lora is not None:  # the actor trains adapters only; the base is shared with the reference
        base = params
        adapters = init_adapters(model_cfg, lora, jax.random.key(t.seed))
        params = strategy.place(adapters, strategy.param_shardings(adapters))
    tx_actor, lr_actor = make_optimizer(cfg.actor, total_steps, params, frozen)
    critic_params, tx_critic = None, None
    if cfg.uses_critic:
        # A copy: the steps donate their parameters, so actor, critic and reference never share a buffer.
        critic_params = (load_checkpoint(cfg.model.critic_path)[1] if cfg.model.critic_path
                         else _copy(params if base is None else base))  # fmt: skip
        critic_params = {**critic_params, "value_head": init_value_head(jax.random.key(cfg.train.seed), model_cfg)}
        critic_params = strategy.place(critic_params, strategy.param_shardings(critic_params))
        tx_critic, _ = make_optimizer(cfg.critic, total_steps, critic_params, frozen)

    rollout = spawn("rollout_torch.service:RolloutService", cfg.to_dict(), num_cpus=0) if leader else None
    pad = broadcast_object(rollout.token_info()["pad_token_id"] if leader else None)
    learner = Learner(model_cfg, opts, cfg.algo, strategy, pad, r.n_samples_per_prompt, tx_actor, params,
                      tx_critic, critic_params, actor_frozen=base, lora=lora)  # fmt: skip
    actor = TrainState(params, learner.actor_step.init_opt_state(params))
    critic = None
    if critic_params is not None:
        critic = TrainState(critic_params, learner.critic_step.init_opt_state(critic_params))
    run = Run(
        cfg=cfg, model_cfg=model_cfg, learner=learner,
        ref_params=(_copy(params) if base is None else base) if cfg.uses_reference else None,
        lr_actor=lr_actor, rollout=rollout,
        sync=(WeightSync(ServiceTarget(rollout, r.backend), model_cfg, dtype=r.dtype, transport=r.weight_transport)
              if leader
              else WeightSync(None, model_cfg, dtype=r.dtype, sender=False)),
        scorer=make_scorer(cfg.reward) if leader else None, ckpt=Checkpointer(t.ckpt_dir, t.max_ckpts),
        logger=MetricsLogger(t.log_dir, t.wandb_project, cfg.name, cfg.to_dict()) if leader else None,
        total_rollouts=total_rollouts, lora=lora, leader=leader, data_skipped=skip_metrics(r for _, r in loaded),
    )  # fmt: skip
    if leader:
        (run.logger.dir / "config.yaml").write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))  # as resolved
    state = LoopState(actor=actor, critic=critic, sampler=sampler, kl_ctl=make_kl_controller(cfg.algo),
                      rng=np.random.default_rng(t.seed))  # fmt: skip
    if resume:
        if run.ckpt.latest_step() is None:
            raise FileNotFoundError(f"--load_checkpoint: no checkpoint in {run.ckpt.directory}")
        run.restore(state, resume)  # True/"latest", "latest_intact" or a step
    elif run.ckpt.latest_step() is not None:
        raise FileExistsError(
            f"{run.ckpt.directory} holds checkpoints of an earlier run; resume with --load_checkpoint or choose "
            f"another train.ckpt_dir"
        )
    return run, state
