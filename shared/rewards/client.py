"""Client of a reward server speaking the reference protocol (`POST /get_reward`).

Retries with exponential backoff, as the reference trainer does (180 s timeout, 5 attempts): a reward server
restarting mid-run should cost a delay, not the run. A 4xx answer is the request's fault and is not retried.
"""
from __future__ import annotations

import json
import time
import urllib.error
import urllib.parse
import urllib.request
from typing import Optional, Sequence

from shared.rewards.lmmr1 import RewardResult


class RewardServerError(RuntimeError):
    pass


class RemoteReward:
    def __init__(self, url: str, timeout_s: float = 180.0, retries: int = 5, backoff_s: float = 1.0):
        if retries < 1:
            raise ValueError(f"retries: expected >= 1, got {retries}")
        parts = urllib.parse.urlsplit(url)
        if parts.scheme not in ("http", "https"):
            raise ValueError(f"reward server url: expected http(s)://host:port[/get_reward], got {url!r}")
        # The reference passes the full endpoint; a bare host:port means the standard one.
        self.url = url if parts.path not in ("", "/") else url.rstrip("/") + "/get_reward"
        self.timeout_s = timeout_s
        self.retries = retries
        self.backoff_s = backoff_s

    def score(
        self, queries: Sequence[str], labels: Sequence[str], prompts: Optional[Sequence[str]] = None
    ) -> list[RewardResult]:
        if len(queries) != len(labels):
            raise ValueError(f"expected one label per query, got {len(queries)} queries and {len(labels)} labels")
        body = {"query": list(queries), "prompts": list(prompts or [""] * len(queries)), "labels": list(labels)}
        out = self._post(json.dumps(body).encode())
        try:
            rewards, fmt, acc = out["rewards"], out["format_rewards"], out["acc_rewards"]
        except (KeyError, TypeError):
            raise RewardServerError(
                f"reward server {self.url}: expected JSON with rewards, format_rewards, acc_rewards; got {out!r:.200}"
            ) from None
        if not len(rewards) == len(fmt) == len(acc) == len(queries):
            raise RewardServerError(f"reward server {self.url}: {len(rewards)} rewards for {len(queries)} queries")
        return [RewardResult(total=float(r), format=float(f), accuracy=float(a)) for r, f, a in zip(rewards, fmt, acc)]

    def _post(self, data: bytes) -> dict:
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
