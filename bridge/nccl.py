"""GPU route: NCCL broadcast from the learner's device into vLLM workers, through vLLM's weight-transfer API.

The learner never imports torch, so it joins vLLM's NCCL group the torch-free way vLLM documents for JAX trainers
(`vllm.distributed.weight_transfer.nccl_common.NCCLWeightTransferInitInfo`): the learner mints the ncclUniqueId
(CuPy's NCCL bindings), ships it base64-encoded in the workers' init info (rank_offset 1, unpacked), joins as
rank 0 while the workers join, and answers their one-element float32 all_reduce warm-up. Each bucket is then
announced with `update_weights({names, dtype_names, shapes})` while the learner broadcasts the tensors in that
order, straight from device memory (converted to HF layout and the engine dtype on the device, see `convert`).

`client` is vLLM's weight-sync control plane (`vllm.distributed.weight_transfer.clients.RayVLLMWeightSyncClient`,
`HTTPVLLMWeightSyncClient`, or any object with `init_weight_transfer_engine`, `start_weight_update`,
`update_weights`, `finish_weight_update`); the engines must be started with `weight_transfer_config=
{"backend": "nccl"}`. After the final bucket the target's `finish_update(version)` records the policy version.
Needs CUDA GPUs and CuPy; not exercised on CPU machines.
"""
from __future__ import annotations

import base64
import threading
from typing import Any, Optional

from .payload import WireTensor
from .transport import Transport

# ncclDataType_t values (nccl.h); bfloat16 needs NCCL >= 2.10.
_NCCL_DTYPES = {"float16": 6, "float32": 7, "float64": 8, "bfloat16": 9}
_NCCL_SUM = 0


class NcclTransport(Transport):
    name = "nccl"
    on_device = True

    def __init__(self, client: Any, *, world_size: int, device: Optional[Any] = None):
        try:
            import cupy  # noqa: F401
            from cupy.cuda import nccl  # noqa: F401
        except ImportError as exc:
            raise ImportError("transport 'nccl' needs CuPy with NCCL (pip install cupy-cuda12x) on a CUDA "
                              "machine") from exc
        import jax

        gpus = [d for d in jax.devices() if d.platform == "gpu"]
        if not gpus:
            raise RuntimeError("transport 'nccl' needs the learner's arrays on a CUDA GPU; jax sees none")
        if world_size < 2:
            raise ValueError(f"world_size counts the learner plus every inference worker; got {world_size}")
        self.client = client
        self.world_size = world_size
        self.device = device or gpus[0]
        self.comm = None
        self._in_update = False

    def _connect(self) -> None:
        import cupy
        from cupy.cuda import nccl

        uid = nccl.get_unique_id()
        uid_bytes = uid if isinstance(uid, bytes) else bytes(x & 0xFF for x in uid)  # CuPy < 14: tuple of chars
        init_info = {
            "rank_offset": 1, "world_size": self.world_size, "packed": False,
            "nccl_unique_id_b64": base64.b64encode(uid_bytes).decode(),
        }  # fmt: skip
        # No store barrier on this path: both sides must be inside ncclCommInitRank together.
        errors: list[BaseException] = []
        worker = threading.Thread(target=_capture(errors, self.client.init_weight_transfer_engine, init_info))
        worker.start()
        with cupy.cuda.Device(self.device.id):
            comm = nccl.NcclCommunicator(self.world_size, uid if not isinstance(uid, bytes) else uid_bytes, 0)
            warm = cupy.zeros(1, dtype=cupy.float32)  # the workers' warm-up all_reduce, matched
            comm.allReduce(warm.data.ptr, warm.data.ptr, 1, _NCCL_DTYPES["float32"], _NCCL_SUM,
                           cupy.cuda.get_current_stream().ptr)  # fmt: skip
            cupy.cuda.get_current_stream().synchronize()
        worker.join()
        if errors:
            raise RuntimeError("vLLM workers failed to join the NCCL weight-transfer group") from errors[0]
        self.comm = comm

    def prepare(self, items: list[WireTensor]) -> list[tuple[str, Any]]:
        import jax

        arrays = [(w.name, jax.device_put(w.array, self.device)) for w in items]  # sharded outputs onto one GPU
        for _, a in arrays:
            a.block_until_ready()
        return arrays

    def send(self, target: Any, payload: list[tuple[str, Any]], version: int, final: bool) -> None:
        import cupy

        if self.comm is None:
            self._connect()
        if not self._in_update:
            self.client.start_weight_update()
            self._in_update = True
        info = {
            "names": [n for n, _ in payload], "dtype_names": [a.dtype.name for _, a in payload],
            "shapes": [list(a.shape) for _, a in payload],
        }  # fmt: skip
        errors: list[BaseException] = []
        worker = threading.Thread(target=_capture(errors, self.client.update_weights, info))
        worker.start()  # the workers post their receives while we broadcast
        with cupy.cuda.Device(self.device.id):
            stream = cupy.cuda.get_current_stream()
            for _, a in payload:
                self.comm.bcast(a.unsafe_buffer_pointer(), a.size, _NCCL_DTYPES[a.dtype.name], 0, stream.ptr)
            stream.synchronize()
        worker.join()
        if errors:
            raise RuntimeError("vLLM workers failed to receive a bucket") from errors[0]
        if final:
            self.client.finish_weight_update(str(version))
            self._in_update = False
            target.finish_update(version)

    def close(self) -> None:
        if self.comm is not None:
            self.client.shutdown_weight_transfer_engine()
            self.comm.destroy()
            self.comm = None


def _capture(errors: list[BaseException], fn: Any, *args: Any):
    def run() -> None:
        try:
            fn(*args)
        except BaseException as exc:  # re-raised by the caller after join
            errors.append(exc)

    return run
