"""Export the policy as a Hugging Face checkpoint directory that transformers and vLLM load: safetensors with
Hub key names, the source model's config (its dtype set to the export's), tokenizer and processor files. Written
to a temporary directory and renamed into place, so an interrupted export never leaves a half-written model at
`out_dir`.

The tensors are written in `dtype`: "auto" (the default) is the source checkpoint's own dtype, its config.json's
`torch_dtype`/`dtype` (bfloat16 for the released Qwen2.5-VL models, float32 when the config names none), or
"float32", "bfloat16", "float16". The learner's float32 weights are rounded to nearest-even, as torch rounds.

Any checkpoint the trainer saved (`learner_jax.checkpoint`; its metadata holds the resolved config, hence the base
model and any LoRA) converts from the command line; only the policy's arrays are read, not the optimizer state:

    python -m learner_jax.export --ckpt checkpoints/fre_text --out checkpoints/fre_text/export_step40 --step 40
    python -m learner_jax.export --ckpt DIR --out DIR [--step N] [--dtype auto|float32|bfloat16|float16]
                                 [--model-path DIR]   # the base checkpoint, when config's model.path has moved
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any, Optional

import jax
import ml_dtypes
import numpy as np
from safetensors.numpy import save_file

from shared.models.qwen2_5_vl_params import flax_to_hf

from .adapters import write_peft
from .models.config import Qwen25VLConfig
from .models.lora import LoraSpec

COPIED = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json", "vocab.json",
          "merges.txt", "chat_template.json", "chat_template.jinja", "preprocessor_config.json",
          "video_preprocessor_config.json", "special_tokens_map.json", "added_tokens.json")  # fmt: skip
EXPORT_DTYPES = ("auto", "float32", "bfloat16", "float16")  # train.export_dtype, --dtype
_NUMPY = {"float32": np.float32, "bfloat16": ml_dtypes.bfloat16, "float16": np.float16}
_DTYPE_KEYS = ("torch_dtype", "dtype")  # transformers < 5 and >= 5 spell the config's dtype so


def source_dtype(source_dir: str | Path) -> str:
    """The dtype the checkpoint at `source_dir` declares (config.json `torch_dtype` or `dtype`, top level or the
    text config's); float32 when it declares none this export can write."""
    path = Path(source_dir) / "config.json"
    cfg = json.loads(path.read_text()) if path.is_file() else {}
    for node in (cfg, cfg.get("text_config") or {}):
        for key in _DTYPE_KEYS:
            if str(node.get(key)).removeprefix("torch.") in _NUMPY:
                return str(node[key]).removeprefix("torch.")
    return "float32"


def resolve_dtype(dtype: str, source_dir: str | Path) -> str:
    if dtype not in EXPORT_DTYPES:
        raise ValueError(f"export dtype {dtype!r} is not one of {', '.join(EXPORT_DTYPES)}")
    return source_dtype(source_dir) if dtype == "auto" else dtype


def export_hf(params: Any, cfg: Qwen25VLConfig, source_dir: str | Path, out_dir: str | Path,
              adapters: Any = None, lora: Optional[LoraSpec] = None, dtype: str = "auto") -> Path:  # fmt: skip
    """`params`: plain (merged) weights. With LoRA `adapters` also go to `out_dir/adapter` in PEFT's format, for
    `PeftModel.from_pretrained(base, out_dir/adapter)` on the base checkpoint at `source_dir` (float32: they are
    small). `dtype`: see the module docstring; config.json states it."""
    out = Path(out_dir)
    target = resolve_dtype(dtype, source_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        host = jax.device_get(params)
        tensors = {name: np.ascontiguousarray(np.asarray(x, dtype=np.float32).astype(_NUMPY[target]))
                   for name, x in flax_to_hf(host, cfg)}  # fmt: skip
        save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        del tensors
        for name in COPIED:
            if (Path(source_dir) / name).is_file():
                shutil.copy2(Path(source_dir) / name, tmp / name)
        if (tmp / "config.json").is_file():
            _set_config_dtype(tmp / "config.json", target)
        if adapters is not None:
            (tmp / "adapter").mkdir()
            write_peft(adapters, cfg, lora, str(Path(source_dir).resolve()), tmp / "adapter")
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    return out


def _set_config_dtype(path: Path, dtype: str) -> None:
    """The config's dtype entries (top level and sub-configs, under whichever names it uses) set to `dtype`; a
    config naming none gets `torch_dtype`, the name the released Qwen2.5-VL configs use."""
    cfg = json.loads(path.read_text())
    found = False
    for node in [cfg] + [v for v in cfg.values() if isinstance(v, dict)]:
        for key in _DTYPE_KEYS:
            if key in node:
                node[key], found = dtype, True
    if not found:
        cfg["torch_dtype"] = dtype
    path.write_text(json.dumps(cfg, indent=2) + "\n")


# ------------------------------------------------------------------------------------------------ from a checkpoint


def _manager(ckpt_dir: Path):
    import orbax.checkpoint as ocp

    # Read-only: no tmp-directory clean-up, so exporting beside a run that is saving into the same directory is safe.
    return ocp.CheckpointManager(
        ckpt_dir, options=ocp.CheckpointManagerOptions(read_only=True),
        item_handlers={"arrays": ocp.PyTreeCheckpointHandler(), "meta": ocp.JsonCheckpointHandler()},
    )  # fmt: skip


def restore_policy(ckpt_dir: str | Path, step: Optional[int] = None) -> tuple[Any, dict, int]:
    """The policy's arrays (`actor/params`, numpy; with LoRA the adapters) and the metadata of the checkpoint at
    `step` (default: the newest). The optimizer state is not read."""
    import orbax.checkpoint as ocp

    ckpt_dir = Path(ckpt_dir).resolve()
    if not ckpt_dir.is_dir():
        raise FileNotFoundError(f"--ckpt {ckpt_dir}: no such directory")
    mgr = _manager(ckpt_dir)
    try:
        steps = sorted(mgr.all_steps())
        if not steps:
            raise FileNotFoundError(f"--ckpt {ckpt_dir}: no checkpoint there (expected step directories)")
        step = steps[-1] if step is None else step
        if step not in steps:
            raise FileNotFoundError(f"--ckpt {ckpt_dir}: no step {step}; steps saved: {steps}")
        meta = mgr.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
        tree = mgr.item_metadata(step)["arrays"]
        tree = getattr(tree, "tree", tree)
        wanted = {"actor": {"params": tree["actor"]["params"]}}
        restore_args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), wanted)
        arrays = mgr.restore(step, args=ocp.args.Composite(
            arrays=ocp.args.PyTreeRestore(wanted, restore_args=restore_args, partial_restore=True)))["arrays"]
    finally:
        mgr.close()
    return arrays["actor"]["params"], meta, step


def export_checkpoint(ckpt_dir: str | Path, out_dir: str | Path, step: Optional[int] = None, dtype: str = "auto",
                      model_path: Optional[str | Path] = None) -> Path:  # fmt: skip
    """An HF directory from a saved training checkpoint: the base model and LoRA settings come from the config in
    its metadata (`model.path` unless `model_path` is given), the weights from the checkpoint."""
    from shared.config import LoraConfig

    from .adapters import fold, lora_spec
    from .models.hf_io import load_checkpoint
    from .models.lora import merge_lora

    params, meta, step = restore_policy(ckpt_dir, step)
    model = (meta.get("config") or {}).get("model") or {}
    base = Path(model_path or model.get("path") or "")
    if not (base / "config.json").is_file():
        raise FileNotFoundError(
            f"the checkpoint's base model {str(base) or '(none recorded)'} has no config.json (model.path in the "
            f"checkpoint's config, relative to the directory the run started in); pass --model-path DIR"
        )
    known = {f for f in LoraConfig.__dataclass_fields__}
    lora_cfg = LoraConfig(**{k: v for k, v in (model.get("lora") or {}).items() if k in known})
    if lora_cfg.rank == 0:
        model_cfg = Qwen25VLConfig.from_hf(base)
        return export_hf(params, model_cfg, base, out_dir, dtype=dtype)
    model_cfg, base_params = load_checkpoint(base)
    spec = lora_spec(lora_cfg, model_cfg)
    weights = jax.device_get(jax.jit(lambda b, a: fold(merge_lora(b, a), spec.scale))(base_params, params))
    return export_hf(weights, model_cfg, base, out_dir, adapters=params, lora=spec, dtype=dtype)


def main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m learner_jax.export",
                                 description="Convert a saved training checkpoint to a Hugging Face directory.")
    ap.add_argument("--ckpt", required=True, help="the run's train.ckpt_dir (orbax step directories)")
    ap.add_argument("--out", required=True, help="HF directory to write (replaced if it exists)")
    ap.add_argument("--step", type=int, help="the step to export (default: the newest)")
    ap.add_argument("--dtype", default="auto", choices=EXPORT_DTYPES,
                    help="tensor dtype; auto = the base checkpoint's own (config.json)")  # fmt: skip
    ap.add_argument("--model-path", help="the base HF checkpoint (default: model.path in the checkpoint's config)")
    args = ap.parse_args(argv)
    try:
        out = export_checkpoint(args.ckpt, args.out, args.step, args.dtype, args.model_path)
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
