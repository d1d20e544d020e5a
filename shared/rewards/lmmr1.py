"""LMM-R1's rule-based math reward: 0.5 for the <think>/<answer> format plus 1.0 for a math-verified answer.

Mirrors the reference reward server (`math_verifier.py`): the same response extraction, format regex and
math-verify parse configurations, so that reward curves are comparable with the published runs.
"""
from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from typing import Optional

from math_verify import LatexExtractionConfig, LatexNormalizationConfig, parse, verify

# The chatml assistant prefix; the trainer sends prompt + response, and the first assistant turn starts the response.
ASSISTANT_PREFIX = "<|im_start|>assistant\n"
END_TOKENS = ("<|im_end|>", "<|endoftext|>", "<｜end▁of▁sentence｜>", "<end_of_turn>")

FORMAT_REWARD = 0.5
ACCURACY_REWARD = 1.0
FORMAT_RE = re.compile(r"^<think>(?:(?!</think>).)*</think><answer>(?:(?!</answer>).)*</answer>\Z", re.DOTALL)

GOLD_CONFIG = [LatexExtractionConfig()]
# Boxed answers first, no bare `$...$` without an "answer" anchor: the reference's prediction parse.
PRED_CONFIG = [
    LatexExtractionConfig(
        normalization_config=LatexNormalizationConfig(
            nits=False, malformed_operators=False, basic_latex=True, boxed="all", units=True
        ),
        boxed_match_priority=0,
        try_extract_without_anchor=False,
    )
]

# math-verify's own timeouts use signal.alarm (main thread only) and are disabled here; callers bound the time
# with processes (RewardPool), so its "timeout disabled" warning carries no information.
logging.getLogger("math_verify").setLevel(logging.ERROR)


@dataclass
class RewardResult:
    total: float
    format: float
    accuracy: float
    error: Optional[str] = None


def extract_response(query: str) -> str:
    """The response part of a decoded prompt+response; text without an assistant prefix is taken as the response."""
    _, found, response = query.partition(ASSISTANT_PREFIX)
    if not found:
        response = query
    for token in END_TOKENS:
        response = response.replace(token, "")
    return response.strip()


def format_score(response: str) -> float:
    ok = FORMAT_RE.match(response) is not None and response.count("<think>") == 1 and response.count("<answer>") == 1
    return FORMAT_REWARD if ok else 0.0


class GoldError(ValueError):
    """A gold answer that math-verify cannot parse: rewarding against it would score every response alike."""


def parse_gold(label: object) -> list:
    """math-verify's parse of a gold answer; `GoldError` saying why for an empty or unparsable one.

    The data loader calls this on every row, so a bad label is named at load time; the reward refuses one too
    (the reference scores it 1.0 for every response, which rewards nothing in particular).
    """
    if not isinstance(label, str) or not label.strip() or label.strip() == "None":
        raise GoldError(f"the gold answer is empty or not a string ({label!r})")
    gold = label if label.startswith("$") else f"${label}$"
    parsed = parse(gold, extraction_config=GOLD_CONFIG, extraction_mode="first_match", parsing_timeout=None)
    if not parsed:
        raise GoldError(f"math-verify cannot parse the gold answer {label!r}")
    return parsed


def accuracy_score(response: str, label: str) -> float:
    """1.0 if math-verify finds the gold answer in the whole response (not only the <answer> span)."""
    gold_parsed = parse_gold(label)
    pred_parsed = parse(response, extraction_config=PRED_CONFIG, extraction_mode="first_match", parsing_timeout=None)
    return ACCURACY_REWARD * float(verify(gold_parsed, pred_parsed, timeout_seconds=None))


def lmmr1_math(query: str, label: str, format_reward: bool = True) -> RewardResult:
    response = extract_response(query)
    fmt = format_score(response) if format_reward else 0.0
    acc = accuracy_score(response, label)
    return RewardResult(total=fmt + acc, format=fmt, accuracy=acc)
