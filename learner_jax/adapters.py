"""LoRA in a run: the adapters a config asks for, their initial values, the merged weights the engines and the HF
export receive, and the adapter in PEFT's format.

The policy is `merge_lora(base, adapters)`: the base weights are loaded once and never trained (no gradient, no
optimizer state); the reference policy is the base alone (adapters off), so no second copy of the model exists.
Engines receive merged kernels W + (alpha / r) A B rather than adapters: vLLM's LoRA path would need its own
adapter files and a LoRA-enabled engine per push, and merged weights keep one verified route (checksums, probe)
for full fine-tuning and LoRA alike.
"""
from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np

from shared.config import LoraConfig
from shared.models import qwen2_5_vl_params as table

from .models.config import Qwen25VLConfig
from .models.lora import LORA, LoraSpec, split_lora
from .models.qwen2_5_vl import init_lora, model_abstract_state

Params = dict[str, Any]


def lora_spec(cfg: LoraConfig, model_cfg: Qwen25VLConfig) -> Optional[LoraSpec]:
    """The adapters `model.lora` asks for; None for full fine-tuning. Unmatched targets raise ValueError."""
    if cfg.rank == 0:
        return None
    return LoraSpec(cfg.rank, cfg.alpha, table.lora_modules(model_cfg, cfg.targets))


def adapter_shapes(model_cfg: Qwen25VLConfig, spec: LoraSpec) -> Params:
    """The adapters-only tree as `jax.ShapeDtypeStruct`s: A [(L,) in, r] and B [(L,) r, out] per target."""
    return split_lora(model_abstract_state(model_cfg, lora=spec))[1]


def init_adapters(model_cfg: Qwen25VLConfig, spec: LoraSpec, key: jax.Array) -> Params:
    """Fresh adapters from Flax's LoRA layers in the model (he-uniform A, zero B): the policy starts as the base."""
    return init_lora(key, model_cfg, spec)


def fold(params: Params, scale: float) -> Params:
    """The policy as plain weights: every adapted kernel replaced by W + scale * A @ B, adapters dropped.
    Pure and jit-able; stacked kernels fold layer by layer in one batched matmul."""
    base, adapters = split_lora(params)

    def walk(node: Params, ad: Params) -> Params:
        out = dict(node)
        for k, v in ad.items():
            if k == LORA:
                delta = jnp.matmul(v["lora_a"], v["lora_b"], precision=jax.lax.Precision.HIGHEST)
                out["kernel"] = node["kernel"] + (scale * delta).astype(node["kernel"].dtype)
            else:
                out[k] = walk(node[k], v)
        return out

    return walk(base, adapters)


def peft_tensors(adapters: Params, model_cfg: Qwen25VLConfig, spec: LoraSpec) -> dict[str, np.ndarray]:
    """The adapters in PEFT's safetensors layout: `base_model.model.<module>.lora_A.weight` [r, in] and
    `lora_B.weight` [out, r], modules named as transformers names them in memory."""
    host = jax.device_get(adapters)
    out: dict[str, np.ndarray] = {}
    for path, names in table.lora_candidates(model_cfg).items():
        if path not in spec.targets:
            continue
        node = table.get_path(host, (*path.split("/"), LORA))
        stacked = node["lora_a"].ndim == 3
        for i, module in enumerate(names):
            a, b = (np.asarray(node[k][i] if stacked else node[k]) for k in ("lora_a", "lora_b"))
            prefix = "base_model.model." + table.engine_name("transformers", module)
            out[prefix + ".lora_A.weight"] = np.ascontiguousarray(a.T, np.float32)
            out[prefix + ".lora_B.weight"] = np.ascontiguousarray(b.T, np.float32)
    return out


def peft_config(model_cfg: Qwen25VLConfig, spec: LoraSpec, base_model: str) -> dict[str, Any]:
    """`adapter_config.json`: the adapted modules as one full-match regex (PEFT matches a string target so)."""
    modules = [table.engine_name("transformers", m) for path, names in table.lora_candidates(model_cfg).items()
               if path in spec.targets for m in names]  # fmt: skip
    return {
        "peft_type": "LORA", "task_type": None, "base_model_name_or_path": str(base_model), "r": spec.rank,
        "lora_alpha": spec.alpha, "lora_dropout": 0.0, "bias": "none", "fan_in_fan_out": False,
        "use_rslora": False, "use_dora": False, "init_lora_weights": True, "inference_mode": True,
        "modules_to_save": None, "target_modules": "^(" + "|".join(re.escape(m) for m in modules) + ")$",
    }  # fmt: skip


def write_peft(adapters: Params, model_cfg: Qwen25VLConfig, spec: LoraSpec, base_model: str,
               out_dir: Path) -> None:  # fmt: skip
    from safetensors.numpy import save_file

    save_file(peft_tensors(adapters, model_cfg, spec), str(out_dir / "adapter_model.safetensors"),
              metadata={"format": "pt"})  # fmt: skip
    (out_dir / "adapter_config.json").write_text(json.dumps(peft_config(model_cfg, spec, base_model), indent=2))

