"""The demo: LMM-R1's two stages at toy scale on 2 CPU cores.

1. data and a small Qwen2.5-VL-architecture model (`shared.synthetic`, `shared.tiny_checkpoint`), cached;
2. a supervised warm start on imperfect worked solutions, cached (RL needs a model that already half-knows the task);
3. FRE: RL on text-only arithmetic; 4. MGT: RL on image tasks, starting from the FRE export;
held-out accuracy and format rate before and after each stage, a table, a PNG plot and TensorBoard logs.
"""
from __future__ import annotations

import copy
import hashlib
import json
from dataclasses import asdict
from pathlib import Path

from shared.config import Config
from shared.data import load_rows
from shared.synthetic import write_suite
from shared.tiny_checkpoint import TinySpec, write_checkpoint

from .export import export_hf
from .metrics import read_jsonl
from .models.hf_io import load_checkpoint
from .placement import spawn, start_ray

CACHE = Path(".cache/demo")
SPEC = TinySpec(seed=0, text_hidden=128, text_layers=4, text_heads=4, kv_heads=2, text_intermediate=384,
                vision_hidden=64, vision_depth=2, vision_heads=2, vision_intermediate=128,
                fullatt_block_indexes=[1], min_pixels=3136, max_pixels=12544)  # fmt: skip
# Half the worked solutions box the wrong number, and half the counts of three or more miss a square: the warm
# start computes right but boxes its result only part of the time, the regime where rule-based RL sharpens a model.
WARM = {"steps": 350, "batch_size": 16, "lr": 2e-3, "train": 1024, "test": 128, "max_operand": 9, "ops": "+",
        "image_tasks": ["count_add"], "slip": 0.5}


def prepare(cfg: Config, root: Path = CACHE, warm: dict = WARM) -> Path:
    """Data, base model and warm start (at `model.path`), rebuilt only when their recipe changed."""
    key = hashlib.sha1(json.dumps([asdict(SPEC), warm], sort_keys=True).encode()).hexdigest()[:10]
    warm_dir = Path(cfg.model.path)
    stamp = warm_dir / "lmmrl_warm_start.json"
    if stamp.is_file() and json.loads(stamp.read_text()).get("key") == key:
        return warm_dir
    write_suite(root / "data", warm["train"], warm["test"], seed=0, max_operand=warm["max_operand"], ops=warm["ops"],
                image_tasks=tuple(warm["image_tasks"]), slip=warm["slip"])  # fmt: skip
    base = write_checkpoint(root / "base", SPEC)
    from .sft import sft

    model_cfg, params = load_checkpoint(base)
    rollout = spawn("rollout_torch.service:RolloutService", cfg.to_dict(), str(base), num_cpus=0)
    rows = load_rows(root / "data" / "text_train.jsonl") + load_rows(root / "data" / "image_train.jsonl")
    params, losses = sft(params, model_cfg, rollout, rows, steps=warm["steps"], batch_size=warm["batch_size"],
                         lr=warm["lr"], pad_token_id=rollout.token_info()["pad_token_id"])  # fmt: skip
    rollout.close()
    export_hf(params, model_cfg, base, warm_dir)
    stamp.write_text(json.dumps({"key": key, "sft_loss_first_last": [losses[0], losses[-1]]}))
    return warm_dir


def stage(cfg: Config, name: str, model_path: str, train_file: str, root: Path = CACHE) -> Config:
    c = copy.deepcopy(cfg)
    c.name, c.pipeline = f"demo_{name}", "rl"
    c.model.path = model_path
    c.data.train_files = [train_file]
    c.train.ckpt_dir = str(root / "runs" / name / "ckpt")
    c.train.log_dir = str(root / "runs" / name / "logs")
    c.train.export_dir = str(root / "runs" / name / "export")
    return c


def run_demo(cfg: Config, root: Path = CACHE, warm_recipe: dict = WARM) -> dict:
    import shutil

    from .evaluate import evaluate_files
    from .launch import launch

    start_ray(cfg.ray)
    warm = prepare(cfg, root, warm_recipe)
    shutil.rmtree(root / "runs", ignore_errors=True)
    evals = [str(root / "data" / "text_test.jsonl"), str(root / "data" / "image_test.jsonl")]

    def evaluate(model_path: str) -> dict:
        rollout = spawn("rollout_torch.service:RolloutService", cfg.to_dict(), model_path, num_cpus=0)
        try:
            return evaluate_files(cfg, rollout, evals)
        finally:
            rollout.close()

    table = {"warm start": evaluate(str(warm))}
    fre = stage(cfg, "fre", str(warm), str(root / "data" / "text_train.jsonl"), root)
    launch(fre)  # the learner in this process, or learner.num_processes actors
    table["after FRE"] = evaluate(fre.train.export_dir)
    mgt = stage(cfg, "mgt", fre.train.export_dir, str(root / "data" / "image_train.jsonl"), root)
    launch(mgt)
    table["after MGT"] = evaluate(mgt.train.export_dir)
    print_table(table)
    plot([fre.train.log_dir, mgt.train.log_dir], root / "demo.png")
    (root / "results.json").write_text(json.dumps(table, indent=2))
    print(f"results: {root / 'results.json'}, plot: {root / 'demo.png'}, TensorBoard: {root / 'runs'}")
    return table


def print_table(table: dict) -> None:
    sets = list(next(iter(table.values())))
    header = f"{'':<12}" + "".join(f"{s + ' acc':>18}{s + ' fmt':>18}" for s in sets)
    print("\n" + header)
    for row, res in table.items():
        print(f"{row:<12}" + "".join(f"{res[s]['accuracy']:>18.3f}{res[s]['format']:>18.3f}" for s in sets))


def plot(log_dirs: list[str], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(13, 3.5))
    offset = 0
    for log_dir in log_dirs:
        rows = read_jsonl(Path(log_dir) / "metrics.jsonl")
        rows = [r for r in rows if "reward/mean" in r]
        x = [offset + r["step"] for r in rows]
        for ax, key in zip(axes, ("reward/mean", "reward/accuracy", "kl/mean")):
            ax.plot(x, [r[key] for r in rows], label=Path(log_dir).parent.name)
            ax.set_title(key)
            ax.set_xlabel("rollout")
        offset = x[-1] + 1 if x else offset
    axes[0].legend()
    fig.tight_layout()
    fig.savefig(out, dpi=100)
