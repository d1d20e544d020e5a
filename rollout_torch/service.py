"""What the learner asks of the torch side, in one object that lives in a Ray actor: turn data rows into prompts
with the checkpoint's chat template, generate through the engine pool, return each prompt's `VisionInputs`
(computed by the same processor the engines use), and take weight pushes.
"""
from __future__ import annotations

import time
from typing import Any

from shared.config import Config, from_dict
from shared.records import Prompt, Sample, SamplingSpec, VisionInputs

from .pool import RolloutPool
from .processing import load_processor, messages_to_prompt, process, vision_inputs


class RolloutService:
    def __init__(self, cfg: Config | dict, model_path: str | None = None):
        cfg = from_dict(cfg) if isinstance(cfg, dict) else cfg
        if model_path is not None:
            cfg.model.path = model_path
        self.cfg = cfg
        self.processor = load_processor(cfg.model.path)
        self._pool: RolloutPool | None = None

    @property
    def pool(self) -> RolloutPool:
        if self._pool is None:  # engines start on first use: encoding and prompts need only the processor
            self._pool = RolloutPool(self.cfg)
        return self._pool

    def token_info(self) -> dict[str, Any]:
        tok = self.processor.tokenizer
        return {"pad_token_id": tok.pad_token_id, "eos_token_id": tok.eos_token_id}

    def prompts(self, rows: list[dict]) -> list[Prompt]:
        """rows: {messages, label, uid}; pixel bounds come from each image item (data loading injects them)."""
        d = self.cfg.data
        return [
            messages_to_prompt(self.processor, r["messages"], label=r.get("label"), uid=r["uid"],
                               min_pixels=d.min_pixels, max_pixels=d.max_pixels)  # fmt: skip
            for r in rows
        ]

    def vision(self, prompts: list[Prompt]) -> list[VisionInputs]:
        return [vision_inputs(self.processor, p) for p in prompts]

    def encode(self, prompts: list[Prompt], responses: list[str]) -> list[tuple[list[int], list[int], VisionInputs]]:
        """(prompt ids, response ids ending in <|im_end|>, vision) per pair, for supervised warm starts; the image
        placeholders are expanded by the processor exactly as the engines expand them."""
        tok = self.processor.tokenizer
        out = []
        for p, text in zip(prompts, responses):
            ids = process(self.processor, [p])["input_ids"][0].tolist()
            out.append((ids, tok.encode(text + "<|im_end|>", add_special_tokens=False), vision_inputs(self.processor, p)))
        return out

    def generate(self, prompts: list[Prompt], sampling: SamplingSpec) -> tuple[list[list[Sample]], list[VisionInputs]]:
        return self.pool.generate(prompts, sampling), self.vision(prompts)

    def generate_rows(self, rows: list[dict], sampling: SamplingSpec) -> tuple[list, list, list, float]:
        """Prompts of data rows, their samples and vision inputs, and the seconds the engines took: one call, so
        the learner can submit it ahead without waiting (asynchronous rollouts)."""
        start = time.perf_counter()
        prompts = self.prompts(rows)
        groups, vision = self.generate(prompts, sampling)
        return prompts, groups, vision, time.perf_counter() - start

    def sleep(self, level: int = 1) -> list[bool]:
        """Every engine frees what it can while the learner works on the same devices (colocated runs)."""
        return self.pool.call_all("sleep", level)

    def wake(self) -> list[bool]:
        return self.pool.call_all("wake")

    def update_weights(self, named: Any, version: int, final: bool = True) -> None:
        """`named`: (hf_name, array) pairs, or an ObjectRef to such a list (wrap it in a list when calling through
        Ray, which resolves top-level ObjectRef arguments)."""
        if isinstance(named, list) and len(named) == 1 and not isinstance(named[0], tuple):
            named = named[0]
        self.pool.update_weights(named, version, final=final)

    def shutdown(self) -> None:
        if self._pool is not None:
            self._pool.shutdown()
            self._pool = None

    def pool_call(self, method: str, *args: Any) -> Any:
        """The pool's other calls: policy_version, engine_stats, call_all (named_weights, score, ...)."""
        return getattr(self.pool, method)(*args)
