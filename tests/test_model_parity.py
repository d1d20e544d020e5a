"""The Flax Qwen2.5-VL against transformers' (fp32, CPU) on tiny random checkpoints: logits, log-probabilities,
entropies and gradients, with inputs from the real processor. Also bf16 and remat behaviour."""
from __future__ import annotations

import re
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from PIL import Image
from transformers import AutoModelForImageTextToText, AutoProcessor

from learner_jax.models.batch import build_batch
from learner_jax.models.config import ModelOptions
from learner_jax.models.hf_io import load_checkpoint
from shared.models.qwen2_5_vl_params import flax_to_hf
from learner_jax.models.qwen2_5_vl import forward, forward_logprobs
from shared.records import VisionInputs

RESPONSE = "<think> 1+1=2 </think><answer> The answer is $\\boxed{2}$ </answer>"
SAMPLES = {  # each sample: (image sizes in pixels, question)
    "text_only": [((), "What is 1+1?")],
    "one_image": [(((84, 140),), "How many squares are in the image?")],
    "two_images": [(((84, 140), (112, 168)), "Compute the total.")],
    "mixed_left_padded": [((), "What is the sum?"), (((112, 112),), "Count."), (((56, 84), (84, 56)), "Total?")],
}
_CACHE: dict[str, tuple] = {}


def _reference(ckpt: str):
    if ckpt not in _CACHE:
        model = AutoModelForImageTextToText.from_pretrained(ckpt, dtype=torch.float32).eval()
        proc = AutoProcessor.from_pretrained(ckpt)
        proc.tokenizer.padding_side = "left"
        cfg, params = load_checkpoint(ckpt)
        _CACHE[ckpt] = (model, proc, cfg, params)
    return _CACHE[ckpt]


def _inputs(proc, samples, seed=0):
    rng = np.random.default_rng(seed)
    texts, images, per_sample = [], [], []
    for sizes, question in samples:
        content = [{"type": "image"} for _ in sizes] + [{"type": "text", "text": question}]
        chat = proc.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)
        texts.append(chat + RESPONSE + "<|im_end|>")
        imgs = [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for h, w in sizes]
        images += imgs
        per_sample.append(len(imgs))
    inputs = proc(text=texts, images=images or None, padding=True, return_tensors="pt")
    return inputs, per_sample


def _our_batch(inputs, per_sample, cfg, pad_token_id):
    ids, mask = inputs["input_ids"].numpy(), inputs["attention_mask"].numpy().astype(bool)
    grid = inputs["image_grid_thw"].numpy() if "image_grid_thw" in inputs else np.zeros((0, 3), np.int64)
    pixels = inputs["pixel_values"].numpy() if "pixel_values" in inputs else np.zeros((0, cfg.vision.patch_dim))
    vision, img, patch = [], 0, 0
    for n in per_sample:
        g = grid[img:img + n]
        count = int(np.prod(g, axis=1).sum())
        vision.append(VisionInputs(pixels[patch:patch + count], g))
        img, patch = img + n, patch + count
    return build_batch([ids[b][mask[b]].tolist() for b in range(len(ids))], vision, cfg, pad_token_id=pad_token_id)


def _hf_forward(model, inputs):
    pos, _ = model.model.get_rope_index(
        inputs["input_ids"], inputs["mm_token_type_ids"], inputs.get("image_grid_thw"),
        attention_mask=inputs["attention_mask"],
    )  # fmt: skip
    return model(**inputs, position_ids=pos).logits


# Compiled once per (config, options, shapes) and shared by the tests below, to keep compilation time down.
@partial(jax.jit, static_argnames=("cfg", "opts"))
def _outputs(params, batch, cfg, opts):
    logits = forward(params, batch, cfg, opts, return_hidden=False)["logits_BTV"]
    return logits, forward_logprobs(params, batch, cfg, opts, chunk=7)  # a chunk that does not divide B*T


@partial(jax.jit, static_argnames=("cfg", "opts", "n_resp"))
def _loss_and_grads(params, batch, cfg, opts, n_resp):
    """Summed log-probabilities of each sample's last `n_resp` tokens, and its gradient."""

    def loss(p):
        out = forward_logprobs(p, batch, cfg, opts, chunk=16)
        return out["logprobs_BL"][:, -n_resp:].sum(), out

    return jax.value_and_grad(loss, has_aux=True)(params)


def _grad_case(ckpt):
    model, proc, cfg, params = _reference(ckpt)
    inputs, per_sample = _inputs(proc, SAMPLES["mixed_left_padded"][1:], seed=1)
    return model, inputs, cfg, params, _our_batch(inputs, per_sample, cfg, proc.tokenizer.pad_token_id)


def _compare(ckpt, samples):
    model, proc, cfg, params = _reference(ckpt)
    inputs, per_sample = _inputs(proc, samples)
    with torch.no_grad():
        ref_logits = _hf_forward(model, inputs)
        ref_logp_all = torch.log_softmax(ref_logits[:, :-1], -1)
        ref_logp = ref_logp_all.gather(-1, inputs["input_ids"][:, 1:, None])[..., 0].numpy()
        ref_ent = -(ref_logp_all.exp() * ref_logp_all).sum(-1).numpy()
    batch = _our_batch(inputs, per_sample, cfg, proc.tokenizer.pad_token_id)
    T = inputs["input_ids"].shape[1]
    logits, out = _outputs(params, batch, cfg, ModelOptions())
    logits = np.asarray(logits)[:, -T:]
    logp, ent = np.asarray(out["logprobs_BL"])[:, -(T - 1):], np.asarray(out["entropy_BL"])[:, -(T - 1):]
    valid = inputs["attention_mask"].numpy().astype(bool)
    pair = valid[:, 1:] & valid[:, :-1]
    ref = ref_logits.numpy()
    err = {
        "logits_rel": float(np.abs(logits - ref)[valid].max() / np.abs(ref[valid]).max()),
        "logprob": float(np.abs(logp - ref_logp)[pair].max()),
        "entropy": float(np.abs(ent - ref_ent)[pair].max()),
    }
    print(f"\n{samples=} {err=}")
    assert err["logits_rel"] <= 1e-4 and err["logprob"] <= 1e-4 and err["entropy"] <= 1e-4, err
    return batch


@pytest.mark.parametrize("case", sorted(SAMPLES))
def test_matches_transformers_untied(tiny_ckpt, case):
    _compare(tiny_ckpt, SAMPLES[case])


def test_matches_transformers_tied_mixed_batch(tiny_ckpt_tied):
    _compare(tiny_ckpt_tied, SAMPLES["mixed_left_padded"])


def test_matches_transformers_when_windows_need_padding(tiny_ckpt_window112):
    # 140x196 px -> 10x14 patches -> 5x7 merged units: neither side is a multiple of the 4-unit window.
    batch = _compare(tiny_ckpt_window112, [(((140, 196), (56, 56)), "Describe.")])
    windows = (batch["vision_window_idx_GS"] < batch["pixel_values_PC"].shape[0]).sum(1)
    assert sorted(set(windows[windows > 0].tolist())) == [12, 16, 48, 64]  # 4x4, 4x3, 1x4, 1x3 units


def _hub_name(torch_name: str) -> str:
    """transformers-5 in-memory names -> the Hub checkpoint names of the name table."""
    return re.sub(r"^model\.visual\.", "visual.", re.sub(r"^model\.language_model\.", "model.", torch_name))


@pytest.mark.parametrize("which", ["untied", "tied"])
def test_gradients_match_torch_autograd(tiny_ckpt, tiny_ckpt_tied, which):
    model, inputs, cfg, params, batch = _grad_case(tiny_ckpt if which == "untied" else tiny_ckpt_tied)
    n_resp = 12
    model.zero_grad()
    logits = _hf_forward(model, inputs)
    logp = torch.log_softmax(logits[:, :-1], -1).gather(-1, inputs["input_ids"][:, 1:, None])[..., 0]
    logp[:, -n_resp:].sum().backward()
    ref = {_hub_name(n): p.grad.numpy() for n, p in model.named_parameters()}

    _, grads = _loss_and_grads(params, batch, cfg, ModelOptions(), n_resp)
    ours = dict(flax_to_hf(grads, cfg))
    assert set(ours) == set(ref)
    rel = {n: float(np.abs(ours[n] - ref[n]).max() / np.abs(ref[n]).max()) for n in ref}
    worst = max(rel, key=rel.get)
    print(f"\nworst relative gradient error ({which}): {worst} {rel[worst]:.2e}")
    assert all(np.abs(ref[n]).max() > 0 for n in ref)
    assert rel[worst] <= 1e-4, {n: r for n, r in rel.items() if r > 1e-4}


def test_bf16_runs_and_stays_finite(tiny_ckpt):
    _, _, cfg, params, batch = _grad_case(tiny_ckpt)
    opts = ModelOptions(dtype="bfloat16")
    B, T = batch["input_ids_BT"].shape
    hidden = jax.eval_shape(lambda p: forward(p, batch, cfg, opts)["hidden_BTD"], params)
    assert hidden.dtype == jnp.bfloat16 and hidden.shape == (B, T, cfg.text.hidden_size)
    (_, out), grads = _loss_and_grads(params, batch, cfg, opts, 12)
    assert out["logprobs_BL"].shape == out["entropy_BL"].shape == (B, T - 1)
    assert out["logprobs_BL"].dtype == jnp.float32
    assert np.isfinite(np.asarray(out["logprobs_BL"])).all() and np.isfinite(np.asarray(out["entropy_BL"])).all()
    assert all(np.isfinite(np.asarray(g)).all() and g.dtype == np.float32 for g in jax.tree.leaves(grads))


def test_remat_and_unrolling_leave_loss_and_gradients_unchanged(tiny_ckpt):
    _, _, cfg, params, batch = _grad_case(tiny_ckpt)
    (l0, _), g0 = _loss_and_grads(params, batch, cfg, ModelOptions(remat=False), 12)
    (l1, _), g1 = _loss_and_grads(params, batch, cfg, ModelOptions(remat=True, unroll_layers=True), 12)
    np.testing.assert_allclose(l1, l0, rtol=1e-6)
    for a, b in zip(jax.tree.leaves(g0), jax.tree.leaves(g1)):  # equal up to float reassociation
        assert np.abs(np.asarray(b) - np.asarray(a)).max() <= 1e-5 * np.abs(np.asarray(a)).max()


def test_dot_product_attention_matches_softmax(tiny_ckpt):
    model, proc, cfg, params = _reference(tiny_ckpt)
    inputs, per_sample = _inputs(proc, SAMPLES["mixed_left_padded"])
    batch = _our_batch(inputs, per_sample, cfg, proc.tokenizer.pad_token_id)
    valid = batch["attention_mask_BT"].astype(bool)
    a = np.asarray(_outputs(params, batch, cfg, ModelOptions(attention="softmax"))[0])[valid]
    b = np.asarray(_outputs(params, batch, cfg, ModelOptions(attention="dot_product"))[0])[valid]
    assert np.abs(a - b).max() <= 1e-5 * np.abs(a).max()


def test_value_head_reads_the_last_hidden_states(tiny_ckpt):
    model, proc, cfg, params = _reference(tiny_ckpt)
    inputs, per_sample = _inputs(proc, SAMPLES["one_image"])
    batch = _our_batch(inputs, per_sample, cfg, proc.tokenizer.pad_token_id)
    w = np.random.default_rng(0).standard_normal((cfg.text.hidden_size, 1)).astype(np.float32)
    out = forward({**params, "value_head": {"kernel": w}}, batch, cfg)
    with torch.no_grad():
        pos, _ = model.model.get_rope_index(inputs["input_ids"], inputs["mm_token_type_ids"], inputs["image_grid_thw"],
                                            attention_mask=inputs["attention_mask"])  # fmt: skip
        hidden = model.model(**inputs, position_ids=pos).last_hidden_state
        ref = (hidden @ torch.from_numpy(w))[..., 0].numpy()
    T = ref.shape[1]
    assert np.abs(np.asarray(out["values_BT"])[:, -T:] - ref).max() <= 1e-4 * np.abs(ref).max()


def test_forward_under_jit_needs_the_host_plan(tiny_ckpt):
    model, proc, cfg, params = _reference(tiny_ckpt)
    inputs, per_sample = _inputs(proc, SAMPLES["one_image"])
    batch = _our_batch(inputs, per_sample, cfg, proc.tokenizer.pad_token_id)
    no_plan = {k: v for k, v in batch.items() if not k.startswith("vision_")}
    with pytest.raises(ValueError, match="lacks the vision plan"):
        jax.eval_shape(lambda p, b: forward(p, b, cfg), params, no_plan)


def test_samples_of_one_prompt_share_one_image_encoding(tiny_ckpt):
    """A prompt's samples pass one VisionInputs object: the tower encodes its image once for the group. Logits
    stay those of transformers (which encodes per sample), and the vision tower's gradient equals the
    per-sample computation's."""
    model, proc, cfg, params = _reference(tiny_ckpt)
    image = Image.fromarray(np.random.default_rng(3).integers(0, 256, (84, 140, 3), dtype=np.uint8))
    content = [{"type": "image"}, {"type": "text", "text": "How many squares?"}]
    chat = proc.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)
    texts = [chat + r + "<|im_end|>" for r in ("<think> 2 </think>", "<answer> 3 </answer>", "<think> a b c </think>")]
    inputs = proc(text=texts, images=[image] * 3, padding=True, return_tensors="pt")
    ids, mask = inputs["input_ids"].numpy(), inputs["attention_mask"].numpy().astype(bool)
    tokens = [ids[b][mask[b]].tolist() for b in range(3)]
    one = VisionInputs(inputs["pixel_values"].numpy()[: len(inputs["pixel_values"]) // 3], inputs["image_grid_thw"][:1].numpy())
    shared = build_batch(tokens, [one] * 3, cfg, pad_token_id=proc.tokenizer.pad_token_id)
    copies = build_batch(tokens, [VisionInputs(one.pixel_values.copy(), one.image_grid_thw) for _ in range(3)], cfg,
                         pad_token_id=proc.tokenizer.pad_token_id)  # fmt: skip
    assert int(shared["image_grid_thw_N3"].shape[0]) == 1 and int(copies["image_grid_thw_N3"].shape[0]) == 3

    with torch.no_grad():
        ref = _hf_forward(model, inputs).numpy()
    T = ref.shape[1]
    logits = np.asarray(_outputs(params, shared, cfg, ModelOptions())[0])[:, -T:]
    assert np.abs(logits - ref)[mask].max() <= 1e-4 * np.abs(ref[mask]).max()

    (loss_s, _), g_s = _loss_and_grads(params, shared, cfg, ModelOptions(), 6)
    (loss_c, _), g_c = _loss_and_grads(params, copies, cfg, ModelOptions(), 6)
    np.testing.assert_allclose(float(loss_s), float(loss_c), rtol=1e-6)
    for a, b in zip(jax.tree.leaves(g_c["visual"]), jax.tree.leaves(g_s["visual"])):
        a, b = np.asarray(a), np.asarray(b)
        assert np.abs(b - a).max() <= 1e-5 * np.abs(a).max()


def test_the_response_window_scores_the_last_positions_exactly(tiny_ckpt):
    """`window=W` runs the LM head on the last W positions only; they equal the full pass's last W."""
    _, _, cfg, params, batch = _grad_case(tiny_ckpt)
    full = jax.jit(lambda p: forward_logprobs(p, batch, cfg, chunk=16))(params)
    win = jax.jit(lambda p: forward_logprobs(p, batch, cfg, chunk=16, window=12))(params)
    assert win["logprobs_BL"].shape == (batch["input_ids_BT"].shape[0], 12)
    np.testing.assert_allclose(np.asarray(win["logprobs_BL"]), np.asarray(full["logprobs_BL"])[:, -12:], rtol=1e-6)
    np.testing.assert_allclose(np.asarray(win["entropy_BL"]), np.asarray(full["entropy_BL"])[:, -12:], rtol=1e-6)
