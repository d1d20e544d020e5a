"""Per-device memory of a training configuration under each sharding strategy, planned without allocating.

    python -m learner_jax.memory --config fre_text --devices 8 --device-gb 80

Parameters, gradients and optimizer state are exact: the shard shapes of the abstract trees (ShapeDtypeStructs,
`jax.eval_shape` of the optimizer's init) under the strategy's own shardings on an `AbstractMesh`, the same code
path a run uses. Activations are an estimate from the batch geometry (see `activation_bytes`).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

import jax
import jax.numpy as jnp

from shared.config import SHARDING_STRATEGIES, Config, ShardingConfig, derive, load_config
from shared.models.qwen2_5_vl_presets import PRESETS, preset

from .models.attention import resolve_attention
from .models.config import Qwen25VLConfig
from .adapters import adapter_shapes, lora_spec
from .models.params import abstract_params
from .optim import make_optimizer
from .sharding import Strategy, path_str, shard_bytes

GIB = 1 << 30


def model_config(cfg: Config, arch: Optional[str] = None) -> Qwen25VLConfig:
    """The architecture to plan for: a preset by name, else the checkpoint's config.json, else the preset the
    checkpoint directory's name points to (e.g. models/Qwen2.5-VL-3B-Instruct before it is downloaded)."""
    if arch is not None:
        return Qwen25VLConfig.from_hf(preset(arch))
    path = Path(cfg.model.path)
    if (path / "config.json").exists():
        return Qwen25VLConfig.from_hf(path)
    for name, raw in PRESETS.items():
        if name.split("-")[-1] in path.name.lower() and "qwen2.5-vl" in path.name.lower():
            return Qwen25VLConfig.from_hf(raw)
    raise ValueError(f"model.path {cfg.model.path!r} has no config.json and names no preset; pass --arch "
                     f"({', '.join(PRESETS)})")  # fmt: skip


# --------------------------------------------------------------------------- activations


def decoder_layer_bytes_per_token(cfg: Qwen25VLConfig, dtype_bytes: int, tensor: int, seq_len: int,
                                  fused_attention: bool) -> float:  # fmt: skip
    """Bytes one decoder layer keeps per token for its backward pass: residual and norm outputs (4 D), q/k/v
    after RoPE and the attention output (2 Dq + 2 Dkv), the SwiGLU intermediates (4 I), in the compute dtype
    and split where tensor parallelism splits the weights; plus the attention's own state. Unfused (softmax,
    and dot_product, whose XLA composition materialises the same [H, T, S] arrays): float32 probabilities (and a
    compute-dtype copy) per head and key. Fused (cudnn): one float32 log-sum-exp per head, and the rotated copies
    of q/k/v and the output that `cudnn_causal_attention` gathers (2 Dq + 2 Dkv)."""
    t = cfg.text
    d_q, d_kv = t.num_heads * t.head_dim, t.num_kv_heads * t.head_dim
    kv_split = tensor if t.num_kv_heads % tensor == 0 else 1
    qkvo = 2 * d_q / tensor + 2 * d_kv / kv_split
    sharded = 4 * t.intermediate_size / tensor + qkvo
    per_key = 4 + (dtype_bytes if dtype_bytes < 4 else 0)
    if fused_attention:
        return dtype_bytes * (4 * t.hidden_size + sharded + qkvo) + t.num_heads / tensor * 4
    return dtype_bytes * (4 * t.hidden_size + sharded) + t.num_heads / tensor * per_key * seq_len


def activation_bytes(cfg: Qwen25VLConfig, micro_batch: int, seq_len: int, dtype_bytes: int, remat: bool,
                     tensor: int = 1, fused_attention: bool = True, logprob_chunk: int = 1024,
                     vocab_split: Optional[int] = None) -> int:  # fmt: skip
    """Estimated peak activation memory of one micro-batch's forward + backward on one device (text decoder).

    Without remat every layer's saved tensors live until the backward pass. With remat (per-layer
    `jax.checkpoint`) only each layer's input (D per token) is kept, plus one layer recomputed at a time.
    On top: the embedding output, the final norm, the residual-stream gradient (about 4 D per token), the
    boolean [T, T] mask per sample (unfused attention only; the fused kernel takes row lengths), and four
    [chunk, V] float32 blocks of the chunked log-prob head (logits, probabilities and their gradients), split
    `vocab_split` ways where the head's vocabulary axis is sharded (tensor, and fsdp under zero3).
    """
    t = cfg.text
    tokens = micro_batch * seq_len
    layer = decoder_layer_bytes_per_token(cfg, dtype_bytes, tensor, seq_len, fused_attention)
    kept = t.num_layers * (dtype_bytes * t.hidden_size + (0 if remat else layer)) + (layer if remat else 0)
    extras = tokens * 4 * dtype_bytes * t.hidden_size + (0 if fused_attention else micro_batch * seq_len * seq_len)
    head = 4 * 4 * min(logprob_chunk, tokens) * t.vocab_size / (vocab_split or tensor)
    return int(tokens * kept + extras + head)


# --------------------------------------------------------------------------- report


@dataclass
class MemoryReport:
    strategy: str
    mesh: dict[str, int]
    params: int  # bytes per device (largest shard), float32 master weights (with LoRA: base + adapters)
    grads: int  # the gradient accumulator (with LoRA: adapters only)
    opt_state: int
    opt_on_host: bool
    reference: int  # frozen reference policy, same shardings as the params (LoRA: the base itself, 0)
    compute_copy: int  # the params cast to the compute dtype inside the forward pass (0 for float32)
    activations: int  # estimate, with the config's remat setting
    activations_no_remat: int
    grad_transient: int  # one micro-batch's gradient, laid out like the params, before it joins the accumulator
    leaves: dict[str, dict[str, int]]  # "params" / "opt_state" -> path -> bytes per device
    notes: list[str]  # partition-rule fallbacks (a dim that did not divide and stayed replicated)
    attention: str = ""  # the attention implementation the activations were planned for (`resolve_attention`)

    @property
    def device_total(self) -> int:
        opt = 0 if self.opt_on_host else self.opt_state
        return (self.params + self.grads + opt + self.reference + self.compute_copy + self.activations
                + self.grad_transient)

    def summary(self) -> dict[str, Any]:
        out = {k: v for k, v in dataclasses.asdict(self).items() if k not in ("leaves", "notes")}
        out["device_total"] = self.device_total
        return out


def tree_bytes(tree: Any, shardings: Any) -> dict[str, int]:
    """Bytes per device of each leaf: the largest shard's size under its sharding."""
    flat = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {path_str(p): shard_bytes(leaf, s) for (p, leaf), s in zip(flat, jax.tree.leaves(shardings))}


def memory_report(strategy: Strategy, params: Any, opt_state: Any, *, micro_batch: int, seq_len: int,
                  compute_dtype: str = "bfloat16", remat: bool = True, with_reference: bool = False,
                  fused_attention: bool = True, logprob_chunk: int = 1024, frozen: Any = None,
                  micro_batches_per_step: int = 2) -> MemoryReport:  # fmt: skip
    """The memory of `strategy` for a params tree and optimizer state (arrays or ShapeDtypeStructs).

    `micro_batch` is the number of sequences each data-parallel rank processes at once, `seq_len` their length.
    With LoRA `params` are the adapters and `frozen` the base: no gradient or optimizer state of its own, and it
    is the reference model too. A step of one micro-batch (`micro_batches_per_step` 1) has no accumulator: its
    gradient is the sum (`grads`), with no transient beside it.
    """
    p = tree_bytes(params, strategy.param_shardings(params))
    g = tree_bytes(params, strategy.grad_shardings(params))
    o = tree_bytes(opt_state, strategy.opt_shardings(opt_state))
    if frozen is not None:
        p = {**tree_bytes(frozen, strategy.param_shardings(frozen)), **p}
    p_total = sum(p.values())
    dtype_bytes = jnp.dtype(compute_dtype).itemsize
    sizes = strategy.sizes
    vocab_split = sizes["tensor"] * (sizes["fsdp"] if strategy.name == "zero3" else 1)
    act = lambda r: activation_bytes(strategy.model, micro_batch, seq_len, dtype_bytes, r,  # noqa: E731
                                     sizes["tensor"], fused_attention, logprob_chunk, vocab_split)
    return MemoryReport(
        strategy=strategy.name, mesh=strategy.sizes, params=p_total, grads=sum(g.values()),
        opt_state=sum(o.values()), opt_on_host=strategy.offload_active,
        reference=p_total if with_reference and frozen is None else 0,
        compute_copy=p_total * dtype_bytes // 4 if dtype_bytes < 4 else 0,
        activations=act(remat), activations_no_remat=act(False),
        grad_transient=(sum(tree_bytes(params, strategy.param_shardings(params)).values())
                        if micro_batches_per_step > 1 else 0),
        leaves={"params": p, "opt_state": o}, notes=list(strategy.notes),
    )  # fmt: skip


def default_layout(strategy: str, num_devices: int, heads: int, cfg: ShardingConfig) -> ShardingConfig:
    """The config's own layout for its strategy; for the others a canonical one on the same devices: data
    parallel for replicated/zero1/zero2, all devices on fsdp for zero3, the largest tensor group that divides
    the heads (at most 8, within a node) for tensor."""
    if strategy == cfg.strategy:
        return cfg
    if strategy == "zero3":
        return ShardingConfig(strategy, data=1, fsdp=num_devices, offload_optimizer=cfg.offload_optimizer)
    if strategy == "tensor":
        fits = [k for k in (8, 4, 2) if num_devices % k == 0 and heads % k == 0]
        if not fits:
            raise ValueError(f"no tensor group of 2, 4 or 8 divides {num_devices} devices and {heads} heads")
        tp = cfg.tensor if cfg.tensor > 1 else fits[0]
        return ShardingConfig(strategy, data=-1, tensor=tp, offload_optimizer=cfg.offload_optimizer)
    return ShardingConfig(strategy, data=-1, offload_optimizer=cfg.offload_optimizer)


def plan(cfg: Config, model: Qwen25VLConfig, num_devices: int,
         strategies: Sequence[str] = SHARDING_STRATEGIES, platform: str = "gpu",
         fused_attention: Optional[bool] = None) -> list[MemoryReport]:  # fmt: skip
    """A report per strategy for the policy of `cfg` (actor, plus the reference when the run uses one).

    The attention is the one a run of `cfg` on `platform` uses (`model.attention` through `resolve_attention`,
    with each layout's tensor axis): cudnn is fused (O(T) per head), softmax and dot_product keep the [T, T]
    probabilities. `fused_attention` overrides that choice."""
    params, frozen = abstract_params(model), None
    lora = lora_spec(cfg.model.lora, model)
    if lora is not None:
        params, frozen = adapter_shapes(model, lora), params
    tx, _ = make_optimizer(cfg.actor, 1000, params)
    opt_state = jax.eval_shape(tx.init, params)
    seq_len = cfg.data.prompt_max_len + cfg.rollout.generate_max_len
    reports = []
    for name in strategies:
        layout = default_layout(name, num_devices, model.text.num_heads, cfg.sharding)
        strategy = Strategy.abstract(layout, model, num_devices, platform=platform)
        impl = resolve_attention(cfg.model.attention, cfg.model.dtype, (model.text.head_dim, model.vision.head_dim),
                                 platform=platform, num_kv_heads=model.text.num_kv_heads, tensor=layout.tensor)
        fused = impl == "cudnn" if fused_attention is None else fused_attention
        micro_steps = cfg.train.train_batch_size // (cfg.train.micro_train_batch_size * strategy.data_parallel_size)
        report = memory_report(strategy, params, opt_state, micro_batch=cfg.train.micro_train_batch_size,
                               seq_len=seq_len, compute_dtype=cfg.model.dtype, remat=cfg.model.remat,
                               with_reference=cfg.uses_reference, fused_attention=fused, frozen=frozen,
                               micro_batches_per_step=max(1, micro_steps))  # fmt: skip
        reports.append(dataclasses.replace(report, attention=impl if fused_attention is None else
                                           ("fused" if fused else "unfused")))  # fmt: skip
    return reports


def format_table(reports: Sequence[MemoryReport], device_gib: float, title: str = "") -> str:
    head = ("strategy", "d/f/t", "params", "grads", "opt", "ref", "bf16copy", "act", "act0", "gradtmp", "total", "fits",
            "attn")  # fmt: skip
    rows = [head]
    for r in reports:
        gib = [f"{b / GIB:.2f}" for b in (r.params, r.grads, r.opt_state, r.reference, r.compute_copy,
                                           r.activations, r.activations_no_remat, r.grad_transient,
                                           r.device_total)]  # fmt: skip
        gib[2] += "h" if r.opt_on_host else ""
        fits = "yes" if r.device_total <= device_gib * GIB else "NO"
        rows.append((r.strategy, "/".join(str(r.mesh[a]) for a in ("data", "fsdp", "tensor")), *gib, fits,
                     r.attention))  # fmt: skip
    lines = [f"{row[0]:<11s}" + "".join(f"{c:>9s}" for c in row[1:-1]) + f"  {row[-1]}" for row in rows]
    return "\n".join(([title] if title else []) + lines)


def main(argv: Optional[Sequence[str]] = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", required=True, help="config name or YAML path")
    ap.add_argument("--set", action="append", default=[], help="override, e.g. train.micro_train_batch_size=1")
    ap.add_argument("--devices", type=int, required=True)
    ap.add_argument("--device-gb", type=float, required=True, help="memory per device, GiB")
    ap.add_argument("--arch", help=f"plan this architecture instead of model.path ({', '.join(PRESETS)})")
    ap.add_argument("--platform", default="gpu", choices=("gpu", "tpu", "cpu"),
                    help="plan the attention model.attention picks there: cpu softmax, gpu cudnn for bfloat16/float16 "
                         "(else dot_product), tpu dot_product; unfused ones keep T x T probabilities per head")
    ap.add_argument("--strategies", nargs="+", default=list(SHARDING_STRATEGIES), choices=SHARDING_STRATEGIES)
    ap.add_argument("--json", action="store_true", help="print the reports as JSON instead of a table")
    args = ap.parse_args(argv)
    cfg = load_config(args.config, args.set)
    model = model_config(cfg, args.arch)
    reports = plan(cfg, model, args.devices, args.strategies, args.platform)
    if args.json:
        json.dump([r.summary() for r in reports], sys.stdout, indent=1)
        print()
        return
    n_params = sum(math.prod(x.shape) for x in jax.tree.leaves(abstract_params(model)))
    t = cfg.train
    seq = derive(cfg, None)["max_model_len"]
    title = (f"{cfg.name}: {n_params / 1e9:.2f}B params (text {model.text.num_layers}x{model.text.hidden_size}, "
             f"vision {model.vision.depth}x{model.vision.hidden_size}), {args.devices} x {args.device_gb:g} GiB\n"
             f"micro-batch {t.micro_train_batch_size} x {seq} tokens per data-parallel rank, compute {cfg.model.dtype}, "
             f"remat {'on' if cfg.model.remat else 'off'}, reference model {'yes' if cfg.uses_reference else 'no'}\n"
             "GiB per device (mesh data/fsdp/tensor); act = activations as configured, act0 = without remat, gradtmp = a "
             "micro-batch's gradient before it is accumulated; "
             "opt 'h' = in host memory, not counted in total")  # fmt: skip
    print(format_table(reports, args.device_gb, title))
    for r in reports:
        for note in r.notes:
            print(f"  {r.strategy}: {note}")


if __name__ == "__main__":
    main()
