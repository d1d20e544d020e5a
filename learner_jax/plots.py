"""The run's plot, from its metrics.jsonl: reward, accuracy, KL, response length and seconds per phase per rollout,
written beside it as metrics.png. `MetricsLogger.close()` draws it at the end of every run; for a finished or
running one:

    python -m learner_jax.plots LOG_DIR [--out FILE]
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path
from typing import Optional

from .metrics import read_jsonl

# (title, metric keys); "eval/*/accuracy" and "time/*" stand for every key of that form in the file.
PANELS = (
    ("reward", ("reward/mean", "reward/format")),
    ("accuracy", ("reward/accuracy", "eval/*/accuracy")),
    ("KL to the reference", ("kl/mean",)),
    ("response length (tokens)", ("response/length",)),
    ("seconds per phase", ("time/*",)),
)


def rollout_rows(rows: list[dict]) -> list[dict]:
    """One row per rollout (those with reward/mean), by step; a step logged twice (a rerun appending to the same
    file) keeps its last row."""
    by_step = {r["step"]: r for r in rows if "reward/mean" in r and "step" in r}
    return [by_step[s] for s in sorted(by_step)]


def eval_rows(rows: list[dict]) -> list[dict]:
    by_step: dict[int, dict] = {}
    for r in rows:
        if "step" in r and any(k.startswith("eval/") for k in r) and "reward/mean" not in r:
            by_step.setdefault(r["step"], {}).update(r)
    return [by_step[s] for s in sorted(by_step)]


def _keys(pattern: str, rows: list[dict]) -> list[str]:
    if "*" not in pattern:
        return [pattern] if any(pattern in r for r in rows) else []
    head, tail = pattern.split("*")
    found = {k for r in rows for k in r if k.startswith(head) and k.endswith(tail) and len(k) > len(head + tail)}
    return sorted(found)


def plot_run(log_dir: str | Path, out: Optional[str | Path] = None) -> Optional[Path]:
    """Draw `<log_dir>/metrics.jsonl` into `out` (default `<log_dir>/metrics.png`). Returns the path, or None when
    the file holds no rollout yet. Written to a temporary file and renamed, so a reader never sees half a PNG."""
    log_dir = Path(log_dir)
    rows = read_jsonl(log_dir / "metrics.jsonl")
    rollouts, evals = rollout_rows(rows), eval_rows(rows)
    if not rollouts:
        return None
    from matplotlib.figure import Figure  # no pyplot: no global backend or figure state in the caller's process

    fig = Figure(figsize=(4.0 * len(PANELS), 3.4))
    axes = fig.subplots(1, len(PANELS))
    x = [r["step"] for r in rollouts]
    for ax, (title, patterns) in zip(axes, PANELS):
        for pattern in patterns:
            source = evals if pattern.startswith("eval/") else rollouts
            for key in _keys(pattern, source):
                pts = [(r["step"], r[key]) for r in source if r.get(key) is not None]
                if not pts:
                    continue
                xs, ys = zip(*pts)
                label = key.removeprefix("time/") if pattern == "time/*" else key
                if source is evals:
                    ax.plot(xs, ys, "o--", label=label)
                else:
                    ax.plot(xs, ys, label=label, marker="." if len(xs) < 30 else None)
        ax.set_title(title)
        ax.set_xlabel("rollout")
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend(fontsize=7)
        if len(x) == 1:
            ax.set_xlim(x[0] - 1, x[0] + 1)
    fig.suptitle(log_dir.name if log_dir.name not in ("logs", "") else str(log_dir), fontsize=9)
    fig.tight_layout()
    out = Path(out) if out is not None else log_dir / "metrics.png"
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".png", dir=out.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            fig.savefig(f, format="png", dpi=100)
        os.replace(tmp, out)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return out


def main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m learner_jax.plots", description=__doc__.split("\n\n")[0])
    ap.add_argument("log_dir", help="a run's train.log_dir (holding metrics.jsonl)")
    ap.add_argument("--out", help="PNG to write (default LOG_DIR/metrics.png)")
    args = ap.parse_args(argv)
    if not (Path(args.log_dir) / "metrics.jsonl").is_file():
        print(f"error: no metrics.jsonl in {args.log_dir}", file=sys.stderr)
        return 2
    out = plot_run(args.log_dir, args.out)
    if out is None:
        print(f"error: {Path(args.log_dir) / 'metrics.jsonl'} holds no rollout yet", file=sys.stderr)
        return 1
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
