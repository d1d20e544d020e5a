"""Sharding strategies on 8 simulated CPU devices: each trains exactly like one device, its arrays take the bytes the
memory report plans, and checkpoints saved under one strategy restore under another.

XLA fixes the device count when JAX first uses a device, and the rest of the suite runs on one device, so the
checks run in a subprocess with `simulated_cpu_env(8)`: this file is both the pytest module and that script
(`python tests/test_sharding_multidevice.py CKPT WORK '{"names": ["zero3"], "steps": 2, "remat": false}'`
prints one JSON object; see `run`).
"""
import os
import sys

if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from learner_jax.sharding import simulated_cpu_env  # before any device is touched

    os.environ.update(simulated_cpu_env(8))

import json
import subprocess
from typing import Optional, Sequence

import numpy as np
import pytest

STEPS = 5
LAYOUTS = {  # name -> ShardingConfig fields
    "replicated": dict(strategy="replicated", data=8),
    "zero1": dict(strategy="zero1", data=8),
    "zero2": dict(strategy="zero2", data=8),
    "zero3": dict(strategy="zero3", data=2, fsdp=4),
    "tensor": dict(strategy="tensor", data=4, tensor=2),
    "zero3_tensor": dict(strategy="zero3", fsdp=4, tensor=2),
    "zero2_offload": dict(strategy="zero2", data=8, offload_optimizer=True),
}


def _run(tiny_ckpt: str, tmp_path, **plan) -> dict:
    proc = subprocess.run([sys.executable, __file__, tiny_ckpt, str(tmp_path), json.dumps(plan)], capture_output=True,
                          text=True, timeout=900, env={**os.environ, "JAX_PLATFORMS": "cpu"})  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _check_training(out: dict, names) -> None:
    base = np.array(out["single_device"])
    assert np.all(np.diff(base) < 0), f"the single-device loss should fall: {base}"
    assert set(out["layouts"]) == set(names)
    for name, r in out["layouts"].items():
        np.testing.assert_allclose(r["losses"], base, rtol=1e-5, err_msg=name)
        assert r["param_update_rel_diff"] < 1e-3, (name, r["param_update_rel_diff"])
        assert r["bytes_mismatches"] == [], (name, r["bytes_mismatches"][:5])
        assert (r["params_bytes"], r["opt_bytes"]) == (r["report_params_bytes"], r["report_opt_bytes"]), name
        assert r["skipped"] == 0


def _check_restores(out: dict, names) -> None:
    assert set(out["restored"]) == set(names)
    for name, r in out["restored"].items():
        assert r["identical"], f"values changed when restoring under {name}"
        assert r["shardings_match"], f"restored arrays are not in {name}'s layout"


def test_fsdp_with_tensor_parallel_trains_like_one_device_and_restores_replicated(tiny_ckpt, tmp_path):
    """The 2-D layout (zero3 over fsdp=4 x tensor=2), two text-only steps of one micro-batch each (the program that
    applies its gradient directly) without remat (the slow tests cover images, remat and accumulation); its
    checkpoint restores into the replicated and the host-offloaded zero2 layouts."""
    targets = ["replicated", "zero2_offload"]
    out = _run(tiny_ckpt, tmp_path, names=["zero3_tensor"], steps=2, remat=False, images=False,
               restore_into=targets, n_micro=1)
    _check_training(out, ["zero3_tensor"])
    _check_restores(out, targets)


@pytest.mark.slow
def test_every_strategy_trains_like_one_device_and_matches_the_memory_report(tiny_ckpt, tmp_path):
    out = _run(tiny_ckpt, tmp_path, names=list(LAYOUTS), steps=STEPS, remat=True, bf16="zero3")
    _check_training(out, LAYOUTS)
    layouts = out["layouts"]
    full = layouts["replicated"]["params_bytes"]
    assert layouts["zero3"]["params_bytes"] < full / 3  # split 4 ways (a few small leaves stay whole)
    assert layouts["zero3_tensor"]["params_bytes"] < full / 6
    assert layouts["zero1"]["opt_bytes"] < layouts["replicated"]["opt_bytes"] / 6
    assert layouts["zero2_offload"]["opt_memory_kind"] == "pinned_host"
    bf16 = np.array(out["bf16_losses"])
    assert np.all(np.isfinite(bf16)) and np.allclose(bf16, out["single_device"], rtol=5e-2)


@pytest.mark.slow
def test_checkpoints_restore_under_every_other_strategy_and_training_resumes(tiny_ckpt, tmp_path):
    targets = [n for n in LAYOUTS if n != "zero3"]
    out = _run(tiny_ckpt, tmp_path, names=["zero3"], steps=2, remat=False, restore_into=targets, resume_under="tensor")
    _check_restores(out, targets)
    np.testing.assert_allclose(out["resumed"]["tensor"], out["resumed"]["zero3"], rtol=1e-5)


# --------------------------------------------------------------------------- the script


def _loss_fn(cfg, opts, forward_logprobs):
    def loss_fn(params, batch, mask_BL, scalars=()):
        logp_BL = forward_logprobs(params, batch, cfg, opts, chunk=64)["logprobs_BL"]
        loss = -(logp_BL * mask_BL).sum() / mask_BL.sum()
        return loss, {"tokens": mask_BL.sum()}

    return loss_fn


def _micro_batches(cfg, n_steps: int, images: bool = True, n_micro: int = 2, size: int = 8, T: int = 32):
    """Fixed micro-batches of `size` sequences (left-padded; with `images`, two of them hold a 4x4-patch image)."""
    from learner_jax.models.batch import build_batch
    from shared.records import VisionInputs

    rng = np.random.default_rng(0)
    start, end = cfg.vision_start_token_id, cfg.vision_start_token_id + 1
    out = []
    for _ in range(n_micro):
        ids, vis = [], []
        for b in range(size):
            n = int(rng.integers(T // 2, T - 6))
            text = rng.integers(0, 400, n).tolist()
            if images and b % 4 == 1:
                grid = np.array([[1, 4, 4]])
                ids.append(text[:3] + [start] + [cfg.image_token_id] * 4 + [end] + text[3:])
                vis.append(VisionInputs(rng.normal(size=(16, cfg.vision.patch_dim)).astype(np.float32), grid))
            else:
                ids.append(text)
                vis.append(None)
        batch = build_batch(ids, vis, cfg, pad_token_id=0, seq_len=T)
        mask = np.zeros((size, T - 1), np.float32)
        for b, toks in enumerate(ids):
            mask[b, T - 1 - len(toks) // 2:] = 1.0  # the second half of each sequence plays the response
        out.append((batch, mask))
    return [out] * n_steps


def _optimizer(params):
    from learner_jax.optim import make_optimizer
    from shared.config import OptimConfig

    return make_optimizer(OptimConfig(lr=1e-3, warmup_ratio=0.0, weight_decay=0.01, max_norm=1.0), STEPS, params)[0]


def _single_device(cfg, params, loss_fn, steps):
    import jax
    import jax.numpy as jnp

    import optax

    dev = jax.devices()[0]
    tx = _optimizer(params)
    params = jax.device_put(params, dev)
    opt = tx.init(params)
    grad = jax.jit(jax.value_and_grad(loss_fn, has_aux=True))
    losses = []
    for micro in steps:
        acc, total = None, 0.0
        for batch, mask in micro:
            (loss, _), g = grad(params, jax.device_put(batch, dev), jax.device_put(mask, dev))
            acc = g if acc is None else jax.tree.map(jnp.add, acc, g)
            total += float(loss)
        updates, opt = tx.update(jax.tree.map(lambda x: x / len(micro), acc), opt, params)
        params = optax.apply_updates(params, updates)
        losses.append(total / len(micro))
    return losses, params


def _strategy(cfg, layout):
    from learner_jax.sharding import Strategy
    from shared.config import ShardingConfig

    return Strategy.from_config(ShardingConfig(**layout), cfg)


def _train(strategy, params_np, loss_fn, steps, params=None, opt=None, step=None):
    from learner_jax.sharding import TrainStep

    step = step or TrainStep(strategy, loss_fn, _optimizer(params_np), params_np)
    if params is None:
        params = step.strategy.place(params_np, step.param_shardings)
        opt = step.init_opt_state(params)
    losses, skipped = [], 0
    for micro in steps:
        params, opt, m = step(params, opt, micro, grad_scale=1.0 / len(micro))
        losses.append(m["loss"])
        skipped += m["skipped"]
    return losses, params, opt, skipped, step


def _device_bytes(tree) -> dict:
    import jax

    from learner_jax.sharding import path_str

    flat = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {path_str(p): max(s.data.nbytes for s in x.addressable_shards) for p, x in flat}


def run(ckpt: str, work: str, names: list[str], steps: int, remat: bool, images: bool = True,
        bf16: Optional[str] = None, restore_into: Sequence[str] = (), resume_under: Optional[str] = None,
        n_micro: int = 2) -> dict:
    """Train each layout in `names` for `steps` of `n_micro` micro-batches against one device; optionally train
    `bf16` in bfloat16; save the last layout's state and restore it under each of `restore_into`; resume one step
    under `resume_under`."""
    import jax

    from learner_jax.checkpoint import Checkpointer
    from learner_jax.memory import memory_report
    from learner_jax.models.config import ModelOptions
    from learner_jax.models.hf_io import load_checkpoint
    from learner_jax.models.qwen2_5_vl import forward_logprobs
    from learner_jax.sharding import Strategy, TrainStep
    from shared.config import ShardingConfig

    cfg, params_np = load_checkpoint(ckpt)
    loss_fn = _loss_fn(cfg, ModelOptions(dtype="float32", remat=remat, attention="softmax"), forward_logprobs)
    batches = _micro_batches(cfg, steps + 1, images, n_micro=n_micro)
    base, base_params = _single_device(cfg, params_np, loss_fn, batches[:steps])
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), params_np)
    abstract_opt = jax.eval_shape(_optimizer(params_np).init, abstract)
    out: dict = {"single_device": base, "layouts": {}}
    for name in names:
        strategy = _strategy(cfg, LAYOUTS[name])
        losses, params, opt, skipped, last = _train(strategy, params_np, loss_fn, batches[:steps])
        planned = Strategy.abstract(ShardingConfig(**LAYOUTS[name]), cfg, 8, platform="cpu")
        report = memory_report(planned, abstract, abstract_opt, micro_batch=1, seq_len=32)
        got = {"params": _device_bytes(params), "opt_state": _device_bytes(opt)}
        mismatches = [(kind, k, got[kind].get(k), v) for kind in got for k, v in report.leaves[kind].items()
                      if got[kind].get(k) != v]  # fmt: skip
        # Adam turns a last-bit difference in a near-zero gradient into a full step, so params are compared by
        # norm against the whole update rather than element by element.
        diff = sum(float(np.sum((np.asarray(a) - b) ** 2)) for a, b in zip(jax.tree.leaves(params),
                                                                            jax.tree.leaves(base_params)))  # fmt: skip
        moved = sum(float(np.sum((b - a) ** 2)) for a, b in zip(jax.tree.leaves(params_np),
                                                                 jax.tree.leaves(base_params)))  # fmt: skip
        out["layouts"][name] = {
            "losses": losses, "skipped": skipped, "param_update_rel_diff": (diff / moved) ** 0.5,
            "bytes_mismatches": mismatches, "params_bytes": sum(got["params"].values()),
            "opt_bytes": sum(got["opt_state"].values()), "report_params_bytes": report.params,
            "report_opt_bytes": report.opt_state, "opt_memory_kind": jax.tree.leaves(opt)[1].sharding.memory_kind,
        }  # fmt: skip
    if bf16:
        bf16_fn = _loss_fn(cfg, ModelOptions(dtype="bfloat16", remat=remat, attention="softmax"), forward_logprobs)
        out["bf16_losses"] = _train(_strategy(cfg, LAYOUTS[bf16]), params_np, bf16_fn, batches[:steps])[0]
    if restore_into:
        state = {"params": params, "opt_state": opt}
        saved = jax.tree.map(np.asarray, state)
        ck = Checkpointer(os.path.join(work, "ck"))
        ck.save(steps, state, {"layout": names[-1]})
        out["restored"] = {}
        for name in restore_into:
            strategy = _strategy(cfg, LAYOUTS[name])
            step = TrainStep(strategy, loss_fn, _optimizer(params_np), params_np)
            shardings = {"params": step.param_shardings, "opt_state": step.opt_shardings}
            target = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), saved, shardings)
            restored, meta, _ = ck.restore(target)
            out["restored"][name] = {
                "identical": all(np.array_equal(np.asarray(a), b)
                                 for a, b in zip(jax.tree.leaves(restored), jax.tree.leaves(saved))),
                "shardings_match": all(a.sharding == t.sharding
                                       for a, t in zip(jax.tree.leaves(restored), jax.tree.leaves(target))),
            }  # fmt: skip
            if name == resume_under:
                resumed = _train(strategy, params_np, loss_fn, batches[steps:], restored["params"],
                                 restored["opt_state"], step)[0]  # fmt: skip
                out["resumed"] = {name: resumed, names[-1]: _train(None, params_np, loss_fn, batches[steps:],
                                                                   params, opt, last)[0]}  # fmt: skip
        ck.close()
    return out


if __name__ == "__main__":
    ckpt_dir, work_dir, plan = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
    print(json.dumps(run(ckpt_dir, work_dir, **plan)))
