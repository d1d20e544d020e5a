"""Client of a reward server speaking the reference protocol (`POST /get_reward`).

Request `{"query": [...], "prompts": [...], "labels": [...]}`; answer `{"rewards": [...]}`, optionally with per-part
lists `format_rewards` / `acc_rewards` (LMM-R1's server; also looked up under `extra_logs`, where OpenRLHF's reward
functions put extra per-sample values; their `scores`, a filter signal, is not read) and `errors` (per-sample message
or null: our server). A part the server does not send is NaN in the result: unknown, not zero.

Retries with exponential backoff, as the reference trainer does (180 s timeout, 5 attempts): a reward server
restarting mid-run should cost a delay, not the run. A 4xx answer is the request's fault and is not retried.
Batches go out in requests of `batch_size` samples, as the reference sends one request per micro-batch, so a
rollout's text stays far below the server's body size limit.
"""
from __future__ import annotations

import json
import math
import time
import urllib.error
import urllib.parse
import urllib.request
from typing import Any, Optional, Sequence

from shared.rewards.lmmr1 import RewardResult

PARTS = {"format": "format_rewards", "accuracy": "acc_rewards"}


class RewardServerError(RuntimeError):
    pass


def endpoint(url: str) -> str:
    """The `/get_reward` URL a reward server address means; ValueError for anything but http(s)://host[:port]."""
    parts = urllib.parse.urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"reward server url: expected http(s)://host:port[/get_reward], got {url!r}")
    # The reference passes the full endpoint; a bare host:port means the standard one.
    return url if parts.path not in ("", "/") else url.rstrip("/") + "/get_reward"


class RemoteReward:
    def __init__(self, url: str, timeout_s: float = 180.0, retries: int = 5, backoff_s: float = 1.0,
                 batch_size: int = 256):  # fmt: skip
        if retries < 1:
            raise ValueError(f"retries: expected >= 1, got {retries}")
        if batch_size < 1:
            raise ValueError(f"batch_size: expected >= 1, got {batch_size}")
        self.url = endpoint(url)
        self.timeout_s = timeout_s
        self.retries = retries
        self.backoff_s = backoff_s
        self.batch_size = batch_size

    def score(
        self, queries: Sequence[str], labels: Sequence[str], prompts: Optional[Sequence[str]] = None
    ) -> list[RewardResult]:
        if len(queries) != len(labels):
            raise ValueError(f"expected one label per query, got {len(queries)} queries and {len(labels)} labels")
        prompts = list(prompts) if prompts is not None else [""] * len(queries)
        if len(prompts) != len(queries):
            raise ValueError(f"expected one prompt per query, got {len(queries)} queries and {len(prompts)} prompts")
        results: list[RewardResult] = []
        for i in range(0, len(queries), self.batch_size):
            part = slice(i, i + self.batch_size)
            body = {"query": list(queries[part]), "prompts": prompts[part], "labels": list(labels[part])}
            results += self._parse(self._post(json.dumps(body).encode()), len(body["query"]))
        return results

    def _parse(self, answer: Any, n: int) -> list[RewardResult]:
        if not isinstance(answer, dict) or "rewards" not in answer:
            raise self._bad_answer(f"expected a JSON object with 'rewards', got {answer!r:.200}")
        extra = answer.get("extra_logs") or {}
        if not isinstance(extra, dict):
            raise self._bad_answer(f"extra_logs is not an object: {extra!r:.200}")
        rewards = self._numbers("rewards", answer["rewards"], n)
        parts = {}
        for name, key in PARTS.items():
            value = answer.get(key, extra.get(key))
            parts[name] = [math.nan] * n if value is None else self._numbers(key, value, n)
        errors = answer.get("errors")
        errors = [None] * n if errors is None else errors
        if not isinstance(errors, list) or len(errors) != n or not all(e is None or isinstance(e, str) for e in errors):
            raise self._bad_answer(f"expected {n} errors (string or null), got {errors!r:.200}")
        return [RewardResult(total=r, format=f, accuracy=a, error=e)
                for r, f, a, e in zip(rewards, parts["format"], parts["accuracy"], errors)]  # fmt: skip

    def _numbers(self, key: str, value: Any, n: int) -> list[float]:
        """`value` as n finite floats: a NaN reward would poison the advantages of the whole batch."""
        numbers = isinstance(value, list) and all(type(x) in (int, float) and math.isfinite(x) for x in value)
        if not (numbers and len(value) == n):
            raise self._bad_answer(f"expected {n} finite numbers in {key!r}, got {value!r:.200}")
        return [float(x) for x in value]

    def _bad_answer(self, what: str) -> RewardServerError:
        return RewardServerError(f"reward server {self.url}: {what}")

    def _post(self, data: bytes) -> Any:
        request = urllib.request.Request(self.url, data=data, headers={"Content-Type": "application/json"})
        last = None
        for attempt in range(self.retries):
            if attempt:
                time.sleep(self.backoff_s * 2 ** (attempt - 1))
            try:
                with urllib.request.urlopen(request, timeout=self.timeout_s) as response:
                    return json.loads(response.read())
            except urllib.error.HTTPError as e:
                if 400 <= e.code < 500:
                    raise RewardServerError(f"reward server {self.url} rejected the request: {e.code} {e.read()!r:.300}")
                last = f"HTTP {e.code}"
            except (OSError, ValueError) as e:  # refused, reset, timed out, or an unreadable answer
                last = f"{type(e).__name__}: {e}"
        raise RewardServerError(f"reward server {self.url} failed {self.retries} attempts; last error: {last}")
