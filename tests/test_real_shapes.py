"""Qwen2.5-VL-3B's exact widths (`configs/qwen25vl_3b_shapes.yaml`: vocabulary 151,936, head_dim 128, tied
embeddings, the 1280-wide vision tower with 112-pixel windows) at a cut depth, random weights from
`shared.tiny_checkpoint --like qwen2.5-vl-3b`: logits equal transformers' on a text and an image input, and two RL
iterations run end to end (vLLM engine, an image resized to just under max_pixels, pushes verified by checksum).
"""
from __future__ import annotations

import json

import numpy as np
import pytest

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def shapes_ckpt(tmp_path_factory) -> str:
    from shared.tiny_checkpoint import spec_like, write_checkpoint

    return str(write_checkpoint(tmp_path_factory.mktemp("shapes_3b"), spec_like("qwen2.5-vl-3b", 2, 4)))


def test_checkpoint_has_the_released_widths(shapes_ckpt):
    from shared.models.qwen2_5_vl_config import Qwen25VLConfig
    from shared.models.qwen2_5_vl_presets import preset

    ours, real = Qwen25VLConfig.from_hf(shapes_ckpt), Qwen25VLConfig.from_hf(preset("qwen2.5-vl-3b"))
    assert ours.text.num_layers == 2 and ours.vision.depth == 4 and ours.vision.fullatt_block_indexes == (3,)
    cut = lambda c: (c.replace(text=c.text.__class__(**{**c.text.__dict__, "num_layers": 0}),  # noqa: E731
                               vision=c.vision.__class__(**{**c.vision.__dict__, "depth": 0,
                                                            "fullatt_block_indexes": ()})))  # fmt: skip
    assert cut(ours).text == cut(real).text and cut(ours).vision == cut(real).vision
    assert ours.text.head_dim == 128 and ours.tie_word_embeddings and ours.text.vocab_size == 151936


@pytest.mark.parametrize("case", ["text_only", "large_image"])
def test_logits_match_transformers(shapes_ckpt, case):
    import test_model_parity as parity

    samples = {"text_only": [((), "What is 1+1?")], "large_image": [(((448, 644),), "How many squares?")]}[case]
    try:
        parity._compare(shapes_ckpt, samples)
    finally:
        parity._CACHE.pop(shapes_ckpt, None)  # 2.3 GB per copy: free it for the next test


def test_two_rl_iterations_run_end_to_end(shapes_ckpt, tmp_path):
    import ray

    from learner_jax.metrics import read_jsonl
    from learner_jax.placement import start_ray
    from learner_jax.trainer import train
    from shared.config import load_config
    from shared.synthetic import write_split

    data = write_split(tmp_path / "data", "image_train", 4, seed=3, kind="image", image_size=640)
    cfg = load_config("qwen25vl_3b_shapes", [
        f"model.path={shapes_ckpt}", f"data.train_files=[{data}]", f"train.ckpt_dir={tmp_path}/ckpt",
        f"train.log_dir={tmp_path}/logs", f"ray.temp_dir=/tmp/lmmrl_ray_shapes",
    ])  # fmt: skip
    start_ray(cfg.ray)
    try:
        train(cfg)
    finally:
        ray.shutdown()
    rows = [r for r in read_jsonl(f"{cfg.train.log_dir}/metrics.jsonl") if "reward/mean" in r]
    assert len(rows) == 2
    for r in rows:
        assert all(np.isfinite(v) for v in r.values() if isinstance(v, float)), r
        assert r["sync/verified_tensors"] > 0  # every push checked against the engine's checksums
    # the image was resized to just under max_pixels: 512 merged tokens at most, more than 95% of them used
    first = json.loads(open(data).readline())
    assert "image" in first["message"] and rows[0]["prompt/length"] > 0.95 * 512


def test_memory_planner_is_within_15_percent_of_what_xla_allocates(shapes_ckpt):
    """Parameters, gradient accumulator and Adam state against the live arrays; activations plus the micro-batch's
    gradient against XLA's scratch for the compiled gradient program (`bench/memory_plan.py`, one CPU device)."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parent.parent / "bench" / "memory_plan.py"
    spec = importlib.util.spec_from_file_location("memory_plan", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    report = bench.measure(shapes_ckpt, micro=1, seq_len=656, remat=True, strategy_name="replicated", devices=1)
    print(report["planned_over_measured"])
    assert all(0.85 <= r <= 1.15 for r in report["planned_over_measured"].values()), report
