import subprocess
import sys
from pathlib import Path

import pytest

from shared.config import CONFIG_DIR, ConfigError, derive, load_config

STAGES = ["fre_text", "fre_multi", "mgt_geo", "mgt_percereason", "direct_rl_geo", "demo"]


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
