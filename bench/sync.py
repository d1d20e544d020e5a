"""Weight-push speed of each transport available on this machine, against the physical bound of one memory copy.

    python bench/sync.py [--layers 8] [--hidden 1024] [--repeats 5] [--no-vllm]

Writes bench/results/sync.json and prints it. A Qwen2.5-VL-shaped checkpoint of a few hundred MB (fp32; text 1024
wide x 8 layers, GQA 16:4, MLP 2816) is loaded as the learner would hold it (jax arrays, one CPU device) and pushed
after a training-like update into engines holding the same model:

    direct        transformers engine in this process (and the vLLM engine, unless --no-vllm)
    shm           transformers engine in this process, through a safetensors file in /dev/shm
    object_store  transformers engine in a Ray actor (bridge.receiver.EngineHost), through one ray.put per bucket
    collective    the same actor (and the in-process vLLM engine, unless --no-vllm), through the gloo broadcast
                  group the bridge's sender actor opens per engine (bridge.collective): ray.put per bucket to the
                  sender, broadcast over loopback TCP, received into fresh tensors, then the engine's load

Each row: the best and median seconds of `repeats` pushes after one warm-up push, the bytes moved, and the ratio to
`np.copyto` of the same bytes into preallocated arrays, timed in the same run next to each row (best of 5). A push includes gathering
from the learner's arrays, any relayout (transposes), the transport and the engine's load, which is itself a copy.
The checksum verification of one push is timed separately.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
for key, value in {"HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
                   "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0"}.items():  # fmt: skip
    os.environ.setdefault(key, value)

import jax  # noqa: E402
import numpy as np  # noqa: E402

from bridge.convert import policy_entries  # noqa: E402
from bridge.sync import WeightSync  # noqa: E402
from bridge.verify import verify_weights  # noqa: E402
from learner_jax.models.hf_io import load_checkpoint  # noqa: E402
from shared.tiny_checkpoint import TinySpec, write_checkpoint  # noqa: E402

BUCKET_BYTES = 64 << 20


def spec(hidden: int, layers: int) -> TinySpec:
    return TinySpec(seed=0, text_hidden=hidden, text_layers=layers, text_heads=hidden // 64, kv_heads=hidden // 256,
                    text_intermediate=hidden * 11 // 4, mrope_section=[8, 12, 12], vision_hidden=256,
                    vision_depth=4, vision_heads=4, vision_intermediate=512)  # fmt: skip


def memcpy_seconds(leaves: list[np.ndarray], repeats: int = 5) -> float:
    dst = [np.empty_like(x) for x in leaves]
    for d, x in zip(dst, leaves):  # fault the pages in first
        np.copyto(d, x)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        for d, x in zip(dst, leaves):
            np.copyto(d, x)
        best = min(best, time.perf_counter() - start)
    return best


def time_pushes(sync: WeightSync, params, versions, repeats: int) -> dict:
    warm = sync.push(params, next(versions))
    reports = [sync.push(params, next(versions)) for _ in range(repeats)]
    secs = [r.seconds for r in reports]
    best = min(reports, key=lambda r: r.seconds)
    return {
        "seconds_best": round(min(secs), 4), "seconds_median": round(statistics.median(secs), 4),
        "warmup_seconds": round(warm.seconds, 4), "bytes": best.bytes, "buckets": best.buckets,
        "gather_seconds": round(best.gather_seconds, 4), "send_seconds": round(best.send_seconds, 4),
        "gbytes_per_s": round(best.gbytes_per_s, 3),
    }  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--no-vllm", action="store_true")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "sync.json"))
    args = ap.parse_args()
    t_start = time.perf_counter()
    workdir = Path(tempfile.mkdtemp(prefix="lmmrl_bench_sync_"))
    try:
        run(args, workdir, t_start)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def run(args: argparse.Namespace, workdir: Path, t_start: float) -> None:
    from rollout_torch.engine import EngineConfig, make_engine

    ckpt = str(write_checkpoint(workdir / "ckpt", spec(args.hidden, args.layers)))
    cfg, host = load_checkpoint(ckpt)
    rng = np.random.default_rng(0)
    host = jax.tree.map(lambda x: (x + 0.01 * rng.standard_normal(x.shape, dtype=np.float32)).astype(np.float32), host)
    params = jax.device_put(host)  # the learner holds jax arrays
    jax.block_until_ready(params)
    leaves = [np.asarray(x) for x in jax.tree.leaves(host)]
    del host
    model_bytes = sum(x.nbytes for x in leaves)
    bound = memcpy_seconds(leaves)
    versions = iter(range(1, 1000))
    rows = []

    def add(transport: str, engine: str, sync: WeightSync) -> None:
        row = {"transport": transport, "engine": engine, "wire_dtype": "float32",
               **time_pushes(sync, params, versions, args.repeats)}
        # The bound is re-measured next to each row: other load on the machine moves both alike.
        row["memcpy_seconds"] = round(memcpy_seconds(leaves) * row["bytes"] / model_bytes, 4)
        row["ratio_to_memcpy"] = round(row["seconds_best"] / row["memcpy_seconds"], 2)
        rows.append(row)
        print(json.dumps(row), flush=True)

    hf = make_engine("transformers", EngineConfig(ckpt))
    add("direct", "transformers", WeightSync(hf, cfg, transport="direct", bucket_bytes=BUCKET_BYTES))
    add("shm", "transformers", WeightSync(hf, cfg, transport="shm", bucket_bytes=BUCKET_BYTES))
    start = time.perf_counter()
    checked = verify_weights(hf, params, cfg)
    verify = {"engine": "transformers", "tensors": checked, "seconds": round(time.perf_counter() - start, 3)}
    del hf

    from learner_jax.placement import spawn, start_ray
    from shared.config import RayConfig

    start_ray(RayConfig(num_cpus=2, temp_dir="/tmp/lmmrl_ray_bench"))
    actor = spawn("bridge.receiver:EngineHost", "transformers", {"model_path": ckpt})
    add("object_store", "transformers (Ray actor)",
        WeightSync(actor, cfg, transport="object_store", bucket_bytes=BUCKET_BYTES))  # fmt: skip
    sync = WeightSync(actor, cfg, transport="collective", bucket_bytes=BUCKET_BYTES)
    add("collective", "transformers (Ray actor, gloo)", sync)
    sync.close()
    import ray

    ray.kill(actor.handle)

    if not args.no_vllm:
        vllm = make_engine("vllm", EngineConfig(ckpt, kv_cache_bytes=256 << 20, max_model_len=2048))
        add("direct", "vllm", WeightSync(vllm, cfg, transport="direct", bucket_bytes=BUCKET_BYTES))
        sync = WeightSync(vllm, cfg, transport="collective", bucket_bytes=BUCKET_BYTES)
        add("collective", "vllm (gloo, worker extension)", sync)
        sync.close()
        vllm.close()
    ray.shutdown()

    result = {
        "model": {"text_hidden": args.hidden, "text_layers": args.layers, "flax_leaves": len(leaves),
                  "hf_tensors": len(policy_entries(cfg)),
                  "bytes": model_bytes, "mbytes": round(model_bytes / 2**20, 1)},  # fmt: skip
        "memcpy_seconds": round(bound, 4),
        "memcpy_gbytes_per_s": round(model_bytes / bound / 1e9, 2),
        "bucket_bytes": BUCKET_BYTES,
        "pushes": rows,
        "verify": verify,
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "jax": jax.__version__},
        "total_seconds": round(time.perf_counter() - t_start, 1),
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
