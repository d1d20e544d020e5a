"""Asynchronous rollouts on the demo's FRE stage: samples per second for rollout.max_staleness k = 0, 1, 2 in one run,
and held-out text accuracy after 30 rollouts for k = 0 and 1 over three seeds.

    python bench/async_overlap.py [--rollouts 10] [--seeds 1 2 3] [--accuracy-rollouts 30] [--skip-accuracy]

The engine's process runs on core 0 (`rollout.cpu_affinity: [0]`, one thread) and the learner on core 1 (this
process and what it starts are pinned there before JAX and Ray start), so the two halves can overlap as they would
on separate accelerators. Samples per second counts iterations 2..N (the first compiles), from each iteration's phase
times in metrics.jsonl. k > 0 uses truncated importance sampling with cap 2. Writes bench/results/async_overlap.json.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def pin() -> None:
    os.sched_setaffinity(0, {1})  # the learner and everything it starts; the engine pins itself to core 0
    os.environ["VLLM_CPU_OMP_THREADS_BIND"] = "0"  # vLLM's compute threads, which it binds itself


def stage_config(base, k: int, seed: int, rollouts: int, root: Path, tag: str):
    from learner_jax.demo import stage

    cfg = stage(base, f"{tag}_k{k}_s{seed}", str(root / "warm_start"), str(root / "data" / "text_train.jsonl"),
                root / "bench_async")  # fmt: skip
    cfg = copy.deepcopy(cfg)
    cfg.rollout.max_staleness = k
    cfg.algo.tis_cap = 2.0 if k > 0 else None
    cfg.rollout.num_engines, cfg.rollout.cpu_threads_per_engine, cfg.rollout.cpu_affinity = 1, 1, [0]
    cfg.train.max_rollouts, cfg.train.save_steps, cfg.train.eval_steps = rollouts, rollouts, 0
    cfg.train.seed = seed
    return cfg


def samples_per_second(cfg) -> dict:
    from learner_jax.metrics import read_jsonl

    rows = [r for r in read_jsonl(f"{cfg.train.log_dir}/metrics.jsonl") if "reward/mean" in r][1:]
    walls = [sum(v for k, v in r.items() if k.startswith("time/")) for r in rows]
    n = cfg.rollout.rollout_batch_size * cfg.rollout.n_samples_per_prompt
    return {"samples_per_s": n * len(walls) / sum(walls), "iteration_s_median": statistics.median(walls),
            "learner_idle_fraction": statistics.mean(r["overlap/learner_idle_fraction"] for r in rows),
            "engines_idle_fraction": statistics.mean(r["overlap/engines_idle_fraction"] for r in rows),
            "staleness_mean": statistics.mean(r["rollout/staleness_mean"] for r in rows)}  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rollouts", type=int, default=10, help="iterations per throughput run")
    ap.add_argument("--ks", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    ap.add_argument("--accuracy-rollouts", type=int, default=30)
    ap.add_argument("--skip-accuracy", action="store_true")
    ap.add_argument("--skip-throughput", action="store_true")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "async_overlap.json"))
    args = ap.parse_args()
    pin()
    from learner_jax.demo import CACHE, prepare
    from learner_jax.evaluate import evaluate_files
    from learner_jax.placement import spawn, start_ray
    from learner_jax.trainer import train
    from shared.config import load_config

    import shutil

    base = load_config("demo", ["ray.num_cpus=2"])
    for tag in ([] if args.skip_throughput else ["tp"]) + ([] if args.skip_accuracy else ["acc"]):
        for old in (CACHE / "bench_async" / "runs").glob(f"{tag}_*"):  # runs of an earlier invocation
            shutil.rmtree(old)
    start_ray(base.ray)
    prepare(base)
    out: dict = {"cores": {"engine": 0, "learner": 1}, "throughput": {}, "accuracy": {}}
    for k in [] if args.skip_throughput else args.ks:  # one run each; the machine should be otherwise idle
        cfg = stage_config(base, k, 1, args.rollouts, CACHE, "tp")
        start = time.perf_counter()
        train(cfg)
        out["throughput"][f"k{k}"] = {**samples_per_second(cfg), "run_s": time.perf_counter() - start}
        print(f"k={k}: {out['throughput'][f'k{k}']}", file=sys.stderr)
    k0 = out["throughput"].get("k0", {}).get("samples_per_s")
    for k in args.ks:
        if k0 and k:
            out["throughput"][f"k{k}"]["speedup_over_k0"] = out["throughput"][f"k{k}"]["samples_per_s"] / k0
    if not args.skip_accuracy:
        evals = [str(CACHE / "data" / "text_test.jsonl")]
        for k in (0, 1):
            accs = []
            for seed in args.seeds:
                cfg = stage_config(base, k, seed, args.accuracy_rollouts, CACHE, "acc")
                train(cfg)
                service = spawn("rollout_torch.service:RolloutService", base.to_dict(), cfg.train.export_dir)
                try:
                    accs.append(evaluate_files(base, service, evals)["text_test"]["accuracy"])
                finally:
                    service.close()
                print(f"k={k} seed={seed}: held-out accuracy {accs[-1]:.3f}", file=sys.stderr)
            out["accuracy"][f"k{k}"] = {"per_seed": accs, "mean": statistics.mean(accs),
                                        "spread": max(accs) - min(accs)}  # fmt: skip
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=1) + "\n")
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
