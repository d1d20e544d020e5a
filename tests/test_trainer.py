"""End-to-end runs of the RL loop through the real parts: JAX learner, vLLM engines in Ray actors, the bridge,
math-verify rewards. Tiny model and data; each run is a few iterations."""
import json
import shutil

import numpy as np
import pytest
import yaml

from shared.config import load_config

pytestmark = pytest.mark.slow
RAY_DIR = "/tmp/lmmrl_ray_trainer_test"  # its own Ray session, apart from any demo running on the machine


def tiny_run_config(tmp, ckpt, data, name, estimator="reinforce_baseline", **sets):
    overrides = {
        "pipeline": "rl", "model.path": ckpt, "model.dtype": "float32", "model.remat": False,
        "data.train_files": f"[{data['text_train']}]", "data.prompt_max_len": 128,
        "rollout.n_samples_per_prompt": 4, "rollout.rollout_batch_size": 4, "rollout.generate_max_len": 12,
        "rollout.kv_cache_gib": 0.125, "reward.num_workers": 1, "algo.advantage_estimator": estimator,
        "train.train_batch_size": 16, "train.micro_train_batch_size": 8, "train.max_rollouts": 2,
        "train.save_steps": 1, "train.ckpt_dir": str(tmp / name / "ckpt"), "train.log_dir": str(tmp / name / "logs"),
        "train.export_dir": None, "actor.lr": 1e-3, "actor.warmup_ratio": 0.0, "critic.lr": 1e-3,
        "ray.temp_dir": RAY_DIR,
    }
    overrides.update(sets)
    return load_config("demo", [f"{k}={'null' if v is None else v}" for k, v in overrides.items()])


def metrics(cfg):
    from learner_jax.metrics import read_jsonl

    return [r for r in read_jsonl(f"{cfg.train.log_dir}/metrics.jsonl") if "reward/mean" in r]


@pytest.fixture(scope="module")
def ray_session():
    import ray

    from learner_jax.placement import start_ray

    start_ray(load_config("demo", [f"ray.temp_dir={RAY_DIR}"]).ray)
    yield
    ray.shutdown()


@pytest.mark.parametrize("estimator", ["reinforce_baseline", "group_norm", "rloo", "gae"])
def test_loop_runs_and_step_zero_is_on_policy(ray_session, tiny_ckpt, synth_data, tmp_path, estimator):
    from learner_jax.trainer import train

    cfg = tiny_run_config(tmp_path, tiny_ckpt, synth_data, estimator, estimator=estimator)
    train(cfg)
    rows = metrics(cfg)
    assert len(rows) == 2
    first = rows[0]
    assert first["actor/log_ratio_abs_max"] == 0.0  # before any update the policy equals the old policy
    assert first["kl/mean"] == 0.0  # and the reference
    assert all(np.isfinite(v) for r in rows for v in r.values())
    assert rows[1]["policy_version"] == 2.0
    if estimator == "gae":
        assert "critic/value_loss" in first


def test_resume_equals_an_uninterrupted_run(ray_session, tiny_ckpt, synth_data, tmp_path):
    from learner_jax.checkpoint import Checkpointer
    from learner_jax.trainer import train

    full = tiny_run_config(tmp_path, tiny_ckpt, synth_data, "full", **{"train.max_rollouts": 4})
    train(full)
    part = tiny_run_config(tmp_path, tiny_ckpt, synth_data, "part", **{"train.max_rollouts": 2})
    train(part)
    part_more = tiny_run_config(tmp_path, tiny_ckpt, synth_data, "part", **{"train.max_rollouts": 4})
    train(part_more, resume=True)
    a, b = metrics(full), metrics(part_more)
    assert [r["step"] for r in b] == [0, 1, 2, 3]
    # the resolved config (after the overrides) is kept beside the metrics and inside every checkpoint
    assert yaml.safe_load(open(f"{part_more.train.log_dir}/config.yaml"))["train"]["max_rollouts"] == 4
    ck = Checkpointer(part_more.train.ckpt_dir)
    assert ck.meta(2)["config"]["train"]["max_rollouts"] == 2 and ck.meta()["config"]["train"]["max_rollouts"] == 4
    ck.close()
    for ra, rb in zip(a, b):
        for key in ("reward/mean", "actor/policy_loss", "kl/mean", "response/length", "actor/grad_norm"):
            np.testing.assert_allclose(rb[key], ra[key], rtol=1e-5, atol=1e-7, err_msg=f"step {ra['step']} {key}")


def test_two_stages_fre_export_feeds_mgt(ray_session, tiny_ckpt, synth_data, tmp_path):
    from transformers import AutoModelForImageTextToText

    from learner_jax.trainer import train

    export = tmp_path / "fre_export"
    fre = tiny_run_config(tmp_path, tiny_ckpt, synth_data, "fre", **{"train.export_dir": str(export)})
    train(fre)
    model, info = AutoModelForImageTextToText.from_pretrained(str(export), output_loading_info=True)
    assert not any(info.values())
    mgt = tiny_run_config(tmp_path, str(export), synth_data, "mgt", **{
        "data.train_files": f"[{synth_data['image_train']}]", "train.max_rollouts": 1})  # fmt: skip
    train(mgt)
    assert len(metrics(mgt)) == 1


def test_lora_run_verifies_merged_pushes_resumes_exactly_and_exports_an_adapter(ray_session, tiny_ckpt, synth_data,
                                                                                tmp_path):  # fmt: skip
    from safetensors.numpy import load_file

    from learner_jax.trainer import train

    lora = {"model.lora.rank": 4, "model.lora.alpha": 8, "train.verify_every": 1, "actor.lr": 1e-2}
    full = tiny_run_config(tmp_path, tiny_ckpt, synth_data, "lora_full", **lora,
                           **{"train.max_rollouts": 3, "train.export_dir": str(tmp_path / "lora_export")})
    train(full)  # every push is checked against the engines' checksums of the merged weights
    rows = metrics(full)
    assert [r["sync/verified_tensors"] > 0 for r in rows] == [True] * 3
    assert rows[0]["kl/mean"] == 0.0  # fresh adapters: the policy is the base, which is the reference
    assert rows[0]["memory/opt_state_bytes_per_device"] < 0.5 * rows[0]["memory/params_bytes_per_device"]
    adapter = load_file(str(tmp_path / "lora_export" / "adapter" / "adapter_model.safetensors"))
    assert adapter and all(".lora_A.weight" in k or ".lora_B.weight" in k for k in adapter)
    part = tiny_run_config(tmp_path, tiny_ckpt, synth_data, "lora_part", **lora, **{"train.max_rollouts": 1})
    train(part)
    more = tiny_run_config(tmp_path, tiny_ckpt, synth_data, "lora_part", **lora, **{"train.max_rollouts": 3})
    train(more, resume=True)
    for ra, rb in zip(rows, metrics(more)):
        for key in ("reward/mean", "actor/policy_loss", "kl/mean", "actor/grad_norm"):
            np.testing.assert_allclose(rb[key], ra[key], rtol=1e-5, atol=1e-7, err_msg=f"step {ra['step']} {key}")
