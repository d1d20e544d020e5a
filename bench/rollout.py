"""Generation throughput of the vLLM engine against the transformers engine, same checkpoint, same prompts.

    python bench/rollout.py [--prompts 8] [--n 4] [--max-tokens 128] [--reps 3]

Writes bench/results/rollout.json and prints it. A ~20 MB Qwen2.5-VL-shaped checkpoint (fp32), text-only and
one-image prompts, `n` samples per prompt at temperature 1 (unseeded requests: every sample its own random stream, so
the two engines stop at EOS at different points; the rate is per generated token); generated tokens per second of
wall time after one warm-up call. Both engines live in this process and use all cores; their runs alternate and the
best of `reps` is reported, so a load spike on a shared machine hits both alike and rarely both repetitions.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
# vLLM logs to stdout unless told not to configure logging; stdout carries the JSON report.
for key, value in {"HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
                   "VLLM_CONFIGURE_LOGGING": "0"}.items():  # fmt: skip
    os.environ.setdefault(key, value)

from PIL import Image  # noqa: E402

from rollout_torch.engine import EngineConfig, checkpoint_shapes, make_engine  # noqa: E402
from rollout_torch.processing import load_processor, messages_to_prompt  # noqa: E402
from shared.records import SamplingSpec  # noqa: E402
from shared.tiny_checkpoint import TinySpec, write_checkpoint  # noqa: E402

# ~5M parameters: text 256 wide x 4 layers (head_dim 64, GQA 4:2), vision 128 wide x 4 blocks.
SPEC = TinySpec(seed=0, text_hidden=256, text_layers=4, text_heads=4, kv_heads=2, text_intermediate=1024,
                mrope_section=[8, 12, 12], vision_hidden=128, vision_depth=4, vision_heads=2,
                vision_intermediate=256)  # fmt: skip


def make_prompts(ckpt: str, workdir: Path, count: int) -> dict[str, list]:
    proc = load_processor(ckpt)
    rng = np.random.default_rng(0)
    text, image = [], []
    for i in range(count):
        text.append(messages_to_prompt(proc, [{"role": "user", "content": f"Compute {i} + {2 * i} and explain."}], uid=i))
        path = workdir / f"img{i}.png"
        Image.fromarray((rng.random((224, 224, 3)) * 255).astype(np.uint8)).save(path)
        content = [{"type": "text", "text": f"How many shapes are in picture {i}?"}, {"type": "image", "image": str(path)}]
        image.append(messages_to_prompt(proc, [{"role": "user", "content": content}], uid=count + i))
    return {"text": text, "image": image}


def timed(engine, prompts, spec: SamplingSpec) -> tuple[int, float]:
    start = time.perf_counter()
    out = engine.generate(prompts, spec)
    return sum(len(s.response_ids) for g in out for s in g), time.perf_counter() - start


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--prompts", type=int, default=8, help="prompts per workload")
    ap.add_argument("--n", type=int, default=4, help="samples per prompt")
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--reps", type=int, default=3)
    args = ap.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        ckpt = str(write_checkpoint(Path(tmp) / "ckpt", SPEC))
        shapes = checkpoint_shapes(ckpt)
        params = int(sum(np.prod(s) for s in shapes.values()))
        # Fresh prompts and images for every repetition: no prefix or encoder cache carries over between them.
        prompts = make_prompts(ckpt, Path(tmp), args.prompts * (args.reps + 1))
        spec = SamplingSpec(n=args.n, temperature=1.0, max_tokens=args.max_tokens)
        cfg = EngineConfig(ckpt, dtype="float32", seed=0, max_model_len=1024, kv_cache_bytes=256 << 20)
        results: dict = {"workloads": {}, "engine_start_s": {}}
        engines = {}
        for backend in ("transformers", "vllm"):
            start = time.perf_counter()
            engines[backend] = make_engine(backend, cfg)
            results["engine_start_s"][backend] = round(time.perf_counter() - start, 2)
            warm = prompts["image"][: args.prompts] + prompts["text"][: args.prompts]
            engines[backend].generate(warm, SamplingSpec(temperature=1.0, max_tokens=8))  # warm-up
        runs: dict = {}
        for rep in range(1, args.reps + 1):
            for name, ps in prompts.items():
                batch = ps[rep * args.prompts:(rep + 1) * args.prompts]
                for backend, engine in engines.items():
                    runs.setdefault((name, backend), []).append(timed(engine, batch, spec))
        for engine in engines.values():
            engine.close()
    for (name, backend), reps in runs.items():
        rates = [tokens / seconds for tokens, seconds in reps]
        tokens, seconds = reps[int(np.argmax(rates))]
        results["workloads"].setdefault(name, {})[backend] = {
            "generated_tokens": tokens, "seconds": round(seconds, 3), "tokens_per_s": round(max(rates), 1),
            "tokens_per_s_each_rep": [round(r, 1) for r in rates],
        }  # fmt: skip
    for w in results["workloads"].values():
        w["ratio_vllm_over_transformers"] = round(w["vllm"]["tokens_per_s"] / w["transformers"]["tokens_per_s"], 2)
    report = {
        "benchmark": "rollout generation throughput (generated tokens / s)",
        "model": {"parameters": params, "megabytes_fp32": round(params * 4 / 2**20, 1), "spec": SPEC.__dict__},
        "sampling": {"prompts_per_workload": args.prompts, "n": args.n, "max_tokens": args.max_tokens,
                     "temperature": 1.0, "seeded": False, "image_size": [224, 224],
                     "reps": args.reps},  # fmt: skip
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "load_average_1m": os.getloadavg()[0]},
        **results,
    }
    out = ROOT / "bench" / "results" / "rollout.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2))
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
