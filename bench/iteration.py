"""Seconds per phase of one demo-sized RL iteration (16 prompts x 16 samples, at most 40 new tokens, micro-batch
64, one optimizer step), text and image, this tree against another commit in one run.

    python bench/iteration.py [--base 391f506] [--reps 3] [--iterations 3] [--tasks text image]

The other commit is checked out as a `git worktree` under .cache/bench/; each contender runs the real trainer
(`learner_jax.trainer.train`: vLLM engine, rewards, learner, weight push) in its own process, alternating, on the
demo's warm-start model (built by the demo; built here if absent). The first iteration of every run compiles and
is dropped. Writes bench/results/iteration.json: per-phase medians, and base/ours ratios (machines are noisy:
ratios, not absolute times).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CACHE = ROOT / ".cache" / "bench"
PHASES = ("generate", "reward", "logprobs", "update", "sync")
WARM = ROOT / ".cache" / "demo" / "warm_start"
DATA = ROOT / ".cache" / "demo" / "data"


def worker(root: Path, task: str, iterations: int, out: Path) -> None:
    """Run `iterations` of the trainer from the tree at `root` and write each iteration's phase seconds."""
    sys.path.insert(0, str(root))
    os.chdir(root)
    from learner_jax.metrics import read_jsonl
    from learner_jax.trainer import train
    from shared.config import load_config

    work = Path(tempfile.mkdtemp(prefix=f"lmmrl_bench_{task}_"))
    sets = {
        "pipeline": "rl", "model.path": str(WARM), "data.train_files": f"[{DATA / f'{task}_train.jsonl'}]",
        "train.max_rollouts": iterations, "train.save_steps": 10_000, "train.ckpt_dir": str(work / "ckpt"),
        "train.log_dir": str(work / "logs"), "train.export_dir": "null", "train.verify_every": 0,
        "ray.temp_dir": str(work / "ray"),
    }  # fmt: skip
    train(load_config("demo", [f"{k}={v}" for k, v in sets.items()]))
    rows = [r for r in read_jsonl(work / "logs" / "metrics.jsonl") if "reward/mean" in r]
    its = [{p: r.get(f"time/{p}", 0.0) for p in PHASES} for r in rows]
    for it in its:
        it["learner"] = it["logprobs"] + it["update"]
        it["total"] = sum(it[p] for p in PHASES)
    out.write_text(json.dumps({"iterations": its}))


def run_worker(root: Path, task: str, iterations: int, log: Path) -> list[dict]:
    out = Path(tempfile.mkstemp(suffix=".json")[1])
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", "--root", str(root), "--task", task,
           "--iterations", str(iterations), "--out", str(out)]  # fmt: skip
    with log.open("a") as f:
        subprocess.run(cmd, check=True, stdout=f, stderr=subprocess.STDOUT, cwd=root)
    return json.loads(out.read_text())["iterations"][1:]  # the first compiles


def worktree(ref: str) -> Path:
    sha = subprocess.check_output(["git", "rev-parse", "--short", ref], cwd=ROOT, text=True).strip()
    path = CACHE / f"base_{sha}"
    if not path.is_dir():
        subprocess.run(["git", "worktree", "add", "--detach", str(path), sha], cwd=ROOT, check=True,
                       capture_output=True)  # fmt: skip
    return path


def ensure_warm_start() -> None:
    if (WARM / "lmmrl_warm_start.json").is_file():
        return
    print("building the demo's warm start (a few minutes, once)", flush=True)
    from learner_jax.demo import prepare
    from learner_jax.placement import start_ray
    from shared.config import load_config

    cfg = load_config("demo")
    start_ray(cfg.ray)
    prepare(cfg)
    import ray

    ray.shutdown()


def median_phases(its: list[dict]) -> dict[str, float]:
    return {k: round(statistics.median(it[k] for it in its), 4) for k in its[0]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--base", default="391f506", help="the commit to compare against")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--iterations", type=int, default=3, help="per run; the first is dropped")
    ap.add_argument("--tasks", nargs="+", default=["text", "image"])
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "iteration.json"))
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--root", help=argparse.SUPPRESS)
    ap.add_argument("--task", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        return worker(Path(args.root), args.task, args.iterations, Path(args.out))

    sys.path.insert(0, str(ROOT))
    ensure_warm_start()
    CACHE.mkdir(parents=True, exist_ok=True)
    base = worktree(args.base)
    log = CACHE / "iteration.log"
    contenders = {"base": base, "ours": ROOT}
    runs: dict[str, dict[str, list[dict]]] = {t: {c: [] for c in contenders} for t in args.tasks}
    for rep in range(args.reps):
        for task in args.tasks:
            for name, root in contenders.items():
                print(f"rep {rep + 1}/{args.reps} {task:5s} {name}", flush=True)
                runs[task][name] += run_worker(root, task, args.iterations, log)
    result = {"base_commit": args.base, "reps": args.reps, "iterations_per_run": args.iterations,
              "loadavg": os.getloadavg(), "tasks": {}}  # fmt: skip
    for task, per in runs.items():
        med = {name: median_phases(its) for name, its in per.items()}
        ratio = {k: round(med["base"][k] / max(med["ours"][k], 1e-9), 2) for k in med["ours"]}
        result["tasks"][task] = {"median_seconds": med, "speedup_base_over_ours": ratio, "runs": per}
        print(f"\n{task}: seconds per iteration (median), base {args.base} vs ours")
        for k in med["ours"]:
            print(f"  {k:9s} {med['base'][k]:8.3f} {med['ours'][k]:8.3f}   x{ratio[k]:.2f}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
