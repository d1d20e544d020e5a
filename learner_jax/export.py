"""Export the policy as a Hugging Face checkpoint directory that transformers and vLLM load: safetensors with
Hub key names, the source model's config, tokenizer and processor files. Written to a temporary directory and
renamed into place, so an interrupted export never leaves a half-written model at `out_dir`.
"""
from __future__ import annotations

import shutil
import tempfile
from pathlib import Path
from typing import Any, Optional

import jax
import numpy as np
from safetensors.numpy import save_file

from shared.models.qwen2_5_vl_params import flax_to_hf

from .adapters import write_peft
from .models.config import Qwen25VLConfig
from .models.lora import LoraSpec

COPIED = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json", "vocab.json",
          "merges.txt", "chat_template.json", "chat_template.jinja", "preprocessor_config.json",
          "video_preprocessor_config.json", "special_tokens_map.json", "added_tokens.json")  # fmt: skip


def export_hf(params: Any, cfg: Qwen25VLConfig, source_dir: str | Path, out_dir: str | Path,
              adapters: Any = None, lora: Optional[LoraSpec] = None) -> Path:  # fmt: skip
    """`params`: plain (merged) weights. With LoRA `adapters` also go to `out_dir/adapter` in PEFT's format, for
    `PeftModel.from_pretrained(base, out_dir/adapter)` on the base checkpoint at `source_dir`."""
    out = Path(out_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        host = jax.device_get(params)
        tensors = {name: np.ascontiguousarray(x, dtype=np.float32) for name, x in flax_to_hf(host, cfg)}
        save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        for name in COPIED:
            if (Path(source_dir) / name).is_file():
                shutil.copy2(Path(source_dir) / name, tmp / name)
        if adapters is not None:
            (tmp / "adapter").mkdir()
            write_peft(adapters, cfg, lora, str(Path(source_dir).resolve()), tmp / "adapter")
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    return out
