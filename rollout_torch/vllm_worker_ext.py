"""Methods added to every vLLM worker (`worker_extension_cls`), reached through `LLM.collective_rpc`.

A weight push is one layerwise-reload session, the lifecycle vLLM's own weight-transfer engines use: begin
(parameters go back to their checkpoint-format shapes), load checkpoint-named tensors (each layer is re-processed
into its kernel format, e.g. repacked oneDNN handles on CPU, as soon as all its tensors arrived), finish (layers
that received nothing get their kernel tensors back; encoder and multimodal caches are dropped). Plain
`model.load_weights` after start-up does not take effect on CPU, because the linear layers no longer read their
`weight` parameter.
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

    def lmmrl_named_weights(self, names: Optional[list[str]] = None) -> dict[str, np.ndarray]:
        wanted = None if names is None else set(names)
        out: dict[str, np.ndarray] = {}
        with torch.no_grad():
            for mod_name, module in self._lmmrl_model().named_modules():
                for p_name, param in module.named_parameters(recurse=False):
                    full = f"{mod_name}.{p_name}" if mod_name else p_name
                    if wanted is not None and full not in wanted:
                        continue
                    if p_name == "weight" and param.numel() == 0 and hasattr(module, "cpu_linear"):
                        param = _linear_weight(module)
                    out[full] = param.detach().float().cpu().numpy().copy()
        if wanted is not None and (missing := wanted - set(out)):
            raise KeyError(f"not parameters of the vLLM model: {sorted(missing)[:5]}")
        return out
