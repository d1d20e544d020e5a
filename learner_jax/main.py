"""Command line of the learner: `python -m learner_jax.main --config NAME [--set key=value ...] [--dry-run]
[--load_checkpoint[=latest|latest_intact|STEP]] [--verbose]`.

Errors reach the user as one line on stderr: config errors as `error: ...` (exit 2), every other error as
`error: <type>: <message> [<where>]` naming the run's checkpoint directory (exit 1; the traceback with
--verbose). Ctrl-C prints the last intact checkpoint (step and path) and exits with 130.
"""
from __future__ import annotations

import argparse
import os
import sys
import traceback
from pathlib import Path

import yaml

from shared.config import Config, ConfigError, derive, load_config
from shared.data import DataError, count_rows


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m learner_jax.main", description="Rule-based RL of a Qwen2.5-VL model.")
    ap.add_argument("--config", required=True, help="a name in configs/ (e.g. mgt_percereason) or a YAML path")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                    help="dotted override, repeatable, e.g. --set actor.lr=1e-6")  # fmt: skip
    ap.add_argument("--dry-run", action="store_true", help="print the resolved config and the schedule, then exit")
    ap.add_argument("--load_checkpoint", nargs="?", const="latest", default=None, type=_load_checkpoint,
                    metavar="latest|latest_intact|STEP",
                    help="resume from train.ckpt_dir: alone or =latest the newest checkpoint, refused if it is not "
                         "intact; =latest_intact the newest intact one (naming those skipped); =STEP that step")
    ap.add_argument("--verbose", action="store_true", help="print the traceback of an error")
    return ap.parse_args(argv)


def _load_checkpoint(value: str) -> str:
    from learner_jax.checkpoint import normalize_selection  # jax and orbax are imported lazily there

    try:
        return normalize_selection(value)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def num_prompts(cfg: Config) -> int | None:
    """Rows in the data sources (files, directories, `dir:split`), or data.expected_num_prompts before they exist."""
    try:
        return sum(count_rows(f) for f in cfg.data.train_files) if cfg.data.train_files else None
    except DataError:
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


def set_learner_env(cfg: Config) -> None:
    """The learner's process environment (`learner_jax.launch.process_env`: JAX platform, GPU memory fraction and
    preallocation) in this process, before JAX is imported: the learner runs here when it reserves no Ray resources
    (`launch`), and Ray workers started from here get the same XLA_/JAX_ variables (`placement.start_ray`). JAX
    reads them once, when it first starts a backend; after that a different value is an error, not ignored."""
    from learner_jax.launch import process_env

    env = process_env(cfg)
    changed = {k: v for k, v in env.items() if os.environ.get(k) != v}
    bridge = sys.modules.get("jax._src.xla_bridge")
    if changed and bridge is not None and bridge.backends_are_initialized():
        raise RuntimeError(
            f"JAX has already started its backends in this process, so the learner's settings would not apply: "
            f"{', '.join(f'{k}={v}' for k, v in changed.items())} (from learner.*). Start the run in a new process"
        )
    os.environ.update(env)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    cfg = None
    try:
        try:
            cfg = load_config(args.config, args.overrides)
            if args.dry_run:
                dry_run(cfg)
                return 0
            if cfg.pipeline == "rl":
                check_model_path(cfg)
            set_learner_env(cfg)  # before anything below imports JAX
        except ConfigError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        from learner_jax.placement import set_verbose

        set_verbose(args.verbose)  # library logs on the console too, not only in <log_dir>/engines.log
        if cfg.pipeline == "demo":
            from learner_jax.demo import run_demo

            run_demo(cfg)
            return 0
        from learner_jax.launch import launch

        launch(cfg, resume=args.load_checkpoint)  # in this process, or learner.num_processes Ray actors
        return 0
    except KeyboardInterrupt:
        return interrupted(cfg, args)
    except Exception as exc:
        if isinstance(root_cause(exc), KeyboardInterrupt):  # Ctrl-C seen first by a Ray worker
            return interrupted(cfg, args)
        print(error_message(exc, cfg, args.verbose), file=sys.stderr)
        if args.verbose:
            traceback.print_exc()
        stop_ray()
        return 1


def _is_ray_error(exc: BaseException) -> bool:
    return any(c.__module__.startswith("ray.") for c in type(exc).__mro__)


def root_cause(exc: BaseException) -> BaseException:
    """The error to show: `exc` itself, or, where `exc` is (or wraps, `raise ... from`) Ray's wrapper of a remote
    error, the remote error (Ray's text carries the remote traceback). Our own wrappers name what they wrap."""
    for _ in range(20):
        inner = getattr(exc, "cause", None) if _is_ray_error(exc) else None  # ray.exceptions.RayTaskError
        if isinstance(inner, BaseException):
            exc = inner
        elif exc.__cause__ is not None and _is_ray_error(exc.__cause__):
            exc = exc.__cause__
        else:
            break
    return exc


def _line(text: str, limit: int = 600) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[:limit] + " ..."


def error_message(exc: BaseException, cfg: Config | None, verbose: bool = False) -> str:
    """One line: the root error's type and message, what wrapped it (if anything), and the run's directories."""
    root = root_cause(exc)
    msg = f"error: {type(root).__name__}: {_line(str(root) or repr(root))}"
    if root is not exc:
        outer = str(exc).split("\n", 1)[0].split(": ray::", 1)[0]  # Ray's wrappers append the remote traceback
        msg += f" (in {type(exc).__name__}: {_line(outer, 300)})"
    if cfg is not None:
        where = Path(cfg.train.ckpt_dir).resolve()
        if str(where) not in msg and cfg.train.ckpt_dir not in msg:
            msg += f" [run {cfg.name}, checkpoints in {where}]"
    return msg + ("" if verbose else "; --verbose shows the traceback")


def interrupted(cfg: Config | None, args: argparse.Namespace) -> int:
    """Ctrl-C: name the checkpoint a resume would start from, stop what this process started, exit 130."""
    try:
        if cfg is None:
            print("interrupted before the run started; nothing was saved", file=sys.stderr)
        else:
            from learner_jax.checkpoint import last_intact_checkpoint

            found = last_intact_checkpoint(cfg.train.ckpt_dir)
            where = Path(cfg.train.ckpt_dir).resolve()
            if found is None:
                print(f"interrupted: no intact checkpoint in {where}", file=sys.stderr)
            else:
                print(f"interrupted: the last intact checkpoint is step {found[0]} at {found[1].resolve()}; resume "
                      f"with --load_checkpoint", file=sys.stderr)  # fmt: skip
        stop_ray()
    except KeyboardInterrupt:  # a second Ctrl-C: leave now
        pass
    return 130


def stop_ray() -> None:
    """End the Ray session this process started (engines, reward and learner actors) rather than at exit."""
    ray = sys.modules.get("ray")
    if ray is not None and ray.is_initialized():
        try:
            ray.shutdown()
        except Exception:
            pass


if __name__ == "__main__":
    sys.exit(main())
