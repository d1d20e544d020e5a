"""Step time and per-device memory of each sharding strategy on 8 simulated CPU devices (tiny Qwen2.5-VL).

    python bench/sharding.py [--steps 3] [--out bench/results/sharding.json]

Writes JSON (and prints it): per strategy the mesh, compile time, median step time of a 2-micro-batch optimizer
step, the planned bytes per device of params / gradients / optimizer state (checked against the live arrays) and
XLA's own per-device buffer sizes of the compiled accumulate and apply programs.
"""
from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from learner_jax.sharding import simulated_cpu_env  # noqa: E402  (no device touched yet)

os.environ.update(simulated_cpu_env(8))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import argparse  # noqa: E402
import json  # noqa: E402
import statistics  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
import warnings  # noqa: E402
from pathlib import Path  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from learner_jax.memory import memory_report  # noqa: E402
from learner_jax.models.batch import build_batch  # noqa: E402
from learner_jax.models.config import ModelOptions  # noqa: E402
from learner_jax.models.hf_io import load_checkpoint  # noqa: E402
from learner_jax.models.qwen2_5_vl import forward_logprobs  # noqa: E402
from learner_jax.optim import make_optimizer  # noqa: E402
from learner_jax.sharding import Strategy, TrainStep, path_str  # noqa: E402
from shared.config import OptimConfig, ShardingConfig  # noqa: E402
from shared.tiny_checkpoint import TinySpec, write_checkpoint  # noqa: E402

LAYOUTS = {
    "replicated": ShardingConfig("replicated", data=8),
    "zero1": ShardingConfig("zero1", data=8),
    "zero2": ShardingConfig("zero2", data=8),
    "zero3": ShardingConfig("zero3", data=1, fsdp=8),
    "tensor": ShardingConfig("tensor", data=4, tensor=2),
}
SPEC = TinySpec(seed=0, text_hidden=256, text_layers=4, text_heads=4, kv_heads=2, text_intermediate=512,
                mrope_section=[8, 12, 12], vision_depth=2, fullatt_block_indexes=[1])  # fmt: skip
MICRO, SEQ, N_MICRO = 16, 64, 2  # sequences per micro-batch (2 per data-parallel device at data=8), tokens


def micro_batches(cfg, rng):
    out = []
    for _ in range(N_MICRO):
        ids = [rng.integers(0, 400, int(rng.integers(SEQ // 2, SEQ))).tolist() for _ in range(MICRO)]
        mask = np.zeros((MICRO, SEQ - 1), np.float32)
        for b, toks in enumerate(ids):
            mask[b, SEQ - 1 - len(toks) // 2:] = 1.0
        out.append((build_batch(ids, [None] * MICRO, cfg, pad_token_id=0, seq_len=SEQ), mask))
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=3, help="timed steps after the compiling one")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "sharding.json"))
    args = ap.parse_args()
    warnings.filterwarnings("ignore", message="Some donated buffers were not usable")

    ckpt = write_checkpoint(tempfile.mkdtemp(prefix="bench_sharding_"), SPEC)
    cfg, params_np = load_checkpoint(ckpt)
    opts = ModelOptions(dtype="float32", remat=False, attention="softmax")

    def loss_fn(params, batch, mask_BL, scalars):
        logp_BL = forward_logprobs(params, batch, cfg, opts, chunk=256)["logprobs_BL"]
        return -(logp_BL * mask_BL).sum() / mask_BL.sum(), {}

    tx, _ = make_optimizer(OptimConfig(lr=1e-4, warmup_ratio=0.0), 100, params_np)
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), params_np)
    abstract_opt = jax.eval_shape(tx.init, abstract)
    batches = micro_batches(cfg, np.random.default_rng(0))
    n_params = sum(x.size for x in jax.tree.leaves(params_np))
    result = {
        "note": "8 simulated XLA CPU devices sharing the machine's 2 cores: step times compare the overhead of each "
                "strategy's collectives and layout, not parallel speed-ups (there is no parallel hardware).",
        "fields": "bytes_per_device: planned by learner_jax.memory from the strategy's shardings (params, gradient "
                  "accumulator, Adam state; checked leaf by leaf against the live arrays) and its activation "
                  "estimate; xla_per_device: XLA's memory_analysis of the compiled programs (args = inputs, temp = "
                  "scratch: activations, un-reduced gradients, gathered weights).",
        "model": {"params": n_params, "text_hidden": SPEC.text_hidden, "text_layers": SPEC.text_layers,
                  "vision_depth": SPEC.vision_depth, "vocab": cfg.text.vocab_size},
        "batch": {"micro_batch": MICRO, "seq_len": SEQ, "micro_batches_per_step": N_MICRO, "text_only": True,
                  "dtype": "float32", "remat": False},
        "strategies": {},
    }  # fmt: skip
    for name, layout in LAYOUTS.items():
        strategy = Strategy.from_config(layout, cfg)
        step = TrainStep(strategy, loss_fn, tx, params_np)
        params = strategy.place(params_np, step.param_shardings)
        opt = step.init_opt_state(params)
        t0 = time.perf_counter()
        params, opt, m = step(params, opt, batches, grad_scale=1.0 / N_MICRO)
        first = time.perf_counter() - t0
        times, losses = [], [m["loss"]]
        for _ in range(args.steps):
            t0 = time.perf_counter()
            params, opt, m = step(params, opt, batches, grad_scale=1.0 / N_MICRO)
            times.append(time.perf_counter() - t0)
            losses.append(m["loss"])
        report = memory_report(Strategy.abstract(layout, cfg, 8, platform="cpu"), abstract, abstract_opt,
                               micro_batch=MICRO // strategy.data_parallel_size, seq_len=SEQ, compute_dtype="float32",
                               remat=False, fused_attention=False, logprob_chunk=256)  # fmt: skip
        live = {"params": _live_bytes(params), "opt_state": _live_bytes(opt)}
        batch, inputs = step.place_micro_batch(*batches[0])
        sums = {"loss": jnp.zeros((), jnp.float32)}
        acc = step._accumulate.lower(params, step.frozen, step._zeros(), sums, batch, inputs, (),
                                     jnp.float32(1.0)).compile().memory_analysis()  # fmt: skip
        prep = step._prepare.lower(step._pre_state(opt), step._zeros()).compile().memory_analysis()
        app = step._apply.lower(params, opt, step._zeros(), jnp.bool_(True)).compile().memory_analysis()
        result["strategies"][name] = {
            "mesh": strategy.sizes,
            "first_step_s": round(first, 3),
            "step_s_median": round(statistics.median(times), 4),
            "step_s": [round(t, 4) for t in times],
            "losses": losses,
            "bytes_per_device": {"params": report.params, "grads": report.grads, "opt_state": report.opt_state,
                                 "activations_estimate": report.activations},
            "report_matches_live_arrays": live["params"] == report.leaves["params"]
                                          and live["opt_state"] == report.leaves["opt_state"],
            "xla_per_device": {"accumulate_temp": acc.temp_size_in_bytes,
                               "accumulate_args": acc.argument_size_in_bytes,
                               "clip_temp": prep.temp_size_in_bytes, "apply_temp": app.temp_size_in_bytes,
                               "apply_args": app.argument_size_in_bytes},
        }  # fmt: skip
        print(f"{name}: step {statistics.median(times):.3f} s, first {first:.1f} s", file=sys.stderr)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result, indent=1))


def _live_bytes(tree) -> dict[str, int]:
    flat = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {path_str(p): max(s.data.nbytes for s in x.addressable_shards) for p, x in flat}


if __name__ == "__main__":
    main()
