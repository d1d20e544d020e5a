"""The typed run configuration: schema, YAML loading, dotted overrides, validation, derived quantities.

A config is the experiment record. Every field has the reference's default (OpenRLHF's `train_ppo_ray.py`
as used by LMM-R1) so that a stage's YAML only states what that stage changes.
"""
from __future__ import annotations

import dataclasses
import math
import os
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
    attention: str = "auto"  # softmax | dot_product | cudnn | auto (CPU softmax, CUDA bf16 cudnn, else dot_product)
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
    # A row that cannot be used (unparsable gold, unreadable image, prompt over prompt_max_len): "error" stops at
    # load naming file and row; "skip" drops it and counts it (data/skipped_* in the metrics).
    on_bad_row: str = "error"


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
    # Asynchronous rollouts: the engines generate up to `max_staleness` iterations ahead of the learner, from
    # weights at most that many versions old (0 = on-policy: each rollout from the latest push).
    max_staleness: int = 0
    # Engines on the learner's devices: each iteration they sleep (free the KV cache; level 1 also offloads the
    # weights to host, level 2 discards them) before the learner's phases and wake before the push (vLLM's
    # enable_sleep_mode on GPU; on CPU sleeping frees nothing).
    colocate: bool = False
    sleep_level: int = 1
    # CPU engines: compute threads of each (None: the machine's cores shared among the engines, since the learner
    # idles while they generate). Ray would otherwise pin an actor holding one CPU to one thread.
    cpu_threads_per_engine: Optional[int] = None
    # CPU engines: the cores their processes are pinned to (empty: no pinning), e.g. [0] to keep them off the
    # learner's cores so that generation and learning overlap (rollout.max_staleness > 0).
    cpu_affinity: list[int] = field(default_factory=list)
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
    remote_batch_size: int = 256  # samples per request to the reward server, far below its body size limit
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
    # How samples from the engines' policy (stale under rollout.max_staleness, or another precision) are corrected:
    # "tis" weights each token's loss by min(pi_old/pi_engine, tis_cap) when a cap is set; "decoupled" always
    # weights it by pi_old/pi_engine (decoupled PPO: clip around the learner's own old policy), capped if set.
    off_policy_correction: str = "tis"


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
    log_samples: int = 4  # prompts per rollout whose responses go to samples.jsonl, TensorBoard, wandb; 0 = off
    export_dtype: str = "auto"  # dtype of the HF export: auto (the source checkpoint's) | float32 | bfloat16 | float16
    seed: int = 42
    max_bad_steps: int = 3  # consecutive non-finite steps before the run stops
    verify_every: int = 10  # rollouts between checksum checks of the engines' weights (and the first); 0 = off
    # Colocated runs: the policy's (and critic's) parameters and optimizer state wait in host memory while the
    # engines generate, and return to the devices for the learner's phases.
    offload_between_phases: bool = False
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
    # CPU collectives: "auto" = XLA's in-process ones for one process, gloo across processes. "gloo" joins a JAX
    # runtime even for one process, so its sums run in the same order as an N-process run's and agree bit for bit.
    cpu_collectives: str = "auto"
    # JAX's pool on each GPU a learner process sees, as a fraction of the device's total memory
    # (XLA_CLIENT_MEM_FRACTION); None = JAX's default, 0.75. Set while the learner reserves no GPU, it makes the
    # learner share the GPUs Ray gives the engines (colocated, docs/cluster.md §1): see `shares_gpus`.
    gpu_memory_fraction: Optional[float] = None
    # False: JAX takes GPU memory as it needs it, up to the fraction (XLA_PYTHON_CLIENT_PREALLOCATE=false); True:
    # JAX's default, the whole fraction at start-up.
    gpu_preallocate: bool = True

    @property
    def shares_gpus(self) -> bool:
        """Colocated: the learner reserves no GPU (nor TPU) but sets gpu_memory_fraction, so it computes on the
        GPUs of its node that Ray gives the engines (`rollout.engine_resources` must name GPU)."""
        return (self.gpu_memory_fraction is not None and self.num_gpus_per_process == 0
                and self.resources_per_process.get("TPU", 0) <= 0)  # fmt: skip

    @property
    def platform(self) -> str:
        """Where the learner computes, as the config fixes it: "tpu" when it reserves TPU, "gpu" when it reserves
        GPUs or shares the engines' (`shares_gpus`), else "cpu". `learner_jax.launch.process_env` pins each learner
        process's JAX to it, and the collective weight route is NCCL exactly when it is "gpu"."""
        if self.resources_per_process.get("TPU", 0) > 0:
            return "tpu"
        return "gpu" if self.num_gpus_per_process > 0 or self.shares_gpus else "cpu"


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
            if value is not None and not isinstance(value, dict):
                raise ConfigError(f"{key}: expected a mapping of {tp.__name__} settings, got {value!r}")
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
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping of sections (model:, data:, ...), got {raw!r:.100}")
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


def _count(key: str, value: Optional[int], low: int = 1) -> None:
    """An integer setting >= low; None (where the schema allows it) means unset."""
    if value is not None and value < low:
        raise ConfigError(f"{key}: must be >= {low}, got {value}")


def _number(key: str, value: Optional[float], low: float = -math.inf, high: float = math.inf,
            open_low: bool = False, open_high: bool = False) -> None:  # fmt: skip
    """A finite float within [low, high] (a bound excluded where open); None means unset. NaN fails every
    comparison, so each check is written to pass only for good values."""
    if value is None:
        return
    above = value > low if open_low else value >= low
    below = value < high if open_high else value <= high
    if not (math.isfinite(value) and above and below):
        raise ConfigError(f"{key}: must be {_describe(low, high, open_low, open_high)}, got {value!r}")


def _describe(low: float, high: float, open_low: bool, open_high: bool) -> str:
    if math.isfinite(low) and math.isfinite(high):
        return f"in {'(' if open_low else '['}{low:g}, {high:g}{')' if open_high else ']'}"
    if math.isfinite(low):
        return f"a finite number {'>' if open_low else '>='} {low:g}"
    return "a finite number"


def _words(key: str, values: list[str]) -> None:
    if any(not v.strip() for v in values):
        raise ConfigError(f"{key}: must be non-empty strings, got {values!r}")


def _resources(key: str, amounts: dict[str, float]) -> None:
    for name, amount in amounts.items():
        _number(f"{key}.{name}", amount, 0.0)


def validate(cfg: Config) -> None:
    _validate_choices(cfg)
    _validate_model(cfg.model)
    _validate_data(cfg.data)
    _validate_rollout(cfg.rollout)
    _validate_reward(cfg.reward)
    _validate_algo(cfg.algo, cfg.rollout)
    _validate_optim("actor", cfg.actor)
    if cfg.uses_critic:
        if cfg.critic.lr is None:
            raise ConfigError("critic.lr: advantage_estimator 'gae' trains a critic and needs a positive critic.lr")
        _validate_optim("critic", cfg.critic)
    _validate_train(cfg)
    _validate_sharding(cfg.sharding)
    _validate_cluster(cfg.learner, cfg.ray)
    _validate_gpu_memory(cfg.learner, cfg.rollout)
    validate_lora(cfg)


def _validate_choices(cfg: Config) -> None:
    a, r = cfg.algo, cfg.rollout
    _choice("algo.advantage_estimator", a.advantage_estimator, ADVANTAGE_ESTIMATORS)
    _choice("algo.kl_estimator", a.kl_estimator, KL_ESTIMATORS)
    _choice("algo.loss_agg", a.loss_agg, LOSS_AGGREGATIONS)
    _choice("algo.advantage_whitening", a.advantage_whitening, WHITENING_RULES)
    _choice("pipeline", cfg.pipeline, ("rl", "demo"))
    _choice("model.dtype", cfg.model.dtype, DTYPES)
    _choice("model.attention", cfg.model.attention, ("auto", "softmax", "dot_product", "cudnn"))
    _choice("rollout.dtype", r.dtype, DTYPES)
    _choice("rollout.backend", r.backend, ROLLOUT_BACKENDS)
    _choice("sharding.strategy", cfg.sharding.strategy, SHARDING_STRATEGIES)
    _choice("rollout.placement", r.placement, ("pack", "spread"))
    _choice("rollout.weight_transport", r.weight_transport, ("object_store", "collective"))
    _choice("learner.cpu_collectives", cfg.learner.cpu_collectives, ("auto", "gloo"))
    _choice("data.on_bad_row", cfg.data.on_bad_row, ("error", "skip"))
    _choice("algo.off_policy_correction", a.off_policy_correction, ("tis", "decoupled"))
    _choice("rollout.sleep_level", r.sleep_level, (1, 2))


def _validate_model(m: ModelConfig) -> None:
    _words("model.freeze_prefixes", m.freeze_prefixes)  # an empty prefix would freeze every parameter
    _number("model.lora.alpha", m.lora.alpha, 0.0, open_low=True)
    _number("model.lora.dropout", m.lora.dropout, 0.0, 1.0, open_high=True)


def _validate_data(d: DataConfig) -> None:
    _words("data.input_key/label_key", [d.input_key, d.label_key])
    for key, value in {"data.prompt_max_len": d.prompt_max_len, "data.max_samples": d.max_samples,
                       "data.min_pixels": d.min_pixels, "data.max_pixels": d.max_pixels,
                       "data.expected_num_prompts": d.expected_num_prompts}.items():  # fmt: skip
        _count(key, value)
    if d.min_pixels > d.max_pixels:
        raise ConfigError("data.min_pixels: larger than data.max_pixels")
    if d.train_probs is not None:
        if len(d.train_probs) != len(d.train_files):
            raise ConfigError(f"data.train_probs: {len(d.train_probs)} weights for {len(d.train_files)} train_files")
        if not all(math.isfinite(p) and p >= 0 for p in d.train_probs) or sum(d.train_probs) <= 0:
            raise ConfigError(f"data.train_probs: weights must be finite and >= 0 with a positive sum, got "
                              f"{d.train_probs}")  # fmt: skip


def _validate_rollout(r: RolloutConfig) -> None:
    for key, value in {"rollout.n_samples_per_prompt": r.n_samples_per_prompt,
                       "rollout.rollout_batch_size": r.rollout_batch_size, "rollout.num_engines": r.num_engines,
                       "rollout.tensor_parallel_size": r.tensor_parallel_size,
                       "rollout.generate_max_len": r.generate_max_len,
                       "rollout.cpu_threads_per_engine": r.cpu_threads_per_engine}.items():  # fmt: skip
        _count(key, value)
    _number("rollout.temperature", r.temperature, 0.0)
    _number("rollout.top_p", r.top_p, 0.0, 1.0, open_low=True)
    if r.top_k != -1 and r.top_k < 1:
        raise ConfigError(f"rollout.top_k: must be -1 (off) or >= 1, got {r.top_k}")
    _number("rollout.kv_cache_gib", r.kv_cache_gib, 0.0, open_low=True)
    _count("rollout.max_staleness", r.max_staleness, 0)
    cores = os.cpu_count() or 1
    if any(not isinstance(c, int) or not 0 <= c < cores for c in r.cpu_affinity):
        raise ConfigError(f"rollout.cpu_affinity: expected core numbers in [0, {cores}), got {r.cpu_affinity}")
    if r.colocate and r.max_staleness > 0:
        raise ConfigError(f"rollout.colocate: colocated engines sleep while the learner works, so they cannot generate "
                          f"ahead of it; set rollout.max_staleness to 0 (got {r.max_staleness})")  # fmt: skip
    _number("rollout.gpu_memory_utilization", r.gpu_memory_utilization, 0.0, 1.0, open_low=True)
    _resources("rollout.engine_resources", r.engine_resources)
    if not any(v > 0 for v in r.engine_resources.values()):
        raise ConfigError(f"rollout.engine_resources: expected amounts >= 0, at least one > 0, got "
                          f"{r.engine_resources}")  # fmt: skip


def _validate_reward(rw: RewardConfig) -> None:
    """The scorer's settings, and the reward function or server address resolved now rather than after the model
    has loaded (imported lazily: the reward package pulls in math-verify)."""
    _count("reward.num_workers", rw.num_workers)
    _count("reward.remote_batch_size", rw.remote_batch_size)
    _number("reward.timeout_s", rw.timeout_s, 0.0, open_low=True)
    _number("reward.error_reward", rw.error_reward)
    if rw.remote_url is not None:
        from shared.rewards.client import endpoint

        try:
            endpoint(rw.remote_url)
        except ValueError as e:
            raise ConfigError(f"reward.remote_url: {e}") from None
        return
    from shared.rewards import get_reward_fn

    try:
        get_reward_fn(rw.fn, rw.format_reward)
    except ValueError as e:
        raise ConfigError(f"reward.fn: {e}") from None


def _validate_algo(a: AlgoConfig, r: RolloutConfig) -> None:
    if a.advantage_estimator in GROUP_ESTIMATORS and r.n_samples_per_prompt < 2:
        raise ConfigError(
            f"rollout.n_samples_per_prompt: {a.advantage_estimator} needs groups of at least 2 samples, "
            f"got {r.n_samples_per_prompt}; use reinforce or gae for n=1"
        )
    _number("algo.gamma", a.gamma, 0.0, 1.0, open_low=True)
    _number("algo.lambd", a.lambd, 0.0, 1.0)
    _number("algo.init_kl_coef", a.init_kl_coef, 0.0)
    _number("algo.kl_target", a.kl_target, 0.0, open_low=True)
    _count("algo.kl_horizon", a.kl_horizon)
    if a.kl_target is not None and a.init_kl_coef <= 0:
        raise ConfigError("algo.kl_target: the adaptive KL controller needs algo.init_kl_coef > 0")
    if a.use_kl_loss and a.init_kl_coef <= 0:
        raise ConfigError("algo.use_kl_loss: a KL loss needs algo.init_kl_coef > 0 (it is the loss weight)")
    clip = a.reward_clip_range
    if len(clip) != 2 or not all(map(math.isfinite, clip)) or clip[0] >= clip[1]:
        raise ConfigError(f"algo.reward_clip_range: expected [low, high] with low < high, got {clip}")
    _number("algo.eps_clip", a.eps_clip, 0.0, open_low=True)
    _number("algo.eps_clip_high", a.eps_clip_high, 0.0, open_low=True)
    _number("algo.dual_clip", a.dual_clip, 1.0, open_low=True)
    _number("algo.value_clip", a.value_clip, 0.0, open_low=True)
    _number("algo.entropy_coef", a.entropy_coef, 0.0)
    _number("algo.tis_cap", a.tis_cap, 0.0, open_low=True)
    if r.max_staleness > 0 and a.off_policy_correction == "tis" and a.tis_cap is None:
        raise ConfigError(f"algo.tis_cap: rollout.max_staleness {r.max_staleness} trains on samples of older policies, "
                          f"which off_policy_correction 'tis' corrects only with a cap (e.g. algo.tis_cap=2.0); "
                          f"or set algo.off_policy_correction=decoupled")  # fmt: skip


def _validate_optim(name: str, o: OptimConfig) -> None:
    if o.lr is None:
        raise ConfigError(f"{name}.lr: a positive learning rate is required")
    _number(f"{name}.lr", o.lr, 0.0, open_low=True)
    if len(o.betas) != 2:
        raise ConfigError(f"{name}.betas: expected two numbers, got {o.betas}")
    for i, beta in enumerate(o.betas):
        _number(f"{name}.betas[{i}]", beta, 0.0, 1.0, open_high=True)
    _number(f"{name}.weight_decay", o.weight_decay, 0.0)
    _number(f"{name}.max_norm", o.max_norm, 0.0, open_low=True)
    _number(f"{name}.warmup_ratio", o.warmup_ratio, 0.0, 1.0)
    _number(f"{name}.min_lr_ratio", o.min_lr_ratio, 0.0, 1.0)


def _validate_train(cfg: Config) -> None:
    """Counts, and the batch arithmetic. eval_steps and verify_every are rollouts between evaluations / weight
    checksum checks, 0 = off; max_ckpts counts checkpoints kept, so 0 would delete each one as it is written."""
    r, t = cfg.rollout, cfg.train
    if t.offload_between_phases and not r.colocate:
        raise ConfigError("train.offload_between_phases: frees the devices for engines that share them; it needs "
                          "rollout.colocate: true")
    for key, value in {"train.train_batch_size": t.train_batch_size,
                       "train.micro_train_batch_size": t.micro_train_batch_size, "train.max_epochs": t.max_epochs,
                       "train.num_episodes": t.num_episodes, "train.save_steps": t.save_steps,
                       "train.max_ckpts": t.max_ckpts, "train.max_bad_steps": t.max_bad_steps,
                       "train.max_rollouts": t.max_rollouts}.items():  # fmt: skip
        _count(key, value)
    for key, value in {"train.eval_steps": t.eval_steps, "train.verify_every": t.verify_every,
                       "train.seed": t.seed, "train.log_samples": t.log_samples}.items():  # fmt: skip
        _count(key, value, 0)
    _choice("train.export_dtype", t.export_dtype, ("auto", "float32", "bfloat16", "float16"))
    for key, template in {"train.ckpt_dir": t.ckpt_dir, "train.log_dir": t.log_dir}.items():
        try:
            ok = bool(template.format(name=cfg.name).strip())
        except (KeyError, IndexError, ValueError):
            ok = False
        if not ok:
            raise ConfigError(f"{key}: must be a non-empty path with at most a {{name}} field, got {template!r}")
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


def _validate_sharding(s: ShardingConfig) -> None:
    if s.fsdp < 1 or s.tensor < 1 or (s.data < 1 and s.data != -1):
        raise ConfigError("sharding.data/fsdp/tensor: axis sizes must be >= 1 (data may be -1 = the rest)")
    if s.strategy == "tensor" and s.tensor < 2:
        raise ConfigError("sharding.tensor: strategy 'tensor' needs sharding.tensor >= 2")
    if s.strategy == "zero3" and s.fsdp < 2:
        raise ConfigError("sharding.fsdp: strategy 'zero3' shards parameters over the fsdp axis; set sharding.fsdp >= 2")


def _validate_cluster(lc: LearnerConfig, ray: RayConfig) -> None:
    _count("learner.num_processes", lc.num_processes)
    _count("learner.devices_per_process", lc.devices_per_process)
    _number("learner.num_gpus_per_process", lc.num_gpus_per_process, 0.0)
    _number("learner.num_cpus_per_process", lc.num_cpus_per_process, 0.0)
    _resources("learner.resources_per_process", lc.resources_per_process)
    _number("learner.coordinator_timeout_s", lc.coordinator_timeout_s, 0.0, open_low=True)
    _count("ray.num_cpus", ray.num_cpus, 0)
    _number("ray.connect_timeout_s", ray.connect_timeout_s, 0.0, open_low=True)
    _words("ray.temp_dir", [ray.temp_dir])


# A GPU shared by the learner and an engine also holds, outside JAX's pool and the engine's budget, one CUDA context
# per process (~0.3-0.6 GiB each) and the NCCL buffers: 5% of the device (4 GiB of 80) is left for them.
COLOCATED_GPU_BUDGET = 0.95


def _validate_gpu_memory(lc: LearnerConfig, r: RolloutConfig) -> None:
    """learner.gpu_memory_fraction, and the colocated deployment it declares when the learner reserves no GPU."""
    f = lc.gpu_memory_fraction
    _number("learner.gpu_memory_fraction", f, 0.0, 1.0, open_low=True)
    if f is None:
        return
    if lc.resources_per_process.get("TPU", 0) > 0:
        raise ConfigError(f"learner.gpu_memory_fraction: {f} is a GPU setting, but the learner reserves TPU "
                          f"(learner.resources_per_process {lc.resources_per_process}); unset it")  # fmt: skip
    if not lc.shares_gpus:
        return
    if r.engine_resources.get("GPU", 0) <= 0:
        raise ConfigError(
            f"learner.gpu_memory_fraction: set while the learner reserves no GPU (learner.num_gpus_per_process 0), "
            f"it makes the learner share the engines' GPUs, but rollout.engine_resources {r.engine_resources} names "
            f"no GPU; name one (e.g. {{GPU: 1}}), or reserve the learner's own GPUs with learner.num_gpus_per_process"
        )
    if round(f + r.gpu_memory_utilization, 9) > COLOCATED_GPU_BUDGET:
        raise ConfigError(
            f"learner.gpu_memory_fraction + rollout.gpu_memory_utilization: {f:g} + {r.gpu_memory_utilization:g} = "
            f"{f + r.gpu_memory_utilization:g} > {COLOCATED_GPU_BUDGET:g}. The learner shares the engines' GPUs "
            f"(it reserves none), so each GPU holds JAX's pool and an engine's budget, and beside both a CUDA context "
            f"per process (~0.3-0.6 GiB each) and the NCCL buffers, which the remaining 5% is kept for (4 GiB of an "
            f"80 GiB GPU); lower one of the two"
        )
    if r.weight_transport == "collective":
        raise ConfigError(
            "rollout.weight_transport: collective cannot serve a colocated run (learner.gpu_memory_fraction set, "
            "no GPU reserved by the learner): the learner sends into every engine's NCCL group from its first GPU, "
            "which also holds an engine, and NCCL refuses two ranks of one communicator on one GPU "
            "(ncclCommInitRank: ncclInvalidUsage); use object_store"
        )


def validate_lora(cfg: Config) -> None:
    """LoRA settings; targets are resolved against the checkpoint's config.json when it exists already (else at
    start-up, before any engine starts)."""
    lo = cfg.model.lora
    if lo.rank < 0:
        raise ConfigError(f"model.lora.rank: must be > 0 to train adapters (0 = full fine-tuning), got {lo.rank}")
    if lo.rank == 0:
        return
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

