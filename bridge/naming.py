"""How each engine names and lays out the Hugging Face (Hub) tensors it holds, and which tensors must travel together.

Two schemes, both starting from Hub names (`model.layers.*`, `model.embed_tokens`, `visual.*`, `lm_head.weight`):

    transformers  state_dict of transformers 5: `model.language_model.*`, `model.visual.*`, `lm_head.weight`
    vllm          vLLM's Qwen2.5-VL: `language_model.model.*`, `language_model.lm_head.weight`, `visual.*`, with
                  q/k/v fused into `qkv_proj` and gate/up into `gate_up_proj` (rows concatenated in that order)

With tied embeddings both engines still hold an `lm_head.weight`, which must equal the embedding; it is listed
so a broken tie is caught. numpy-free and framework-free: used by the learner and in engine processes.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Iterable

NAMINGS = ("transformers", "vllm")
EMBED = "model.embed_tokens.weight"
LM_HEAD = "lm_head.weight"

# (pattern on the module path, fused module, order of the parts); shared by both vLLM towers.
_FUSIONS = (
    (re.compile(r"\.([qkv])_proj$"), ".qkv_proj", ("q", "k", "v")),
    (re.compile(r"\.(gate|up)_proj$"), ".gate_up_proj", ("gate", "up")),
)


def fused_group(hf_name: str) -> str:
    """The vLLM layer an HF tensor lands in. Tensors of one group (q/k/v with their biases, gate/up, a weight with
    its bias) must reach an engine in the same call: vLLM re-processes a layer once all of its tensors arrived."""
    module = hf_name.rsplit(".", 1)[0]
    for pattern, fused, _ in _FUSIONS:
        module = pattern.sub(fused, module)
    return module


@dataclass(frozen=True)
class EngineTensor:
    """One tensor as an engine holds it: rows of `parts` (HF names) concatenated in order."""

    name: str
    parts: tuple[str, ...]


def _prefixed(naming: str, hf_name: str) -> str:
    if naming == "transformers":
        if hf_name.startswith("model."):
            return "model.language_model." + hf_name[len("model."):]
        if hf_name.startswith("visual."):
            return "model." + hf_name
        return hf_name
    if hf_name.startswith("model."):
        return "language_model." + hf_name
    if hf_name == LM_HEAD:
        return "language_model." + LM_HEAD
    return hf_name


def _fused(hf_name: str) -> tuple[str, str, tuple[str, ...]]:
    """(vLLM name without prefix, this tensor's part key, the fused tensor's part order); ("", ("",)) unfused."""
    module, leaf = hf_name.rsplit(".", 1)
    for pattern, fused, order in _FUSIONS:
        m = pattern.search(module)
        if m:
            return pattern.sub(fused, module) + "." + leaf, m.group(1), order
    return hf_name, "", ("",)


def engine_tensors(naming: str, hf_names: Iterable[str], tied: bool) -> list[EngineTensor]:
    """The engine tensors covering `hf_names` (in first-appearance order), each with its HF parts in row order.

    `tied`: the model ties lm_head to the embedding, so the engine's lm_head holds the embedding too."""
    if naming not in NAMINGS:
        raise ValueError(f"engine naming {naming!r}: expected one of {NAMINGS}")
    hf_names = list(hf_names)
    if tied and EMBED in hf_names and LM_HEAD not in hf_names:
        hf_names.append(LM_HEAD)
    parts: dict[str, dict[str, str]] = {}
    orders: dict[str, tuple[str, ...]] = {}
    for name in hf_names:
        source = EMBED if tied and name == LM_HEAD else name
        base, part, order = _fused(name) if naming == "vllm" else (name, "", ("",))
        engine_name = _prefixed(naming, base)
        parts.setdefault(engine_name, {})[part] = source
        orders[engine_name] = order
    result = []
    for engine_name, got in parts.items():
        if missing := [p for p in orders[engine_name] if p not in got]:
            raise ValueError(f"{engine_name}: fused tensor is missing its {missing} parts")
        result.append(EngineTensor(engine_name, tuple(got[p] for p in orders[engine_name])))
    return result
