"""The reference engine: Hugging Face transformers, sampling done here so every request gets its own seeded stream.

`model.generate` runs the model (left-padded batch, KV cache, Qwen2.5-VL's 3-D rope positions); a logits processor
(`_Sampler`) picks each row's token with the row's own `torch.Generator` and forces it, so a request's samples do not
depend on what else is in the batch. Sampling follows vLLM's sampler: temperature, then top-k, then top-p on the
sorted probabilities, then an exponential race (argmax of p / q with q ~ Exp(1)); sample j of a request with seed s
uses seed s + j, as vLLM's parallel sampling does. Greedy takes the first argmax.

Logprobs (`EngineConfig.logprobs_mode`): "raw" (default) is the log-softmax of the model's float32 logits at
temperature 1, as vLLM's default raw_logprobs; "processed" is the log-softmax after temperature and top-k/top-p
masking, the distribution the token was drawn from. Greedy parity with vLLM is measured in raw mode.

`named_weights` returns the model's `state_dict()` names (transformers 5 in-memory layout:
`model.language_model.layers.*`, `model.visual.*`, `lm_head.weight`); `update_weights` takes Hub names and maps them.
"""
from __future__ import annotations

import time
from typing import Iterable, Optional

import numpy as np
import torch

from rollout_torch.engine import (
    EngineConfig,
    RolloutEngine,
    stop_token_ids,
    tensor_checksum,
    to_numpy,
    validate_sampling,
)
from rollout_torch.processing import load_images, load_processor, process
from shared.checksum import Checksum
from shared.models.qwen2_5_vl_params import hub_name
from shared.records import Prompt, Sample, SamplingSpec

MAX_BATCH_ROWS = 32  # sequences per generate call


def mask_top_k_top_p(logits_BV: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    """vLLM's order: top-k, then top-p over the sorted probabilities (always keeping the most likely token)."""
    if top_k > 0 and top_k < logits_BV.shape[-1]:
        kth = torch.topk(logits_BV, top_k, dim=-1).values[..., -1:]
        logits_BV = logits_BV.masked_fill(logits_BV < kth, float("-inf"))
    if top_p < 1.0:
        sorted_BV, idx_BV = torch.sort(logits_BV, dim=-1, descending=False)
        cum_BV = sorted_BV.softmax(dim=-1).cumsum(dim=-1)
        drop_BV = cum_BV <= 1 - top_p
        drop_BV[..., -1] = False
        logits_BV = logits_BV.masked_fill(drop_BV.scatter(-1, idx_BV, drop_BV), float("-inf"))
    return logits_BV


class _Sampler:
    """A logits processor that samples each row itself and returns scores that force that token."""

    def __init__(self, sampling: SamplingSpec, generators: list[Optional[torch.Generator]], stop_ids: set[int],
                 stop_strings: tuple[str, ...], tokenizer, force_id: int, processed: bool):  # fmt: skip
        self.s = sampling
        self.generators = generators
        self.stop_ids = stop_ids
        self.stop_strings = stop_strings
        self.tokenizer = tokenizer
        self.force_id = force_id  # fed to finished rows so generate() retires them
        self.processed = processed
        rows = len(generators)
        self.tokens: list[list[int]] = [[] for _ in range(rows)]
        self.logprobs: list[list[float]] = [[] for _ in range(rows)]
        self.finish: list[Optional[str]] = [None] * rows

    def __call__(self, input_ids: torch.Tensor, scores_BV: torch.Tensor) -> torch.Tensor:
        scores_BV = scores_BV.float()
        raw_BV = scores_BV.log_softmax(dim=-1)
        if self.s.greedy:
            picked_B = scores_BV.argmax(dim=-1)
            lp_BV = raw_BV
        else:
            logits_BV = mask_top_k_top_p(scores_BV / self.s.temperature, self.s.top_k, self.s.top_p)
            probs_BV = logits_BV.softmax(dim=-1)
            q_BV = torch.empty(probs_BV.shape)  # drawn on the CPU, where the per-request generators live
            for r, g in enumerate(self.generators):
                q_BV[r].exponential_(generator=g)
            picked_B = (probs_BV / q_BV.to(probs_BV.device)).argmax(dim=-1)
            lp_BV = logits_BV.log_softmax(dim=-1) if self.processed else raw_BV
        chosen_B = lp_BV.gather(-1, picked_B[:, None])[:, 0]
        forced_BV = torch.full_like(scores_BV, float("-inf"))
        for r in range(len(self.tokens)):
            if self.finish[r] is not None:
                forced_BV[r, self.force_id] = 0.0
                continue
            tok = int(picked_B[r])
            self.tokens[r].append(tok)
            self.logprobs[r].append(float(chosen_B[r]))
            forced_BV[r, tok] = 0.0
            if tok in self.stop_ids or self._hit_stop_string(r):
                self.finish[r] = "stop"
            elif len(self.tokens[r]) >= self.s.max_tokens:
                self.finish[r] = "length"
        return forced_BV

    def _hit_stop_string(self, r: int) -> bool:
        if not self.stop_strings:
            return False
        text = self.tokenizer.decode(self.tokens[r], skip_special_tokens=True)
        return any(s in text for s in self.stop_strings)


class HFEngine(RolloutEngine):
    def __init__(self, cfg: EngineConfig, engine_id: int = 0):
        super().__init__(cfg, engine_id)
        from transformers import AutoModelForImageTextToText

        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        dtype = torch.float32 if cfg.dtype == "float32" else torch.bfloat16
        self.model = AutoModelForImageTextToText.from_pretrained(cfg.model_path, dtype=dtype).to(self.device).eval()
        self.processor = load_processor(cfg.model_path)
        self.tokenizer = self.processor.tokenizer
        self._stop_ids = stop_token_ids(cfg.model_path, self.tokenizer)
        self._params = dict(self.model.named_parameters())
        self._by_hub = {hub_name("transformers", k): k for k in self._params}
        self._rng = torch.Generator().manual_seed(cfg.seed)  # for requests without a seed

    # -- generation
    def _generators(self, sampling: SamplingSpec, n_prompts: int) -> list[Optional[torch.Generator]]:
        if sampling.greedy:
            return [None] * (n_prompts * sampling.n)
        gens = []
        for _ in range(n_prompts):
            for j in range(sampling.n):
                seed = sampling.seed + j if sampling.seed is not None else int(torch.randint(0, 2**62, (1,), generator=self._rng))
                gens.append(torch.Generator().manual_seed(seed))
        return gens

    @torch.no_grad()
    def _generate_rows(self, prompts: list[Prompt], images: list, sampling: SamplingSpec, gens: list):
        from transformers import GenerationConfig, LogitsProcessorList

        batch = process(self.processor, prompts, images).to(self.device)
        stop_ids = set(self._stop_ids) | set(sampling.stop_token_ids)
        sampler = _Sampler(sampling, gens, stop_ids, tuple(sampling.stop), self.tokenizer, min(stop_ids),
                           self.cfg.logprobs_mode == "processed")  # fmt: skip
        gen_cfg = GenerationConfig(
            max_new_tokens=sampling.max_tokens, do_sample=False, num_beams=1, eos_token_id=sorted(stop_ids),
            pad_token_id=self.tokenizer.pad_token_id, use_cache=True,
        )  # fmt: skip
        self.model.generate(**batch, generation_config=gen_cfg, logits_processor=LogitsProcessorList([sampler]))
        prompt_ids = [ids[m.bool()].tolist() for ids, m in zip(batch["input_ids"].cpu(), batch["attention_mask"].cpu())]
        return sampler, prompt_ids

    def generate(self, prompts: list[Prompt], sampling: SamplingSpec) -> list[list[Sample]]:
        validate_sampling(sampling)
        self._check_ready()
        if not prompts:
            return []
        start = time.perf_counter()
        n = sampling.n
        gens = self._generators(sampling, len(prompts))
        rows = [(i, j) for i in range(len(prompts)) for j in range(n)]
        images = [load_images(p) for p in prompts]
        samples: dict[tuple[int, int], Sample] = {}
        # One processor call takes one pair of pixel bounds; group rows by them, then cut into batches.
        by_bounds: dict[tuple[int, int], list[int]] = {}
        for k, (i, _) in enumerate(rows):
            by_bounds.setdefault((prompts[i].min_pixels, prompts[i].max_pixels), []).append(k)
        for ks in by_bounds.values():
            for b in range(0, len(ks), MAX_BATCH_ROWS):
                chunk = ks[b:b + MAX_BATCH_ROWS]
                idx = [rows[k][0] for k in chunk]
                out, prompt_ids = self._generate_rows(
                    [prompts[i] for i in idx], [images[i] for i in idx], sampling, [gens[k] for k in chunk]
                )
                for r, k in enumerate(chunk):
                    samples[rows[k]] = self._sample(prompts[rows[k][0]], prompt_ids[r], out, r, sampling)
        results = [[samples[(i, j)] for j in range(n)] for i in range(len(prompts))]
        self._record(results, time.perf_counter() - start)
        return results

    def _sample(self, prompt: Prompt, prompt_ids: list[int], out: _Sampler, r: int, sampling: SamplingSpec) -> Sample:
        ids = out.tokens[r]
        text = self.tokenizer.decode(ids, skip_special_tokens=True)
        if out.finish[r] == "stop" and sampling.stop:
            cut = min((text.find(s) for s in sampling.stop if s in text), default=-1)
            text = text[:cut] if cut >= 0 else text  # vLLM drops the stop string from the text, keeps its token
        return Sample(
            uid=prompt.uid, prompt_ids=prompt_ids, response_ids=list(ids), logprobs=out.logprobs[r],
            text=text, finish_reason=out.finish[r] or "length", policy_version=self._version, engine_id=self.engine_id,
        )  # fmt: skip

    @torch.no_grad()
    def score(self, prompt: Prompt, response_ids: list[int]) -> list[float]:
        self._check_ready()
        if not response_ids:
            return []
        batch = process(self.processor, [prompt]).to(self.device)
        resp = torch.tensor([list(response_ids)], dtype=batch["input_ids"].dtype, device=self.device)
        zeros = torch.zeros_like(resp)
        batch["input_ids"] = torch.cat([batch["input_ids"], resp], dim=1)
        batch["attention_mask"] = torch.cat([batch["attention_mask"], torch.ones_like(resp)], dim=1)
        if "mm_token_type_ids" in batch:
            batch["mm_token_type_ids"] = torch.cat([batch["mm_token_type_ids"], zeros.to(batch["mm_token_type_ids"].dtype)], dim=1)
        self.model.model.rope_deltas = None  # positions are recomputed from this prompt, not a previous generate
        logits_BTV = self.model(**batch, use_cache=False).logits.float()
        n = len(response_ids)
        lp_TV = logits_BTV[0, -n - 1:-1].log_softmax(dim=-1)
        return lp_TV.gather(-1, resp[0, :, None])[:, 0].tolist()

    # -- weights
    def _key(self, name: str) -> str:
        key = self._by_hub.get(name, name if name in self._params else None)
        if key is None:
            raise KeyError(
                f"engine {self.engine_id}: {name!r} is not a parameter of the model; expected Hugging Face "
                f"Hub names such as {next(iter(self._by_hub))!r}"
            )
        return key

    def _validate(self, named: list[tuple[str, torch.Tensor]]) -> None:
        for name, t in named:
            shape = tuple(self._params[self._key(name)].shape)
            if tuple(t.shape) != shape:
                raise ValueError(f"{name}: shape {tuple(t.shape)}, model has {shape}")

    @torch.no_grad()
    def _load(self, named: list[tuple[str, torch.Tensor]]) -> None:
        for name, t in named:
            param = self._params[self._key(name)]
            param.copy_(t.to(param.device, param.dtype))

    def _finish(self) -> None:
        pass  # no caches outlive a generate call

    def _tensors(self, names: Optional[Iterable[str]]) -> dict[str, torch.Tensor]:
        state = self.model.state_dict()
        keys = list(state) if names is None else list(names)
        if missing := [k for k in keys if k not in state]:
            raise KeyError(f"not in the model's state_dict: {missing[:5]}")
        return {k: state[k] for k in keys}

    def named_weights(self, names: Optional[Iterable[str]] = None) -> dict[str, np.ndarray]:
        return {k: to_numpy(t) for k, t in self._tensors(names).items()}

    def weight_checksums(self, names: Iterable[str]) -> dict[str, Checksum]:
        return {k: tensor_checksum(t) for k, t in self._tensors(names).items()}

    # sleep()/wake(): the reference engine keeps its weights; the base class reports False.
