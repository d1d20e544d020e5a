"""The runtime choices of one forward pass (`ModelOptions`); the architecture (`Qwen25VLConfig`) is
`shared.models.qwen2_5_vl_config`, read by the learner, the engines and the checkpoint tools alike."""
from __future__ import annotations

from dataclasses import dataclass

from shared.models.qwen2_5_vl_config import Qwen25VLConfig, TextConfig, VisionConfig

__all__ = ["ModelOptions", "Qwen25VLConfig", "TextConfig", "VisionConfig", "ATTENTION_IMPLS", "COMPUTE_DTYPES"]

ATTENTION_IMPLS = ("softmax", "dot_product", "auto")
COMPUTE_DTYPES = ("float32", "bfloat16")


@dataclass(frozen=True)
class ModelOptions:
    """How to run the model; parameters stay float32 whatever `dtype` says (the optimizer owns them).

    `attention`: softmax (explicit masked softmax, exact on CPU), dot_product (`jax.nn.dot_product_attention`,
    which dispatches to fused kernels on GPU), auto (dot_product on GPU/TPU, softmax on CPU). `remat` recomputes
    each layer in the backward pass; `unroll_layers` unrolls the layer scans.
    """

    dtype: str = "float32"
    remat: bool = False
    attention: str = "auto"
    unroll_layers: bool = False  # unrolled layer loops: slower compile, ~10% less step time on CPU

    def __post_init__(self) -> None:
        if self.dtype not in COMPUTE_DTYPES:
            raise ValueError(f"dtype {self.dtype!r}: expected one of {COMPUTE_DTYPES}")
        if self.attention not in ATTENTION_IMPLS:
            raise ValueError(f"attention {self.attention!r}: expected one of {ATTENTION_IMPLS}")
