"""Command line of the learner: `python -m learner_jax.main --config NAME [--set key=value ...] [--dry-run]`."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import yaml

from shared.config import Config, ConfigError, derive, load_config
from shared.data import count_rows


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m learner_jax.main", description="Rule-based RL of a Qwen2.5-VL model.")
    ap.add_argument("--config", required=True, help="a name in configs/ (e.g. mgt_percereason) or a YAML path")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                    help="dotted override, repeatable, e.g. --set actor.lr=1e-6")  # fmt: skip
    ap.add_argument("--dry-run", action="store_true", help="print the resolved config and the schedule, then exit")
    ap.add_argument("--load_checkpoint", action="store_true", help="resume from the newest checkpoint in ckpt_dir")
    return ap.parse_args(argv)


def num_prompts(cfg: Config) -> int | None:
    files = [Path(f) for f in cfg.data.train_files]
    if files and all(f.is_file() for f in files):
        return sum(count_rows(f) for f in files)
    return cfg.data.expected_num_prompts


def check_model_path(cfg: Config) -> None:
    path = Path(cfg.model.path)
    if not (path / "config.json").is_file() or not any(path.glob("*.safetensors")):
        raise ConfigError(
            f"model.path: no Hugging Face checkpoint at {path.resolve()} (expected config.json and *.safetensors "
            f"there). Download the model to that directory or point to it with --set model.path=DIR"
        )


def dry_run(cfg: Config) -> None:
    print(yaml.safe_dump(cfg.to_dict(), sort_keys=False).rstrip())
    n = num_prompts(cfg)
    src = "data files" if n is not None and n != cfg.data.expected_num_prompts else "data.expected_num_prompts"
    print(f"\n# derived (num_prompts from {src if n is not None else 'nowhere: files absent, size unknown'})")
    for key, value in derive(cfg, n).items():
        print(f"{key}: {value if value is not None else 'unknown'}")
    check_model_path(cfg)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
        if args.dry_run:
            dry_run(cfg)
            return 0
        if cfg.pipeline == "rl":
            check_model_path(cfg)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if cfg.pipeline == "demo":
        from learner_jax.demo import run_demo

        run_demo(cfg)
        return 0
    from learner_jax.launch import launch

    launch(cfg, resume=args.load_checkpoint)  # in this process, or learner.num_processes Ray actors
    return 0


if __name__ == "__main__":
    sys.exit(main())
