"""Records passed between the learner and the rollout pool. Plain data: lists, numpy arrays, strings.

They cross Ray's object store, so they hold nothing framework-specific; numpy arrays travel zero-copy.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import numpy as np


@dataclass(frozen=True)
class SamplingSpec:
    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    max_tokens: int = 1024
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    seed: Optional[int] = None  # per-request seed; with it, sampling is reproducible in each engine

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


@dataclass
class Prompt:
    """One chat-templated prompt and its images, as both the engines and the learner see it."""

    text: str  # output of the chat template with add_generation_prompt=True
    image_paths: list[str] = field(default_factory=list)
    min_pixels: int = 4 * 28 * 28
    max_pixels: int = 16384 * 28 * 28
    label: Optional[str] = None  # gold answer, passed to the reward
    uid: int = 0  # position in the data stream; groups samples of one prompt


@dataclass
class Sample:
    """One generated response. `logprobs` are the engine's per-token log-probabilities of the sampled tokens."""

    uid: int
    prompt_ids: list[int]
    response_ids: list[int]
    logprobs: list[float]
    text: str
    finish_reason: str  # "stop" | "length" | "abort"
    policy_version: int
    engine_id: int = 0


@dataclass
class VisionInputs:
    """The processor's output for one prompt's images: flattened patches and the (t, h, w) grid of each image."""

    pixel_values: np.ndarray  # [num_patches, 3 * temporal_patch * patch * patch], float32
    image_grid_thw: np.ndarray  # [num_images, 3], int64

    @staticmethod
    def empty(patch_dim: int = 3 * 2 * 14 * 14) -> "VisionInputs":
        return VisionInputs(np.zeros((0, patch_dim), np.float32), np.zeros((0, 3), np.int64))
