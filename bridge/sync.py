"""Stream the learner's policy weights into the rollout engines, bucket by bucket, tagged with a policy version.

    sync = WeightSync(target, model_cfg, transport="object_store", dtype="bfloat16")
    report = sync.push(params, version)          # PushReport
    sync.verify(params, probe, probe_logprobs)   # checksums of what the engines hold, and a logprob probe

`push` never materialises a second copy of the model: buckets of at most `bucket_bytes` are gathered from the
(possibly sharded) params, converted, shipped and loaded one after another; the next bucket is gathered while
the current one is being loaded, so at most two are alive. Fused groups (q/k/v, gate/up, weight and bias) never
straddle buckets. The last bucket carries `final=True`: the engines reset their caches once and take `version`.
Learner side: importable without torch.
"""
from __future__ import annotations

import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Optional

from shared.models.qwen2_5_vl_config import Qwen25VLConfig
from shared.models.qwen2_5_vl_params import Params

from .convert import Bucket, gather, plan_buckets, policy_entries, resolve_dtype, wire_itemsizes
from .transport import Transport, make_transport


@dataclass
class PushReport:
    version: int
    transport: str
    dtype: str  # wire dtype ("params" when the params' own dtype is sent)
    tensors: int
    buckets: int
    bytes: int
    max_bucket_bytes: int
    seconds: float  # wall time of the whole push
    gather_seconds: float  # gathering from the learner's arrays and copying into the transport (overlaps sending)
    send_seconds: float  # handing buckets over and the engines' loading
    engine_versions: list[int] = field(default_factory=list)

    @property
    def gbytes_per_s(self) -> float:
        return self.bytes / self.seconds / 1e9 if self.seconds > 0 else 0.0


def engine_versions(target: Any) -> list[int]:
    """Policy versions the target's engines report, one per engine, asked of the engines themselves.

    A pool (`rollout_torch.pool.RolloutPool`, directly or behind the rollout service) keeps its own record of the
    last push it completed (`policy_version`); comparing the pushed version with that record cannot fail, so a
    pool is asked for `engine_versions` instead: each engine actor's `policy_version`. A local engine, an engine
    actor (`bridge.receiver.EngineHost`) or any other target reports through `policy_version` (an int, or a list
    with one entry per engine)."""
    from .targets import ServiceTarget
    from .transport import is_local_engine

    if is_local_engine(target):
        v = target.policy_version()
    elif callable(getattr(type(target), "engine_versions", None)):  # a pool, or a target that asks its engines
        v = target.engine_versions()
    elif isinstance(target, ServiceTarget):  # its policy_version is the pool's record: ask the pool's engines
        v = target.service.pool_call("engine_versions")
    else:
        try:
            v = target.policy_version()
        except AttributeError:  # the rollout service's proxy reaches its pool through pool_call
            v = target.pool_call("engine_versions")
    return [int(x) for x in v] if isinstance(v, (list, tuple)) else [int(v)]


class WeightSync:
    """Pushes params to `target` (anything with `update_weights(named, version, final)` and `policy_version()`).

    `transport`: "direct" | "object_store" | "shm" | "nccl" or a `Transport`; `transport_options` go to it.
    `dtype`: the engines' weight dtype ("bfloat16", "float32", ...); None sends the params' dtype.
    `sender=False`: a learner process other than the one that reaches the engines (multi-process learner, params
    spread over processes). It has no target (None); `push` and `verify` only run the per-tensor gather programs,
    in the same order as the sender, because every process must take part in them, and send nothing.
    """

    def __init__(self, target: Any, model_cfg: Qwen25VLConfig, *, bucket_bytes: int = 256 << 20,
                 transport: str | Transport = "object_store", dtype: Any = None, prefetch: bool = True,
                 sender: bool = True, **transport_options: Any):  # fmt: skip
        self.sender = sender
        if not sender:
            self.target, self.cfg, self.bucket_bytes, self.prefetch = target, model_cfg, int(bucket_bytes), prefetch
            self.dtype, self.transport, self.entries = resolve_dtype(dtype), None, policy_entries(model_cfg)
            return
        if not callable(getattr(target, "update_weights", None)):
            raise TypeError(f"target {type(target).__name__} has no update_weights(named, version, final)")
        self.target = target
        self.cfg = model_cfg
        self.bucket_bytes = int(bucket_bytes)
        if self.bucket_bytes <= 0:
            raise ValueError(f"bucket_bytes must be positive, got {bucket_bytes}")
        self.dtype = resolve_dtype(dtype)
        self.transport = make_transport(transport, target, **transport_options)
        self.transport.check_target(target)
        self.prefetch = prefetch
        self.entries = policy_entries(model_cfg)

    def plan(self, params: Params) -> list[Bucket]:
        return plan_buckets(self.entries, self.bucket_bytes, wire_itemsizes(params, self.entries, self.dtype))

    def _prepare(self, params: Params, bucket: Bucket) -> tuple[Any, int, float]:
        """Gather one bucket and put it into the transport (runs in the gather thread)."""
        start = time.perf_counter()
        items = gather(params, bucket.entries, self.dtype, on_device=self.transport.on_device,
                       defer_layout=self.transport.defers_layout)  # fmt: skip
        nbytes = sum(w.nbytes for w in items)
        return self.transport.prepare(items), nbytes, time.perf_counter() - start

    def push(self, params: Params, version: int) -> PushReport:
        if not isinstance(version, int) or version < 0:
            raise ValueError(f"policy version must be a non-negative int, got {version!r}")
        start = time.perf_counter()
        buckets = self.plan(params)
        if not self.sender:
            self._gather_only(params)
            seconds = time.perf_counter() - start
            return PushReport(version=version, transport="none", dtype=self.dtype.name if self.dtype else "params",
                              tensors=len(self.entries), buckets=len(buckets), bytes=0, max_bucket_bytes=0,
                              seconds=seconds, gather_seconds=seconds, send_seconds=0.0)  # fmt: skip
        gather_s = send_s = 0.0
        sent = 0
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="bridge-gather") as pool:
            future: Optional[Future] = pool.submit(self._prepare, params, buckets[0])
            try:
                for k, bucket in enumerate(buckets):
                    payload, nbytes, seconds = future.result()
                    future = None
                    gather_s += seconds
                    if self.prefetch and k + 1 < len(buckets):
                        future = pool.submit(self._prepare, params, buckets[k + 1])
                    t0 = time.perf_counter()
                    try:
                        self.transport.send(self.target, payload, version, final=k == len(buckets) - 1)
                    except Exception as exc:
                        names = bucket.entries[0].hf_name, bucket.entries[-1].hf_name
                        raise RuntimeError(f"push of version {version} failed at bucket {k + 1}/{len(buckets)} "
                                           f"({names[0]} .. {names[1]}); the engines hold a partial update until "
                                           f"a push completes") from exc  # fmt: skip
                    finally:
                        self.transport.release(payload)
                    send_s += time.perf_counter() - t0
                    sent += nbytes
                    if not self.prefetch and k + 1 < len(buckets):
                        future = pool.submit(self._prepare, params, buckets[k + 1])
            finally:
                if future is not None and future.exception() is None:  # prepared but never sent
                    self.transport.release(future.result()[0])
        versions = engine_versions(self.target)
        if not versions or any(v != version for v in versions):
            lagging = [k for k, v in enumerate(versions) if v != version]
            raise RuntimeError(f"after pushing version {version} the engines report versions {versions}: engine(s) "
                               f"{lagging or 'none reported'} do not hold it, so what they generate with is not the "
                               f"learner's policy")  # fmt: skip
        return PushReport(
            version=version, transport=self.transport.name, dtype=self.dtype.name if self.dtype else "params",
            tensors=len(self.entries), buckets=len(buckets), bytes=sent,
            max_bucket_bytes=max(b.nbytes for b in buckets), seconds=time.perf_counter() - start,
            gather_seconds=gather_s, send_seconds=send_s, engine_versions=versions,
        )  # fmt: skip

    def verify(self, params: Params, probe: Optional[Any] = None, probe_logprobs: Optional[Any] = None, *,
               exact: bool = True, atol: float = 1e-3) -> dict:  # fmt: skip
        """Checksums of every tensor the engines hold against `params`, and the logprob probe if given (with the
        learner's log-probabilities of its response); raises `bridge.verify.WeightMismatch` / `LogprobMismatch`."""
        from .verify import verify_logprobs, verify_weights

        if not self.sender:  # the sender's checksum pass gathers every tensor once, in table order
            self._gather_only(params)
            return {"tensors": len(self.entries)}
        out: dict[str, Any] = {"tensors": verify_weights(self.target, params, self.cfg, dtype=self.dtype, exact=exact)}
        if probe is not None:
            if probe_logprobs is None:
                raise ValueError("a logprob probe needs the learner's log-probabilities of its response")
            out["logprob_max_abs_diff"] = verify_logprobs(self.target, probe_logprobs, probe, atol=atol)
        return out

    def _gather_only(self, params: Params) -> None:
        """Run the per-tensor programs a push (or checksum pass) runs, in the same order, and drop the results."""
        for bucket in self.plan(params):
            gather(params, bucket.entries, self.dtype)

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()
