"""Per-iteration metrics to JSONL and TensorBoard always, and to wandb when a project is named; sampled responses
(`samples.jsonl`, TensorBoard text, a wandb table); the run's plot (`metrics.png`) when the logger closes; and the
console's two kinds of line, the progress bar's figures and one line per evaluation."""
from __future__ import annotations

import json
import math
import time
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Optional, Sequence

SAMPLE_COLUMNS = ("step", "uid", "sample", "prompt", "images", "label", "response", "reward", "format", "accuracy",
                  "error", "finish_reason", "response_tokens")  # fmt: skip


class MetricsLogger:
    def __init__(self, log_dir: str | Path, wandb_project: Optional[str] = None, run_name: str = "", config: dict = None,
                 engines_log: bool = True):  # fmt: skip
        """`engines_log`: library output (engines, Ray, XLA) goes to `<log_dir>/engines.log` from now on
        (`placement.log_to`), so each run, and each stage of the demo, keeps its own."""
        from tensorboardX import SummaryWriter

        self.dir = Path(log_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        if engines_log:
            from .placement import log_to

            log_to(self.dir / "engines.log")
        self.jsonl = (self.dir / "metrics.jsonl").open("a")
        self.samples = None  # samples.jsonl, opened on the first call of log_samples
        self.tb = SummaryWriter(str(self.dir / "tb"))
        self.wandb = None
        self.closed = False
        if wandb_project:
            import wandb  # optional dependency (the [wandb] extra), only when asked for

            self.wandb = wandb.init(project=wandb_project, name=run_name, config=config or {}, dir=str(self.dir))

    def log(self, step: int, metrics: dict[str, float]) -> None:
        clean = {k: float(v) for k, v in metrics.items() if v is not None}
        self.jsonl.write(json.dumps({"step": step, **clean}) + "\n")
        self.jsonl.flush()
        for key, value in clean.items():
            self.tb.add_scalar(key, value, step)
        self.tb.flush()
        if self.wandb is not None:
            self.wandb.log(clean, step=step)

    def log_samples(self, step: int, rows: Sequence[dict]) -> None:
        """Sampled responses of one rollout (`sample_rows`): a line each in `samples.jsonl`, one text entry in
        TensorBoard, one table in wandb."""
        if not rows:
            return
        rows = [{"step": step, **{k: v for k, v in r.items() if k != "step"}} for r in rows]
        if self.samples is None:
            self.samples = (self.dir / "samples.jsonl").open("a")
        for r in rows:
            self.samples.write(json.dumps(_jsonable(r), ensure_ascii=False) + "\n")
        self.samples.flush()
        self.tb.add_text("samples", samples_markdown(rows), step)
        self.tb.flush()
        if self.wandb is not None:
            import wandb

            columns = [c for c in SAMPLE_COLUMNS if any(c in r for r in rows)]
            data = [[_table_cell(r.get(c)) for c in columns] for r in rows]
            self.wandb.log({"samples": wandb.Table(columns=columns, data=data)}, step=step)

    def eval_summary(self, step: int, results: dict[str, dict[str, float]]) -> str:
        """One console line for one evaluation (above the progress bar), e.g.
        `[eval] step 30: text_test acc 0.898 fmt 1.000 (n=128) | image_test acc 0.539 fmt 1.000 (n=128)`."""
        line = format_eval(step, results)
        console(line)
        return line

    def close(self) -> None:
        """Closes the files and wandb, then plots metrics.jsonl to `metrics.png` beside it; a plot that fails warns
        and never fails the run."""
        if self.closed:
            return
        self.closed = True
        self.jsonl.close()
        if self.samples is not None:
            self.samples.close()
        self.tb.close()
        if self.wandb is not None:
            self.wandb.finish()
        try:
            from .plots import plot_run

            plot_run(self.dir)
        except Exception as exc:  # a plot is a convenience: the run's records are already written
            warnings.warn(f"could not plot {self.dir / 'metrics.jsonl'}: {type(exc).__name__}: {exc}", RuntimeWarning,
                          stacklevel=2)  # fmt: skip


class PhaseTimer:
    """Wall time of the named phases of one iteration (generate, reward, logprobs, update, sync)."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    @contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - start

    def metrics(self) -> dict[str, float]:
        return {f"time/{k}": v for k, v in self.seconds.items()}


def read_jsonl(path: str | Path) -> list[dict]:
    with Path(path).open() as f:
        return [json.loads(line) for line in f if line.strip()]


# ------------------------------------------------------------------------------------------------ samples


def sample_rows(prompts: Sequence[Any], groups: Sequence[Sequence[Any]], scores: Sequence[Any], k: int) -> list[dict]:
    """The first `k` prompts of a rollout (the sampler has shuffled them) with every response of each: prompt text
    and images, label, response text, reward and its format/accuracy parts, scoring error, finish reason.
    `prompts`: `shared.records.Prompt`s; `groups`: per prompt its `Sample`s; `scores`: one `RewardResult` per sample,
    flat in group order (as `scorer.score` returns them)."""
    rows: list[dict] = []
    offset = 0
    for i, (prompt, group) in enumerate(zip(prompts, groups)):
        if i >= k:
            break
        for j, sample in enumerate(group):
            s = scores[offset + j]
            rows.append({
                "uid": getattr(prompt, "uid", None), "sample": j, "prompt": prompt.text,
                "images": list(getattr(prompt, "image_paths", []) or []), "label": prompt.label,
                "response": sample.text, "reward": s.total, "format": s.format, "accuracy": s.accuracy,
                "error": s.error, "finish_reason": getattr(sample, "finish_reason", None),
                "response_tokens": len(getattr(sample, "response_ids", []) or []),
            })  # fmt: skip
        offset += len(group)
    return rows


def samples_markdown(rows: Sequence[dict]) -> str:
    """The rows as TensorBoard markdown: per prompt its text, then a table of the rewards and each response."""
    out: list[str] = []
    by_prompt: dict[Any, list[dict]] = {}
    for r in rows:
        by_prompt.setdefault((r.get("uid"), r.get("prompt")), []).append(r)
    for (uid, prompt), group in by_prompt.items():
        label = group[0].get("label")
        images = group[0].get("images") or []
        out.append(f"### prompt {uid} (label `{_md_inline(label)}`" + (f", images {images}" if images else "") + ")")
        out.append(_code(prompt))
        out.append("| sample | reward | format | accuracy | finish | error |")
        out.append("|---|---|---|---|---|---|")
        for r in group:
            out.append(f"| {r.get('sample')} | {_num(r.get('reward'))} | {_num(r.get('format'))} | "
                       f"{_num(r.get('accuracy'))} | {r.get('finish_reason') or ''} | "
                       f"{_md_inline(r.get('error') or '')} |")  # fmt: skip
        for r in group:
            out.append(f"**sample {r.get('sample')}** (reward {_num(r.get('reward'))})")
            out.append(_code(r.get("response")))
    return "\n\n".join(out)


def _code(text: Any) -> str:
    return "\n".join("    " + line for line in str(text or "").splitlines() or [""])  # an indented code block


def _md_inline(x: Any) -> str:
    return str(x).replace("|", "\\|").replace("`", "'").replace("\n", " ")


def _num(x: Any) -> str:
    return "" if x is None else (f"{x:.3f}" if isinstance(x, float) else str(x))


def _jsonable(x: Any) -> Any:
    """Non-finite floats as null: JSON has no NaN (a reward server without per-part fields sends NaN parts)."""
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {k: _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    return x


def _table_cell(x: Any) -> Any:
    if isinstance(x, (list, tuple)):
        return ", ".join(map(str, x))
    return _jsonable(x)


# ------------------------------------------------------------------------------------------------ console


def progress_postfix(metrics: dict[str, float]) -> dict[str, str]:
    """The progress bar's figures for one rollout: mean reward, accuracy and KL
    (`bar.set_postfix(progress_postfix(last))`)."""
    out = {}
    for name, key, fmt in (("reward", "reward/mean", "{:.3f}"), ("acc", "reward/accuracy", "{:.2f}"),
                           ("kl", "kl/mean", "{:.2e}")):  # fmt: skip
        if metrics.get(key) is not None:
            out[name] = fmt.format(float(metrics[key]))
    return out


def format_eval(step: int, results: dict[str, dict[str, float]]) -> str:
    parts = [f"{name} acc {r['accuracy']:.3f} fmt {r['format']:.3f} (n={r.get('num_examples', '?')})"
             for name, r in results.items()]  # fmt: skip
    return f"[eval] step {step}: " + (" | ".join(parts) if parts else "no data")


def console(line: str) -> None:
    """A line on the console above the progress bar (tqdm redraws the bar below it)."""
    from tqdm import tqdm

    tqdm.write(line)
