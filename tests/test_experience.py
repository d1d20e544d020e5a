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


def test_micro_batches_treat_response_vision_tokens_as_text(tiny_ckpt):
    """A policy that samples `<|image_pad|>` (an untrained one does at once) must not stop the run: only the
    prompt's pads are image placeholders, counted against its grids; the response's are text."""
    from learner_jax.models.config import Qwen25VLConfig

    cfg = Qwen25VLConfig.from_hf(tiny_ckpt)
    pad, vs = cfg.image_token_id, cfg.vision_start_token_id
    prompt = [1, 2, vs, pad, pad, pad, pad, vs + 1, 3]
    vision = VisionInputs(np.ones((16, cfg.vision.patch_dim), np.float32), np.array([[1, 4, 4]]))
    responses = [[5, pad, pad, pad, pad, 6], [pad, cfg.video_token_id, vs, vs + 1], []]
    exp = make_experience([[sample(prompt, r, [-1.0] * len(r)) for r in responses]], [vision], np.zeros(3))
    np.testing.assert_array_equal(exp.prompt_lengths, [9, 9, 9])
    batch = exp.micro_batch([2, 0, 1], cfg, pad_token_id=0)
    T = exp.seq_len
    assert batch["image_mask_BT"].sum(1).tolist() == [4, 4, 4]
    for row, b in enumerate([2, 0, 1]):
        start = T - len(exp.token_ids[b])
        assert batch["image_mask_BT"][row, start + 3:start + 7].all()
        assert not batch["image_mask_BT"][row, start + 9:].any()  # the response
        pos = batch["position_ids_3BT"][:, row, start + 8:]  # last prompt token, then the response: 1-D, on by one
        np.testing.assert_array_equal(pos, pos[:, :1] + np.arange(pos.shape[1]))


def test_response_special_tokens_counts_all_but_a_final_stop_token(tiny_ckpt):
    from learner_jax.experience import response_special_tokens
    from learner_jax.models.config import Qwen25VLConfig
    from shared.tiny_checkpoint import SPECIAL_TOKENS

    cfg = Qwen25VLConfig.from_hf(tiny_ckpt)
    # <|endoftext|> (the pad token), the first of Qwen's added tokens, which follow each other in this order
    first = cfg.vision_start_token_id - SPECIAL_TOKENS.index("<|vision_start|>")
    pad, video, vs, im_end = cfg.image_token_id, cfg.video_token_id, cfg.vision_start_token_id, first + 2
    groups = [[
        sample([1, 2], [5, 6, im_end], [-1.0] * 3),  # a finished answer: its EOS is not counted
        sample([1, 2], [pad, 7, video, vs, im_end], [-1.0] * 5),  # 3 vision tokens
        sample([1, 2], [first + 1, 8, 500, 511], [-1.0] * 4, "length"),  # <|im_start|>, 500, an unused row: all count
        sample([1, 2], [], [], "length"),
    ]]  # fmt: skip
    exp = make_experience(groups, [VisionInputs.empty()], np.zeros(4))
    assert response_special_tokens(exp, first) == 3 + 3
