"""The rollout engine interface, its configuration, and helpers both engines share.

An engine turns chat-templated prompts into sampled responses under the weights it currently holds, and takes new
weights in place. Weights arrive in Hugging Face Hub naming (`model.layers.*`, `visual.*`, `lm_head.weight`), in one
or more buckets per policy version; `final=True` on the last bucket (or `finish_update`) completes the push, resets
the engine's caches once and makes `version` the policy version every later sample carries.
"""
from __future__ import annotations

import json
import struct
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Optional, Union

import numpy as np
import torch

from shared.checksum import Checksum, row_ranges
from shared.records import Prompt, Sample, SamplingSpec

Tensor = Union[np.ndarray, torch.Tensor]
NamedTensors = Iterable[tuple[str, Tensor]]
LOGPROBS_MODES = ("raw", "processed")
WEIGHT_TRANSPORTS = ("auto", "inprocess", "shm", "ipc", "nccl")


@dataclass
class EngineConfig:
    model_path: str
    dtype: str = "float32"  # float32 | bfloat16
    seed: int = 0
    max_model_len: int = 4096
    # KV cache bound (vLLM). None: vLLM's own rule, VLLM_CPU_KVCACHE_SPACE on CPU, gpu_memory_utilization on GPU.
    kv_cache_bytes: Optional[int] = 1 << 30
    enable_prefix_caching: bool = True
    tensor_parallel_size: int = 1
    max_images_per_prompt: int = 4
    # raw: log-softmax of the model's logits (temperature 1), what the learner recomputes.
    # processed: after temperature and top-k/top-p, the distribution the token was sampled from.
    logprobs_mode: str = "raw"
    gpu_memory_utilization: float = 0.5
    enable_sleep: bool = False
    # vLLM weight route: "auto" (in-process when the engine core and its one worker share this process, on CPU and
    # GPU; across processes a /dev/shm safetensors file on CPU, CUDA IPC weight transfer on GPU), or force
    # "inprocess" | "shm" | "ipc" ("ipc" only with the workers in other processes); "nccl" starts vLLM with its NCCL
    # weight-transfer engine for the bridge's collective route on GPU (host-memory pushes then go in-process, or
    # through "shm" with the workers in other processes).
    weight_transport: str = "auto"
    # The data's image bounds (data.min_pixels/max_pixels). vLLM sizes its encoder profiling and budget by the
    # largest image allowed; without them it takes the processor's (12.8M pixels: a 65k-patch dummy image).
    min_pixels: Optional[int] = None
    max_pixels: Optional[int] = None
    cpu_affinity: tuple[int, ...] = ()  # CPU cores the engine's process runs on (empty: wherever the OS puts it)

    def __post_init__(self) -> None:
        if self.dtype not in ("float32", "bfloat16"):
            raise ValueError(f"dtype: expected float32 or bfloat16, got {self.dtype!r}")
        if self.logprobs_mode not in LOGPROBS_MODES:
            raise ValueError(f"logprobs_mode: expected one of {LOGPROBS_MODES}, got {self.logprobs_mode!r}")
        if self.weight_transport not in WEIGHT_TRANSPORTS:
            raise ValueError(f"weight_transport: expected one of {WEIGHT_TRANSPORTS}, got {self.weight_transport!r}")
        if not (Path(self.model_path) / "config.json").is_file():
            raise FileNotFoundError(f"model_path {self.model_path!r} is not a Hugging Face checkpoint directory")

    @staticmethod
    def from_config(cfg, **overrides) -> "EngineConfig":
        """From the run config (`shared.config.Config`); `overrides` win."""
        r = cfg.rollout
        kwargs = dict(
            model_path=cfg.model.path, dtype=r.dtype, seed=cfg.train.seed,
            max_model_len=cfg.data.prompt_max_len + r.generate_max_len,
            kv_cache_bytes=None if torch.cuda.is_available() else int(r.kv_cache_gib * (1 << 30)),
            enable_prefix_caching=r.enable_prefix_caching, tensor_parallel_size=r.tensor_parallel_size,
            gpu_memory_utilization=r.gpu_memory_utilization, enable_sleep=r.colocate,
            min_pixels=cfg.data.min_pixels, max_pixels=cfg.data.max_pixels, cpu_affinity=tuple(r.cpu_affinity),
        )  # fmt: skip
        # The collective route's form is decided once, by the learner's platform as the config fixes it
        # (`LearnerConfig.platform`, to which `learner_jax.launch.process_env` pins the learner's JAX; the bridge
        # picks NCCL from the same devices): a GPU learner broadcasts into vLLM's NCCL weight-transfer engine, which
        # must be chosen at start-up; a CPU or TPU learner sends over gloo from host memory, which the workers join
        # through the worker extension (on GPU engines too) and needs nothing at start-up. Not decided by what
        # this process sees: a rollout process with CUDA beside a learner without would start NCCL engines for a
        # gloo sender.
        if getattr(r, "weight_transport", "object_store") == "collective" and cfg.learner.platform == "gpu":
            kwargs["weight_transport"] = "nccl"
        kwargs.update(overrides)
        return EngineConfig(**kwargs)


class RolloutEngine(ABC):
    """One generation engine. Not thread-safe; the pool gives each engine its own actor."""

    def __init__(self, cfg: EngineConfig, engine_id: int = 0):
        self.cfg = cfg
        self.engine_id = engine_id
        self._version = 0
        self._pending: Optional[int] = None  # version of a push whose final bucket has not arrived
        self._group = None  # rollout_torch.collective.Group of the collective weight route, once joined
        self.generated_tokens = 0
        self.generate_seconds = 0.0
        self.prompts_done = 0
        self.lifecycle: list[tuple[str, int]] = []  # ("sleep" | "wake", policy version held), in call order

    # -- generation
    @abstractmethod
    def generate(self, prompts: list[Prompt], sampling: SamplingSpec) -> list[list[Sample]]:
        """`sampling.n` samples per prompt, grouped: result[i] holds the samples of prompts[i]."""

    @abstractmethod
    def score(self, prompt: Prompt, response_ids: list[int]) -> list[float]:
        """Log-probabilities (raw, temperature 1) of `response_ids` following `prompt` under the current weights."""

    # -- weights
    def update_weights(self, named_tensors: NamedTensors, version: int, final: bool = True) -> None:
        """Load HF-Hub-named tensors in place. Each call must hold whole fused groups (q/k/v with their biases,
        gate/up); a push may span several calls, the last with `final=True` (or followed by `finish_update`)."""
        if self._pending is not None and self._pending != version:
            raise RuntimeError(f"engine {self.engine_id}: push of version {self._pending} is unfinished, got {version}")
        named = [(n, to_torch(t)) for n, t in named_tensors]
        self._validate(named)  # before anything is loaded: a rejected bucket leaves the engine as it was
        self._pending = version
        self._load(named)
        if final:
            self.finish_update(version)

    def finish_update(self, version: int) -> None:
        if self._pending not in (None, version):
            raise RuntimeError(f"engine {self.engine_id}: finish_update({version}) during a push of {self._pending}")
        self._finish()
        self._version = version
        self._pending = None

    def policy_version(self) -> int:
        return self._version

    # -- collective weight route: one broadcast group per engine, rank 0 the bridge's sender (bridge.collective)
    def collective_world_size(self) -> int:
        """Size of this engine's group: the sender plus the processes that receive (here: this one)."""
        return 2

    def collective_group(self) -> Optional[str]:
        """Name of the group joined, None before `collective_join` (e.g. in an engine restarted by the pool)."""
        return None if self._group is None else self._group.name

    def collective_join(self, info: dict) -> list[int]:
        """Join the group the sender opened (`info`: name, host, port, world_size, timeout_s); returns the ranks
        taken. Blocks until the sender has joined too. Leaves any earlier group first."""
        from rollout_torch.collective import join_info

        self.collective_leave()
        self._group = join_info(info, 1)
        return [1]

    def collective_receive(self, meta: list, version: int, final: bool = False) -> int:
        """Receive one bucket the sender broadcasts (`meta`: (hf_name, dtype, shape) per tensor, in broadcast
        order) and load it as `update_weights` would. A bucket that cannot be loaded is still received (the group
        stays in step with the sender) and then rejected, leaving the engine's weights as they were."""
        meta = [(str(n), str(d), tuple(int(x) for x in s)) for n, d, s in meta]
        try:
            if self._pending is not None and self._pending != version:
                raise RuntimeError(f"engine {self.engine_id}: push of version {self._pending} is unfinished, got "
                                   f"{version}")  # fmt: skip
            self._validate([(n, torch.empty(s, dtype=getattr(torch, d), device="meta")) for n, d, s in meta])
        except Exception:
            self._collective_drain(meta)
            raise
        self._pending = version
        self._collective_load(meta)
        if final:
            self.finish_update(version)
        return len(meta)

    def collective_leave(self) -> None:
        if self._group is not None:
            self._group.close()
            self._group = None

    def _collective_load(self, meta: list) -> None:
        from rollout_torch.collective import receive

        self._load(receive(self._group, meta, f"engine {self.engine_id}"))

    def _collective_drain(self, meta: list) -> None:
        from rollout_torch.collective import receive

        if self._group is not None:
            receive(self._group, meta, f"engine {self.engine_id}")

    @abstractmethod
    def _validate(self, named: list[tuple[str, torch.Tensor]]) -> None:
        """Raise (KeyError for unknown names, ValueError otherwise) if the bucket cannot be loaded as a whole."""

    @abstractmethod
    def _load(self, named: list[tuple[str, torch.Tensor]]) -> None: ...

    @abstractmethod
    def _finish(self) -> None: ...

    @abstractmethod
    def named_weights(self, names: Optional[Iterable[str]] = None) -> dict[str, np.ndarray]:
        """The tensors the engine holds now, in its own naming (see the engine's docstring), as float32 numpy."""

    @abstractmethod
    def weight_checksums(self, names: Iterable[str]) -> dict[str, Checksum]:
        """Fingerprints (`tensor_checksum`) of the named tensors the engine holds, computed in its process: what
        the bridge's verification moves instead of float32 copies of the weights."""

    # -- memory
    def sleep(self, level: int = 1) -> bool:
        """Free KV cache (level 1: and offload weights; level 2: and discard them) if the backend can; returns
        whether it did. Every call is recorded in `lifecycle` with the version held, freed or not."""
        self.lifecycle.append(("sleep", self._version))
        return self._sleep(level)

    def wake(self) -> bool:
        """Restore what `sleep` freed; returns whether anything was restored."""
        self.lifecycle.append(("wake", self._version))
        return self._wake()

    def _sleep(self, level: int) -> bool:
        return False

    def _wake(self) -> bool:
        return False

    def close(self) -> None:
        """Release the backend's processes and memory; the engine is unusable afterwards."""

    # -- bookkeeping
    def stats(self) -> dict:
        s = self.generate_seconds
        return {
            "engine_id": self.engine_id, "prompts": self.prompts_done, "generated_tokens": self.generated_tokens,
            "seconds": round(s, 3), "tokens_per_s": round(self.generated_tokens / s, 2) if s > 0 else 0.0,
            "lifecycle": list(self.lifecycle),
        }  # fmt: skip

    def _check_ready(self) -> None:
        if self._pending is not None:
            raise RuntimeError(
                f"engine {self.engine_id}: weights of version {self._pending} are partly loaded; "
                f"send the final bucket (final=True) or call finish_update before generating"
            )

    def _record(self, results: list[list[Sample]], seconds: float) -> None:
        self.generated_tokens += sum(len(s.response_ids) for group in results for s in group)
        self.prompts_done += len(results)
        self.generate_seconds += seconds


# --------------------------------------------------------------------------- helpers shared by the engines


def validate_sampling(sampling: SamplingSpec) -> None:
    if sampling.n < 1:
        raise ValueError(f"SamplingSpec.n must be >= 1, got {sampling.n}")
    if sampling.temperature < 0:
        raise ValueError(f"SamplingSpec.temperature must be >= 0, got {sampling.temperature}")
    if not 0 < sampling.top_p <= 1:
        raise ValueError(f"SamplingSpec.top_p must be in (0, 1], got {sampling.top_p}")
    if sampling.top_k == 0 or sampling.top_k < -1:
        raise ValueError(f"SamplingSpec.top_k must be -1 (off) or >= 1, got {sampling.top_k}")
    if sampling.max_tokens < 1:
        raise ValueError(f"SamplingSpec.max_tokens must be >= 1, got {sampling.max_tokens}")


def to_torch(t: Tensor) -> torch.Tensor:
    """A CPU torch tensor sharing memory where it can; numpy bfloat16 (ml_dtypes, as JAX exports it) is kept bf16."""
    if isinstance(t, torch.Tensor):
        return t.detach()
    a = np.asarray(t)
    if a.dtype.name == "bfloat16":
        return torch.from_numpy(np.ascontiguousarray(a).view(np.uint16).copy()).view(torch.bfloat16)
    if not a.flags.writeable or not a.flags.c_contiguous:
        a = np.array(a, copy=True, order="C")  # object-store arrays are read-only views
    return torch.from_numpy(a)


def to_numpy(t: torch.Tensor) -> np.ndarray:
    t = t.detach().cpu()
    return (t.float() if t.dtype in (torch.bfloat16, torch.float16) else t).numpy().copy()


def tensor_checksum(t: torch.Tensor) -> Checksum:
    """The `shared.checksum.Checksum` of a tensor, cast to float32 one row block at a time (never a whole copy)."""
    t = t.detach()
    shape = tuple(int(x) for x in t.shape)
    blocks = (t if not shape else t[start:stop] for start, stop in row_ranges(shape))
    return Checksum.of_blocks((b.float().cpu().contiguous().numpy() for b in blocks), shape)


def checkpoint_shapes(model_path: str) -> dict[str, tuple[int, ...]]:
    """Names and shapes of the checkpoint's tensors, read from the safetensors headers only."""
    out: dict[str, tuple[int, ...]] = {}
    files = sorted(Path(model_path).glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no *.safetensors files in {model_path}")
    for f in files:
        with open(f, "rb") as fh:
            (n,) = struct.unpack("<Q", fh.read(8))
            header = json.loads(fh.read(n))
        out.update({k: tuple(v["shape"]) for k, v in header.items() if k != "__metadata__"})
    return out


def stop_token_ids(model_path: str, tokenizer, extra: Iterable[int] = ()) -> list[int]:
    """EOS ids of the checkpoint (tokenizer + generation_config.json) plus the request's: both engines stop on the
    same set and keep the stop token in the response, as vLLM does."""
    ids = set(int(i) for i in extra)
    if tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    gen = Path(model_path) / "generation_config.json"
    if gen.is_file():
        eos = json.loads(gen.read_text()).get("eos_token_id")
        ids.update(int(i) for i in (eos if isinstance(eos, list) else [eos] if eos is not None else []))
    return sorted(ids)


def make_engine(backend: str, cfg: EngineConfig, engine_id: int = 0) -> RolloutEngine:
    if backend == "vllm":
        from rollout_torch.vllm_engine import VllmEngine

        return VllmEngine(cfg, engine_id)
    if backend == "transformers":
        from rollout_torch.hf_engine import HFEngine

        return HFEngine(cfg, engine_id)
    raise ValueError(f"rollout backend: expected vllm or transformers, got {backend!r}")
