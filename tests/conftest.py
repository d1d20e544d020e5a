"""Fixtures shared by the whole suite. Sections below are owned by the module they name; append, don't rewrite."""
from __future__ import annotations

import os

# Offline, single-process engines, bounded KV cache, no Ray auth: the machines' facts (see README).
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402

from shared.tiny_checkpoint import TinySpec, write_checkpoint  # noqa: E402


# ---------------------------------------------------------------- foundation: tiny checkpoints and data


@pytest.fixture(scope="session")
def tiny_ckpt(tmp_path_factory) -> str:
    """A tiny untied Qwen2.5-VL checkpoint (text hidden 128, head_dim 32, 2 layers; vision depth 4)."""
    return str(write_checkpoint(tmp_path_factory.mktemp("tiny_ckpt"), TinySpec(seed=0)))


@pytest.fixture(scope="session")
def tiny_ckpt_tied(tmp_path_factory) -> str:
    return str(write_checkpoint(tmp_path_factory.mktemp("tiny_ckpt_tied"), TinySpec(seed=1, tie_word_embeddings=True)))


@pytest.fixture(scope="session")
def synth_data(tmp_path_factory) -> dict:
    from shared.synthetic import write_suite

    return {k: str(v) for k, v in write_suite(tmp_path_factory.mktemp("synth"), 24, 8, seed=0).items()}


# ---------------------------------------------------------------- learner_jax.models: Qwen2.5-VL port


@pytest.fixture(scope="session")
def tiny_ckpt_window112(tmp_path_factory) -> str:
    """Tied checkpoint with the real model's 112-pixel windows (4x4 merged units) and other full-attention blocks."""
    spec = TinySpec(seed=2, tie_word_embeddings=True, window_size=112, fullatt_block_indexes=[0, 2])
    return str(write_checkpoint(tmp_path_factory.mktemp("tiny_ckpt_w112"), spec))


# ---------------------------------------------------------------- rollout_torch: engines, prompts, Ray pool


@pytest.fixture(scope="session")
def rollout_images(tmp_path_factory) -> list[str]:
    """Synthetic PNGs of different sizes and aspect ratios (noise, so every patch differs)."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    out = tmp_path_factory.mktemp("rollout_images")
    paths = []
    for i, (h, w) in enumerate([(60, 80), (100, 50), (90, 140), (40, 40)]):
        path = out / f"img{i}.png"
        Image.fromarray((rng.random((h, w, 3)) * 255).astype(np.uint8)).save(path)
        paths.append(str(path))
    return paths


@pytest.fixture(scope="session")
def rollout_prompts(tiny_ckpt, rollout_images) -> list:
    """Text, one-image and two-image prompts built with the checkpoint's chat template."""
    from rollout_torch.processing import load_processor, messages_to_prompt

    proc = load_processor(tiny_ckpt)
    img0, img1, img2, _ = rollout_images
    messages = [
        [{"role": "user", "content": [{"type": "text", "text": "What is the sum?"}, {"type": "image", "image": img0}]}],
        [{"role": "user", "content": "Compute 3 + 4."}],
        [{"role": "user", "content": [{"type": "image", "image": img1}, {"type": "text", "text": "How many squares?"},
                                      {"type": "image", "image": f"file://{img2}"}]}],
        [{"role": "system", "content": "Solve the question."}, {"role": "user", "content": "What is 7 * 8?"}],
    ]  # fmt: skip
    return [messages_to_prompt(proc, m, uid=100 + i, label=str(i)) for i, m in enumerate(messages)]


def _engine_config(path: str, **kw):
    from rollout_torch.engine import EngineConfig

    kw = {"dtype": "float32", "seed": 0, "max_model_len": 2048, "kv_cache_bytes": 64 << 20, **kw}
    return EngineConfig(path, **kw)


@pytest.fixture(scope="session")
def rollout_engine_config():
    """EngineConfig factory for tests: fp32, 2k context, 64 MiB KV cache."""
    return _engine_config


@pytest.fixture(scope="session")
def vllm_engine(tiny_ckpt):
    """One in-process vLLM engine (fp32) on the tiny checkpoint; tests that push weights restore them."""
    from rollout_torch.vllm_engine import VllmEngine

    engine = VllmEngine(_engine_config(tiny_ckpt))
    yield engine
    engine.close()


@pytest.fixture(scope="session")
def hf_engine(tiny_ckpt):
    from rollout_torch.hf_engine import HFEngine

    return HFEngine(_engine_config(tiny_ckpt))


@pytest.fixture(scope="module")
def rollout_ray():
    """A local Ray for pool tests (reused if a test already started one)."""
    import ray

    started = not ray.is_initialized()
    if started:
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, _temp_dir="/tmp/lmmrl_ray_tests")
    yield ray
    if started:
        ray.shutdown()


@pytest.fixture(scope="session")
def weights(tiny_ckpt):
    """The tiny checkpoint's tensors by Hub name."""
    from safetensors.numpy import load_file

    return load_file(f"{tiny_ckpt}/model.safetensors")


@pytest.fixture(scope="session")
def scaled(weights):
    """The checkpoint with every language-model layer scaled: a visibly different policy."""
    return {k: (v * 1.5 if k.startswith("model.layers.") else v) for k, v in weights.items()}


def run_script(path: str, *args, timeout: float = 2400):
    """Run a test file as a script in a fresh process (XLA fixes the device count when JAX first touches a device);
    its last line of output is JSON."""
    import json
    import os
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, path, *map(str, args)], capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "JAX_PLATFORMS": "cpu"})  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-6000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])
