"""MetricsLogger: sampled responses (samples.jsonl, TensorBoard text, a wandb table), the run's plot at close (and
from the command line on a finished run), and the console's figures (progress bar, one line per evaluation)."""
from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from learner_jax import plots
from learner_jax.metrics import MetricsLogger, format_eval, progress_postfix, read_jsonl, sample_rows


@dataclass
class _Prompt:
    text: str
    label: str
    uid: int
    image_paths: list = field(default_factory=list)


@dataclass
class _Sample:
    text: str
    response_ids: list
    finish_reason: str = "stop"


@dataclass
class _Score:
    total: float
    format: float
    accuracy: float
    error: str | None = None


def _rollout(n_prompts=3, n=2):
    prompts = [_Prompt(f"<|im_start|>user\nWhat is {i} + 1?<|im_end|>", str(i + 1), 100 + i,
                       [f"/data/img{i}.png"] if i == 1 else []) for i in range(n_prompts)]  # fmt: skip
    groups = [[_Sample(f"<answer>{i + j}</answer>", list(range(3 + j))) for j in range(n)] for i in range(n_prompts)]
    scores = [_Score(float(j == 1), float("nan") if i == 2 else 1.0, float(j == 1), "timeout" if (i, j) == (0, 0) else None)
              for i in range(n_prompts) for j in range(n)]  # fmt: skip
    return prompts, groups, scores


def _tb_texts(tb_dir: Path) -> dict[int, str]:
    """step -> text of the "samples" tag, read from tensorboardX's event files (TFRecord framing, Event protos)."""
    from tensorboardX.proto import event_pb2

    out = {}
    for path in sorted(tb_dir.glob("events.out.tfevents.*")):
        data = path.read_bytes()
        pos = 0
        while pos < len(data):
            (n,) = struct.unpack("<Q", data[pos:pos + 8])
            event = event_pb2.Event.FromString(data[pos + 12:pos + 12 + n])
            pos += 12 + n + 4
            for v in event.summary.value:
                if v.tag.startswith("samples"):
                    out[event.step] = v.tensor.string_val[0].decode()
    return out


def test_sample_rows_take_the_first_k_prompts_with_every_response_and_its_score():
    prompts, groups, scores = _rollout(n_prompts=3, n=2)
    rows = sample_rows(prompts, groups, scores, k=2)
    assert [(r["uid"], r["sample"]) for r in rows] == [(100, 0), (100, 1), (101, 0), (101, 1)]
    r = rows[3]
    assert r["prompt"] == prompts[1].text and r["label"] == "2" and r["images"] == ["/data/img1.png"]
    assert r["response"] == "<answer>2</answer>" and r["response_tokens"] == 4 and r["finish_reason"] == "stop"
    assert (r["reward"], r["format"], r["accuracy"], r["error"]) == (1.0, 1.0, 1.0, None)
    assert rows[0]["error"] == "timeout"
    assert sample_rows(prompts, groups, scores, k=0) == []
    assert len(sample_rows(prompts, groups, scores, k=10)) == 6


def test_log_samples_writes_jsonl_and_tensorboard_text(tmp_path):
    prompts, groups, scores = _rollout()
    log = MetricsLogger(tmp_path / "run", engines_log=False)
    log.log_samples(0, sample_rows(prompts, groups, scores, k=3))
    log.log_samples(1, sample_rows(prompts, groups, scores, k=1))
    log.log_samples(2, [])  # nothing sampled (train.log_samples: 0): nothing written
    log.close()
    rows = read_jsonl(tmp_path / "run" / "samples.jsonl")
    assert [r["step"] for r in rows] == [0] * 6 + [1] * 2
    assert rows[4]["format"] is None  # NaN (no per-part fields) is written as JSON null
    assert json.loads((tmp_path / "run" / "samples.jsonl").read_text().splitlines()[0])["prompt"] == prompts[0].text
    texts = _tb_texts(tmp_path / "run" / "tb")
    assert sorted(texts) == [0, 1]
    assert "What is 2 + 1?" in texts[0] and "<answer>3</answer>" in texts[0] and "timeout" in texts[0]
    assert "What is 2 + 1?" not in texts[1]


def test_wandb_gets_a_table_of_samples_offline(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    prompts, groups, scores = _rollout()
    log = MetricsLogger(tmp_path / "run", wandb_project="lmmrl-test", run_name="t", config={"x": 1},
                        engines_log=False)  # fmt: skip
    log.log(0, {"reward/mean": 0.5, "reward/accuracy": 0.5, "kl/mean": 0.0, "response/length": 3.5})
    log.log_samples(0, sample_rows(prompts, groups, scores, k=2))
    log.close()
    tables = list((tmp_path / "run" / "wandb").glob("offline-run-*/files/media/table/samples_*.table.json"))
    assert len(tables) == 1
    table = json.loads(tables[0].read_text())
    assert {"prompt", "response", "label", "reward", "format", "accuracy"} <= set(table["columns"])
    assert len(table["data"]) == 4


def _metrics_file(path: Path, n: int = 6, evals: bool = True) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as f:
        for step in range(n):
            f.write(json.dumps({"step": step, "reward/mean": step / n, "reward/format": 1.0, "reward/accuracy": step / n / 2,
                                "kl/mean": 1e-3 * step, "response/length": 10 + step, "time/generate": 1.5,
                                "time/update": 2.0 + step, "time/sync": 0.1}) + "\n")  # fmt: skip
            if evals and step % 3 == 2:
                f.write(json.dumps({"step": step + 1, "eval/text_test/accuracy": 0.5, "eval/text_test/format": 1.0}) + "\n")
        f.write(json.dumps({"step": 0, "reward/mean": 0.9, "reward/accuracy": 0.1, "kl/mean": 0.0}) + "\n")  # a rerun


def _is_png(path: Path) -> bool:
    return path.is_file() and path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 10_000


def test_close_plots_the_run_beside_metrics_jsonl(tmp_path):
    log = MetricsLogger(tmp_path / "run", engines_log=False)
    for step in range(4):
        log.log(step, {"reward/mean": 0.1 * step, "reward/accuracy": 0.05 * step, "kl/mean": 0.001 * step,
                       "response/length": 12.0, "time/generate": 1.0, "time/update": 2.0})  # fmt: skip
    log.close()
    assert _is_png(tmp_path / "run" / "metrics.png")
    log.close()  # twice is harmless


def test_a_plot_that_fails_warns_and_never_fails_the_run(tmp_path, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("no display today")

    monkeypatch.setattr(plots, "plot_run", broken)
    log = MetricsLogger(tmp_path / "run", engines_log=False)
    log.log(0, {"reward/mean": 0.5})
    with pytest.warns(RuntimeWarning, match="could not plot .*no display today"):
        log.close()
    assert read_jsonl(tmp_path / "run" / "metrics.jsonl")[0]["reward/mean"] == 0.5
    # A run that never logged a rollout (it failed at start-up) closes without a plot and without a warning.
    empty = MetricsLogger(tmp_path / "empty", engines_log=False)
    monkeypatch.undo()
    empty.close()
    assert not (tmp_path / "empty" / "metrics.png").exists()


def test_plot_panels_and_rows(tmp_path):
    _metrics_file(tmp_path / "run" / "metrics.jsonl")
    rows = read_jsonl(tmp_path / "run" / "metrics.jsonl")
    rollouts = plots.rollout_rows(rows)
    assert [r["step"] for r in rollouts] == list(range(6)) and rollouts[0]["reward/mean"] == 0.9  # the last row wins
    assert [r["step"] for r in plots.eval_rows(rows)] == [3, 6]
    assert plots._keys("time/*", rollouts) == ["time/generate", "time/sync", "time/update"]
    assert plots._keys("eval/*/accuracy", plots.eval_rows(rows)) == ["eval/text_test/accuracy"]
    out = plots.plot_run(tmp_path / "run")
    assert out == tmp_path / "run" / "metrics.png" and _is_png(out)
    assert not list((tmp_path / "run").glob(".metrics.png.*"))  # no temporary left behind


def test_plots_command_line_on_a_finished_run(tmp_path, capsys):
    _metrics_file(tmp_path / "done" / "metrics.jsonl", evals=False)
    assert plots.main([str(tmp_path / "done")]) == 0
    assert _is_png(tmp_path / "done" / "metrics.png")
    assert plots.main([str(tmp_path / "done"), "--out", str(tmp_path / "elsewhere.png")]) == 0
    assert _is_png(tmp_path / "elsewhere.png")
    assert plots.main([str(tmp_path / "missing")]) == 2
    (tmp_path / "started").mkdir()
    (tmp_path / "started" / "metrics.jsonl").write_text(json.dumps({"step": 0, "eval/x/accuracy": 0.5}) + "\n")
    assert plots.main([str(tmp_path / "started")]) == 1
    assert "holds no rollout yet" in capsys.readouterr().err


def test_progress_bar_figures_and_one_line_per_evaluation(tmp_path, capsys):
    post = progress_postfix({"reward/mean": 0.51234, "reward/accuracy": 0.25, "kl/mean": 0.000123, "x": 1.0})
    assert post == {"reward": "0.512", "acc": "0.25", "kl": "1.23e-04"}
    assert progress_postfix({"reward/mean": 1.0}) == {"reward": "1.000"}
    results = {"text_test": {"accuracy": 0.898, "format": 1.0, "num_examples": 128},
               "image_test": {"accuracy": 0.5390625, "format": math.nan, "num_examples": 64}}  # fmt: skip
    line = format_eval(30, results)
    assert line == "[eval] step 30: text_test acc 0.898 fmt 1.000 (n=128) | image_test acc 0.539 fmt nan (n=64)"
    log = MetricsLogger(tmp_path / "run", engines_log=False)
    assert log.eval_summary(30, results) == line
    log.close()
    out = capsys.readouterr()
    assert (out.out + out.err).strip().splitlines() == [line]
