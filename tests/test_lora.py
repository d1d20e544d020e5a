"""LoRA in a run: errors at config load, only adapters trained (no base gradient, no base optimizer state), the
reference is the base itself, folded weights equal the adapted model, the memory planner counts it, and the PEFT
export loads with `peft` onto the base checkpoint and gives the adapted model's logits."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from learner_jax import memory
from learner_jax.adapters import adapter_shapes, fold, init_adapters, lora_spec, peft_tensors
from learner_jax.learner import Learner, TrainState
from learner_jax.models.batch import build_batch
from learner_jax.models.config import ModelOptions, Qwen25VLConfig
from learner_jax.models.hf_io import load_checkpoint
from learner_jax.models.lora import merge_lora, split_lora
from learner_jax.models.qwen2_5_vl import forward
from learner_jax.optim import make_optimizer
from learner_jax.rl.kl import make_kl_controller
from learner_jax.setup import LoopState, Run
from learner_jax.sharding import Strategy, device_bytes
from shared.config import ConfigError, ShardingConfig, load_config
from shared.records import VisionInputs

from test_learner import N, _iteration, _rollout

LORA = {"model.lora.rank": 4, "model.lora.alpha": 8}


@pytest.mark.parametrize("override, message", [
    ({"model.lora.rank": -1}, "model.lora.rank: must be > 0"),
    ({**LORA, "model.lora.alpha": 0}, "model.lora.alpha"),
    ({**LORA, "model.lora.dropout": 0.1}, "model.lora.dropout"),
    ({**LORA, "model.lora.targets": "[]"}, "model.lora.targets: name at least one"),
    ({**LORA, "model.lora.targets": "[qkv_proj]"}, "matches no linear layer"),
    ({**LORA, "model.lora.targets": "['model.layers.0.*']"}, "only some layers"),
    ({**LORA, "model.freeze_prefixes": "[visual]"}, "model.freeze_prefixes"),
])  # fmt: skip
def test_bad_lora_settings_fail_at_config_load(tiny_ckpt, override, message):
    with pytest.raises(ConfigError, match=message):
        load_config("demo", [f"model.path={tiny_ckpt}", *[f"{k}={v}" for k, v in override.items()]])


def _noisy(adapters, seed=0):
    """Adapters as after some training (fresh ones have B = 0, the base model exactly)."""
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda x: jnp.asarray(0.05 * rng.standard_normal(x.shape), jnp.float32), adapters)


def _image_batch(cfg, seed=0):
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, 400, 5).tolist() + [cfg.vision_start_token_id, *[cfg.image_token_id] * 4] + [7, 8, 9]
    vision = VisionInputs(rng.normal(size=(16, cfg.vision.patch_dim)).astype(np.float32), np.array([[1, 4, 4]]))
    return build_batch([ids, rng.integers(0, 400, 9).tolist()], [vision, VisionInputs.empty(cfg.vision.patch_dim)],
                       cfg, pad_token_id=0)  # fmt: skip


def test_fresh_adapters_are_the_base_and_folding_equals_the_adapted_model(tiny_ckpt):
    cfg, params = load_checkpoint(tiny_ckpt)
    spec = lora_spec(load_config("demo", [f"model.path={tiny_ckpt}", "model.lora.rank=4",
                                          "model.lora.targets=[language_model, vision_tower]"]).model.lora, cfg)
    assert "visual/blocks/attn/qkv" in spec.targets and "text/layers/mlp/down" in spec.targets
    fresh = init_adapters(cfg, spec, jax.random.key(0))
    assert jax.tree.map(lambda x: x.shape, fresh) == jax.tree.map(lambda x: x.shape, adapter_shapes(cfg, spec))
    batch, opts = _image_batch(cfg), ModelOptions(attention="softmax")
    logits = lambda p, lora=spec: forward(p, batch, cfg, opts, return_hidden=False, lora=lora)["logits_BTV"]  # noqa
    base = np.asarray(logits(params, None))
    np.testing.assert_array_equal(np.asarray(logits(merge_lora(params, fresh))), base)  # B = 0
    trained = merge_lora(params, _noisy(fresh))
    adapted = np.asarray(logits(trained))
    assert np.abs(adapted - base).max() > 1e-3  # the adapters matter
    folded = fold(trained, spec.scale)
    assert split_lora(folded)[1] == {}
    np.testing.assert_allclose(np.asarray(logits(folded, None)), adapted, rtol=1e-5, atol=1e-5)


def _lora_run(ckpt, rank=4):
    overrides = {"rollout.n_samples_per_prompt": N, "rollout.rollout_batch_size": 4, "train.train_batch_size": 16,
                 "train.micro_train_batch_size": 4, "actor.warmup_ratio": 0.0, "actor.lr": 1e-2,
                 "model.path": ckpt, "model.lora.rank": rank}  # fmt: skip
    cfg = load_config("demo", [f"{k}={v}" for k, v in overrides.items()])
    model_cfg, base = load_checkpoint(ckpt)
    strategy = Strategy.from_config(ShardingConfig("replicated"), model_cfg, jax.devices()[:1])
    base = strategy.place(base, strategy.param_shardings(base))
    spec = lora_spec(cfg.model.lora, model_cfg)
    adapters = init_adapters(model_cfg, spec, jax.random.key(0))
    adapters = strategy.place(adapters, strategy.param_shardings(adapters))
    tx, lr = make_optimizer(cfg.actor, 10, adapters)
    learner = Learner(model_cfg, ModelOptions(attention="softmax"), cfg.algo, strategy, 0, N, tx, adapters,
                      logprob_chunk=64, actor_frozen=base, lora=spec)  # fmt: skip
    run = Run(cfg=cfg, model_cfg=model_cfg, learner=learner, ref_params=base, lr_actor=lr, rollout=None, sync=None,
              scorer=None, ckpt=None, logger=None, total_rollouts=1, lora=spec)  # fmt: skip
    state = LoopState(actor=TrainState(adapters, learner.actor_step.init_opt_state(adapters)), critic=None,
                      sampler=None, kl_ctl=make_kl_controller(cfg.algo), rng=np.random.default_rng(0))  # fmt: skip
    return run, state, base


def test_an_update_trains_the_adapters_only_and_the_reference_stays_the_base(tiny_ckpt):
    run, state, base = _lora_run(tiny_ckpt)
    before = jax.tree.map(np.asarray, base)
    exp = _rollout(run.model_cfg, np.random.default_rng(0))
    perm, batches, arrays, kl, kl_mean = _iteration(run, state, exp)
    assert float(kl_mean) == 0.0  # fresh adapters: policy == reference
    stats = run.update(state, batches, perm, arrays)
    assert stats["actor/grad_norm"] > 0 and state.actor.step == 1
    # the base (also the reference) is untouched; only adapter leaves have gradients and optimizer state
    jax.tree.map(np.testing.assert_array_equal, jax.tree.map(np.asarray, run.learner.actor_step.frozen), before)
    assert run.ref_params is run.learner.actor_step.frozen
    grads, opt = run.learner.actor_step.grad_bytes, device_bytes(state.actor.opt_state)
    assert grads and all("/lora/" in k for k in grads)
    assert all("/lora/" in k for k in opt if not k.endswith("count"))
    assert any(np.abs(np.asarray(x)).max() > 0 for x in jax.tree.leaves(split_lora(state.actor.params)[1]))
    # after the update the policy differs from the reference: KL of the next rollout is no longer 0
    _, _, _, _, kl_mean = _iteration(run, state, exp)
    assert float(kl_mean) != 0.0
    # pushes and exports receive folded weights with the base's structure
    weights = run.policy_weights(state)
    assert jax.tree.structure(weights) == jax.tree.structure(base)


def test_planner_counts_lora_and_its_optimizer_state_is_a_few_percent_at_3b():
    cfg = load_config("mgt_geo", ["sharding.strategy=zero2"])
    model = Qwen25VLConfig.from_hf(memory.PRESETS["qwen2.5-vl-3b"])
    full = memory.plan(cfg, model, 8, ["zero2"])[0]
    cfg.model.lora.rank = 16
    lora = memory.plan(cfg, model, 8, ["zero2"])[0]
    assert lora.opt_state <= 0.05 * full.opt_state and lora.grads <= 0.05 * full.grads
    assert lora.params > full.params  # base + adapters
    assert cfg.uses_reference and full.reference == full.params and lora.reference == 0  # the base is the reference


def test_optimizer_state_measured_matches_the_planner(tiny_ckpt):
    run, state, base = _lora_run(tiny_ckpt)
    measured = sum(device_bytes(state.actor.opt_state).values())
    cfg = run.cfg
    planned = memory.plan(cfg, run.model_cfg, 1, ["replicated"], platform="cpu")[0]
    assert planned.opt_state == measured
    assert planned.params == sum(device_bytes(run.policy(state)).values())


def test_peft_export_loads_onto_the_base_with_peft_and_matches_the_adapted_model(tiny_ckpt, tmp_path):
    torch = pytest.importorskip("torch")
    peft = pytest.importorskip("peft")
    from transformers import AutoModelForImageTextToText

    from learner_jax.export import export_hf

    cfg, params = load_checkpoint(tiny_ckpt)
    spec = lora_spec(load_config("demo", [f"model.path={tiny_ckpt}", "model.lora.rank=4", "model.lora.alpha=8",
                                          "model.lora.targets=['model.layers.*']"]).model.lora, cfg)
    adapters = _noisy(init_adapters(cfg, spec, jax.random.key(1)), seed=3)
    export_hf(fold(merge_lora(params, adapters), spec.scale), cfg, tiny_ckpt, tmp_path / "out", adapters=adapters,
              lora=spec)
    assert len(peft_tensors(adapters, cfg, spec)) == 2 * 7 * cfg.text.num_layers
    ids = torch.tensor([[5, 17, 42, 99, 3, 250, 31]])
    base = AutoModelForImageTextToText.from_pretrained(tiny_ckpt, dtype=torch.float32)
    with_adapter = peft.PeftModel.from_pretrained(base, str(tmp_path / "out" / "adapter")).eval()
    merged = AutoModelForImageTextToText.from_pretrained(str(tmp_path / "out"), dtype=torch.float32).eval()
    with torch.no_grad():
        a = with_adapter(input_ids=ids).logits.numpy()
        b = merged(input_ids=ids).logits.numpy()
    ours = np.asarray(forward(merge_lora(params, adapters), build_batch([ids[0].tolist()], [VisionInputs.empty(
        cfg.vision.patch_dim)], cfg, pad_token_id=0), cfg, ModelOptions(attention="softmax"), return_hidden=False,
        lora=spec)["logits_BTV"])  # fmt: skip
    base_logits = np.asarray(forward(params, build_batch([ids[0].tolist()], [VisionInputs.empty(cfg.vision.patch_dim)],
                                                         cfg, pad_token_id=0), cfg, return_hidden=False)["logits_BTV"])
    assert np.abs(ours - base_logits).max() > 1e-3
    np.testing.assert_allclose(a, ours, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(b, ours, rtol=1e-4, atol=1e-4)
