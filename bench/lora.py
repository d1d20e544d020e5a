"""LoRA against full fine-tuning: optimizer-state bytes (planner and measured) and held-out accuracy on the demo's
FRE stage over seeds.

    python bench/lora.py [--seeds 1 2 3] [--rank 16] [--alpha 32] [--lr 1e-3] [--skip-accuracy]

Memory: the planner's per-device bytes for Qwen2.5-VL-3B (zero2, 8 devices), and measured bytes of real optimizer
states for a model of 3B widths cut to 2 layers (vocabulary cut to the tiny tokenizer's), full and LoRA.
Accuracy: the demo's warm start (built by the demo, or here if absent), then its FRE stage (30 rollouts of text
addition) with LoRA adapters of rank `--rank` on every linear layer of the language model, once per seed; held-out
text accuracy before and after. Writes bench/results/lora.json.
"""
from __future__ import annotations

import argparse
import copy
import json
import shutil
import statistics
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def memory_figures(rank: int) -> dict:
    import jax

    from learner_jax import memory
    from learner_jax.adapters import init_adapters, lora_spec
    from learner_jax.models.hf_io import load_checkpoint
    from learner_jax.optim import make_optimizer
    from learner_jax.sharding import Strategy, device_bytes
    from shared.config import LoraConfig, ShardingConfig, load_config
    from shared.models.qwen2_5_vl_config import Qwen25VLConfig
    from shared.tiny_checkpoint import TinySpec, write_checkpoint

    out: dict = {}
    cfg = load_config("mgt_geo", ["sharding.strategy=zero2"])
    model = Qwen25VLConfig.from_hf(memory.PRESETS["qwen2.5-vl-3b"])
    full = memory.plan(cfg, model, 8, ["zero2"])[0]
    cfg.model.lora = LoraConfig(rank=rank, alpha=2 * rank)
    lora = memory.plan(cfg, model, 8, ["zero2"])[0]
    out["planner_3b_zero2_8dev"] = {"full": full.summary(), "lora": lora.summary(),
                                    "opt_state_ratio": lora.opt_state / full.opt_state,
                                    "grads_ratio": lora.grads / full.grads}  # fmt: skip

    # Measured: a checkpoint with the 3B's text widths and two layers (vision cut to one small block).
    spec = TinySpec(text_hidden=2048, text_layers=2, text_heads=16, kv_heads=2, text_intermediate=11008,
                    mrope_section=[16, 24, 24], vision_hidden=64, vision_depth=1, vision_heads=2,
                    vision_intermediate=128, fullatt_block_indexes=[0])  # fmt: skip
    ckpt = write_checkpoint(Path(tempfile.mkdtemp(prefix="lmmrl_lora_bench_")), spec)
    model_cfg, params = load_checkpoint(ckpt)
    strategy = Strategy.from_config(ShardingConfig("replicated"), model_cfg, jax.devices()[:1])
    run_cfg = load_config("demo", [f"model.path={ckpt}", f"model.lora.rank={rank}"])
    measured = {}
    for name in ("full", "lora"):
        if name == "full":
            trained = params
        else:
            trained = init_adapters(model_cfg, lora_spec(run_cfg.model.lora, model_cfg), jax.random.key(0))
        trained = strategy.place(trained, strategy.param_shardings(trained))
        tx, _ = make_optimizer(run_cfg.actor, 10, trained)
        opt = jax.jit(tx.init)(trained)
        measured[name] = sum(device_bytes(opt).values())
        del opt, trained
    run_cfg.model.lora.rank = 0
    planned_full = memory.plan(run_cfg, model_cfg, 1, ["replicated"], platform="cpu")[0].opt_state
    run_cfg.model.lora.rank = rank
    planned_lora = memory.plan(run_cfg, model_cfg, 1, ["replicated"], platform="cpu")[0].opt_state
    out["measured_3b_widths_2_layers"] = {
        "opt_state_bytes": measured, "planned_opt_state_bytes": {"full": planned_full, "lora": planned_lora},
        "opt_state_ratio": measured["lora"] / measured["full"]}  # fmt: skip
    return out


def accuracy(seeds: list[int], rank: int, alpha: float, lr: float) -> dict:
    from learner_jax.demo import CACHE, prepare, stage
    from learner_jax.evaluate import evaluate_files
    from learner_jax.placement import spawn, start_ray
    from learner_jax.trainer import train
    from shared.config import load_config

    cfg = load_config("demo")
    start_ray(cfg.ray)
    warm = prepare(cfg)
    evals = [str(CACHE / "data" / "text_test.jsonl")]

    def evaluate(path: str) -> float:
        rollout = spawn("rollout_torch.service:RolloutService", cfg.to_dict(), path, num_cpus=0)
        try:
            return evaluate_files(cfg, rollout, evals)["text_test"]["accuracy"]
        finally:
            rollout.close()

    result = {"warm_start": evaluate(str(warm)), "runs": []}
    shutil.rmtree(ROOT / ".cache" / "bench" / "lora", ignore_errors=True)  # stages refuse a used checkpoint dir
    for seed in seeds:
        c = copy.deepcopy(cfg)
        c.train.seed, c.actor.lr = seed, lr
        c.model.lora.rank, c.model.lora.alpha = rank, alpha
        fre = stage(c, f"lora_fre_seed{seed}", str(warm), str(CACHE / "data" / "text_train.jsonl"),
                    ROOT / ".cache" / "bench" / "lora")  # fmt: skip
        t0 = time.perf_counter()
        train(fre)
        acc = evaluate(fre.train.export_dir)
        result["runs"].append({"seed": seed, "accuracy": acc, "seconds": time.perf_counter() - t0})
        print(f"seed {seed}: text accuracy {result['warm_start']:.3f} -> {acc:.3f}", flush=True)
    accs = [r["accuracy"] for r in result["runs"]]
    result.update(mean_after=statistics.mean(accs), spread=max(accs) - min(accs),
                  gain=statistics.mean(accs) - result["warm_start"])  # fmt: skip
    result["gain_exceeds_spread"] = result["gain"] > result["spread"]
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--alpha", type=float, default=32.0)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--skip-accuracy", action="store_true")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "lora.json"))
    args = ap.parse_args()
    out = {"rank": args.rank, "alpha": args.alpha, "lr": args.lr, "memory": memory_figures(args.rank)}
    print(json.dumps(out["memory"], indent=1, default=str), flush=True)
    if not args.skip_accuracy:
        out["fre_accuracy"] = accuracy(args.seeds, args.rank, args.alpha, args.lr)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=1, default=str))
    print(json.dumps(out.get("fre_accuracy", {}), indent=1))


if __name__ == "__main__":
    main()
