"""Greedy evaluation on data sets in the training format: accuracy and format rate per data set, as JSON.

    python -m learner_jax.evaluate --config demo --model checkpoints/demo/export --data a.jsonl b.jsonl --out r.json
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, Optional

import numpy as np

from shared.config import Config, ConfigError, load_config
from shared.data import load_options, load_rows
from shared.records import SamplingSpec
from shared.rewards import make_scorer

from .placement import spawn, start_ray


def evaluate_files(cfg: Config, rollout: Any, files: list[str], *, step: int = 0, logger=None,
                   scorer=None) -> dict[str, dict[str, float]]:  # fmt: skip
    """`rollout`: a RolloutService proxy holding the weights to evaluate."""
    d = cfg.data
    own_scorer = scorer is None
    scorer = scorer or make_scorer(cfg.reward)
    results: dict[str, dict[str, float]] = {}
    try:
        for path in files:
            rows = load_rows(path, **load_options(cfg))
            records = [{"messages": r.messages, "label": r.label, "uid": i} for i, r in enumerate(rows)]
            prompts = rollout.prompts(records)
            groups, _ = rollout.generate(prompts, SamplingSpec(n=1, temperature=0.0, max_tokens=cfg.rollout.generate_max_len))
            scores = scorer.score([g[0].text for g in groups], [r.label for r in rows])
            name = Path(path).stem
            results[name] = {
                "accuracy": float(np.mean([s.accuracy for s in scores])),
                # NaN: a reward server that sends no per-part fields; those samples are left out
                "format": float(np.nanmean([s.format > 0 if np.isfinite(s.format) else np.nan for s in scores])),
                "num_examples": len(rows),
            }
            if logger is not None:
                logger.log(step, {f"eval/{name}/accuracy": results[name]["accuracy"],
                                  f"eval/{name}/format": results[name]["format"]})  # fmt: skip
    finally:
        if own_scorer and hasattr(scorer, "close"):
            scorer.close()
    return results


def main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m learner_jax.evaluate", description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", required=True)
    ap.add_argument("--set", dest="overrides", action="append", default=[])
    ap.add_argument("--model", help="HF checkpoint directory (default: model.path of the config)")
    ap.add_argument("--data", nargs="+", help="JSONL files (default: data.eval_files of the config)")
    ap.add_argument("--out", required=True, help="JSON file to write")
    args = ap.parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides + ([f"model.path={args.model}"] if args.model else []))
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    files = args.data or cfg.data.eval_files
    if not files:
        print("error: no data: pass --data or set data.eval_files", file=sys.stderr)
        return 2
    start_ray(cfg.ray)
    rollout = spawn("rollout_torch.service:RolloutService", cfg.to_dict(), num_cpus=0)
    try:
        results = evaluate_files(cfg, rollout, files)
    finally:
        rollout.close()
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"model": cfg.model.path, "results": results}, indent=2))
    print(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
