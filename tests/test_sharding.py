"""Partition rules, mesh shapes, batch splitting and the memory planner, without devices (AbstractMesh), plus the
train step's skip of non-finite updates on one device. The 8-device numerics are in test_sharding_multidevice.py."""
import json
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from learner_jax import memory
from learner_jax.models.config import Qwen25VLConfig
from learner_jax.models.params import abstract_params
from learner_jax.optim import make_optimizer
from learner_jax.sharding import (PARAM_RULES, Strategy, TrainStep, axis_sizes, batch_spec, device_bytes, leaf_spec,
                                  path_str)
from shared.config import OptimConfig, ShardingConfig, load_config

QWEN_3B = Qwen25VLConfig.from_hf(memory.PRESETS["qwen2.5-vl-3b"])
QWEN_7B = Qwen25VLConfig.from_hf(memory.PRESETS["qwen2.5-vl-7b"])


def _plan(strategy="zero3", model=QWEN_3B, n=8, **axes) -> Strategy:
    return Strategy.abstract(ShardingConfig(strategy, **axes), model, n)


def _specs(strategy: Strategy, kind="params", value_head=False):
    params = abstract_params(strategy.model, include_value_head=value_head)
    tree = strategy.param_shardings(params) if kind == "params" else strategy.grad_shardings(params)
    return {path_str(p): s.spec for p, s in jax.tree_util.tree_flatten_with_path(tree)[0]}


@pytest.mark.parametrize("model", [QWEN_3B, QWEN_7B], ids=["3b_tied", "7b_untied"])
def test_every_parameter_matches_exactly_one_rule(model):
    params = abstract_params(model, include_value_head=True)
    for path, _ in jax.tree_util.tree_flatten_with_path(params)[0]:
        name = path_str(path)
        hits = [pattern for pattern, _, _ in PARAM_RULES if re.search(rf"(?:^|/){pattern}$", name)]
        assert len(hits) == 1, (name, hits)
    specs = _specs(_plan("tensor", model, data=4, tensor=2), value_head=True)  # every template fits its leaf
    assert len(specs) == len(jax.tree.leaves(params))


def test_tensor_parallel_layout_is_megatron_and_indivisible_heads_stay_whole():
    s = _plan("tensor", data=1, tensor=8)
    specs = _specs(s)
    assert specs["text/embed/embedding"] == P("tensor")  # vocabulary-parallel (tied: also the LM head)
    assert specs["text/layers/q/kernel"] == P(None, None, "tensor")  # column-parallel
    assert specs["text/layers/q/bias"] == P(None, "tensor")
    assert specs["text/layers/o/kernel"] == P(None, "tensor")  # row-parallel
    assert specs["text/layers/mlp/gate/kernel"] == P(None, None, "tensor")
    assert specs["text/layers/mlp/down/kernel"] == P(None, "tensor")
    # 2 KV heads cannot split 8 ways (and 3420 vision MLP columns do not divide by 8): replicated, and said so.
    assert specs["text/layers/k/kernel"] == P() and specs["visual/blocks/mlp/gate/kernel"] == P()
    assert any(n.startswith("text/layers/k/kernel (36, 2048, 256): dim 2 (kv_heads") for n in s.notes)
    assert any(n.startswith("visual/blocks/mlp/gate/kernel") for n in s.notes)
    listing = s.listing(abstract_params(QWEN_3B), s.param_shardings(abstract_params(QWEN_3B)))
    assert "text/layers/q/kernel" in listing and "fallback: text/layers/k/kernel" in listing
    two = _specs(_plan("tensor", data=4, tensor=2))
    assert two["text/layers/k/kernel"] == P(None, None, "tensor")
    assert two["visual/blocks/mlp/up/kernel"] == P(None, None, "tensor")


def test_fsdp_takes_the_largest_dividing_dim_and_never_the_layer_axis():
    specs = _specs(_plan("zero3", data=1, fsdp=8))
    assert specs["text/embed/embedding"] == P("fsdp")  # 151936 > 2048
    assert specs["text/layers/mlp/gate/kernel"] == P(None, None, "fsdp")  # [36, 2048, 11008]
    assert specs["visual/blocks/mlp/gate/kernel"] == P(None, "fsdp")  # 3420 does not divide by 8, 1280 does
    sizes = {"data": 1, "fsdp": 64, "tensor": 1}
    assert leaf_spec("text/layers/input_norm/scale", (64, 32), sizes, {}, ("fsdp",)) == P()  # the 64 is layers
    notes = []
    assert leaf_spec("visual/blocks/mlp/up/bias", (32, 3420), {"data": 1, "fsdp": 8, "tensor": 1}, {}, ("fsdp",),
                     notes) == P()  # fmt: skip
    assert notes and "replicated" in notes[0]


def test_2d_layout_combines_fsdp_and_tensor_on_different_dims():
    specs = _specs(_plan("zero3", fsdp=4, tensor=2))
    assert specs["text/layers/q/kernel"] == P(None, "fsdp", "tensor")
    assert specs["text/layers/o/kernel"] == P(None, "tensor", "fsdp")
    assert specs["text/embed/embedding"] == P("tensor", "fsdp")


def test_each_strategy_shards_what_its_zero_stage_says():
    q = "text/layers/q/kernel"  # [36, 2048, 2048]: ZeRO takes the first of the two largest dims
    expected = {  # strategy: (axes, params, grads)
        "replicated": ({}, P(), P()),
        "zero1": ({}, P(), P()),
        "zero2": ({}, P(), P(None, "data")),
        "zero3": ({"data": 2, "fsdp": 4}, P(None, "fsdp"), P(None, ("data", "fsdp"))),
    }
    for name, (axes, params, grads) in expected.items():
        s = _plan(name, **axes)
        assert (_specs(s)[q], _specs(s, "grads")[q]) == (params, grads), name


def test_optimizer_moments_follow_their_parameter_and_counters_are_replicated():
    s = _plan("zero1")
    params = abstract_params(QWEN_3B)
    tx, _ = make_optimizer(OptimConfig(lr=1e-6), 10, params)
    opt = jax.eval_shape(tx.init, params)
    specs = {path_str(p): sh.spec for p, sh in jax.tree_util.tree_flatten_with_path(s.opt_shardings(opt))[0]}
    mu = [v for k, v in specs.items() if k.endswith("mu/text/layers/q/kernel")]
    assert mu == [P(None, "data")]
    assert all(v == P() for k, v in specs.items() if k.endswith("count"))


def test_mesh_shape_from_config_and_clear_errors():
    assert axis_sizes(ShardingConfig("zero3", data=-1, fsdp=4), 8) == {"data": 2, "fsdp": 4, "tensor": 1}
    with pytest.raises(ValueError, match="does not match the 8 devices"):
        axis_sizes(ShardingConfig("zero3", data=3, fsdp=2), 8)
    with pytest.raises(ValueError, match="use strategy 'tensor'"):
        _plan("replicated", tensor=2)
    with pytest.raises(ValueError, match="fsdp >= 2"):
        _plan("zero3", fsdp=1)
    with pytest.raises(ValueError, match="expected one of replicated, zero1, zero2, zero3, tensor"):
        _plan("zero4")
    with pytest.raises(ValueError, match="no partition rule for parameter extra/w"):
        _plan(fsdp=8).param_shardings({"extra": {"w": jax.ShapeDtypeStruct((8, 8), jnp.float32)}})


def test_batch_arrays_split_on_their_B_dimension():
    sizes = {"data": 2, "fsdp": 4, "tensor": 2}
    assert batch_spec("input_ids_BT", (8, 32), sizes) == P(("data", "fsdp"))
    assert batch_spec("position_ids_3BT", (3, 8, 32), sizes) == P(None, ("data", "fsdp"))
    assert batch_spec("pixel_values_PC", (64, 1176), sizes) == P()  # all images concatenated: not per sample
    assert batch_spec("vision_window_idx_GS", (4, 16), sizes) == P()
    with pytest.raises(ValueError, match="multiple of 8"):
        batch_spec("input_ids_BT", (4, 32), sizes)


def test_memory_report_of_3b_counts_params_and_adam_moments():
    params = abstract_params(QWEN_3B)
    n = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params))
    assert 3.7e9 < n < 3.8e9  # Qwen2.5-VL-3B: 3.75B with the vision tower
    tx, _ = make_optimizer(OptimConfig(lr=1e-6), 10, params)
    opt = jax.eval_shape(tx.init, params)
    r = {name: memory.memory_report(_plan(name, **axes), params, opt, micro_batch=2, seq_len=8192)
         for name, axes in (("replicated", {}), ("zero1", {}), ("zero2", {}), ("zero3", {"fsdp": 8}))}  # fmt: skip
    assert r["replicated"].params == 4 * n and r["replicated"].grads == 4 * n
    assert abs(r["replicated"].opt_state - 8 * n) < 1000  # two float32 moments (plus step counters)
    assert r["zero1"].params == 4 * n and abs(r["zero1"].opt_state - 8 * n / 8) < 8 * n * 0.002
    assert r["zero2"].grads < 4 * n / 8 * 1.002 and r["zero2"].params == 4 * n
    assert r["zero3"].params < 4 * n / 8 * 1.002
    assert r["replicated"].compute_copy == 2 * n  # bf16 copy made by the forward pass
    a = r["zero3"]
    assert a.activations < a.activations_no_remat / 5  # remat (the default) keeps one input per layer


def test_offload_moves_optimizer_state_out_of_the_device_total():
    params = abstract_params(QWEN_3B)
    tx, _ = make_optimizer(OptimConfig(lr=1e-6), 10, params)
    opt = jax.eval_shape(tx.init, params)
    on = memory.memory_report(_plan("zero1", offload_optimizer=True), params, opt, micro_batch=1, seq_len=1024)
    off = memory.memory_report(_plan("zero1"), params, opt, micro_batch=1, seq_len=1024)
    assert on.opt_on_host and on.device_total == off.device_total - off.opt_state
    kinds = {s.memory_kind for s in jax.tree.leaves(_plan("zero1", offload_optimizer=True).opt_shardings(opt))}
    assert kinds == {"pinned_host"}


def test_activation_estimate_grows_with_tokens_and_shrinks_with_tensor_parallelism():
    base = memory.activation_bytes(QWEN_3B, 2, 4096, 2, remat=False)
    assert memory.activation_bytes(QWEN_3B, 4, 4096, 2, remat=False) > 1.9 * base
    assert memory.activation_bytes(QWEN_3B, 2, 4096, 2, remat=False, tensor=8) < base / 2
    softmax = memory.activation_bytes(QWEN_3B, 2, 4096, 2, remat=False, fused_attention=False)
    assert softmax > base + 36 * 2 * 4096 * 16 * 4096 * 4  # float32 T x T probabilities per head and layer


def test_planner_cli_prints_every_strategy_for_the_3b_config(capsys):
    memory.main(["--config", "fre_text", "--devices", "8", "--device-gb", "80"])
    out = capsys.readouterr().out
    assert "3.75B params" in out
    rows = {line.split()[0]: line.split() for line in out.splitlines() if line.split()}
    for name in ("replicated", "zero1", "zero2", "zero3", "tensor"):
        assert rows[name][-2] in ("yes", "NO") and rows[name][-1] in ("cudnn", "dot_product", "softmax"), out
    memory.main(["--config", "fre_text", "--devices", "8", "--device-gb", "80", "--json", "--strategies", "zero3"])
    (zero3,) = json.loads(capsys.readouterr().out)
    assert zero3["mesh"] == {"data": 1, "fsdp": 8, "tensor": 1} and zero3["device_total"] < 80 * memory.GIB


def test_planner_resolves_the_architecture_or_says_how():
    cfg = load_config("fre_text")
    assert memory.model_config(cfg).text.num_layers == 36  # from the 3B path name; the files are not needed
    cfg.model.path = "models/some-other-model"
    with pytest.raises(ValueError, match="--arch"):
        memory.model_config(cfg)
    assert memory.model_config(cfg, "qwen2.5-vl-7b").text.hidden_size == 3584


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_train_step_keeps_the_old_state_when_the_gradient_is_not_finite(tiny_ckpt, bad):
    from learner_jax.models.hf_io import load_checkpoint

    cfg, params_np = load_checkpoint(tiny_ckpt)
    strategy = Strategy.from_config(ShardingConfig("replicated"), cfg, jax.devices()[:1])

    def loss_fn(params, batch, scale_B, scalars):  # a cheap loss on every parameter; no model forward needed here
        sq = sum(jnp.sum(x * x) for x in jax.tree.leaves(params))
        return sq * scale_B.mean() * batch["input_ids_BT"].mean(), {}

    tx, _ = make_optimizer(OptimConfig(lr=1e-2, warmup_ratio=0.0), 10, params_np)
    step = TrainStep(strategy, loss_fn, tx, params_np)
    params = strategy.place(params_np, step.param_shardings)
    opt = step.init_opt_state(params)
    batch = {"input_ids_BT": np.ones((2, 4), np.int32)}
    params, opt, m = step(params, opt, [(batch, np.full(2, bad, np.float32))])
    assert m["skipped"] == 1.0 and not np.isfinite(m["grad_norm"])
    assert all(np.array_equal(np.asarray(a), b) for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(params_np)))
    params, opt, m = step(params, opt, [(batch, np.ones(2, np.float32))] * 2, grad_scale=0.5)
    assert m["skipped"] == 0.0 and np.isfinite(m["loss"])
    moved = [not np.array_equal(np.asarray(a), b) for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(params_np))]
    assert all(moved)


@pytest.mark.parametrize("n_micro", [1, 2])
def test_a_step_equals_the_whole_optax_chain(tiny_ckpt, n_micro):
    """The step's two optimizer programs (clip over the gradient sum in place, then AdamW) give what the optax chain
    gives in one update; one micro-batch takes the program with no accumulator."""
    import optax

    from learner_jax.models.hf_io import load_checkpoint

    cfg, params_np = load_checkpoint(tiny_ckpt)
    strategy = Strategy.from_config(ShardingConfig("replicated"), cfg, jax.devices()[:1])

    def loss_fn(params, batch, w_B, scalars):
        sq = sum(jnp.sum(jnp.sin(x) * x) for x in jax.tree.leaves(params))
        return sq * w_B.mean() * batch["input_ids_BT"].mean(), {"w": w_B.mean()}

    tx, _ = make_optimizer(OptimConfig(lr=1e-2, warmup_ratio=0.0, max_norm=0.5, weight_decay=0.1), 10, params_np,
                           frozen=lambda name: name.startswith("visual/merger/"))  # fmt: skip
    step = TrainStep(strategy, loss_fn, tx, params_np)
    micro = [({"input_ids_BT": np.full((2, 4), k + 2, np.int32)}, np.array([0.5, 1.5 + k], np.float32))
             for k in range(n_micro)]  # fmt: skip
    params = strategy.place(params_np, step.param_shardings)
    ours = step(params, step.init_opt_state(params), micro, grad_scale=0.5)
    assert step.grad_bytes == device_bytes(step._zeros())

    grads = [jax.grad(lambda p: loss_fn(p, b, w, ())[0])(params_np) for b, w in micro]
    g = jax.tree.map(lambda *x: 0.5 * sum(x), *grads)
    updates, opt = tx.update(g, tx.init(params_np), params_np)
    want = (optax.apply_updates(params_np, updates), opt)
    assert ours[2]["grad_norm"] == pytest.approx(float(optax.global_norm(g)), rel=1e-5)
    assert ours[2]["grad_norm"] > 0.5  # so the clip acts
    assert ours[2]["w"] == pytest.approx(np.mean([w.mean() for _, w in micro]))
    for a, b in zip(jax.tree.leaves((ours[0], ours[1])), jax.tree.leaves(want)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-7)
    flat = jax.tree_util.tree_flatten_with_path(ours[0])[0]
    kept = [np.array_equal(np.asarray(a), b) for (path, a), b in zip(flat, jax.tree.leaves(params_np))
            if path_str(path).startswith("visual/merger/")]  # fmt: skip
    assert kept and all(kept)
