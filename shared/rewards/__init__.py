"""Rule-based rewards: a registry of reward functions and the scorers that run them.

A reward function is `fn(query, label) -> RewardResult`, where `query` is the full decoded prompt + response
(what the reference trainer sends to its reward server). It must be importable by name so that worker
processes and the reward server can load it. Both scorers return one result per sample; a result that is not a
real score has `error` set, and `is_timeout(result)` tells the ones that ran out of time.
"""
from __future__ import annotations

import functools
import importlib
import inspect
from typing import Union

from shared.rewards.client import RemoteReward
from shared.rewards.lmmr1 import RewardResult, lmmr1_math
from shared.rewards.pool import RewardFn, RewardPool, is_timeout

BUILTIN: dict[str, RewardFn] = {"lmmr1_math": lmmr1_math}

__all__ = ["BUILTIN", "RemoteReward", "RewardFn", "RewardPool", "RewardResult", "get_reward_fn", "is_timeout",
           "make_scorer"]


def _import(path: str) -> RewardFn:
    module_name, _, attr = path.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise ValueError(f"reward function {path!r}: cannot import module {module_name!r} ({e})") from None
    fn = getattr(module, attr, None)
    if not callable(fn):
        raise ValueError(f"reward function {path!r}: module {module_name!r} has no function {attr!r}")
    return fn


def get_reward_fn(name_or_path: str, format_reward: bool = True) -> RewardFn:
    """A builtin name (see BUILTIN) or `package.module:function`.

    `format_reward` is bound when the function takes that parameter; turning it off for a function that
    cannot is an error rather than a silently ignored setting.
    """
    if name_or_path in BUILTIN:
        fn = BUILTIN[name_or_path]
    elif ":" in name_or_path:
        fn = _import(name_or_path)
    else:
        raise ValueError(
            f"unknown reward function {name_or_path!r}; expected one of {', '.join(sorted(BUILTIN))} "
            "or an import path 'package.module:function'"
        )
    if "format_reward" in inspect.signature(fn).parameters:
        return functools.partial(fn, format_reward=format_reward)
    if not format_reward:
        raise ValueError(f"reward function {name_or_path!r} has no format_reward parameter to turn off")
    return fn


def make_scorer(cfg_reward) -> Union[RewardPool, RemoteReward]:
    """The scorer a `RewardConfig` describes: a reward server when `remote_url` is set, else local workers."""
    if cfg_reward.remote_url:
        return RemoteReward(cfg_reward.remote_url, batch_size=cfg_reward.remote_batch_size)
    fn = get_reward_fn(cfg_reward.fn, cfg_reward.format_reward)
    return RewardPool(fn, cfg_reward.num_workers, cfg_reward.timeout_s, cfg_reward.error_reward)
