"""Forward+backward throughput of the JAX Qwen2.5-VL against transformers' torch model, same weights, same batch.

    python bench/learner_step.py [--models 58m 3b_shapes] [--reps 5] [--batch 4] [--response-len 160] [--image 224]

Two models: ~58M parameters (below), and Qwen2.5-VL-3B's exact widths cut to 2 decoder layers and 4 vision blocks
(`tiny_checkpoint.spec_like`, 0.58B parameters, 151,936-token vocabulary; run at --batch 2, --response-len 64).
Writes bench/results/learner_step.json (one entry per model) and prints it. Loss: summed log-probabilities of all next tokens (the RL
policy-gradient shape), float32, CPU. FLOP/s counts the matmuls the step performs (3x the forward's, attention
over the full masked T x T and S x S blocks as computed) against a large fp32 matmul measured in each framework.
Repetitions interleave the contenders; medians and bests are both reported, since other processes on a shared
machine inflate single timings (the load average is recorded).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402
from transformers import AutoModelForImageTextToText, AutoProcessor  # noqa: E402

from learner_jax.models.batch import build_batch  # noqa: E402
from learner_jax.models.config import ModelOptions, Qwen25VLConfig  # noqa: E402
from learner_jax.models.hf_io import load_checkpoint  # noqa: E402
from learner_jax.models.qwen2_5_vl import forward_logprobs  # noqa: E402
from shared.records import VisionInputs  # noqa: E402
from shared.tiny_checkpoint import TinySpec, spec_like, write_checkpoint  # noqa: E402

# ~60M parameters: text 768 wide x 8 layers (head_dim 64, GQA 12:2), vision 256 wide x 8 blocks.
SPEC = TinySpec(seed=0, text_hidden=768, text_layers=8, text_heads=12, kv_heads=2, text_intermediate=2048,
                mrope_section=[8, 12, 12], vision_hidden=256, vision_depth=8, vision_heads=4,
                vision_intermediate=768, window_size=112, fullatt_block_indexes=[3, 7])  # fmt: skip
MODELS = {"58m": (SPEC, {}), "3b_shapes": (spec_like("qwen2.5-vl-3b", 2, 4), {"batch": 2, "response_len": 64})}


def _seconds(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def matmul_peak(n: int = 2048, reps: int = 30) -> dict[str, float]:
    flops = 2 * n**3
    a = np.random.default_rng(0).standard_normal((n, n), dtype=np.float32)
    ja = jnp.asarray(a)
    jmm = jax.jit(lambda x: x @ x)
    jmm(ja).block_until_ready()
    jt = [_seconds(lambda: jmm(ja).block_until_ready()) for _ in range(reps)]
    ta = torch.from_numpy(a)
    tt = [_seconds(lambda: ta @ ta) for _ in range(reps + 1)][1:]
    return {"jax_gflops": flops / min(jt) / 1e9, "torch_gflops": flops / min(tt) / 1e9}


def step_flops(cfg: Qwen25VLConfig, batch: dict) -> float:
    """Matmul FLOPs of one forward+backward (3x forward) as the JAX step computes them."""
    t, v = cfg.text, cfg.vision
    B, T = batch["input_ids_BT"].shape
    kv = t.num_kv_heads * t.head_dim
    per_token = t.num_layers * 2 * (t.hidden_size * (2 * t.hidden_size + 2 * kv) + 3 * t.hidden_size * t.intermediate_size)
    attn_text = t.num_layers * 2 * 2 * B * T * T * t.hidden_size
    head = 2 * B * (T - 1) * t.hidden_size * t.vocab_size
    P = batch["pixel_values_PC"].shape[0]
    per_block = 2 * (4 * v.hidden_size**2 + 3 * v.hidden_size * v.intermediate_size)
    per_patch = 2 * v.patch_dim * v.hidden_size + v.depth * per_block
    attn_vis = 0
    for i in range(v.depth):
        G, S = batch["vision_image_idx_GS" if i in v.fullatt_block_indexes else "vision_window_idx_GS"].shape
        attn_vis += 2 * 2 * G * S * S * v.hidden_size
    merger = 2 * (P // v.merge_unit) * (16 * v.hidden_size**2 + 4 * v.hidden_size * v.out_hidden_size)
    return 3.0 * (B * T * per_token + attn_text + head + P * per_patch + attn_vis + merger)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--response-len", type=int, default=160, help="response tokens appended to each prompt")
    ap.add_argument("--image", type=int, default=224, help="image side in pixels (one image per sample)")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "learner_step.json"))
    args = ap.parse_args()
    torch.set_num_threads(os.cpu_count() or 1)
    peak = matmul_peak()
    report = {"matmul_peak_fp32_gflops": peak, "models": {}}
    for name in args.models:
        spec, sizes = MODELS[name]
        run_args = argparse.Namespace(**{**vars(args), **sizes})
        report["models"][name] = measure(spec, run_args, peak)
        print(f"{name}: jax/torch speed-up {report['models'][name]['speedup_jax_over_torch_median']:.2f} (median)",
              file=sys.stderr)  # fmt: skip
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2))
    print(json.dumps(report, indent=2))


def measure(spec: TinySpec, args: argparse.Namespace, peak: dict) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = write_checkpoint(Path(tmp) / "ckpt", spec)
        proc = AutoProcessor.from_pretrained(ckpt)
        proc.tokenizer.padding_side = "left"
        model = AutoModelForImageTextToText.from_pretrained(ckpt, dtype=torch.float32)
        cfg, params = load_checkpoint(ckpt)
    n_params = sum(p.numel() for p in model.parameters())

    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 256, (args.image, args.image, 3), dtype=np.uint8)) for _ in range(args.batch)]
    content = [{"type": "image"}, {"type": "text", "text": "Count."}]
    prompt = proc.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)
    inputs = dict(proc(text=[prompt] * args.batch, images=images, return_tensors="pt"))
    # A random response of --response-len ordinary tokens after each prompt (equal lengths: no padding).
    response = torch.from_numpy(rng.integers(0, cfg.vision_start_token_id - 20, (args.batch, args.response_len)))
    inputs["input_ids"] = torch.cat([inputs["input_ids"], response], 1)
    for key in ("attention_mask", "mm_token_type_ids"):
        inputs[key] = torch.cat([inputs[key], torch.full_like(response, int(key == "attention_mask"))], 1)
    T = inputs["input_ids"].shape[1]
    grid = inputs["image_grid_thw"].numpy()
    per_img = np.prod(grid, axis=1)
    vision = [VisionInputs(inputs["pixel_values"].numpy()[sum(per_img[:b]):sum(per_img[:b + 1])], grid[b:b + 1])
              for b in range(args.batch)]  # fmt: skip
    mask = inputs["attention_mask"].numpy().astype(bool)
    ids = [inputs["input_ids"][b].numpy()[mask[b]].tolist() for b in range(args.batch)]
    batch = build_batch(ids, vision, cfg, pad_token_id=proc.tokenizer.pad_token_id, seq_len=T,
                        num_patches=int(per_img.sum()))  # fmt: skip
    tokens = int(mask.sum())

    # torch: the HF model with its default attention (sdpa), plain autograd.
    pos, _ = model.model.get_rope_index(inputs["input_ids"], inputs["mm_token_type_ids"], inputs["image_grid_thw"],
                                        attention_mask=inputs["attention_mask"])  # fmt: skip

    def torch_step():
        model.zero_grad(set_to_none=True)
        logits = model(**inputs, position_ids=pos).logits
        logp = torch.log_softmax(logits[:, :-1].float(), -1).gather(-1, inputs["input_ids"][:, 1:, None])
        (logp[..., 0] * inputs["attention_mask"][:, 1:]).sum().backward()

    jbatch = jax.tree.map(jnp.asarray, batch)
    jparams = jax.tree.map(jnp.asarray, params)
    steps = {"torch": torch_step}
    # On CPU `dot_product` lowers to the same XLA ops as `softmax` (measured equal), so it is not repeated here.
    variants = {"softmax_scan": ("softmax", False), "softmax_unrolled": ("softmax", True)}
    for variant, (attention, unroll) in variants.items():
        opts = ModelOptions(attention=attention, remat=False, unroll_layers=unroll)

        def loss(p, b, opts=opts):
            out = forward_logprobs(p, b, cfg, opts, chunk=1024)
            return (out["logprobs_BL"] * b["attention_mask_BT"][:, 1:]).sum()

        jitted = jax.jit(jax.value_and_grad(loss))
        steps[f"jax_{variant}"] = lambda f=jitted: jax.block_until_ready(f(jparams, jbatch))

    # Repetitions interleave the contenders, so load from other processes hits them alike.
    load_before = os.getloadavg()
    first, times = {}, {k: [] for k in steps}
    for name, fn in steps.items():
        first[name] = _seconds(fn)
    for _ in range(args.reps):
        for name, fn in steps.items():
            times[name].append(_seconds(fn))
    load_after = os.getloadavg()
    flops = step_flops(cfg, batch)

    def summary(first_s: float, ts: list[float], peak_gflops: float) -> dict:
        med, best = statistics.median(ts), min(ts)
        return {"compile_and_first_s": first_s, "times_s": ts, "median_s": med, "best_s": best,
                "tokens_per_s": tokens / med, "tokens_per_s_best": tokens / best,
                "gflops": flops / med / 1e9, "gflops_best": flops / best / 1e9,
                "fraction_of_peak_best": flops / best / 1e9 / peak_gflops}  # fmt: skip

    jax_results = {k: summary(first[k], v, peak["jax_gflops"]) for k, v in times.items() if k != "torch"}
    torch_result = summary(first["torch"], times["torch"], peak["torch_gflops"])
    best = min(jax_results, key=lambda k: jax_results[k]["median_s"])
    report = {
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "jax": jax.__version__,
                    "torch": torch.__version__, "jax_backend": jax.default_backend(),
                    "loadavg_before": load_before, "loadavg_after": load_after},
        "model": {"params": n_params, "vocab": cfg.text.vocab_size, "text_hidden": spec.text_hidden,
                  "text_layers": spec.text_layers, "vision_hidden": spec.vision_hidden, "vision_depth": spec.vision_depth},
        "batch": {"B": args.batch, "T": T, "tokens": tokens, "image_patches": int(per_img.sum()),
                  "image_grid_thw": grid.tolist()},
        "step_gflop": flops / 1e9,
        "torch": {**torch_result, "attn_implementation": model.config._attn_implementation},
        "jax": jax_results,
        "jax_best_variant": best,
        "speedup_jax_over_torch_median": torch_result["median_s"] / jax_results[best]["median_s"],
        "speedup_jax_over_torch_best": torch_result["best_s"] / jax_results[best]["best_s"],
    }  # fmt: skip
    del model, jparams, steps
    return report


if __name__ == "__main__":
    main()
