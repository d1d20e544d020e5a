import jax.numpy as jnp
import numpy as np
import optax
import pytest

from learner_jax.experience import make_experience
from learner_jax.ppo import _apply
from shared.records import Sample, VisionInputs


def sample(prompt, response, logprobs, reason="stop"):
    return Sample(uid=0, prompt_ids=prompt, response_ids=response, logprobs=logprobs, text="", finish_reason=reason,
                  policy_version=0)  # fmt: skip


def test_responses_are_right_aligned_on_next_token_positions():
    groups = [[sample([1, 2, 3], [7, 8], [-0.5, -0.25]), sample([1, 2, 3], [9], [-1.0], "length")]]
    exp = make_experience(groups, [VisionInputs.empty()], np.array([1.0, 0.0]))
    T, L = exp.seq_len, exp.seq_len - 1
    assert exp.token_ids == [[1, 2, 3, 7, 8], [1, 2, 3, 9]]
    assert exp.action_mask_BL.shape == (2, L)
    # position t scores token t+1: the last r positions are the r response tokens of a right-aligned sequence
    np.testing.assert_array_equal(exp.action_mask_BL[0, L - 3:], [0, 1, 1])
    np.testing.assert_array_equal(exp.action_mask_BL[1, L - 2:], [0, 1])
    np.testing.assert_array_equal(exp.rollout_logp_BL[0, L - 2:], [-0.5, -0.25])
    assert exp.action_mask_BL.sum() == 3 and T >= 5
    np.testing.assert_array_equal(exp.finish_length_B, [0, 1])


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_a_non_finite_gradient_is_reported_and_not_applied(bad):
    tx = optax.adam(0.1)
    params = {"w": jnp.ones(3)}
    state = tx.init(params)
    (new_params, _), gnorm, finite = _apply(tx, params, state, {"w": jnp.array([1.0, bad, 0.0])})
    assert not bool(finite) and not np.isfinite(float(gnorm))
    (ok_params, _), _, finite_ok = _apply(tx, params, state, {"w": jnp.array([1.0, 1.0, 0.0])})
    assert bool(finite_ok) and float(ok_params["w"][0]) < 1.0
