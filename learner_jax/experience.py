"""One rollout's samples as learner arrays (host side, numpy).

Every sequence is prompt ‖ response, left-padded to one length T for the whole rollout, so all micro-batches of
the rollout share T (one compilation) and every response ends at position T-1. Per-token quantities live on the
last L next-token positions (L >= the longest response, bucketed; at most T-1): window position l is sequence
position T-1-L+l, which scores token T-L+l and is an action when that token is a response token.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

from shared.records import Sample, VisionInputs

from .models.batch import build_batch
from .models.config import Qwen25VLConfig
from .models.vision_plan import bucket


@dataclass
class Experience:
    token_ids: list[list[int]]  # prompt + response per sample
    vision: list[VisionInputs]  # per sample (shared by the samples of one prompt)
    action_mask_BL: np.ndarray  # float32, on the response window of L positions
    rollout_logp_BL: np.ndarray  # engine logprobs at action positions, 0 elsewhere
    rewards_B: np.ndarray
    seq_len: int
    response_lengths: np.ndarray
    finish_length_B: np.ndarray  # 1 where generation stopped on max_tokens

    @property
    def size(self) -> int:
        return len(self.token_ids)

    @property
    def prompt_lengths(self) -> np.ndarray:
        return np.array([len(t) for t in self.token_ids]) - np.asarray(self.response_lengths)

    def micro_batch(self, idx: Sequence[int], cfg: Qwen25VLConfig, pad_token_id: int) -> dict[str, np.ndarray]:
        """Model inputs of samples `idx`. Only prompt tokens can be image placeholders: a response token is text
        whatever its id (`build_batch`), as it was for the engine that sampled it."""
        return build_batch([self.token_ids[i] for i in idx], [self.vision[i] for i in idx], cfg,
                           pad_token_id=pad_token_id, seq_len=self.seq_len,
                           prompt_lengths=self.prompt_lengths[np.asarray(idx, np.int64)])  # fmt: skip


def response_special_tokens(exp: Experience, first_special_id: int) -> int:
    """How many response tokens are special: ids >= `first_special_id`, i.e. Qwen's added tokens (from
    `<|endoftext|>`, its pad token, on: `<|im_start|>`, `<|vision_start|>`, `<|image_pad|>`, `<|video_pad|>`, ...)
    and the unused embedding rows beyond the tokenizer. A response's last token is not counted when generation
    stopped on it (not truncated): that is the EOS (`<|im_end|>`) every finished response ends with. The learner
    treats such tokens as text, as the engine did; a rising count flags a policy drifting into them."""
    total = 0
    for toks, r, truncated in zip(exp.token_ids, exp.response_lengths, exp.finish_length_B):
        resp = np.asarray(toks[len(toks) - int(r):], np.int64)
        if len(resp) and not truncated:
            resp = resp[:-1]
        total += int((resp >= first_special_id).sum())
    return total


def make_experience(groups: list[list[Sample]], vision: list[VisionInputs], rewards_B: np.ndarray,
                    max_response: int = 0) -> Experience:  # fmt: skip
    """`max_response` (the generation limit) fixes the window, so it does not change, and recompile the learner's
    programs, with each rollout's longest response."""
    samples = [s for g in groups for s in g]
    vis = [v for g, v in zip(groups, vision) for _ in g]
    token_ids = [list(s.prompt_ids) + list(s.response_ids) for s in samples]
    T = bucket(max(len(t) for t in token_ids))
    B, L = len(samples), min(bucket(max(max_response, *(len(s.response_ids) for s in samples), 1)), T - 1)
    mask = np.zeros((B, L), np.float32)
    rollout_logp = np.zeros((B, L), np.float32)
    for b, s in enumerate(samples):
        r = len(s.response_ids)
        if r:
            mask[b, L - r:] = 1.0
            rollout_logp[b, L - r:] = s.logprobs
    return Experience(
        token_ids=token_ids, vision=vis, action_mask_BL=mask, rollout_logp_BL=rollout_logp,
        rewards_B=np.asarray(rewards_B, np.float32), seq_len=T,
        response_lengths=np.array([len(s.response_ids) for s in samples]),
        finish_length_B=np.array([s.finish_reason == "length" for s in samples], np.float32),
    )  # fmt: skip
