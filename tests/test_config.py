import subprocess
import sys
from pathlib import Path

import pytest

from shared.config import CONFIG_DIR, ConfigError, derive, load_config

STAGES = sorted(p.stem for p in CONFIG_DIR.glob("*.yaml"))


def test_the_stages_are_all_there():
    assert {"fre_text", "fre_multi", "mgt_geo", "mgt_percereason", "direct_rl_geo", "demo"} <= set(STAGES)


@pytest.mark.parametrize("name", STAGES)
def test_every_named_config_loads_and_documents_itself(name):
    cfg = load_config(name)
    assert cfg.name == name
    assert cfg.reproduces and cfg.expected_result
    header = (CONFIG_DIR / f"{name}.yaml").read_text().splitlines()[0]
    assert header.startswith("#")


def test_reference_hyperparameters_of_the_stages():
    fre, geo, perce = load_config("fre_text"), load_config("mgt_geo"), load_config("mgt_percereason")
    assert (fre.algo.advantage_estimator, fre.actor.lr, fre.rollout.n_samples_per_prompt) == ("reinforce_baseline", 4e-7, 16)
    assert (geo.algo.advantage_estimator, geo.critic.lr, geo.actor.lr) == ("gae", 9e-6, 1e-6)
    assert (perce.rollout.generate_max_len, perce.train.micro_train_batch_size, perce.actor.lr) == (8192, 1, 4e-7)
    assert fre.actor.betas == [0.9, 0.95] and fre.actor.max_norm == 1.0 and fre.algo.eps_clip == 0.2
    assert geo.model.path == fre.train.export_dir  # MGT starts from the FRE export


def test_derived_quantities_match_the_reference_counting():
    d = derive(load_config("fre_text"), 40315)
    assert d["responses_per_rollout"] == 4096
    assert d["optimizer_steps_per_rollout"] == 16
    assert d["total_optimizer_steps"] == 5038 and d["warmup_steps"] == 152
    assert d["total_rollouts"] == 314 and d["max_model_len"] == 8192
    assert derive(load_config("direct_rl_geo"), None)["total_optimizer_steps"] is None


def test_overrides_are_typed():
    cfg = load_config("fre_text", ["actor.lr=1e-6", "rollout.n_samples_per_prompt=8", "model.freeze_prefixes=[visual]"])
    assert cfg.actor.lr == 1e-6 and cfg.rollout.n_samples_per_prompt == 8 and cfg.model.freeze_prefixes == ["visual"]


@pytest.mark.parametrize(
    "override, message",
    [
        ("actor.lrr=1", "unknown key actor.lrr; valid keys here: lr,"),
        ("bogus.x=1", "unknown key bogus"),
        ("rollout.n_samples_per_prompt=abc", "rollout.n_samples_per_prompt: expected an integer"),
        ("algo.advantage_estimator=ppo", "not one of gae, reinforce, rloo"),
        ("algo.kl_estimator=k4", "algo.kl_estimator"),
        ("train.train_batch_size=300", "does not divide the 4096 responses"),
        ("train.micro_train_batch_size=3", "micro_train_batch_size: 3 does not divide"),
        ("rollout.n_samples_per_prompt=1", "needs groups of at least 2"),
        ("algo.use_kl_loss=maybe", "expected true or false"),
    ],
)
def test_bad_configs_fail_at_load_naming_the_key(override, message):
    with pytest.raises(ConfigError) as e:
        load_config("fre_text", [override])
    assert message in str(e.value)


# (config, override, key named in the error): every value a run would trip over later, caught at load.
BAD_VALUES = [
    ("fre_text", "actor.lr=nan", "actor.lr: must be a finite number > 0, got nan"),
    ("fre_text", "actor.lr=inf", "actor.lr:"),
    ("fre_text", "actor.lr=0", "actor.lr:"),
    ("mgt_geo", "critic.lr=nan", "critic.lr:"),
    ("mgt_geo", "critic.lr=-1e-6", "critic.lr:"),
    ("mgt_geo", "critic.max_norm=0", "critic.max_norm:"),
    ("mgt_geo", "critic.betas=[0.9]", "critic.betas:"),
    ("fre_text", "actor.max_norm=0", "actor.max_norm: must be a finite number > 0"),
    ("fre_text", "actor.max_norm=nan", "actor.max_norm:"),
    ("fre_text", "actor.warmup_ratio=1.5", "actor.warmup_ratio: must be in [0, 1]"),
    ("fre_text", "actor.warmup_ratio=-0.1", "actor.warmup_ratio:"),
    ("fre_text", "actor.min_lr_ratio=2", "actor.min_lr_ratio:"),
    ("fre_text", "actor.weight_decay=-1", "actor.weight_decay:"),
    ("fre_text", "actor.betas=[0.9, 1.0]", "actor.betas[1]: must be in [0, 1)"),
    ("fre_text", "rollout.top_p=0", "rollout.top_p: must be in (0, 1]"),
    ("fre_text", "rollout.top_p=1.01", "rollout.top_p:"),
    ("fre_text", "rollout.top_p=nan", "rollout.top_p:"),
    ("fre_text", "rollout.temperature=-0.5", "rollout.temperature: must be a finite number >= 0"),
    ("fre_text", "rollout.temperature=nan", "rollout.temperature:"),
    ("fre_text", "rollout.top_k=0", "rollout.top_k: must be -1 (off) or >= 1"),
    ("fre_text", "rollout.top_k=-2", "rollout.top_k:"),
    ("fre_text", "rollout.tensor_parallel_size=0", "rollout.tensor_parallel_size: must be >= 1"),
    ("fre_text", "rollout.kv_cache_gib=0", "rollout.kv_cache_gib:"),
    ("fre_text", "rollout.gpu_memory_utilization=1.5", "rollout.gpu_memory_utilization: must be in (0, 1]"),
    ("fre_text", "rollout.cpu_threads_per_engine=0", "rollout.cpu_threads_per_engine:"),
    ("fre_text", "rollout.engine_resources={CPU: .nan}", "rollout.engine_resources.CPU:"),
    ("fre_text", "algo.eps_clip=0", "algo.eps_clip: must be a finite number > 0"),
    ("fre_text", "algo.eps_clip_high=-0.1", "algo.eps_clip_high:"),
    ("fre_text", "algo.dual_clip=nan", "algo.dual_clip: must be a finite number > 1"),
    ("fre_text", "algo.value_clip=0", "algo.value_clip:"),
    ("fre_text", "algo.gamma=nan", "algo.gamma: must be in (0, 1]"),
    ("fre_text", "algo.lambd=1.5", "algo.lambd:"),
    ("fre_text", "algo.init_kl_coef=-0.001", "algo.init_kl_coef:"),
    ("fre_text", "algo.kl_target=0", "algo.kl_target:"),
    ("fre_text", "algo.kl_horizon=0", "algo.kl_horizon: must be >= 1"),
    ("fre_text", "algo.reward_clip_range=[.nan, 1]", "algo.reward_clip_range:"),
    ("fre_text", "algo.entropy_coef=nan", "algo.entropy_coef:"),
    ("fre_text", "algo.tis_cap=0", "algo.tis_cap:"),
    ("fre_text", "model.lora.dropout=1.0", "model.lora.dropout: must be in [0, 1)"),
    ("fre_text", "model.lora.alpha=nan", "model.lora.alpha:"),
    ("fre_text", "model.freeze_prefixes=['']", "model.freeze_prefixes:"),
    ("fre_text", "train.max_ckpts=0", "train.max_ckpts: must be >= 1, got 0"),
    ("fre_text", "train.max_bad_steps=0", "train.max_bad_steps:"),
    ("fre_text", "train.max_rollouts=0", "train.max_rollouts:"),
    ("fre_text", "train.verify_every=-1", "train.verify_every: must be >= 0"),
    ("fre_text", "train.eval_steps=-1", "train.eval_steps:"),
    ("fre_text", "train.seed=-1", "train.seed:"),
    ("fre_text", "train.ckpt_dir=ckpt/{nme}", "train.ckpt_dir:"),
    ("fre_text", "train.log_dir=", "train.log_dir:"),
    ("fre_text", "reward.num_workers=0", "reward.num_workers: must be >= 1"),
    ("fre_text", "reward.remote_batch_size=0", "reward.remote_batch_size:"),
    ("fre_text", "reward.timeout_s=0", "reward.timeout_s: must be a finite number > 0"),
    ("fre_text", "reward.timeout_s=nan", "reward.timeout_s:"),
    ("fre_text", "reward.error_reward=inf", "reward.error_reward:"),
    ("fre_text", "reward.fn=nope", "reward.fn: unknown reward function 'nope'"),
    ("fre_text", "reward.fn=no_such_module_xyz:fn", "reward.fn:"),
    ("fre_text", "reward.remote_url=localhost:5000", "reward.remote_url:"),
    ("fre_text", "data.max_samples=0", "data.max_samples:"),
    ("fre_text", "data.min_pixels=0", "data.min_pixels:"),
    ("fre_text", "data.expected_num_prompts=0", "data.expected_num_prompts:"),
    ("fre_text", "data.train_probs=[.nan]", "data.train_probs:"),
    ("fre_text", "data.label_key=", "data.input_key/label_key:"),
    ("fre_text", "learner.coordinator_timeout_s=0", "learner.coordinator_timeout_s:"),
    ("fre_text", "learner.num_cpus_per_process=-1", "learner.num_cpus_per_process:"),
    ("fre_text", "learner.num_gpus_per_process=nan", "learner.num_gpus_per_process:"),
    ("fre_text", "learner.resources_per_process={TPU: -1}", "learner.resources_per_process.TPU:"),
    ("fre_text", "ray.connect_timeout_s=0", "ray.connect_timeout_s:"),
    ("fre_text", "ray.num_cpus=-1", "ray.num_cpus:"),
    ("fre_text", "model=3", "model: expected a mapping of ModelConfig settings, got 3"),
    ("fre_text", "model=[visual]", "model: expected a mapping"),
    ("fre_text", "model.lora=3", "model.lora: expected a mapping"),
]


@pytest.mark.parametrize("name, override, message", BAD_VALUES, ids=[b[1] for b in BAD_VALUES])
def test_bad_values_fail_at_load_naming_the_key(name, override, message):
    with pytest.raises(ConfigError) as e:
        load_config(name, [override])
    assert message in str(e.value)


@pytest.mark.parametrize(
    "override",
    ["rollout.temperature=0", "rollout.top_p=1", "rollout.top_k=-1", "rollout.top_k=50", "train.verify_every=0",
     "train.eval_steps=0", "actor.warmup_ratio=0", "actor.warmup_ratio=1", "critic.lr=null", "algo.init_kl_coef=0",
     "reward.remote_url=http://10.0.0.2:5000", "train=null"],
)  # fmt: skip
def test_edge_values_that_mean_something_still_load(override):
    load_config("fre_text", [override])  # critic.lr: fre_text trains no critic, so it may stay unset


def test_a_yaml_list_where_a_mapping_belongs_names_the_key(tmp_path):
    section = tmp_path / "section.yaml"
    section.write_text("reproduces: x\nrollout:\n  - n_samples_per_prompt: 8\n")
    with pytest.raises(ConfigError, match="rollout: expected a mapping"):
        load_config(str(section))
    whole = tmp_path / "whole.yaml"
    whole.write_text("- model\n- data\n")
    with pytest.raises(ConfigError, match="expected a mapping of sections"):
        load_config(str(whole))


def test_gae_without_critic_lr_is_rejected():
    with pytest.raises(ConfigError, match="critic.lr"):
        load_config("mgt_geo", ["critic.lr=null"])


def test_unknown_config_name_lists_the_known_ones():
    with pytest.raises(ConfigError, match="named configs: .*fre_text"):
        load_config("fre_txt")


def test_dry_run_prints_schedule_and_then_asks_for_the_model(tmp_path):
    cmd = [sys.executable, "-m", "learner_jax.main", "--config", "mgt_percereason", "--dry-run",
           "--set", "model.path=" + str(tmp_path / "nowhere")]  # fmt: skip
    p = subprocess.run(cmd, capture_output=True, text=True, cwd=Path(__file__).parent.parent)
    assert "optimizer_steps_per_rollout: 16" in p.stdout and "warmup_steps:" in p.stdout
    assert p.returncode == 2
    assert "model.path: no Hugging Face checkpoint at " + str(tmp_path / "nowhere") in p.stderr


def test_dry_run_succeeds_with_a_local_model(tiny_ckpt):
    cmd = [sys.executable, "-m", "learner_jax.main", "--config", "fre_text", "--dry-run", "--set", f"model.path={tiny_ckpt}"]
    p = subprocess.run(cmd, capture_output=True, text=True, cwd=Path(__file__).parent.parent)
    assert p.returncode == 0, p.stderr
    assert "total_optimizer_steps: 5038" in p.stdout


# The colocated layout of docs/cluster.md §1: the learner reserves no GPU and shares the engines' GPUs.
COLOCATED = ["learner.num_gpus_per_process=0", "rollout.engine_resources={GPU: 1}", "rollout.gpu_memory_utilization=0.4"]


def test_a_gpu_memory_fraction_without_a_reserved_gpu_declares_a_colocated_learner():
    cfg = load_config("fre_text", COLOCATED + ["learner.gpu_memory_fraction=0.55"])  # 0.55 + 0.4 = 0.95 exactly
    assert cfg.learner.shares_gpus and cfg.learner.platform == "gpu"
    own = load_config("fre_text", ["learner.num_gpus_per_process=8", "learner.gpu_memory_fraction=0.9"])
    assert not own.learner.shares_gpus and own.learner.platform == "gpu"  # a cap on its own GPUs, no sharing
    assert load_config("fre_text").learner.platform == "cpu"
    assert load_config("fre_text", ["learner.resources_per_process={TPU: 4}"]).learner.platform == "tpu"


@pytest.mark.parametrize(
    "override, message",
    [
        (["learner.gpu_memory_fraction=0"], "learner.gpu_memory_fraction: must be in (0, 1], got 0.0"),
        (["learner.gpu_memory_fraction=1.2"], "learner.gpu_memory_fraction: must be in (0, 1], got 1.2"),
        (["learner.gpu_memory_fraction=0.6"],
         "learner.gpu_memory_fraction + rollout.gpu_memory_utilization: 0.6 + 0.4 = 1 > 0.95"),
        (["learner.gpu_memory_fraction=0.5", "rollout.weight_transport=collective"],
         "rollout.weight_transport: collective cannot serve a colocated run"),
        (["learner.gpu_memory_fraction=0.5", "rollout.engine_resources={CPU: 1}"],
         "rollout.engine_resources {'CPU': 1.0} names no GPU"),
        (["learner.gpu_memory_fraction=0.5", "learner.resources_per_process={TPU: 4}"],
         "learner.gpu_memory_fraction: 0.5 is a GPU setting, but the learner reserves TPU"),
    ],
)  # fmt: skip
def test_gpu_memory_settings_that_cannot_work_fail_at_load(override, message):
    with pytest.raises(ConfigError) as e:
        load_config("fre_text", COLOCATED + override)
    assert message in str(e.value)


def test_the_colocated_budget_error_explains_the_headroom():
    with pytest.raises(ConfigError) as e:
        load_config("fre_text", COLOCATED + ["learner.gpu_memory_fraction=0.6"])
    assert "CUDA context per process" in str(e.value) and "NCCL buffers" in str(e.value)
    # Learner GPUs of its own: nothing is shared, so no joint budget and any weight route.
    load_config("fre_text", ["learner.num_gpus_per_process=8", "learner.gpu_memory_fraction=0.9",
                             "rollout.gpu_memory_utilization=0.9", "rollout.weight_transport=collective"])  # fmt: skip
