import numpy as np

from learner_jax.experience import make_experience
from shared.records import Sample, VisionInputs


def sample(prompt, response, logprobs, reason="stop"):
    return Sample(uid=0, prompt_ids=prompt, response_ids=response, logprobs=logprobs, text="", finish_reason=reason,
                  policy_version=0)  # fmt: skip


def test_responses_are_right_aligned_on_the_response_window():
    groups = [[sample([1, 2, 3], [7, 8], [-0.5, -0.25]), sample([1, 2, 3], [9], [-1.0], "length")]]
    exp = make_experience(groups, [VisionInputs.empty()], np.array([1.0, 0.0]))
    assert exp.token_ids == [[1, 2, 3, 7, 8], [1, 2, 3, 9]]
    # the window holds the last L = 2 next-token positions (the longest response): position T-2 scores token T-1
    assert exp.action_mask_BL.shape == (2, 2) and exp.seq_len >= 5
    np.testing.assert_array_equal(exp.action_mask_BL, [[1, 1], [0, 1]])
    np.testing.assert_array_equal(exp.rollout_logp_BL, [[-0.5, -0.25], [0.0, -1.0]])
    np.testing.assert_array_equal(exp.finish_length_B, [0, 1])


def test_the_window_is_bucketed_and_never_longer_than_the_sequence():
    groups = [[sample([1, 2, 3], list(range(9)), [-0.1] * 9), sample([1], [4, 5, 6, 7, 8], [-0.2] * 5)]]
    exp = make_experience(groups, [VisionInputs.empty()], np.array([1.0, 0.0]))
    assert exp.seq_len == 12 and exp.action_mask_BL.shape == (2, 10)  # bucket(9) = 10 <= T - 1 = 11
    assert exp.action_mask_BL.sum(1).tolist() == [9, 5] and exp.action_mask_BL[:, -1].tolist() == [1, 1]
    short = make_experience([[sample([1], [2, 3, 4, 5, 6, 7, 8], [-0.1] * 7)]], [VisionInputs.empty()], np.ones(1))
    assert short.seq_len == 8 and short.action_mask_BL.shape == (1, 7)  # bucket(7) = 7 = T - 1


def test_the_generation_limit_fixes_the_window_across_rollouts():
    short = make_experience([[sample(list(range(30)), [2, 3], [-0.1] * 2)]], [VisionInputs.empty()], np.ones(1), 12)
    longer = make_experience([[sample(list(range(30)), list(range(9)), [-0.1] * 9)]], [VisionInputs.empty()],
                             np.ones(1), 12)  # fmt: skip
    assert short.action_mask_BL.shape[1] == longer.action_mask_BL.shape[1] == 12
