"""Read an HF checkpoint directory (`model.safetensors` or a sharded `model.safetensors.index.json`) into params.

Tensors are memory-mapped with numpy (bfloat16 through ml_dtypes, which numpy alone cannot name), so a shard is
never read whole before it is converted.
"""
from __future__ import annotations

import json
import struct
from pathlib import Path

import ml_dtypes
import numpy as np

from .config import Qwen25VLConfig
from shared.models.qwen2_5_vl_params import Params, hf_to_flax

_DTYPES = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
    "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_,
}  # fmt: skip


def read_safetensors(path: str | Path) -> dict[str, np.ndarray]:
    """All tensors of one .safetensors file as read-only memory-mapped arrays."""
    path = Path(path)
    with path.open("rb") as f:
        (header_len,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(header_len))
    header.pop("__metadata__", None)
    data = np.memmap(path, dtype=np.uint8, mode="r", offset=8 + header_len)
    out = {}
    for name, info in header.items():
        if info["dtype"] not in _DTYPES:
            raise ValueError(f"{path}: tensor {name} has unsupported dtype {info['dtype']}")
        start, end = info["data_offsets"]
        out[name] = data[start:end].view(_DTYPES[info["dtype"]]).reshape(info["shape"])
    return out


def read_checkpoint_tensors(ckpt_dir: str | Path) -> dict[str, np.ndarray]:
    """Every tensor of an HF checkpoint directory, single-file or sharded."""
    ckpt_dir = Path(ckpt_dir)
    index = ckpt_dir / "model.safetensors.index.json"
    if index.exists():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    elif (ckpt_dir / "model.safetensors").exists():
        shards = ["model.safetensors"]
    else:
        raise FileNotFoundError(f"{ckpt_dir}: expected model.safetensors or model.safetensors.index.json")
    tensors: dict[str, np.ndarray] = {}
    for shard in shards:
        tensors.update(read_safetensors(ckpt_dir / shard))
    return tensors


def load_checkpoint(ckpt_dir: str | Path, dtype=np.float32) -> tuple[Qwen25VLConfig, Params]:
    """Config and params (numpy, `dtype`) of an HF Qwen2.5-VL checkpoint directory."""
    cfg = Qwen25VLConfig.from_hf(ckpt_dir)
    return cfg, hf_to_flax(read_checkpoint_tensors(ckpt_dir), cfg, dtype=dtype)
