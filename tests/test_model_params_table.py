"""The model's parameter table (HF <-> Flax): loading, bit-exact round trip, errors naming the offending keys, sharded and
bfloat16 checkpoints."""
from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
import torch
from safetensors.numpy import save_file
from safetensors.torch import load_file as torch_load_file
from safetensors.torch import save_file as torch_save_file

from learner_jax.models.config import Qwen25VLConfig
from learner_jax.models.hf_io import load_checkpoint, read_checkpoint_tensors, read_safetensors
from learner_jax.models.params import abstract_params
from shared.models.qwen2_5_vl_params import flax_to_hf, hf_to_flax


def _tensors(ckpt):
    return {k: np.array(v) for k, v in read_checkpoint_tensors(ckpt).items()}


def test_reader_matches_safetensors(tiny_ckpt):
    ours = read_checkpoint_tensors(tiny_ckpt)
    ref = torch_load_file(f"{tiny_ckpt}/model.safetensors")
    assert set(ours) == set(ref)
    assert all(np.array_equal(ours[k], ref[k].numpy()) for k in ref)


@pytest.mark.parametrize("fixture", ["tiny_ckpt", "tiny_ckpt_tied"])
def test_round_trip_is_bit_exact(fixture, request):
    ckpt = request.getfixturevalue(fixture)
    cfg = Qwen25VLConfig.from_hf(ckpt)
    tensors = _tensors(ckpt)
    tensors["score.weight"] = np.random.default_rng(0).standard_normal((1, cfg.text.hidden_size)).astype(np.float32)
    params = hf_to_flax(tensors, cfg)
    D = cfg.text.hidden_size
    assert params["text"]["layers"]["q"]["kernel"].shape == (cfg.text.num_layers, D, D)
    assert ("lm_head" in params) == (not cfg.tie_word_embeddings)
    pairs = list(flax_to_hf(jax.tree.map(jnp.asarray, params), cfg, include_value_head=True))  # from device arrays
    back = dict(pairs)
    assert len(back) == len(pairs)
    assert set(back) == set(tensors)
    for name, x in tensors.items():
        assert back[name].dtype == x.dtype and np.array_equal(back[name], x), name
    shapes = jax.tree.map(lambda s: (s.shape, s.dtype), abstract_params(cfg, include_value_head=True))
    assert shapes == jax.tree.map(lambda a: (a.shape, a.dtype), params)


def test_flax_to_hf_is_lazy_and_ordered_by_layer(tiny_ckpt):
    cfg, params = load_checkpoint(tiny_ckpt)
    gen = flax_to_hf(params, cfg)
    assert next(gen)[0] == "model.embed_tokens.weight"
    names = [n for n, _ in gen]
    q0, q1, k0 = (names.index(f"model.layers.{i}.self_attn.{p}_proj.weight") for i, p in ((0, "q"), (1, "q"), (0, "k")))
    assert q0 < k0 < q1  # all of layer 0 before layer 1
    assert "lm_head.weight" in names and "score.weight" not in names


def test_missing_unknown_and_misshaped_keys_are_named(tiny_ckpt):
    cfg = Qwen25VLConfig.from_hf(tiny_ckpt)
    tensors = _tensors(tiny_ckpt)
    broken = dict(tensors)
    del broken["model.layers.1.mlp.up_proj.weight"], broken["lm_head.weight"]
    broken["model.layers.7.extra.weight"] = np.zeros(3, np.float32)
    broken["visual.merger.mlp.2.bias"] = np.zeros(5, np.float32)
    with pytest.raises(ValueError) as err:
        hf_to_flax(broken, cfg)
    msg = str(err.value)
    for name in ("model.layers.1.mlp.up_proj.weight", "lm_head.weight", "model.layers.7.extra.weight",
                 "visual.merger.mlp.2.bias: (5,) != (128,)"):  # fmt: skip
        assert name in msg
    with pytest.raises(ValueError, match="no leaf lm_head/kernel"):
        list(flax_to_hf({k: v for k, v in hf_to_flax(tensors, cfg).items() if k != "lm_head"}, cfg))


def test_tied_checkpoint_uses_the_embedding(tiny_ckpt_tied):
    cfg = Qwen25VLConfig.from_hf(tiny_ckpt_tied)
    tensors = _tensors(tiny_ckpt_tied)
    assert "lm_head.weight" not in tensors and cfg.tie_word_embeddings
    params = hf_to_flax({**tensors, "lm_head.weight": tensors["model.embed_tokens.weight"]}, cfg)
    assert "lm_head" not in params
    with pytest.raises(ValueError, match="differs from model.embed_tokens.weight"):
        hf_to_flax({**tensors, "lm_head.weight": tensors["model.embed_tokens.weight"] + 1}, cfg)


def test_sharded_bf16_checkpoint_loads(tiny_ckpt, tmp_path):
    tensors = _tensors(tiny_ckpt)
    names = sorted(tensors)
    torch_bf16 = {k: torch.from_numpy(v).to(torch.bfloat16) for k, v in tensors.items()}
    weight_map = {}
    shards = {"model-00001-of-00002.safetensors": names[::2], "model-00002-of-00002.safetensors": names[1::2]}
    for shard, part in shards.items():
        torch_save_file({k: torch_bf16[k] for k in part}, str(tmp_path / shard))
        weight_map.update({k: shard for k in part})
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    (tmp_path / "config.json").write_text(open(f"{tiny_ckpt}/config.json").read())
    cfg, params = load_checkpoint(tmp_path)
    back = dict(flax_to_hf(params, cfg))
    for k, v in torch_bf16.items():
        assert np.array_equal(back[k], v.float().numpy()), k  # bf16 -> float32 upcast is exact
    raw = read_safetensors(tmp_path / "model-00001-of-00002.safetensors")
    assert raw[names[0]].dtype == ml_dtypes.bfloat16


def test_missing_checkpoint_file_is_reported(tmp_path):
    save_file({"x": np.zeros(1, np.float32)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        read_checkpoint_tensors(tmp_path)


# --------------------------------------------------------------------------- the table's other columns

from shared.models import qwen2_5_vl_params as table  # noqa: E402
from learner_jax import memory  # noqa: E402

QWEN_3B = Qwen25VLConfig.from_hf(memory.PRESETS["qwen2.5-vl-3b"])


def test_every_row_declares_one_axis_per_flax_dim_and_leaf_matches_the_table():
    for r in table.RULES:
        leaf = table.leaf(QWEN_3B, r.flax)
        assert len(r.axes) == len(leaf.shape), r.flax
    q = table.leaf(QWEN_3B, "text/layers/q/kernel")
    assert q.full_shape == (36, 2048, 2048) and q.axes == (None, "heads") and q.stack == "text"
    with pytest.raises(KeyError, match="no Qwen2.5-VL parameter"):
        table.leaf(QWEN_3B, "text/layers/q/weight")


def test_engine_names_round_trip_and_fuse_like_vllm():
    assert table.engine_name("vllm", "model.layers.3.self_attn.k_proj.bias") == \
        "language_model.model.layers.3.self_attn.qkv_proj.bias"
    assert table.engine_name("vllm", "visual.blocks.0.mlp.up_proj.weight") == "visual.blocks.0.mlp.gate_up_proj.weight"
    assert table.engine_name("vllm", "lm_head.weight") == "language_model.lm_head.weight"
    assert table.engine_name("transformers", "visual.merger.mlp.0.bias") == "model.visual.merger.mlp.0.bias"
    for e in table.name_table(QWEN_3B):
        assert table.hub_name("transformers", table.engine_name("transformers", e.hf_name)) == e.hf_name
        assert table.hub_name("hub", e.hf_name) == e.hf_name


def test_lora_targets_resolve_to_whole_stacked_modules():
    assert table.lora_modules(QWEN_3B, ["q_proj", "v_proj"]) == {"text/layers/q", "text/layers/v"}
    assert table.lora_modules(QWEN_3B, ["model.layers.*.mlp.*"]) == {
        "text/layers/mlp/gate", "text/layers/mlp/up", "text/layers/mlp/down"}
    assert table.lora_modules(QWEN_3B, ["language_model"]) == table.lora_modules(QWEN_3B, ["model.layers.*"])
    every = table.lora_modules(QWEN_3B, ["all-linear"])
    assert "visual/blocks/attn/qkv" in every and "visual/merger/fc1" in every and len(every) == 7 + 5 + 2
    with pytest.raises(ValueError, match="matches no linear layer"):
        table.lora_modules(QWEN_3B, ["qkv_proj"])
    with pytest.raises(ValueError, match="only some layers"):
        table.lora_modules(QWEN_3B, ["model.layers.1.*"])
