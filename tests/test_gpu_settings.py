"""GPU settings that take effect before JAX or vLLM start, checked on CPU: the learner process's environment
(`learner_jax.launch.process_env`, `learner_jax.main.set_learner_env`) and the one NCCL-or-gloo decision of the
collective weight route (`EngineConfig.from_config`, `bridge.transport.make_transport`)."""
import os

import pytest

from shared.config import ConfigError, load_config

COLOCATED = ["learner.num_gpus_per_process=0", "rollout.engine_resources={GPU: 1}", "rollout.gpu_memory_utilization=0.4"]
MEMORY_VARS = ("XLA_CLIENT_MEM_FRACTION", "XLA_PYTHON_CLIENT_MEM_FRACTION", "XLA_PYTHON_CLIENT_PREALLOCATE")


@pytest.fixture
def environ(monkeypatch):
    """A copy of the environment without JAX's platform and memory variables, restored afterwards."""
    env = {k: v for k, v in os.environ.items() if k not in MEMORY_VARS + ("JAX_PLATFORMS",)}
    monkeypatch.setattr(os, "environ", env)
    return env


def test_process_env_pins_the_platform_and_sets_the_memory_keys(environ):
    from learner_jax.launch import process_env

    assert process_env(load_config("fre_text")) == {"JAX_PLATFORMS": "cpu"}  # reserves no accelerator
    colocated = process_env(load_config("fre_text", COLOCATED + ["learner.gpu_memory_fraction=0.5"]))
    assert colocated == {"JAX_PLATFORMS": "cuda,cpu", "XLA_CLIENT_MEM_FRACTION": "0.5"}
    capped = process_env(load_config("fre_text", COLOCATED + ["learner.gpu_memory_fraction=0.45",
                                                              "learner.gpu_preallocate=false"]))  # fmt: skip
    assert capped == {"JAX_PLATFORMS": "cuda,cpu", "XLA_CLIENT_MEM_FRACTION": "0.45",
                      "XLA_PYTHON_CLIENT_PREALLOCATE": "false"}  # fmt: skip
    own = process_env(load_config("fre_text", ["learner.num_gpus_per_process=8"]))
    assert own == {"JAX_PLATFORMS": "cuda,cpu"}  # JAX's default fraction
    tpu = process_env(load_config("fre_text", ["learner.resources_per_process={TPU: 4}"]))
    assert tpu == {}
    assert not any("XLA_PYTHON_CLIENT_MEM_FRACTION" in e for e in (colocated, capped, own, tpu))


def test_the_deprecated_fraction_variable_with_the_key_is_an_error_naming_both(environ):
    from learner_jax.launch import process_env

    cfg = load_config("fre_text", COLOCATED + ["learner.gpu_memory_fraction=0.5"])
    environ["XLA_PYTHON_CLIENT_MEM_FRACTION"] = "0.5"
    with pytest.raises(ConfigError) as e:
        process_env(cfg)
    msg = str(e.value)
    assert "learner.gpu_memory_fraction" in msg and "XLA_PYTHON_CLIENT_MEM_FRACTION=0.5" in msg
    assert "raises ValueError when both are set" in msg and "unset XLA_PYTHON_CLIENT_MEM_FRACTION" in msg
    # Without the key nothing is set, and JAX reads the user's variable as before.
    assert process_env(load_config("fre_text")) == {"JAX_PLATFORMS": "cpu"}


def test_a_fraction_variable_in_the_environment_must_agree_with_the_key(environ):
    from learner_jax.launch import process_env

    cfg = load_config("fre_text", COLOCATED + ["learner.gpu_memory_fraction=0.5"])
    environ["XLA_CLIENT_MEM_FRACTION"] = "0.50"
    assert process_env(cfg)["XLA_CLIENT_MEM_FRACTION"] == "0.5"
    environ["XLA_CLIENT_MEM_FRACTION"] = "0.7"
    with pytest.raises(ConfigError, match="XLA_CLIENT_MEM_FRACTION=0.7 disagree"):
        process_env(cfg)


def test_the_driver_gets_the_learner_env_and_refuses_it_once_jax_has_started(environ):
    import jax

    from learner_jax.main import set_learner_env

    jax.devices()  # backends started in this process
    cfg = load_config("fre_text", COLOCATED + ["learner.gpu_memory_fraction=0.5"])
    with pytest.raises(RuntimeError, match="already started its backends.*XLA_CLIENT_MEM_FRACTION=0.5"):
        set_learner_env(cfg)
    assert "XLA_CLIENT_MEM_FRACTION" not in environ
    environ.update({"JAX_PLATFORMS": "cuda,cpu", "XLA_CLIENT_MEM_FRACTION": "0.5"})
    set_learner_env(cfg)  # nothing to change: fine even now


def test_engines_take_nccl_from_the_learner_platform_not_from_their_own_process(tmp_path, monkeypatch):
    import torch

    from rollout_torch.engine import EngineConfig

    (tmp_path / "config.json").write_text("{}")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # the rollout process sees CUDA
    cpu_learner = load_config("fre_text", ["rollout.weight_transport=collective", f"model.path={tmp_path}"])
    assert EngineConfig.from_config(cpu_learner).weight_transport == "auto"  # the bridge opens gloo groups
    gpu_learner = load_config("fre_text", ["rollout.weight_transport=collective", f"model.path={tmp_path}",
                                           "learner.num_gpus_per_process=8"])  # fmt: skip
    assert EngineConfig.from_config(gpu_learner).weight_transport == "nccl"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert EngineConfig.from_config(gpu_learner).weight_transport == "nccl"  # VllmEngine then refuses: no CUDA
    assert EngineConfig.from_config(load_config("fre_text", [f"model.path={tmp_path}"])).weight_transport == "auto"


def test_a_gpu_learner_whose_jax_sees_no_gpu_is_refused_before_any_group(environ):
    from bridge.transport import make_transport

    environ["JAX_PLATFORMS"] = "cuda,cpu"  # what process_env sets for a GPU learner; JAX here has CPU only
    with pytest.raises(RuntimeError, match="engines take NCCL, but JAX sees no GPU"):
        make_transport("collective", object())
