"""GPU form of the collective route: NCCL broadcasts from the learner's device into each vLLM engine's workers,
one communicator per engine, through vLLM's NCCL weight-transfer engine.

The learner never imports torch, so it joins each engine's NCCL group the torch-free way vLLM documents for JAX
trainers (`vllm.distributed.weight_transfer.nccl_common.NCCLWeightTransferInitInfo`): per engine it mints an
ncclUniqueId (CuPy's NCCL bindings) and ships it base64-encoded as that engine's init info (rank_offset 1, unpacked,
world size 1 + the engine's workers), joins as rank 0 while the workers join (`collective_join` ->
`LLM.init_weight_transfer_engine`), and answers their one-element float32 all_reduce warm-up. One communicator per
engine because vLLM ranks a worker inside its own engine (`worker_init_process_group`: data-parallel index x world
size + rank + rank_offset): the workers of independent single-GPU engines all take rank 1, so one group of the
learner plus every engine's workers cannot form.

Each bucket is announced to every engine (`collective_receive` -> `LLM.update_weights({names, dtype_names,
shapes})`) while the learner broadcasts the tensors in that order into every communicator, straight from device
memory (converted to HF layout and the engine dtype on the device, see `convert`). The final bucket is followed by
`target.finish_update(version)` (`LLM.finish_weight_update`, the policy version). Engines are reached and rejoined
exactly as in the CPU form (`bridge.collective`); the engines must be started with `weight_transport="nccl"`
(`EngineConfig.from_config` does so for `rollout.weight_transport: collective` with a GPU learner), which passes vLLM
`weight_transfer_config={"backend": "nccl"}`. Needs CUDA GPUs and CuPy 13 (the `[gpu]` extra); not exercised on CPU.
"""
from __future__ import annotations

import base64
import threading
import uuid
from typing import Any, Optional

from .collective import DEFAULT_TIMEOUT_S, EngineCalls
from .payload import WireTensor
from .transport import Transport

# ncclDataType_t values (nccl.h); bfloat16 needs NCCL >= 2.10.
_NCCL_DTYPES = {"float16": 6, "float32": 7, "float64": 8, "bfloat16": 9}
_NCCL_SUM = 0


class NcclTransport(Transport):
    name = "nccl"
    on_device = True

    def __init__(self, target: Any = None, *, device: Optional[Any] = None, timeout_s: float = DEFAULT_TIMEOUT_S,
                 world_size: Optional[int] = None):  # fmt: skip
        try:
            import cupy  # noqa: F401
            from cupy.cuda import nccl  # noqa: F401
        except ImportError as exc:
            raise ImportError("transport 'nccl' needs CuPy with NCCL (pip install cupy-cuda12x, in the [gpu] extra) "
                              "on a CUDA machine") from exc  # fmt: skip
        import jax

        gpus = [d for d in jax.devices() if d.platform == "gpu"]
        if not gpus:
            raise RuntimeError("transport 'nccl' needs the learner's arrays on a CUDA GPU; jax sees none")
        if world_size is not None:
            raise TypeError("transport 'nccl': world_size is per engine now (1 + its workers, asked of each engine)")
        self.device = device or gpus[0]
        # The CUDA ordinal in this process, what CuPy selects by (jax/_src/array.py __dlpack_device__ uses the same);
        # `Device.id` is JAX's global id, which differs on any process but 0 of a multi-host runtime.
        self.ordinal = int(self.device.local_hardware_id)
        self.timeout_s = float(timeout_s)
        self.comms: dict[int, Any] = {}  # engine index -> communicator (rank 0 of that engine's group)
        self.groups: dict[int, str] = {}
        self._in_push: Optional[int] = None

    # -- set-up: one communicator per engine
    def _ensure_groups(self, engines: EngineCalls, version: int) -> int:
        held = engines.call_all("collective_group")
        stale = [k for k, name in enumerate(held) if name is None or name != self.groups.get(k)]
        if stale and self._in_push == version:
            self._in_push = None
            raise RuntimeError(f"transport 'nccl': engine(s) {stale} lost their weight group during the push of "
                               f"version {version} (restarted?); push again to rejoin them")  # fmt: skip
        for k in stale:
            self._join(engines, k)
        return len(held)

    def _join(self, engines: EngineCalls, k: int) -> None:
        import cupy
        from cupy.cuda import nccl

        if (old := self.comms.pop(k, None)) is not None:
            old.destroy()
        self.groups.pop(k, None)
        world = int(engines.call(k, "collective_world_size"))
        uid = nccl.get_unique_id()
        uid_bytes = bytes(x & 0xFF for x in uid)  # CuPy 13 (the [gpu] extra's pin): a tuple of 128 signed chars
        name = f"lmmrl-nccl-e{k}-{uuid.uuid4().hex[:8]}"
        init_info = {
            "rank_offset": 1, "world_size": world, "packed": False,
            "nccl_unique_id_b64": base64.b64encode(uid_bytes).decode(),
        }  # fmt: skip
        # No store barrier on this path: both sides must be inside ncclCommInitRank together.
        errors: list[BaseException] = []
        worker = threading.Thread(target=_capture(errors, engines.call, k, "collective_join",
                                                  {"name": name, "init_info": init_info}))  # fmt: skip
        worker.start()
        with cupy.cuda.Device(self.ordinal):
            comm = nccl.NcclCommunicator(world, uid, 0)
            warm = cupy.zeros(1, dtype=cupy.float32)  # the workers' warm-up all_reduce, matched
            comm.allReduce(warm.data.ptr, warm.data.ptr, 1, _NCCL_DTYPES["float32"], _NCCL_SUM,
                           cupy.cuda.get_current_stream().ptr)  # fmt: skip
            cupy.cuda.get_current_stream().synchronize()
        worker.join(self.timeout_s)
        if worker.is_alive() or errors:
            comm.destroy()
            raise RuntimeError(f"transport 'nccl': engine {k}'s vLLM workers failed to join NCCL group {name}") from (
                errors[0] if errors else TimeoutError(f"no answer within {self.timeout_s:.0f} s"))
        self.comms[k], self.groups[k] = comm, name

    # -- buckets
    def prepare(self, items: list[WireTensor]) -> list[tuple[str, Any]]:
        import jax

        arrays = [(w.name, jax.device_put(w.array, self.device)) for w in items]  # sharded outputs onto one GPU
        for _, a in arrays:
            a.block_until_ready()
        return arrays

    def send(self, target: Any, payload: list[tuple[str, Any]], version: int, final: bool) -> None:
        import cupy
        from cupy.cuda import nccl

        engines = EngineCalls(target)
        n = self._ensure_groups(engines, version)
        self._in_push = version
        meta = [(name, a.dtype.name, tuple(int(s) for s in a.shape)) for name, a in payload]
        errors: list[BaseException] = []
        worker = threading.Thread(target=_capture(errors, engines.call_all, "collective_receive", meta, version, False))
        worker.start()  # the workers post their receives while we broadcast
        with cupy.cuda.Device(self.ordinal):
            stream = cupy.cuda.get_current_stream()
            for _, a in payload:
                nccl.groupStart()  # one tensor into every engine's communicator, issued together
                for k in range(n):
                    self.comms[k].bcast(a.unsafe_buffer_pointer(), a.size, _NCCL_DTYPES[a.dtype.name], 0, stream.ptr)
                nccl.groupEnd()
            stream.synchronize()
        worker.join()
        if errors:
            self._in_push = None
            raise RuntimeError(f"transport 'nccl': the engines failed to receive a bucket of version {version}") \
                from errors[0]  # fmt: skip
        if final:
            self._in_push = None
            target.finish_update(version)

    def close(self) -> None:
        for comm in self.comms.values():
            comm.destroy()
        self.comms.clear()
        self.groups.clear()


def _capture(errors: list[BaseException], fn: Any, *args: Any):
    def run() -> None:
        try:
            fn(*args)
        except BaseException as exc:  # re-raised by the caller after join
            errors.append(exc)

    return run
