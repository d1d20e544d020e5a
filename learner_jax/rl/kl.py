"""KL estimators on the log-ratio l = log pi - log pi_ref, and the coefficient controllers.

k1 = l (unbiased, what LMM-R1 puts in the reward), k2 = l^2/2, k3 = exp(-l) - 1 + l (unbiased and >= 0).
Masked positions are selected away before any exp, so padding garbage gives neither inf nor NaN gradients.
"""
from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp


def k1(log_ratio_BT: jax.Array) -> jax.Array:
    return log_ratio_BT


def k2(log_ratio_BT: jax.Array) -> jax.Array:
    return 0.5 * log_ratio_BT**2


def k3(log_ratio_BT: jax.Array) -> jax.Array:
    return jnp.expm1(-log_ratio_BT) + log_ratio_BT


KL_ESTIMATORS: dict[str, Callable[[jax.Array], jax.Array]] = {"k1": k1, "k2": k2, "k3": k3}


def approx_kl(logp_BT: jax.Array, ref_logp_BT: jax.Array, mask_BT: jax.Array, estimator: str = "k1") -> jax.Array:
    """Per-token KL estimate, zero outside `mask_BT`."""
    if estimator not in KL_ESTIMATORS:
        raise ValueError(f"kl_estimator: expected one of {', '.join(KL_ESTIMATORS)}, got {estimator!r}")
    mask_BT = mask_BT.astype(bool)
    log_ratio_BT = jnp.where(mask_BT, logp_BT - ref_logp_BT, 0.0)
    return jnp.where(mask_BT, KL_ESTIMATORS[estimator](log_ratio_BT), 0.0)


class FixedKLController:
    def __init__(self, kl_coef: float):
        self.value = kl_coef

    def update(self, current_kl: float, n_steps: int) -> None:
        pass


class AdaptiveKLController:
    """beta <- beta * (1 + clip(KL/target - 1, -0.2, 0.2) * n_steps / horizon) (Ziegler et al., as OpenRLHF).

    `n_steps` is the number of samples the KL was measured on (OpenRLHF passes rollout_batch_size * n).
    """

    def __init__(self, init_kl_coef: float, target: float, horizon: int):
        if target <= 0 or horizon <= 0:
            raise ValueError(f"adaptive KL: expected target > 0 and horizon > 0, got {target} and {horizon}")
        self.value = init_kl_coef
        self.target = target
        self.horizon = horizon

    def update(self, current_kl: float, n_steps: int) -> None:
        error = min(max(current_kl / self.target - 1.0, -0.2), 0.2)
        self.value *= 1.0 + error * n_steps / self.horizon


def make_kl_controller(cfg_algo) -> FixedKLController | AdaptiveKLController:
    if cfg_algo.kl_target is None:
        return FixedKLController(cfg_algo.init_kl_coef)
    return AdaptiveKLController(cfg_algo.init_kl_coef, cfg_algo.kl_target, cfg_algo.kl_horizon)
