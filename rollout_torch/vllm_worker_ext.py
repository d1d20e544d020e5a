"""Methods added to every vLLM worker (`worker_extension_cls`), reached through `LLM.collective_rpc`.

A weight push is one layerwise-reload session, the lifecycle vLLM's own weight-transfer engines use: begin
(parameters go back to their checkpoint-format shapes), load checkpoint-named tensors (each layer is re-processed
into its kernel format, e.g. repacked oneDNN handles on CPU, as soon as all its tensors arrived), finish (layers
that received nothing get their kernel tensors back; encoder and multimodal caches are dropped). Plain
`model.load_weights` after start-up does not take effect on CPU, because the linear layers no longer read their
`weight` parameter.

The collective route (`rollout_torch.collective`) adds a group per engine: each worker joins as rank 1 + its rank
(`lmmrl_collective_join`), receives every bucket the sender broadcasts into tensors allocated from the announced
metadata and loads them in the same session (`lmmrl_collective_receive`). On GPU vLLM's NCCL weight-transfer engine
receives instead; `lmmrl_nccl_drain` only reads a rejected bucket off its communicator.
"""
from __future__ import annotations

from typing import Optional, Union

import numpy as np
import torch

Source = Union[str, list]  # a safetensors file path, or (name, tensor) pairs when the worker is in-process


def _read_source(source: Source) -> list[tuple[str, torch.Tensor]]:
    if isinstance(source, str):
        from safetensors.torch import load_file

        return list(load_file(source).items())
    return list(source)


def _linear_weight(layer: torch.nn.Module, rows_per_chunk: int = 1024) -> torch.Tensor:
    """The [out, in] weight a CPU linear layer computes with, read back through its kernel: x = I gives x W^T = W^T.
    Exact (each output is one weight times 1 plus zeros); costs one matmul of the weight's size per chunk."""
    k = int(layer.input_size_per_partition)
    dtype = layer.params_dtype
    cols = []
    for start in range(0, k, rows_per_chunk):
        stop = min(k, start + rows_per_chunk)
        eye = torch.zeros(stop - start, k, dtype=dtype)
        eye[torch.arange(stop - start), torch.arange(start, stop)] = 1
        cols.append(layer.cpu_linear(eye, layer.weight, None))
    return torch.cat(cols, dim=0).t().contiguous()


class LmmrlWorkerExtension:
    def _lmmrl_model(self) -> torch.nn.Module:
        return self.model_runner.get_model()

    def lmmrl_begin_update(self) -> None:
        from vllm.config import set_current_vllm_config
        from vllm.model_executor.model_loader.reload import initialize_layerwise_reload

        with set_current_vllm_config(self.vllm_config):
            initialize_layerwise_reload(self._lmmrl_model())

    def lmmrl_load_weights(self, source: Source) -> int:
        from vllm.config import set_current_vllm_config

        weights = _read_source(source)
        with set_current_vllm_config(self.vllm_config), torch.no_grad():
            self._lmmrl_model().load_weights(iter(weights))
        return len(weights)

    def lmmrl_finish_update(self) -> None:
        from vllm.config import set_current_vllm_config
        from vllm.model_executor.model_loader.reload import finalize_layerwise_reload

        with set_current_vllm_config(self.vllm_config):
            finalize_layerwise_reload(self._lmmrl_model(), self.model_config)
        self.model_runner.reset_encoder_cache()
        self.model_runner.reset_mm_cache()

    def _lmmrl_tensors(self, names: Optional[list[str]]):
        """(name, tensor) of the parameters the model computes with, packed CPU linear weights read back."""
        wanted = None if names is None else set(names)
        found = set()
        for mod_name, module in self._lmmrl_model().named_modules():
            for p_name, param in module.named_parameters(recurse=False):
                full = f"{mod_name}.{p_name}" if mod_name else p_name
                if wanted is not None and full not in wanted:
                    continue
                if p_name == "weight" and param.numel() == 0 and hasattr(module, "cpu_linear"):
                    param = _linear_weight(module)
                found.add(full)
                yield full, param.detach()
        if wanted is not None and (missing := wanted - found):
            raise KeyError(f"not parameters of the vLLM model: {sorted(missing)[:5]}")

    def lmmrl_named_weights(self, names: Optional[list[str]] = None) -> dict[str, np.ndarray]:
        with torch.no_grad():
            return {n: t.float().cpu().numpy().copy() for n, t in self._lmmrl_tensors(names)}

    def lmmrl_weight_checksums(self, names: list[str]) -> dict:
        from rollout_torch.engine import tensor_checksum

        with torch.no_grad():
            return {n: tensor_checksum(t) for n, t in self._lmmrl_tensors(names)}

    # -- collective route
    def _lmmrl_rank(self) -> int:
        """This worker's rank among the engine's workers, as vLLM's weight-transfer engines count it
        (vllm/distributed/weight_transfer/nccl_common.py worker_init_process_group)."""
        pc = self.vllm_config.parallel_config
        return int(getattr(pc, "data_parallel_index", 0) or 0) * int(pc.world_size) + int(self.rank)

    def lmmrl_collective_join(self, info: dict) -> int:
        from rollout_torch.collective import join_info

        self.lmmrl_collective_leave()
        rank = 1 + self._lmmrl_rank()
        self._lmmrl_group = join_info(info, rank)
        return rank

    def lmmrl_collective_receive(self, meta: list, load: bool = True) -> int:
        from vllm.config import set_current_vllm_config

        from rollout_torch.collective import receive

        named = receive(getattr(self, "_lmmrl_group", None), meta, f"vLLM worker {self.rank}")
        if load:
            with set_current_vllm_config(self.vllm_config), torch.no_grad():
                self._lmmrl_model().load_weights(iter(named))
        return len(named)

    def lmmrl_collective_leave(self) -> None:
        group = getattr(self, "_lmmrl_group", None)
        if group is not None:
            group.close()
            self._lmmrl_group = None

    def lmmrl_nccl_drain(self, meta: list, load: bool = False) -> int:
        """GPU: receive a bucket the engine rejected off vLLM's NCCL weight-transfer communicator, unloaded, so the
        sender's broadcast completes (vllm/distributed/device_communicators/pynccl.py PyNcclCommunicator.broadcast)."""
        group = getattr(self.weight_transfer_engine, "model_update_group", None)
        if group is None:
            raise RuntimeError("vLLM's NCCL weight transfer is not initialised (init_weight_transfer_engine)")
        for _, dtype, shape in meta:
            buf = torch.empty(tuple(shape), dtype=getattr(torch, dtype), device=self.device)
            group.broadcast(buf, src=0, stream=torch.cuda.current_stream())
        torch.cuda.current_stream().synchronize()
        return len(meta)
