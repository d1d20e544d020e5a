"""The learner's side of the weight bridge's logprob probe: its log-probabilities of the probe's response."""
from __future__ import annotations

from functools import partial

import jax
import numpy as np

from bridge.verify import LogprobProbe
from shared.models.qwen2_5_vl_params import Params

from .models.batch import build_batch
from .models.config import Qwen25VLConfig
from .models.qwen2_5_vl import forward_logprobs


@partial(jax.jit, static_argnames=("cfg",))
def _logprobs(params: Params, batch: dict, cfg: Qwen25VLConfig):
    return forward_logprobs(params, batch, cfg)["logprobs_BL"]


def learner_logprobs(params: Params, cfg: Qwen25VLConfig, probe: LogprobProbe) -> np.ndarray:
    """Log-probabilities of the probe's response tokens under `params`, for `WeightSync.verify`."""
    if not probe.response_ids:
        raise ValueError("the probe needs at least one response token")
    ids = list(probe.prompt_ids) + list(probe.response_ids)
    batch = build_batch([ids], [probe.vision], cfg, pad_token_id=probe.pad_token_id,
                        prompt_lengths=[len(probe.prompt_ids)])  # a sampled response may hold any token
    logp_BL = np.asarray(_logprobs(params, batch, cfg))
    return logp_BL[0, -len(probe.response_ids):]
