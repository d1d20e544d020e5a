"""The learner's proxy of `rollout_torch.service.RolloutService` as a bridge target.

The service takes pushes itself and reaches its pool through `pool_call`; this adapter gives `WeightSync` and
`bridge.verify` the calls they use (`update_weights`, `policy_version`, `weight_naming`, `weight_checksums`,
`score`). Checksums are computed here from the engines' `named_weights`, fetched a few tensors at a time; a pool
that runs `bridge.receiver.weight_checksums` in its engine actors would save moving those tensors.
"""
from __future__ import annotations

from typing import Any

from .checksum import Checksum
from shared.models.qwen2_5_vl_params import NAMINGS


class ServiceTarget:
    def __init__(self, service: Any, backend: str, per_call: int = 16):
        if backend not in NAMINGS:  # each backend names its weights its own way
            raise ValueError(f"rollout backend {backend!r}: expected one of {NAMINGS}")
        self.service = service
        self.naming = backend
        self.per_call = per_call

    def update_weights(self, named: Any, version: int, final: bool = True) -> None:
        self.service.update_weights(named, version, final)

    def finish_update(self, version: int) -> None:
        self.service.pool_call("finish_update", version)

    def retain_for_restarts(self, refs: list, version: int) -> None:
        self.service.pool_call("retain_for_restarts", refs, version)

    def policy_version(self) -> int:
        return self.service.pool_call("policy_version")

    def weight_naming(self) -> str:
        return self.naming

    def weight_checksums(self, names: list[str]) -> list[dict[str, Checksum]]:
        out: list[dict[str, Checksum]] = []
        for start in range(0, len(names), self.per_call):
            per_engine = self.service.pool_call("call_all", "named_weights", names[start:start + self.per_call])
            out += [{} for _ in range(len(per_engine) - len(out))]
            for sums, tensors in zip(out, per_engine):
                sums.update({k: Checksum.of(v) for k, v in tensors.items()})
        return out

    def score(self, prompt: Any, response_ids: list[int]) -> list[list[float]]:
        return self.service.pool_call("call_all", "score", prompt, list(response_ids))
