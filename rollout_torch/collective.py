"""A weight-broadcast group of one sender and one engine's worker(s), over torch.distributed gloo (CPU).

One group per engine: rank 0 is the bridge's sender process, ranks 1..k that engine's worker(s). The group never
touches torch.distributed's default group (vLLM owns that one in the same process): it is a `ProcessGroupGloo`
over its own `TCPStore` (the sender hosts the store, the workers connect to it), addressed directly rather than
through `torch.distributed.broadcast`, which only knows registered groups.

A bucket travels as its tensors' bytes, one broadcast per tensor, in the order of the announced metadata
`[(hf_name, dtype_name, shape), ...]`; the receiver allocates each tensor from that metadata. bfloat16 rides as
its bits (byte views), so neither side needs a dtype the other cannot name.
Used by the engines (`rollout_torch.engine`, `rollout_torch.vllm_worker_ext`) and by the bridge's sender actor.
"""
from __future__ import annotations

from datetime import timedelta
from typing import Any, Iterable, Optional, Sequence

import torch

Meta = Sequence[tuple[str, str, Sequence[int]]]  # (hf_name, torch dtype name, shape) per tensor, in broadcast order
DEFAULT_TIMEOUT_S = 300.0


class Group:
    """One member's handle on a broadcast group."""

    def __init__(self, name: str, host: str, port: int, rank: int, world_size: int,
                 timeout_s: float = DEFAULT_TIMEOUT_S, store: Any = None):  # fmt: skip
        from torch.distributed import PrefixStore, TCPStore
        from torch.distributed.distributed_c10d import ProcessGroupGloo

        if not 0 <= rank < world_size:
            raise ValueError(f"group {name}: rank {rank} outside world size {world_size}")
        self.name, self.host, self.port = name, host, int(port)
        self.rank, self.world_size = rank, world_size
        timeout = timedelta(seconds=timeout_s)
        self.store = store if store is not None else TCPStore(host, self.port, world_size, False, timeout=timeout)
        # Blocks until every rank has constructed its side (the rendezvous runs through the store).
        self.pg = ProcessGroupGloo(PrefixStore(f"lmmrl/{name}", self.store), rank, world_size, timeout)

    def broadcast(self, tensors: Iterable[torch.Tensor]) -> list:
        """Post one broadcast per tensor (rank 0 sends, the others receive in place); returns the works to wait."""
        from torch.distributed import BroadcastOptions

        opts = BroadcastOptions()
        opts.rootRank = 0
        return [self.pg.broadcast([byte_view(t)], opts) for t in tensors]

    def close(self) -> None:
        self.pg = None
        self.store = None


def host_store(world_size: int, timeout_s: float = DEFAULT_TIMEOUT_S) -> Any:
    """The rendezvous store rank 0 hosts, on a free port of this node (`store.port`)."""
    from torch.distributed import TCPStore

    return TCPStore("0.0.0.0", 0, world_size, True, timeout=timedelta(seconds=timeout_s), wait_for_workers=False)


def byte_view(t: torch.Tensor) -> torch.Tensor:
    if not t.is_contiguous():
        raise ValueError("broadcast tensors must be contiguous")
    return t.reshape(-1).view(torch.uint8)


def allocate(meta: Meta) -> list[tuple[str, torch.Tensor]]:
    return [(name, torch.empty(tuple(shape), dtype=getattr(torch, dtype))) for name, dtype, shape in meta]


def receive(group: Optional[Group], meta: Meta, where: str) -> list[tuple[str, torch.Tensor]]:
    """Allocate the announced tensors and receive them from rank 0."""
    if group is None:
        raise RuntimeError(f"{where} has not joined a weight-broadcast group (collective_join)")
    named = allocate(meta)
    for work in group.broadcast(t for _, t in named):
        work.wait()
    return named


def join_info(info: dict, rank: int) -> Group:
    """Join the group `info` (from the sender: name, host, port, world_size, timeout_s) as `rank`."""
    if not 1 <= rank < int(info["world_size"]):
        raise ValueError(f"group {info['name']}: worker rank {rank} outside 1..{int(info['world_size']) - 1}; "
                         f"the sender sized the group for a different number of workers")  # fmt: skip
    return Group(info["name"], info["host"], info["port"], rank, int(info["world_size"]),
                 float(info.get("timeout_s", DEFAULT_TIMEOUT_S)))  # fmt: skip
