"""The memory planner (`learner_jax.memory`) against what JAX measures, for Qwen2.5-VL-3B's widths at a cut depth.

    python bench/memory_plan.py [--micro-batch 2] [--seq-len 656] [--remat 1]

One micro-batch's gradient program of the policy loss (chunked log-probabilities of every token, the RL update's
shape), compiled for one CPU device with the planner's own options (fp32, explicit softmax attention, remat as
given). Parameters, gradient accumulator and Adam state are measured on the live arrays; activations against
XLA's `memory_analysis()` of that program (its scratch: everything the program allocates beyond its arguments and
outputs). Writes bench/results/memory_plan.json: planned, measured and planned/measured per item.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
if "--devices" in sys.argv:  # simulated CPU devices: XLA reads the flag when JAX first touches a device
    import os

    os.environ["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={sys.argv[sys.argv.index('--devices') + 1]}"

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from learner_jax.memory import plan  # noqa: E402
from learner_jax.models.batch import build_batch  # noqa: E402
from learner_jax.models.config import ModelOptions  # noqa: E402
from learner_jax.models.hf_io import load_checkpoint  # noqa: E402
from learner_jax.models.qwen2_5_vl import forward_logprobs  # noqa: E402
from learner_jax.optim import make_optimizer  # noqa: E402
from learner_jax.sharding import Strategy, TrainStep, device_bytes  # noqa: E402
from shared.config import load_config  # noqa: E402
from shared.tiny_checkpoint import spec_like, write_checkpoint  # noqa: E402

CHUNK = 1024  # the learner's default log-prob chunk


def measure(ckpt: str, micro: int, seq_len: int, remat: bool, strategy_name: str, devices: int) -> dict:
    cfg = load_config("qwen25vl_3b_shapes", [
        f"model.path={ckpt}", "model.dtype=float32", f"model.remat={remat}", f"train.micro_train_batch_size={micro}",
        f"train.train_batch_size={2 * micro * devices}",  # two micro-batches per step: the accumulating program
        f"rollout.rollout_batch_size={micro * devices}",  # x 2 samples: one step per rollout
        "data.prompt_max_len=" + str(seq_len - 16), "rollout.generate_max_len=16", "algo.init_kl_coef=0",
        f"sharding.strategy={strategy_name}", "sharding.data=" + ("1" if strategy_name == "zero3" else "-1"),
        f"sharding.fsdp={devices if strategy_name == 'zero3' else 1}",
    ])  # fmt: skip
    model_cfg, params_np = load_checkpoint(ckpt)
    planned = plan(cfg, model_cfg, devices, [strategy_name], platform="cpu")[0]
    opts = ModelOptions(dtype="float32", remat=remat, attention="softmax")

    def loss_fn(params, batch, mask_BL, scalars):
        logp_BL = forward_logprobs(params, batch, model_cfg, opts, chunk=CHUNK)["logprobs_BL"]
        return -(logp_BL * mask_BL).sum() / mask_BL.sum(), {}

    strategy = Strategy.from_config(cfg.sharding, model_cfg, jax.devices()[:devices])
    tx, _ = make_optimizer(cfg.actor, 10, params_np)
    step = TrainStep(strategy, loss_fn, tx, params_np)
    params = strategy.place(params_np, step.param_shardings)
    del params_np
    opt = step.init_opt_state(params)
    rng = np.random.default_rng(0)
    rows = micro * strategy.data_parallel_size  # the config's micro-batch is per data-parallel rank
    ids = [rng.integers(0, 500, seq_len).tolist() for _ in range(rows)]
    batch = build_batch(ids, [None] * rows, model_cfg, pad_token_id=0, seq_len=seq_len)
    mask = np.ones((rows, seq_len - 1), np.float32)
    placed, extra = step.place_micro_batch(batch, mask)
    sums = {"loss": jnp.zeros((), jnp.float32)}
    compiled = step._accumulate.lower(params, step.frozen, step._zeros(), sums, placed, extra, (),
                                      jnp.float32(1)).compile()  # fmt: skip
    xla = compiled.memory_analysis()
    measured = {"params": sum(device_bytes(params).values()), "grads": sum(device_bytes(step._zeros()).values()),
                "opt_state": sum(device_bytes(opt).values()), "activations": int(xla.temp_size_in_bytes)}  # fmt: skip
    # XLA's scratch holds the activations and the micro-batch's gradient before it is added to the accumulator
    plan_items = {"params": planned.params, "grads": planned.grads, "opt_state": planned.opt_state,
                  "activations": planned.activations + planned.grad_transient}  # fmt: skip
    act_parts = {"activations": planned.activations, "grad_transient": planned.grad_transient}
    return {
        "strategy": strategy_name, "devices": devices, "micro_batch": micro, "seq_len": seq_len, "remat": remat,
        "planned": plan_items, "measured": measured,
        "planned_over_measured": {k: plan_items[k] / measured[k] for k in plan_items},
        "activation_plan_parts": act_parts,
        "xla": {"temp": xla.temp_size_in_bytes, "arguments": xla.argument_size_in_bytes,
                "outputs": xla.output_size_in_bytes, "aliased": xla.alias_size_in_bytes},
    }  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--micro-batch", type=int, default=2)
    ap.add_argument("--seq-len", type=int, default=656)
    ap.add_argument("--remat", type=int, nargs="+", default=[1, 0])
    ap.add_argument("--strategy", default="replicated", choices=["replicated", "zero2", "zero3"])
    ap.add_argument("--devices", type=int, default=1, help="simulated CPU devices (bytes are per device)")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "memory_plan.json"))
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = str(write_checkpoint(Path(tmp) / "ckpt", spec_like("qwen2.5-vl-3b", 2, 4)))
        report = {"model": "qwen2.5-vl-3b widths, 2 text layers, 4 vision blocks, fp32, 1 CPU device",
                  "runs": [measure(ckpt, args.micro_batch, args.seq_len, bool(r), args.strategy, args.devices)
                           for r in args.remat]}  # fmt: skip
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=1) + "\n")
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
