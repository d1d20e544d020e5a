"""The runtime choices of one forward pass (`ModelOptions`); the architecture (`Qwen25VLConfig`) is
`shared.models.qwen2_5_vl_config`, read by the learner, the engines and the checkpoint tools alike."""
from __future__ import annotations

from dataclasses import dataclass

from shared.models.qwen2_5_vl_config import Qwen25VLConfig, TextConfig, VisionConfig

__all__ = ["ModelOptions", "Qwen25VLConfig", "TextConfig", "VisionConfig", "ATTENTION_IMPLS", "COMPUTE_DTYPES"]

ATTENTION_IMPLS = ("softmax", "dot_product", "cudnn", "auto")
COMPUTE_DTYPES = ("float32", "bfloat16")


@dataclass(frozen=True)
class ModelOptions:
    """How to run the model; parameters stay float32 whatever `dtype` says (the optimizer owns them).

    `attention`: softmax (explicit masked softmax, exact on CPU), dot_product (`jax.nn.dot_product_attention`,
    XLA's composition with the [T, S] probabilities in memory), cudnn (cuDNN flash attention, CUDA GPUs, bfloat16
    or float16, O(T) saved state), auto (`attention.resolve_attention`: softmax on CPU, cudnn on CUDA GPUs where
    dtype and head dims allow, else dot_product). `remat` recomputes each layer in the backward pass;
    `unroll_layers` unrolls the layer scans.
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
