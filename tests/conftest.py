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
