"""A quiet console: library output (vLLM, transformers, Ray, XLA, gloo) goes to <train.log_dir>/engines.log, the
console keeps the progress bar, evaluation lines and the warnings that mean something; --verbose shows it all. And
the processor call without the deprecated min_pixels/max_pixels keywords."""
from __future__ import annotations

import logging
import os
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest

from learner_jax import placement
from learner_jax.placement import LogRouter

ENGINE = {"pid": 4242, "actor_name": "EngineActor", "ip": "10.0.0.1", "localhost": "10.0.0.1", "is_err": True}
LEARNER = {"pid": 77, "actor_name": "LearnerActor", "ip": "10.0.0.2", "localhost": "10.0.0.1", "is_err": True}
NOISE = [
    "(MainProcess pid=4242) INFO 12-06 21:07:56 [core.py:133] Initializing a V1 LLM engine (v0.32.0) with config",
    "/venv/lib/python3.11/site-packages/transformers/models/qwen2_vl/image_processing_qwen2_vl.py:129: FutureWarning: "
    "Passing `min_pixels` and `max_pixels` to a processor call is deprecated",
    "  warnings.warn(",
    "(MainProcess pid=4242) WARNING 12-06 21:08:00 [cpu_worker.py:140] CPU backend doesn't allow to use "
    "`torch.set_num_threads` after the thread binding, skip it.",
    "(MainProcess pid=4242) WARNING 12-06 21:08:12 [layerwise.py:266] MRotaryEmbedding: Failed to load weights",
    "Loading safetensors checkpoint shards: 100% Completed | 1/1 [00:00<00:00, 112.28it/s]",
    "[W1206 21:07:58.662471998 utils.cpp:68] Warning: NUMA binding: Using MEMBIND policy",
]
MEANINGFUL = [
    "(MainProcess pid=4242) WARNING 12-06 21:08:12 [layerwise.py:266] Qwen2DecoderLayer: Failed to load weights",
    "(MainProcess pid=4242) ERROR 12-06 21:08:13 [core.py:900] EngineCore encountered a fatal error.",
    f"{placement._PROJECT}/rollout_torch/pool.py:300: UserWarning: engine 1 died and was restarted",
    "[lmmrl] engine 1 restarted",
]


def _console(capsys) -> list[str]:
    out = capsys.readouterr()
    return [line for line in (out.out + out.err).splitlines() if line.strip()]


def test_router_writes_every_line_to_the_file_and_only_what_matters_to_the_console(tmp_path, capsys):
    router = LogRouter(verbose=False)
    router.set_file(tmp_path / "engines.log")
    router({**ENGINE, "lines": NOISE + MEANINGFUL})
    router({**LEARNER, "lines": [
        "[Gloo] Rank 0 is connected to 1 peer ranks. Expected number of connected peer ranks is : 1",
        "I1206 21:07:58.1 external/xla/xla/service/service.cc:163] XLA service initialized for platform Host",
        "[eval] step 2: text_test acc 0.500 fmt 1.000 (n=8)",
    ]})  # fmt: skip
    router({**ENGINE, "lines": ["Traceback (most recent call last):", '  File "x.py", line 1, in <module>',
                                "ValueError: bad bucket"]})  # fmt: skip
    router({"pid": "raylet", "ip": "10.0.0.1", "localhost": "10.0.0.1", "is_err": False,
            "lines": ["A worker died or was killed while executing a task by an unexpected system error."]})
    shown = _console(capsys)
    assert shown == (
        [f"(EngineActor pid=4242) {line}" for line in MEANINGFUL]
        + ["(LearnerActor pid=77, ip=10.0.0.2) [eval] step 2: text_test acc 0.500 fmt 1.000 (n=8)"]
        + ["(EngineActor pid=4242) Traceback (most recent call last):",
           '(EngineActor pid=4242)   File "x.py", line 1, in <module>', "(EngineActor pid=4242) ValueError: bad bucket"]
        + ["(raylet) A worker died or was killed while executing a task by an unexpected system error."]
    )  # fmt: skip
    router.close()
    logged = (tmp_path / "engines.log").read_text().splitlines()
    assert len(logged) == len(NOISE) + len(MEANINGFUL) + 3 + 3 + 1
    assert all(line.split(" ", 1)[1].startswith(("(EngineActor pid=4242)", "(LearnerActor pid=77, ip=10.0.0.2)",
                                                 "(raylet)")) for line in logged)  # fmt: skip
    assert any("Initializing a V1 LLM engine" in line for line in logged)
    assert any("Rank 0 is connected" in line for line in logged)


def test_verbose_prints_everything_through_rays_printer_and_still_logs_it(tmp_path):
    seen = []
    router = LogRouter(verbose=True, printer=seen.append)
    router.set_file(tmp_path / "engines.log")
    batch = {**ENGINE, "lines": NOISE}
    router(batch)
    router.close()
    assert seen == [batch]
    assert len((tmp_path / "engines.log").read_text().splitlines()) == len(NOISE)


def test_lines_before_a_file_is_named_go_to_the_first_file_and_later_files_take_over(tmp_path):
    router = LogRouter()
    router({**ENGINE, "lines": ["early line"]})
    router.set_file(tmp_path / "stage1" / "engines.log")
    router({**ENGINE, "lines": ["stage 1 line"]})
    router.set_file(tmp_path / "stage2" / "engines.log")
    router({**ENGINE, "lines": ["stage 2 line"]})
    router.close()
    one, two = ((tmp_path / s / "engines.log").read_text() for s in ("stage1", "stage2"))
    assert "early line" in one and "stage 1 line" in one and "stage 2 line" not in one
    assert "stage 2 line" in two and "early line" not in two


def test_a_line_the_router_cannot_handle_does_not_kill_rays_log_thread(tmp_path, capsys):
    router = LogRouter()
    router.set_file(tmp_path / "engines.log")
    router({**ENGINE, "lines": [None]})  # type: ignore[list-item]
    assert "could not be routed" in "\n".join(_console(capsys))


def test_rays_info_lines_leave_the_console_for_the_log_file(tmp_path):
    import ray  # noqa: F401  (configures the "ray" logger and its console handler)

    ray_logger = logging.getLogger("ray")
    placement.log_to(tmp_path / "engines.log")
    console = [h for h in ray_logger.handlers if not isinstance(h, placement._RayLoggerToFile)]
    assert console  # Ray's own console handler (it writes to the stderr of its creation, so levels are checked)
    try:
        placement.set_verbose(False)
        assert all(h.level == logging.WARNING for h in console)
        ray_logger.info("Started a local Ray instance (test).")
        ray_logger.warning("a Ray warning (test)")
        logged = (tmp_path / "engines.log").read_text()
        assert "Started a local Ray instance (test)." in logged and "a Ray warning (test)" in logged
        placement.set_verbose(True)
        assert all(h.level == logging.NOTSET for h in console)
    finally:
        placement.set_verbose(False)


def test_each_run_names_its_own_engines_log(tmp_path):
    from learner_jax.metrics import MetricsLogger

    for name in ("fre", "mgt"):
        log = MetricsLogger(tmp_path / name)
        assert placement.engines_log() == tmp_path / name / "engines.log"
        log.close()


def test_processor_kwargs_give_the_same_pixels_without_the_deprecation_warning(tiny_ckpt, rollout_images):
    from PIL import Image

    from rollout_torch.processing import load_processor, messages_to_prompt, processor_kwargs

    proc = load_processor(tiny_ckpt)
    msgs = [{"role": "user", "content": [{"type": "image", "image": rollout_images[2]}, {"type": "text", "text": "?"}]}]
    # bounds that bind: the processor itself resizes (the images come pre-resized under the prompt's own bounds)
    prompt = messages_to_prompt(proc, msgs, min_pixels=28 * 28 * 4, max_pixels=28 * 28 * 6)
    images = [Image.open(rollout_images[2]).convert("RGB")]  # 90x140: the bounds make the processor shrink it
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        new = proc(text=[prompt.text], images=images, return_tensors="np", **processor_kwargs(prompt))
    assert not [w for w in caught if "min_pixels" in str(w.message)]
    assert processor_kwargs(prompt) == {"size": {"shortest_edge": 28 * 28 * 4, "longest_edge": 28 * 28 * 6}}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        old = proc(text=[prompt.text], images=images, return_tensors="np", min_pixels=prompt.min_pixels,
                   max_pixels=prompt.max_pixels)  # fmt: skip
    assert [w for w in caught if "min_pixels" in str(w.message)]  # the form we no longer use does warn
    np.testing.assert_array_equal(new["image_grid_thw"], old["image_grid_thw"])
    np.testing.assert_array_equal(new["pixel_values"], old["pixel_values"])
    np.testing.assert_array_equal(new["input_ids"], old["input_ids"])
    default = proc(text=[prompt.text], images=images, return_tensors="np")
    assert default["pixel_values"].shape != new["pixel_values"].shape  # the bounds did bind


# ------------------------------------------------------------------------------------------------ the real thing

MAX_CONSOLE_LINES = 10  # measured: 1 here (27 before: Ray's start-up line, vLLM/transformers/torch warnings)


@pytest.mark.slow
def test_a_run_prints_a_progress_bar_and_keeps_library_logs_in_engines_log(tiny_ckpt, synth_data, tmp_path):
    run = tmp_path / "run"
    sets = {
        "pipeline": "rl", "model.path": tiny_ckpt, "model.dtype": "float32", "model.remat": "false",
        "data.train_files": f"[{synth_data['image_train']}]", "data.eval_files": f"[{synth_data['image_test']}]",
        "data.prompt_max_len": 128, "rollout.n_samples_per_prompt": 4, "rollout.rollout_batch_size": 4,
        "rollout.generate_max_len": 12, "rollout.kv_cache_gib": 0.125, "reward.num_workers": 1,
        "train.train_batch_size": 16, "train.micro_train_batch_size": 8, "train.max_rollouts": 2,
        "train.eval_steps": 2, "train.save_steps": 2, "train.ckpt_dir": run / "ckpt", "train.log_dir": run / "logs",
        "train.export_dir": run / "export", "actor.lr": 1e-3, "actor.warmup_ratio": 0.0,
        "ray.temp_dir": "/tmp/lmmrl_ray_console_test",
    }  # fmt: skip
    cmd = [sys.executable, "-m", "learner_jax.main", "--config", "demo"]
    for k, v in sets.items():
        cmd += ["--set", f"{k}={v}"]
    env = {k: v for k, v in os.environ.items() if k != "VLLM_LOGGING_LEVEL"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900, env=env,
                          cwd=Path(__file__).resolve().parent.parent)  # fmt: skip
    # Lines as a terminal shows them: "\n" ends one; tqdm's "\r" redraws the bar within it.
    console = [line for line in (proc.stdout + proc.stderr).split("\n") if line.strip()]
    assert proc.returncode == 0, "\n".join(console[-60:])
    print("\n".join(console))
    assert len(console) < MAX_CONSOLE_LINES, "\n".join(console)
    assert not [line for line in console if "INFO" in line or "Warning" in line or "pid=" in line], console
    assert any("100%" in line and "2/2" in line for line in console)  # the progress bar, finished
    log = (run / "logs" / "engines.log").read_text()
    assert "Started a local Ray instance" in log  # Ray's start-up line
    assert "Initializing a V1 LLM engine" in log and "(EngineActor pid=" in log  # vLLM's, with their source
    assert (run / "logs" / "metrics.png").is_file()
    # Wired in the trainer and Run (see the hand-over notes): KL in the bar, one line per evaluation, samples.
    assert any("kl=" in line for line in console), "trainer hook missing: bar.set_postfix(progress_postfix(last))"
    assert any(line.startswith("[eval] step 2: image_test acc") for line in console), "Run.evaluate hook missing"
    assert (run / "logs" / "samples.jsonl").is_file(), "trainer hook missing: run.logger.log_samples(...)"
