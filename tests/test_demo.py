"""A shortened run of the README's main job: warm start, both RL stages, evaluations, table and plot."""
import json

import pytest

from shared.config import load_config

pytestmark = pytest.mark.slow


def test_demo_path_end_to_end(tmp_path):
    import ray

    from learner_jax.demo import WARM, run_demo

    warm = {**WARM, "steps": 20, "train": 64, "test": 16}
    cfg = load_config("demo", [f"model.path={tmp_path / 'warm'}", "train.max_rollouts=2",
                               "rollout.rollout_batch_size=4", "rollout.n_samples_per_prompt=4",
                               "train.train_batch_size=16", "train.micro_train_batch_size=16",
                               "ray.temp_dir=/tmp/lmmrl_ray_demo_test"])  # fmt: skip
    try:
        table = run_demo(cfg, root=tmp_path, warm_recipe=warm)
    finally:
        ray.shutdown()
    assert list(table) == ["warm start", "after FRE", "after MGT"]
    for row in table.values():
        for split in ("text_test", "image_test"):
            assert 0.0 <= row[split]["accuracy"] <= 1.0 and row[split]["num_examples"] == 16
    assert (tmp_path / "demo.png").stat().st_size > 1000
    assert json.loads((tmp_path / "results.json").read_text()) == table
    assert json.loads((tmp_path / "warm" / "lmmrl_warm_start.json").read_text())["key"]
    assert (tmp_path / "runs" / "mgt" / "export" / "model.safetensors").is_file()
