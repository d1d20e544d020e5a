"""The learner's proxy of `rollout_torch.service.RolloutService` as a bridge target.

The service takes pushes itself and reaches its pool through `pool_call`; this adapter gives `WeightSync` and
`bridge.verify` the calls they use (`update_weights`, `policy_version`, `weight_naming`, `weight_checksums`,
`score`). Checksums are computed by each engine actor (`RolloutEngine.weight_checksums`): only fingerprints come
back, never the tensors.
"""
from __future__ import annotations

from typing import Any

from shared.checksum import Checksum
from shared.models.qwen2_5_vl_params import NAMINGS


class ServiceTarget:
    def __init__(self, service: Any, backend: str):
        if backend not in NAMINGS:  # each backend names its weights its own way
            raise ValueError(f"rollout backend {backend!r}: expected one of {NAMINGS}")
        self.service = service
        self.naming = backend

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
        return self.service.pool_call("call_all", "weight_checksums", list(names))

    def score(self, prompt: Any, response_ids: list[int]) -> list[list[float]]:
        return self.service.pool_call("call_all", "score", prompt, list(response_ids))
