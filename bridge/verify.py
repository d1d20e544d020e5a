"""Check that the engines hold the learner's policy: per-tensor checksums and a logprob probe.

Checksums: the engines fingerprint the tensors they compute with, in their own naming (`bridge.receiver`); the
learner computes the expected fingerprints from its params by streaming them bucket by bucket into the engine's
naming and layout (fused q/k/v and gate/up row blocks are fingerprinted in order, never concatenated), after the
same dtype cast the push applies. Any difference raises `WeightMismatch` naming the tensors.

Probe: the engine's `score` of a fixed prompt + response against the learner's log-probabilities of the same token
ids and pixels (computed by the learner, `learner_jax.probe`); a gap above `atol` raises `LogprobMismatch`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import numpy as np

from shared.models.qwen2_5_vl_config import Qwen25VLConfig
from shared.models.qwen2_5_vl_params import NAMINGS, Params, engine_tensors
from shared.records import Prompt, Sample, VisionInputs

from shared.checksum import Checksum
from .convert import gather, hf_layout, plan_buckets, policy_entries, resolve_dtype, wire_itemsizes
from .transport import is_local_engine


class WeightMismatch(RuntimeError):
    def __init__(self, differences: dict[str, str], engine: int = 0):
        self.differences = differences
        shown = "; ".join(f"{k}: {v}" for k, v in list(differences.items())[:20])
        more = f" (and {len(differences) - 20} more)" if len(differences) > 20 else ""
        super().__init__(f"engine {engine}: {len(differences)} tensors differ from the learner's: {shown}{more}")


class LogprobMismatch(RuntimeError):
    pass


def _remote(target: Any, method: str, *args: Any) -> Any:
    try:
        return getattr(target, method)(*args)
    except AttributeError as exc:  # also Ray's error for a method the remote object lacks
        raise TypeError(f"{type(target).__name__} cannot report its weights ({method}); pass a local engine, a "
                        f"bridge.receiver.EngineHost actor, or wrap the rollout service's proxy in "
                        f"bridge.targets.ServiceTarget") from exc  # fmt: skip


def target_naming(target: Any) -> str:
    if is_local_engine(target):
        from .receiver import engine_naming

        return engine_naming(target)
    naming = _remote(target, "weight_naming")
    names = set(naming) if isinstance(naming, (list, tuple)) else {naming}
    if len(names) != 1 or not names <= set(NAMINGS):
        raise ValueError(f"target reports weight namings {sorted(names)}; expected one of {NAMINGS}")
    return names.pop()


def engine_checksums(target: Any, names: list[str]) -> list[dict[str, Checksum]]:
    """Each engine's checksums of `names` (engine naming): computed where the engine lives."""
    if is_local_engine(target):
        return [target.weight_checksums(names)]
    reported = _remote(target, "weight_checksums", names)
    return list(reported) if isinstance(reported, (list, tuple)) else [reported]


def expected_checksums(params: Params, cfg: Qwen25VLConfig, naming: str, dtype: Any = None,
                       bucket_bytes: int = 256 << 20) -> dict[str, Checksum]:  # fmt: skip
    """What an engine with `naming` holds after a push of `params` in `dtype`, fingerprinted tensor by tensor."""
    entries = policy_entries(cfg)
    d = resolve_dtype(dtype)
    wanted = engine_tensors(naming, [e.hf_name for e in entries], cfg.tie_word_embeddings)
    uses: dict[str, int] = {}
    for t in wanted:
        for p in t.parts:
            uses[p] = uses.get(p, 0) + 1
    held: dict[str, np.ndarray] = {}
    todo = list(wanted)
    out: dict[str, Checksum] = {}
    for bucket in plan_buckets(entries, bucket_bytes, wire_itemsizes(params, entries, d)):
        for w in gather(params, bucket.entries, d):
            held[w.name] = hf_layout(w)  # the wire dtype: Checksum casts to float32 block by block
        still = []
        for t in todo:
            if not all(p in held for p in t.parts):
                still.append(t)
                continue
            out[t.name] = Checksum.of_parts([held[p] for p in t.parts])
            for p in t.parts:
                uses[p] -= 1
                if not uses[p]:
                    del held[p]
        todo = still
    if todo:
        raise RuntimeError(f"engine tensors never completed: {[t.name for t in todo[:5]]}")
    return out


def compare(expected: dict[str, Checksum], reported: dict[str, Checksum], exact: bool = True) -> dict[str, str]:
    """name -> what differs, for every expected tensor the engine lacks or holds differently."""
    diffs = {}
    for name, want in expected.items():
        got = reported.get(name)
        why = "missing in the engine" if got is None else want.differs(got, exact=exact)
        if why:
            diffs[name] = why
    return diffs


def verify_weights(target: Any, params: Params, cfg: Qwen25VLConfig, *, dtype: Any = None,
                   naming: Optional[str] = None, exact: bool = True) -> int:  # fmt: skip
    """Compare every engine's tensors with `params` (as pushed in `dtype`); returns the number of tensors checked
    per engine, raises `WeightMismatch` for the first engine that differs."""
    naming = naming or target_naming(target)
    expected = expected_checksums(params, cfg, naming, dtype)
    for k, reported in enumerate(engine_checksums(target, list(expected))):
        if diffs := compare(expected, reported, exact=exact):
            raise WeightMismatch(diffs, engine=k)
    return len(expected)


# --------------------------------------------------------------------------- logprob probe


@dataclass
class LogprobProbe:
    """A fixed prompt and response, with the token ids and pixels the engines' processor produced for it."""

    prompt: Prompt
    prompt_ids: list[int]  # image placeholders expanded, as in `Sample.prompt_ids`
    response_ids: list[int]
    vision: VisionInputs
    pad_token_id: int = 0

    @staticmethod
    def from_sample(prompt: Prompt, sample: Sample, vision: VisionInputs, pad_token_id: int = 0) -> "LogprobProbe":
        return LogprobProbe(prompt, list(sample.prompt_ids), list(sample.response_ids), vision, pad_token_id)


def verify_logprobs(target: Any, ours: np.ndarray, probe: LogprobProbe, atol: float = 1e-3) -> float:
    """Max |engine - learner| over the probe's response tokens (and engines), `ours` being the learner's
    log-probabilities of them; raises `LogprobMismatch` above `atol`."""
    ours = np.asarray(ours, np.float64)
    scored = target.score(probe.prompt, list(probe.response_ids))
    per_engine = scored if scored and isinstance(scored[0], (list, tuple, np.ndarray)) else [scored]
    worst = 0.0
    for k, theirs in enumerate(per_engine):
        theirs = np.asarray(theirs, np.float64)
        if theirs.shape != ours.shape:
            raise LogprobMismatch(f"engine {k} scored {theirs.shape[0]} tokens, the learner {ours.shape[0]}")
        diff = np.abs(theirs - ours)
        worst = max(worst, float(diff.max()))
        if diff.max() > atol:
            t = int(diff.argmax())
            raise LogprobMismatch(f"engine {k}: logprobs differ from the learner's by up to {diff.max():.3g} "
                                  f"(> {atol}) at response token {t} (id {probe.response_ids[t]}): engine "
                                  f"{theirs[t]:.5f}, learner {ours[t]:.5f}")  # fmt: skip
    return worst
