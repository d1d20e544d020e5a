"""The Flax NNX modules of the Qwen2.5-VL port: their state is the params tree the rest of the system reads (paths,
shapes, tensor-parallel axes), and LoRA adapters on their linear layers compute W + (alpha / r) A B."""
from __future__ import annotations

import dataclasses
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from learner_jax import sharding
from learner_jax.models.batch import build_batch
from learner_jax.models.config import ModelOptions
from learner_jax.models.hf_io import load_checkpoint
from learner_jax.models.lora import LORA, LoraSpec, adapted_modules, merge_lora, split_lora
from learner_jax.models.params import abstract_params
from learner_jax.models.qwen2_5_vl import (Qwen25VL, forward, forward_logprobs, init_lora, logical_axes,
                                          model_abstract_state)
from shared.models import qwen2_5_vl_params as table
from shared.records import VisionInputs


def _shapes(tree):
    return jax.tree.map(lambda a: tuple(a.shape), tree)


def _batch(cfg, seed=0):
    """Three samples with one random image each (different grids) and different lengths (left padding)."""
    rng = np.random.default_rng(seed)
    ids, vision = [], []
    for b, (h, w) in enumerate([(4, 6), (6, 4), (8, 8)]):
        prompt = [cfg.vision_start_token_id] + [cfg.image_token_id] * (h * w // cfg.vision.merge_unit)
        ids.append([int(t) for t in [*rng.integers(0, 100, 4), *prompt, *rng.integers(0, 100, 6 + 3 * b)]])
        pixels = rng.standard_normal((h * w, cfg.vision.patch_dim)).astype(np.float32)
        vision.append(VisionInputs(pixels, np.array([[1, h, w]])))
    return build_batch(ids, vision, cfg, pad_token_id=0)


@pytest.fixture(scope="module")
def model(tiny_ckpt):
    cfg, params = load_checkpoint(tiny_ckpt)
    return cfg, params, _batch(cfg)


def _spec(cfg, rank=4, alpha=8.0):
    """Adapters on every linear layer LoRA may target: text and vision attention and MLPs, the merger."""
    return LoraSpec(rank, alpha, frozenset(table.lora_candidates(cfg)))


def _adapters(cfg, spec, key, b_scale=0.0):
    """Adapters-only tree with random A and B = b_scale * N(0, 1)."""
    shapes = model_abstract_state(cfg, lora=spec)
    _, shapes = split_lora(shapes)
    flat, treedef = jax.tree_util.tree_flatten_with_path(shapes)
    keys = jax.random.split(key, len(flat))
    leaves = [jax.random.normal(k, s.shape) * (0.1 if p[-1].key == "lora_a" else b_scale)
              for (p, s), k in zip(flat, keys)]  # fmt: skip
    return jax.tree.unflatten(treedef, leaves)


def _fold(params, scale):
    """The plain model with every adapted kernel replaced by W + scale * A @ B (float64-accurate matmul)."""
    base, adapters = split_lora(params)

    def walk(node, ad):
        out = dict(node)
        for k, v in ad.items():
            if k == LORA:
                delta = jnp.matmul(v["lora_a"], v["lora_b"], precision=jax.lax.Precision.HIGHEST)
                out["kernel"] = node["kernel"] + scale * delta
            else:
                out[k] = walk(node[k], v)
        return out

    return walk(base, adapters)


@partial(jax.jit, static_argnames=("cfg", "opts", "lora"))
def _logits(params, batch, cfg, opts=ModelOptions(), lora=None):
    return forward(params, batch, cfg, opts, return_hidden=False, lora=lora)["logits_BTV"]


# --------------------------------------------------------------------------- the parameter tree


@pytest.mark.parametrize("tied", [False, True])
@pytest.mark.parametrize("value_head", [False, True])
def test_module_state_is_the_params_tree(model, tied, value_head):
    cfg = dataclasses.replace(model[0], tie_word_embeddings=tied)
    expected = _shapes(abstract_params(cfg, include_value_head=value_head))
    module = nnx.eval_shape(lambda: Qwen25VL(cfg, rngs=nnx.Rngs(0), value_head=value_head))
    assert _shapes(nnx.to_pure_dict(nnx.state(module, nnx.Param))) == expected
    abstract = model_abstract_state(cfg, value_head)
    assert _shapes(abstract) == expected
    assert all(a.dtype == jnp.float32 for a in jax.tree.leaves(abstract))
    assert ("lm_head" in abstract) == (not tied) and ("value_head" in abstract) == value_head


def test_a_real_module_initialises_every_parameter(model):
    cfg = model[0]
    state = nnx.state(Qwen25VL(cfg, rngs=nnx.Rngs(0), value_head=True), nnx.Param)
    leaves = jax.tree.leaves(nnx.to_pure_dict(state))
    assert len(leaves) == len(jax.tree.leaves(abstract_params(cfg, True))) and all(np.isfinite(x).all() for x in leaves)
    layers = state["text"]["layers"]["q"]["kernel"]  # stacked layers are drawn independently
    assert not np.array_equal(layers[...][0], layers[...][1])


@pytest.mark.parametrize("lora", [False, True])
def test_logical_axes_are_the_tensor_parallel_rules(model, lora):
    cfg = model[0]
    spec = _spec(cfg) if lora else None
    axes = logical_axes(cfg, value_head=True, lora=spec)
    abstract = model_abstract_state(cfg, value_head=True, lora=spec)
    flat_axes = dict((sharding.path_str(p), a) for p, a in
                     jax.tree_util.tree_flatten_with_path(axes, is_leaf=lambda x: isinstance(x, tuple))[0])  # fmt: skip
    for path, leaf in jax.tree_util.tree_flatten_with_path(abstract)[0]:
        name = sharding.path_str(path)
        rule = sharding.match_rule(name)
        template, stacked = rule[0], rule[-1]
        assert flat_axes[name] == (None,) * stacked + tuple(template), name
        assert len(flat_axes[name]) == len(leaf.shape), name
        if LORA not in name:
            assert flat_axes[name] == (None,) * (table.leaf(cfg, name).stack is not None) + table.leaf(cfg, name).axes
    # The same split decisions as the learner's strategy makes for tensor = 2.
    sizes, units = {"data": 1, "fsdp": 1, "tensor": 2}, sharding.tensor_units(cfg)
    specs = sharding.tree_specs(abstract, sizes, units, ())
    for (path, leaf), spec_ in zip(jax.tree_util.tree_flatten_with_path(abstract)[0], jax.tree.leaves(
            specs, is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec))):  # fmt: skip
        logical = flat_axes[sharding.path_str(path)]
        split = [n is not None and leaf.shape[d] % (units[n] * 2) == 0 for d, n in enumerate(logical)]
        assert tuple(spec_) + (None,) * (len(split) - len(spec_)) == tuple("tensor" if s else None for s in split)


def test_params_carry_their_partition_specs(model):
    cfg = model[0]
    module = nnx.eval_shape(lambda: Qwen25VL(cfg, rngs=nnx.Rngs(0), lora=_spec(cfg)))
    specs = nnx.get_partition_spec(nnx.state(module, nnx.Param))
    P = jax.sharding.PartitionSpec
    assert specs["text"]["layers"]["q"]["kernel"].get_value() == P(None, None, "heads")
    assert specs["text"]["layers"]["mlp"]["down"]["lora"]["lora_a"].get_value() == P(None, "mlp", None)
    assert specs["text"]["layers"]["mlp"]["down"]["lora"]["lora_b"].get_value() == P(None, None, None)
    assert specs["text"]["embed"]["embedding"].get_value() == P("vocab", None)
    assert isinstance(module.text.layers.q.lora.lora_a, nnx.LoRAParam)


def test_a_tree_that_does_not_match_the_model_is_refused(model):
    cfg, params, batch = model
    broken = {**params, "text": {**params["text"], "norm": {}}}
    with pytest.raises(ValueError, match="missing.*text/norm/scale"):
        jax.eval_shape(lambda p: forward(p, batch, cfg), broken)


# --------------------------------------------------------------------------- LoRA


def test_lora_tree_layout(model):
    cfg = model[0]
    spec = _spec(cfg)
    abstract = model_abstract_state(cfg, lora=spec)
    t, v, L = cfg.text, cfg.vision, cfg.text.num_layers
    q = abstract["text"]["layers"]["q"][LORA]
    assert q["lora_a"].shape == (L, t.hidden_size, 4) and q["lora_b"].shape == (L, 4, t.num_heads * t.head_dim)
    assert abstract["visual"]["blocks"]["attn"]["qkv"][LORA]["lora_a"].shape == (v.depth, v.hidden_size, 4)
    assert abstract["visual"]["merger"]["fc1"][LORA]["lora_b"].shape == (4, v.hidden_size * v.merge_unit)
    assert adapted_modules(abstract) == {path: 4 for path in spec.targets}
    base, adapters = split_lora(abstract)
    assert _shapes(base) == _shapes(abstract_params(cfg)) and _shapes(merge_lora(base, adapters)) == _shapes(abstract)


def test_fresh_adapters_are_flax_lora_init(model):
    cfg = model[0]
    spec = _spec(cfg)
    adapters = init_lora(jax.random.key(0), cfg, spec)
    assert _shapes(adapters) == _shapes(split_lora(model_abstract_state(cfg, lora=spec))[1])
    q = adapters["text"]["layers"]["q"][LORA]
    assert not np.asarray(q["lora_b"]).any()  # zero B: the policy starts as the base model
    a = np.asarray(q["lora_a"])
    bound = np.sqrt(6.0 / cfg.text.hidden_size)  # he-uniform over the fan-in of one layer's A
    assert np.abs(a).max() <= bound and np.abs(a).max() > 0.5 * bound and not np.array_equal(a[0], a[1])


def test_zero_lora_b_is_the_base_model_exactly(model):
    cfg, params, batch = model
    base = np.asarray(_logits(params, batch, cfg))
    text = LoraSpec(4, 8.0, frozenset(t for t in table.lora_candidates(cfg) if t.startswith("text/")))
    with_lora = merge_lora(params, _adapters(cfg, text, jax.random.key(0), b_scale=0.0))
    np.testing.assert_array_equal(np.asarray(_logits(with_lora, batch, cfg, lora=text)), base)
    # Adapting the vision qkv changes how XLA fuses the RoPE'd q/k into the attention that reads them, and with
    # it the last bit of a few values: the same math, compiled into differently rounded code.
    spec = _spec(cfg)
    with_lora = merge_lora(params, _adapters(cfg, spec, jax.random.key(0), b_scale=0.0))
    assert np.abs(np.asarray(_logits(with_lora, batch, cfg, lora=spec)) - base).max() <= 1e-6 * np.abs(base).max()
    # The tree without adapters is the plain model, whatever spec comes along (the reference policy).
    np.testing.assert_array_equal(np.asarray(_logits(params, batch, cfg, lora=spec)), base)


def test_lora_equals_the_merged_kernels(model):
    cfg, params, batch = model
    spec = _spec(cfg, rank=4, alpha=8.0)
    with_lora = merge_lora(params, _adapters(cfg, spec, jax.random.key(1), b_scale=0.1))
    ours = np.asarray(_logits(with_lora, batch, cfg, lora=spec))
    merged = np.asarray(_logits(_fold(with_lora, spec.scale), batch, cfg))
    base = np.asarray(_logits(params, batch, cfg))
    valid = batch["attention_mask_BT"].astype(bool)
    assert np.abs(ours - base)[valid].max() > 1e-2 * np.abs(base).max()  # the adapters do change the output
    assert np.abs(ours - merged)[valid].max() <= 1e-5 * np.abs(merged[valid]).max()


def test_gradients_reach_only_the_adapters_and_match_the_merged_model(model):
    cfg, params, batch = model
    spec = _spec(cfg)
    adapters = _adapters(cfg, spec, jax.random.key(2), b_scale=0.1)
    valid = jnp.asarray(batch["attention_mask_BT"][:, 1:])

    def loss(ad, merged):  # the base weights are closed over: a constant of the loss
        p = merge_lora(params, ad)
        out = forward_logprobs(_fold(p, spec.scale) if merged else p, batch, cfg, chunk=16,
                               lora=None if merged else spec)  # fmt: skip
        return (out["logprobs_BL"] * valid).sum()

    grads = jax.jit(jax.grad(partial(loss, merged=False)))(adapters)
    ref = jax.jit(jax.grad(partial(loss, merged=True)))(adapters)
    assert _shapes(grads) == _shapes(adapters)
    for (path, g), r in zip(jax.tree_util.tree_flatten_with_path(grads)[0], jax.tree.leaves(ref)):
        g, r = np.asarray(g), np.asarray(r)
        assert np.abs(r).max() > 0, path
        assert np.abs(g - r).max() <= 1e-4 * np.abs(r).max(), (path, np.abs(g - r).max(), np.abs(r).max())


def test_adapters_need_their_spec(model):
    cfg, params, batch = model
    spec = _spec(cfg)
    with_lora = merge_lora(params, _adapters(cfg, spec, jax.random.key(0)))
    with pytest.raises(ValueError, match="pass lora=LoraSpec"):
        jax.eval_shape(lambda p: forward(p, batch, cfg), with_lora)
    fewer = LoraSpec(4, 8.0, frozenset({"text/layers/q"}))
    with pytest.raises(ValueError, match="do not match"):
        jax.eval_shape(lambda p: forward(p, batch, cfg, lora=fewer), with_lora)


def test_bf16_with_adapters_is_finite(model):
    cfg, params, batch = model
    spec = _spec(cfg)
    adapters = _adapters(cfg, spec, jax.random.key(3), b_scale=0.1)
    opts = ModelOptions(dtype="bfloat16", remat=True)
    B, T = batch["input_ids_BT"].shape
    params = merge_lora(params, adapters)
    hidden = jax.eval_shape(lambda p: forward(p, batch, cfg, opts, lora=spec)["hidden_BTD"], params)
    assert hidden.dtype == jnp.bfloat16 and hidden.shape == (B, T, cfg.text.hidden_size)

    @jax.jit
    def run(ad):
        def loss(ad):
            out = forward_logprobs(merge_lora(params, ad), batch, cfg, opts, chunk=16, lora=spec)
            return out["logprobs_BL"].sum(), out
        return jax.value_and_grad(loss, has_aux=True)(ad)

    (_, out), grads = run(adapters)
    assert out["logprobs_BL"].shape == out["entropy_BL"].shape == (B, T - 1) and out["logprobs_BL"].dtype == jnp.float32
    assert np.isfinite(np.asarray(out["logprobs_BL"])).all() and np.isfinite(np.asarray(out["entropy_BL"])).all()
    assert _shapes(grads) == _shapes(adapters)
    assert all(g.dtype == jnp.float32 and np.isfinite(np.asarray(g)).all() for g in jax.tree.leaves(grads))
