"""Vision and other special tokens in a *response* (a policy can sample `<|image_pad|>`; an untrained one does in
its first rollout) are ordinary text for the learner, as they were for the engine that sampled them.

vLLM fixes a request's image placeholders when it processes the prompt (`mm_position` ranges from the processor's
prompt updates), not by token id: only those get vision features (`GPUModelRunner._gather_mm_embeddings` builds
`is_mm_embed` from them) and 3-D positions (`Qwen2_5_VLForConditionalGeneration.get_mrope_input_positions`). A
decoded token, whatever its id, gets its text embedding and the 1-D position context length + the prompt's mrope
delta (`MRotaryEmbedding.get_next_input_positions_tensor`). transformers' generate() does the same (decode
positions = text positions + `rope_deltas`; no pixel values after the prefill).
"""
from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch

from learner_jax.experience import make_experience
from learner_jax.models.batch import build_batch
from learner_jax.models.config import ModelOptions, Qwen25VLConfig
from learner_jax.models.hf_io import load_checkpoint
from learner_jax.models.qwen2_5_vl import embed_inputs, forward_logprobs
from shared.records import Sample, VisionInputs

GRIDS = np.array([[1, 6, 10], [1, 8, 4]])  # two images, non-square merged grids (3x5 and 4x2)


@pytest.fixture(scope="module")
def learner(tiny_ckpt):
    return load_checkpoint(tiny_ckpt)


def _prompt(cfg: Qwen25VLConfig, rng) -> list[int]:
    pad, vs = cfg.image_token_id, cfg.vision_start_token_id
    ids = [int(i) for i in rng.integers(0, 400, 4)]
    for t, h, w in GRIDS:
        ids += [vs] + [pad] * (t * h * w // 4) + [vs + 1] + [int(i) for i in rng.integers(0, 400, 3)]
    return ids


def _response(cfg: Qwen25VLConfig) -> list[int]:
    """Pads in the response: a run as long as the first image's (15), single ones, and a whole fake image."""
    pad, vs = cfg.image_token_id, cfg.vision_start_token_id
    return [11, 12] + [pad] * 15 + [13, cfg.video_token_id, vs, pad, pad, vs + 1, 14, pad, vs]


def _vllm_positions(tiny_ckpt: str, cfg: Qwen25VLConfig, prompt: list[int], n_response: int) -> np.ndarray:
    """vLLM's own functions: the prompt's M-RoPE positions from its placeholder ranges, then one decode step per
    response token, as `GPUModelRunner._calc_mrope_positions` schedules them."""
    from transformers import AutoConfig
    from vllm.model_executor.layers.rotary_embedding.mrope import MRotaryEmbedding
    from vllm.model_executor.models.qwen2_5_vl import Qwen2_5_VLForConditionalGeneration as VllmQwen

    class Stub:  # get_mrope_input_positions reads self.config and self.iter_mm_grid_thw only
        iter_mm_grid_thw = VllmQwen.iter_mm_grid_thw
        get_mrope_input_positions = VllmQwen.get_mrope_input_positions

        def __init__(self):
            self.config = AutoConfig.from_pretrained(tiny_ckpt)

    ids = np.asarray(prompt)
    is_pad = ids == cfg.image_token_id
    offsets = np.flatnonzero(is_pad & ~np.concatenate([[False], is_pad[:-1]]))  # where each pad run starts
    features = [SimpleNamespace(modality="image", mm_position=SimpleNamespace(offset=int(o)),
                                data={"image_grid_thw": SimpleNamespace(data=torch.tensor(g))})
                for o, g in zip(offsets, GRIDS.tolist())]  # fmt: skip
    prefill, delta = Stub().get_mrope_input_positions(list(prompt), features)
    out = np.zeros((3, len(prompt) + n_response), np.int64)
    out[:, :len(prompt)] = prefill.numpy()
    for i in range(n_response):  # decode: one new token, context = everything before it
        MRotaryEmbedding.get_next_input_positions_tensor(out, len(prompt) + i, delta, len(prompt) + i, 1)
    return out


def test_positions_equal_vllm_prefill_then_decode(tiny_ckpt):
    cfg = Qwen25VLConfig.from_hf(tiny_ckpt)
    prompt, response = _prompt(cfg, np.random.default_rng(0)), _response(cfg)
    seq = prompt + response
    vision = VisionInputs(np.ones((int(np.prod(GRIDS, axis=1).sum()), cfg.vision.patch_dim), np.float32), GRIDS)
    batch = build_batch([seq, seq[:len(prompt) + 3]], [vision, vision], cfg, pad_token_id=0,
                        prompt_lengths=[len(prompt), len(prompt)])  # fmt: skip
    want = _vllm_positions(tiny_ckpt, cfg, prompt, len(response))
    T = batch["input_ids_BT"].shape[1]
    np.testing.assert_array_equal(batch["position_ids_3BT"][:, 0, T - len(seq):], want)
    np.testing.assert_array_equal(batch["position_ids_3BT"][:, 1, T - len(prompt) - 3:], want[:, :len(prompt) + 3])
    assert want[0, len(prompt)] < len(prompt)  # the images' 3-D positions pulled the text positions back


def test_response_image_pad_is_embedded_as_text(learner):
    cfg, params = learner
    prompt, response = _prompt(cfg, np.random.default_rng(1)), _response(cfg)
    rng = np.random.default_rng(2)
    vision = VisionInputs(rng.standard_normal((int(np.prod(GRIDS, axis=1).sum()), cfg.vision.patch_dim),
                                              dtype=np.float32), GRIDS)  # fmt: skip
    full = build_batch([prompt + response], [vision], cfg, pad_token_id=0, prompt_lengths=[len(prompt)])
    alone = build_batch([prompt], [vision], cfg, pad_token_id=0, seq_len=full["input_ids_BT"].shape[1] - len(response))
    x = np.asarray(embed_inputs(params, full, cfg, ModelOptions()))[0]
    x_prompt = np.asarray(embed_inputs(params, alone, cfg, ModelOptions()))[0]
    table = np.asarray(params["text"]["embed"]["embedding"])
    np.testing.assert_allclose(x[-len(response):], table[response], rtol=0, atol=0)
    np.testing.assert_allclose(x[:-len(response)], x_prompt, rtol=1e-6, atol=1e-6)  # the images' features as before


def _forced_sample(engine, prompt, allowed: list[int], seed: int) -> Sample:
    """A response decoded by vLLM from `allowed` tokens only (vision tokens among them), with its raw logprobs
    (computed before the allowed-token mask: the model's own distribution)."""
    from vllm import SamplingParams

    from rollout_torch.processing import load_images, processor_kwargs

    req: dict = {"prompt": prompt.text}
    if prompt.image_paths:
        req["multi_modal_data"] = {"image": load_images(prompt)}
        req["mm_processor_kwargs"] = processor_kwargs(prompt)
    params = SamplingParams(max_tokens=12, temperature=1.0, seed=seed, logprobs=0, allowed_token_ids=allowed,
                            detokenize=False)  # fmt: skip
    out = engine.llm.generate([req], params, use_tqdm=False)[0]
    c = out.outputs[0]
    ids = list(c.token_ids)
    return Sample(uid=prompt.uid, prompt_ids=list(out.prompt_token_ids), response_ids=ids,
                  logprobs=[float(step[t].logprob) for step, t in zip(c.logprobs, ids)], text="",
                  finish_reason=c.finish_reason, policy_version=0)  # fmt: skip


@pytest.mark.parametrize("which", ["text_prompt", "image_prompt"])
def test_learner_logprobs_equal_vllm_decode_on_sampled_vision_tokens(which, vllm_engine, learner, tiny_ckpt,
                                                                     rollout_prompts):  # fmt: skip
    from rollout_torch.processing import load_processor, vision_inputs

    cfg, params = learner
    prompt = rollout_prompts[1] if which == "text_prompt" else rollout_prompts[0]
    proc = load_processor(tiny_ckpt)
    vision = vision_inputs(proc, prompt) if prompt.image_paths else VisionInputs.empty(cfg.vision.patch_dim)
    pad, vs = cfg.image_token_id, cfg.vision_start_token_id
    s = _forced_sample(vllm_engine, prompt, [pad, cfg.video_token_id, vs, 10], seed=1)
    assert s.response_ids.count(pad) >= 2 and cfg.video_token_id in s.response_ids and vs in s.response_ids
    assert s.prompt_ids.count(pad) == int(np.prod(vision.image_grid_thw, axis=1).sum()) // 4
    # the trainer's route: experience, micro-batch, windowed logprobs
    exp = make_experience([[s]], [vision], np.zeros(1), max_response=12)
    L = exp.action_mask_BL.shape[1]
    logp = np.asarray(forward_logprobs(params, exp.micro_batch([0], cfg, pad_token_id=0), cfg, window=L)["logprobs_BL"])
    mask = exp.action_mask_BL.astype(bool)
    np.testing.assert_allclose(logp[mask], exp.rollout_logp_BL[mask], atol=1e-4)
    # and vLLM scores the same continuation identically through its prefill (`score`: prompt_logprobs)
    np.testing.assert_allclose(vllm_engine.score(prompt, s.response_ids), s.logprobs, atol=1e-5)
