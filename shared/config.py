"""The typed run configuration: schema, YAML loading, dotted overrides, validation, derived quantities.

A config is the experiment record. Every field has the reference's default (OpenRLHF's `train_ppo_ray.py`
as used by LMM-R1) so that a stage's YAML only states what that stage changes.
"""
from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import yaml

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"

ADVANTAGE_ESTIMATORS = ("gae", "reinforce", "rloo", "reinforce_baseline", "group_norm", "dr_grpo")
GROUP_ESTIMATORS = ("rloo", "reinforce_baseline", "group_norm", "dr_grpo")
KL_ESTIMATORS = ("k1", "k2", "k3")
LOSS_AGGREGATIONS = ("seq_mean_token_mean", "token_mean", "global_token_mean")
WHITENING_RULES = ("reference", "on", "off", "center")
DTYPES = ("float32", "bfloat16")
ROLLOUT_BACKENDS = ("vllm", "transformers")
SHARDING_STRATEGIES = ("replicated", "zero1", "zero2", "zero3", "tensor")


class ConfigError(ValueError):
    """A config that cannot describe a valid run; the message names the key and what was expected."""


@dataclass
class LoraConfig:
    rank: int = 0  # 0 = full fine-tuning; > 0 trains low-rank adapters on `targets` and nothing else
    alpha: float = 16.0  # adapter output scaled by alpha / rank (PEFT's convention)
    dropout: float = 0.0
    # language_model | vision_tower | all-linear (both), or patterns over HF module names: a PEFT-style suffix
    # ("q_proj") or a glob over the names in the model's parameter table.
    targets: list[str] = field(default_factory=lambda: ["language_model"])


@dataclass
class ModelConfig:
    path: str = ""  # HF checkpoint directory of the policy (also the reference model)
    critic_path: Optional[str] = None  # critic initialisation; None = same as `path` with a fresh value head
    dtype: str = "bfloat16"  # compute dtype; parameters and optimizer state stay float32
    remat: bool = True  # rematerialise each decoder/vision block in the backward pass
    attention: str = "auto"  # softmax | dot_product | auto (dot_product on GPU/TPU, softmax on CPU)
    freeze_prefixes: list[str] = field(default_factory=list)  # HF-name prefixes kept fixed, e.g. ["visual"]
    lora: LoraConfig = field(default_factory=LoraConfig)


@dataclass
class DataConfig:
    train_files: list[str] = field(default_factory=list)
    train_probs: Optional[list[float]] = None  # mixing weights, one per file; None = proportional to size
    eval_files: list[str] = field(default_factory=list)
    input_key: str = "message"
    label_key: str = "answer"
    min_pixels: int = 4 * 28 * 28
    max_pixels: int = 16384 * 28 * 28
    prompt_max_len: int = 4096
    max_samples: int = 100000
    expected_num_prompts: Optional[int] = None  # size of the full data set, for planning before it is downloaded


@dataclass
class RolloutConfig:
    backend: str = "vllm"
    num_engines: int = 1
    tensor_parallel_size: int = 1
    n_samples_per_prompt: int = 16
    rollout_batch_size: int = 256  # prompts per rollout
    generate_max_len: int = 4096
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    dtype: str = "bfloat16"
    kv_cache_gib: float = 4.0  # CPU KV cache bound (vLLM's default takes most of the RAM)
    gpu_memory_utilization: float = 0.5
    enable_prefix_caching: bool = True
    enable_sleep: bool = False
    # CPU engines: compute threads of each (None: the machine's cores shared among the engines, since the learner
    # idles while they generate). Ray would otherwise pin an actor holding one CPU to one thread.
    cpu_threads_per_engine: Optional[int] = None
    # Where engines run: one Ray placement-group bundle per engine holding `engine_resources` (Ray resource names:
    # CPU, GPU, or custom ones such as a node label), packed onto few nodes or spread over many.
    placement: str = "pack"
    engine_resources: dict[str, float] = field(default_factory=lambda: {"CPU": 1.0})
    # How pushed weights travel: object_store (Ray's object store, any topology) or collective (a broadcast group
    # per engine: NCCL on GPUs, gloo on CPUs).
    weight_transport: str = "object_store"


@dataclass
class RewardConfig:
    fn: str = "lmmr1_math"  # registry name or `module:function`
    remote_url: Optional[str] = None  # use a reward server instead of in-process workers
    format_reward: bool = True
    num_workers: int = 16
    timeout_s: float = 10.0
    error_reward: float = 0.0  # reward on verifier error/time-out (paper-era code gave 1.0)


@dataclass
class AlgoConfig:
    advantage_estimator: str = "reinforce_baseline"
    gamma: float = 1.0
    lambd: float = 1.0
    init_kl_coef: float = 0.001
    kl_estimator: str = "k1"
    use_kl_loss: bool = False  # KL as a loss term instead of in the reward
    kl_target: Optional[float] = None  # set = adaptive KL controller
    kl_horizon: int = 10000
    reward_clip_range: list[float] = field(default_factory=lambda: [-10.0, 10.0])
    advantage_whitening: str = "reference"  # reference: all estimators but group_norm and dr_grpo (LMM-R1 head)
    eps_clip: float = 0.2
    eps_clip_high: Optional[float] = None  # asymmetric clip; None = eps_clip
    dual_clip: Optional[float] = None
    value_clip: float = 0.2
    entropy_coef: float = 0.0
    loss_agg: str = "global_token_mean"  # sound default; LMM-R1 head used token_mean per micro-batch
    tis_cap: Optional[float] = None  # truncated importance weight for engine/learner logprob gaps; None = off


@dataclass
class OptimConfig:
    lr: Optional[float] = None
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    weight_decay: float = 0.0
    max_norm: float = 1.0
    warmup_ratio: float = 0.03
    min_lr_ratio: float = 0.1


@dataclass
class TrainConfig:
    train_batch_size: int = 256  # samples per optimizer step
    micro_train_batch_size: int = 2  # per data-parallel rank; also the micro-batch of the logprob/value passes
    max_epochs: int = 1  # PPO epochs over one rollout
    num_episodes: int = 2  # passes over the prompt data
    save_steps: int = 20  # rollouts between checkpoints
    eval_steps: int = 0  # rollouts between evaluations; 0 = off
    max_ckpts: int = 3
    ckpt_dir: str = "checkpoints/{name}"
    log_dir: str = "runs/{name}"
    export_dir: Optional[str] = None  # HF export at the end of the run
    wandb_project: Optional[str] = None
    seed: int = 42
    max_bad_steps: int = 3  # consecutive non-finite steps before the run stops
    verify_every: int = 10  # rollouts between checksum checks of the engines' weights (and the first); 0 = off
    max_rollouts: Optional[int] = None  # stop early (smoke runs)


@dataclass
class ShardingConfig:
    strategy: str = "replicated"
    data: int = -1  # -1 = all devices not used by the other axes
    fsdp: int = 1
    tensor: int = 1
    offload_optimizer: bool = False


@dataclass
class LearnerConfig:
    # Learner processes, one Ray actor each (one per learner host on a cluster); > 1 joins them with
    # jax.distributed (process 0's actor is the coordinator) and builds one mesh over every process's devices.
    num_processes: int = 1
    num_gpus_per_process: float = 0.0
    num_cpus_per_process: float = 1.0
    resources_per_process: dict[str, float] = field(default_factory=dict)  # custom Ray resources, e.g. {TPU: 4}
    devices_per_process: Optional[int] = None  # CPU only: simulated devices per process (tests, CPU rehearsals)
    coordinator_timeout_s: float = 60.0  # a coordinator or peer that does not answer fails the start within this


@dataclass
class RayConfig:
    address: Optional[str] = None  # None = start a local Ray
    num_cpus: Optional[int] = None
    temp_dir: str = "/tmp/lmmrl_ray"
    connect_timeout_s: float = 60.0  # joining `address`, and waiting for the resources the config asks for


@dataclass
class Config:
    name: str = "unnamed"
    pipeline: str = "rl"  # rl: one RL run; demo: warm start, FRE then MGT, evaluated before and after each stage
    reproduces: str = ""
    expected_result: str = ""
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    reward: RewardConfig = field(default_factory=RewardConfig)
    algo: AlgoConfig = field(default_factory=AlgoConfig)
    actor: OptimConfig = field(default_factory=lambda: OptimConfig(lr=1e-6))
    critic: OptimConfig = field(default_factory=lambda: OptimConfig(lr=9e-6))
    train: TrainConfig = field(default_factory=TrainConfig)
    sharding: ShardingConfig = field(default_factory=ShardingConfig)
    learner: LearnerConfig = field(default_factory=LearnerConfig)
    ray: RayConfig = field(default_factory=RayConfig)

    @property
    def uses_critic(self) -> bool:
        return self.algo.advantage_estimator == "gae"

    @property
    def uses_reference(self) -> bool:
        return self.algo.init_kl_coef > 0

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# --------------------------------------------------------------------------- building from plain data


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check `value` against the annotation `tp`, converting only where YAML is ambiguous (1e-6 is a string)."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(value, inner[0], key)
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        key_tp, value_tp = typing.get_args(tp)
        return {_coerce(k, key_tp, f"{key} key"): _coerce(v, value_tp, f"{key}.{k}") for k, v in value.items()}
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        (item_tp,) = typing.get_args(tp)
        return [_coerce(v, item_tp, f"{key}[{i}]") for i, v in enumerate(value)]
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected true or false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{key}: expected a number, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{key}: expected a string, got {value!r}")
    raise ConfigError(f"{key}: unsupported type {tp}")  # a schema bug, not a user error


def _build(cls: type, data: dict, prefix: str) -> Any:
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix or 'config'}: expected a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = [k for k in data if k not in names]
    if unknown:
        where = f"{prefix}." if prefix else ""
        raise ConfigError(f"unknown key {where}{unknown[0]}; valid keys here: {', '.join(names)}")
    kwargs = {}
    for name, value in data.items():
        tp = hints[name]
        key = f"{prefix}.{name}" if prefix else name
        if dataclasses.is_dataclass(tp):
            base = dataclasses.asdict(getattr(cls(), name))
            base.update(value or {})
            kwargs[name] = _build(tp, base, key)
        else:
            kwargs[name] = _coerce(value, tp, key)
    return cls(**kwargs)


def _set_dotted(tree: dict, dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node = tree
    for p in parts[:-1]:
        node = node.setdefault(p, {})
        if not isinstance(node, dict):
            raise ConfigError(f"--set {dotted}: {p} is not a section")
    node[parts[-1]] = value


def parse_override(text: str) -> tuple[str, Any]:
    if "=" not in text:
        raise ConfigError(f"--set expects key=value (e.g. actor.lr=1e-6), got {text!r}")
    key, raw = text.split("=", 1)
    return key.strip(), yaml.safe_load(raw) if raw.strip() else ""


def resolve_path(name_or_path: str) -> Path:
    p = Path(name_or_path)
    if p.suffix in (".yaml", ".yml") or p.exists():
        if not p.exists():
            raise ConfigError(f"config file {p} does not exist")
        return p
    candidate = CONFIG_DIR / f"{name_or_path}.yaml"
    if not candidate.exists():
        known = sorted(x.stem for x in CONFIG_DIR.glob("*.yaml"))
        raise ConfigError(f"unknown config {name_or_path!r}; named configs: {', '.join(known)}")
    return candidate


def load_config(name_or_path: str, overrides: Optional[list[str]] = None) -> Config:
    path = resolve_path(name_or_path)
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from None
    raw.setdefault("name", path.stem)
    for text in overrides or []:
        key, value = parse_override(text)
        _set_dotted(raw, key, value)
    try:
        cfg = from_dict(raw)
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from None
    cfg.train.ckpt_dir = cfg.train.ckpt_dir.format(name=cfg.name)
    cfg.train.log_dir = cfg.train.log_dir.format(name=cfg.name)
    return cfg


def from_dict(raw: dict) -> Config:
    base = dataclasses.asdict(Config())
    for section, value in raw.items():
        if isinstance(base.get(section), dict) and isinstance(value, dict):
            base[section].update(value)
        else:
            base[section] = value
    cfg = _build(Config, base, "")
    validate(cfg)
    return cfg


# --------------------------------------------------------------------------- validation


def _choice(key: str, value: Any, choices: tuple) -> None:
    if value not in choices:
        raise ConfigError(f"{key}: {value!r} is not one of {', '.join(map(str, choices))}")


def validate(cfg: Config) -> None:
    a, r, t = cfg.algo, cfg.rollout, cfg.train
    _choice("algo.advantage_estimator", a.advantage_estimator, ADVANTAGE_ESTIMATORS)
    _choice("algo.kl_estimator", a.kl_estimator, KL_ESTIMATORS)
    _choice("algo.loss_agg", a.loss_agg, LOSS_AGGREGATIONS)
    _choice("algo.advantage_whitening", a.advantage_whitening, WHITENING_RULES)
    _choice("pipeline", cfg.pipeline, ("rl", "demo"))
    _choice("model.dtype", cfg.model.dtype, DTYPES)
    _choice("model.attention", cfg.model.attention, ("auto", "softmax", "dot_product"))
    _choice("rollout.dtype", r.dtype, DTYPES)
    _choice("rollout.backend", r.backend, ROLLOUT_BACKENDS)
    _choice("sharding.strategy", cfg.sharding.strategy, SHARDING_STRATEGIES)
    _choice("rollout.placement", r.placement, ("pack", "spread"))
    _choice("rollout.weight_transport", r.weight_transport, ("object_store", "collective"))
    if any(v < 0 for v in r.engine_resources.values()) or not any(v > 0 for v in r.engine_resources.values()):
        raise ConfigError(f"rollout.engine_resources: expected amounts >= 0, at least one > 0, got "
                          f"{r.engine_resources}")  # fmt: skip
    if cfg.learner.num_processes < 1:
        raise ConfigError(f"learner.num_processes: must be >= 1, got {cfg.learner.num_processes}")
    if cfg.learner.devices_per_process is not None and cfg.learner.devices_per_process < 1:
        raise ConfigError(f"learner.devices_per_process: must be >= 1, got {cfg.learner.devices_per_process}")

    positive = {
        "rollout.n_samples_per_prompt": r.n_samples_per_prompt,
        "rollout.rollout_batch_size": r.rollout_batch_size,
        "rollout.num_engines": r.num_engines,
        "rollout.generate_max_len": r.generate_max_len,
        "train.train_batch_size": t.train_batch_size,
        "train.micro_train_batch_size": t.micro_train_batch_size,
        "train.max_epochs": t.max_epochs,
        "train.num_episodes": t.num_episodes,
        "train.save_steps": t.save_steps,
        "data.prompt_max_len": cfg.data.prompt_max_len,
    }
    for key, value in positive.items():
        if value < 1:
            raise ConfigError(f"{key}: must be >= 1, got {value}")
    if cfg.actor.lr is None or cfg.actor.lr <= 0:
        raise ConfigError("actor.lr: a positive learning rate is required")
    if cfg.uses_critic and (cfg.critic.lr is None or cfg.critic.lr <= 0):
        raise ConfigError("critic.lr: advantage_estimator 'gae' trains a critic and needs a positive critic.lr")
    if a.advantage_estimator in GROUP_ESTIMATORS and r.n_samples_per_prompt < 2:
        raise ConfigError(
            f"rollout.n_samples_per_prompt: {a.advantage_estimator} needs groups of at least 2 samples, "
            f"got {r.n_samples_per_prompt}; use reinforce or gae for n=1"
        )
    responses = r.rollout_batch_size * r.n_samples_per_prompt
    if responses % t.train_batch_size:
        raise ConfigError(
            f"train.train_batch_size: {t.train_batch_size} does not divide the {responses} responses per rollout "
            f"(rollout.rollout_batch_size {r.rollout_batch_size} x rollout.n_samples_per_prompt {r.n_samples_per_prompt})"
        )
    if t.train_batch_size % t.micro_train_batch_size:
        raise ConfigError(
            f"train.micro_train_batch_size: {t.micro_train_batch_size} does not divide "
            f"train.train_batch_size {t.train_batch_size}"
        )
    if a.kl_target is not None and a.init_kl_coef <= 0:
        raise ConfigError("algo.kl_target: the adaptive KL controller needs algo.init_kl_coef > 0")
    if a.use_kl_loss and a.init_kl_coef <= 0:
        raise ConfigError("algo.use_kl_loss: a KL loss needs algo.init_kl_coef > 0 (it is the loss weight)")
    lo, hi = (a.reward_clip_range + [None, None])[:2]
    if len(a.reward_clip_range) != 2 or lo >= hi:
        raise ConfigError(f"algo.reward_clip_range: expected [low, high] with low < high, got {a.reward_clip_range}")
    if a.dual_clip is not None and a.dual_clip <= 1:
        raise ConfigError(f"algo.dual_clip: must be > 1, got {a.dual_clip}")
    if not (0 < a.gamma <= 1 and 0 <= a.lambd <= 1):
        raise ConfigError(f"algo.gamma/algo.lambd: expected 0 < gamma <= 1 and 0 <= lambd <= 1")
    if len(cfg.actor.betas) != 2:
        raise ConfigError(f"actor.betas: expected two numbers, got {cfg.actor.betas}")
    if cfg.data.train_probs is not None:
        if len(cfg.data.train_probs) != len(cfg.data.train_files):
            raise ConfigError(
                f"data.train_probs: {len(cfg.data.train_probs)} weights for {len(cfg.data.train_files)} train_files"
            )
        if any(p < 0 for p in cfg.data.train_probs) or sum(cfg.data.train_probs) <= 0:
            raise ConfigError(f"data.train_probs: weights must be >= 0 with a positive sum, got {cfg.data.train_probs}")
    if cfg.data.min_pixels > cfg.data.max_pixels:
        raise ConfigError("data.min_pixels: larger than data.max_pixels")
    s = cfg.sharding
    if s.fsdp < 1 or s.tensor < 1 or (s.data < 1 and s.data != -1):
        raise ConfigError("sharding.data/fsdp/tensor: axis sizes must be >= 1 (data may be -1 = the rest)")
    if s.strategy == "tensor" and s.tensor < 2:
        raise ConfigError("sharding.tensor: strategy 'tensor' needs sharding.tensor >= 2")
    if s.strategy == "zero3" and s.fsdp < 2:
        raise ConfigError("sharding.fsdp: strategy 'zero3' shards parameters over the fsdp axis; set sharding.fsdp >= 2")
    validate_lora(cfg)


def validate_lora(cfg: Config) -> None:
    """LoRA settings; targets are resolved against the checkpoint's config.json when it exists already (else at
    start-up, before any engine starts)."""
    lo = cfg.model.lora
    if lo.rank < 0:
        raise ConfigError(f"model.lora.rank: must be > 0 to train adapters (0 = full fine-tuning), got {lo.rank}")
    if lo.rank == 0:
        return
    if lo.alpha <= 0:
        raise ConfigError(f"model.lora.alpha: must be > 0, got {lo.alpha}")
    if lo.dropout != 0:
        raise ConfigError(f"model.lora.dropout: adapter dropout is not supported (RL recipes run without it); "
                          f"got {lo.dropout}, expected 0")  # fmt: skip
    if not lo.targets:
        raise ConfigError("model.lora.targets: name at least one group or module pattern, e.g. ['language_model']")
    if cfg.model.freeze_prefixes:
        raise ConfigError("model.freeze_prefixes: with LoRA only the adapters train already; drop freeze_prefixes "
                          "or narrow model.lora.targets")  # fmt: skip
    config_json = Path(cfg.model.path) / "config.json" if cfg.model.path else None
    if config_json is not None and config_json.is_file():
        from shared.models.qwen2_5_vl_config import Qwen25VLConfig
        from shared.models.qwen2_5_vl_params import lora_modules

        try:
            lora_modules(Qwen25VLConfig.from_hf(config_json), lo.targets)
        except ValueError as e:
            raise ConfigError(f"model.lora.targets: {e}") from None


# --------------------------------------------------------------------------- derived quantities


def derive(cfg: Config, num_prompts: Optional[int]) -> dict[str, Optional[int]]:
    """The schedule the run will follow, with the reference's counting (PPOTrainer.prepare_datasets).

    Totals are None when the data set size is unknown (files absent and data.expected_num_prompts unset).
    """
    r, t = cfg.rollout, cfg.train
    responses = r.rollout_batch_size * r.n_samples_per_prompt
    out: dict[str, Optional[int]] = {
        "num_prompts": None,
        "responses_per_rollout": responses,
        "optimizer_steps_per_rollout": responses // t.train_batch_size * t.max_epochs,
        "micro_batches_per_step": t.train_batch_size // t.micro_train_batch_size,
        "rollouts_per_episode": None,
        "total_rollouts": None,
        "total_optimizer_steps": None,
        "warmup_steps": None,
        "max_model_len": cfg.data.prompt_max_len + r.generate_max_len,
    }
    if num_prompts is None:
        return out
    n_prompts = min(num_prompts, cfg.data.max_samples)
    total_steps = (n_prompts * r.n_samples_per_prompt // t.train_batch_size) * t.max_epochs * t.num_episodes
    rollouts_per_episode = n_prompts // r.rollout_batch_size
    out.update(
        num_prompts=n_prompts,
        rollouts_per_episode=rollouts_per_episode,
        total_rollouts=rollouts_per_episode * t.num_episodes,
        total_optimizer_steps=total_steps,
        warmup_steps=math.ceil(cfg.actor.warmup_ratio * total_steps),
    )
    return out

