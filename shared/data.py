"""Prompt data in the LMM-R1 format: JSONL rows whose `message` is an OpenAI-style message list (often a JSON
string) and whose `answer` is the gold label. Images are referenced by path (relative to the JSONL file),
`file://` URI or `data:image/...;base64,` URI.

Every row is checked when the file is loaded; an error names the file, the line and what was expected.
"""
from __future__ import annotations

import base64
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import numpy as np

ROLES = ("system", "user", "assistant")


class DataError(ValueError):
    pass


@dataclass
class PromptRow:
    messages: list[dict[str, Any]]
    label: Optional[str]
    image_paths: list[str]
    source: str  # file the row came from
    line: int
    extra: dict[str, Any] = field(default_factory=dict)  # other keys of the row (e.g. a worked solution for SFT)


def _resolve_image(ref: Any, base: Path, where: str, cache_dir: Path) -> str:
    if not isinstance(ref, str) or not ref:
        raise DataError(f"{where}: image reference must be a non-empty string, got {ref!r}")
    if ref.startswith("data:image"):
        try:
            payload = base64.b64decode(ref.split(",", 1)[1], validate=True)
        except Exception:
            raise DataError(f"{where}: malformed base64 image data URI") from None
        cache_dir.mkdir(parents=True, exist_ok=True)
        out = cache_dir / (hashlib.sha1(payload).hexdigest() + ".img")
        if not out.exists():
            out.write_bytes(payload)
        return str(out)
    if ref.startswith(("http://", "https://")):
        raise DataError(f"{where}: image {ref} is a URL; download images next to the data file and use local paths")
    path = Path(ref[len("file://"):] if ref.startswith("file://") else ref)
    path = path if path.is_absolute() else base / path
    if not path.is_file():
        raise DataError(f"{where}: image file {path} does not exist")
    return str(path)


def parse_row(
    obj: Any, *, source: str, line: int, input_key: str = "message", label_key: Optional[str] = "answer",
    min_pixels: int = 4 * 28 * 28, max_pixels: int = 16384 * 28 * 28,
) -> PromptRow:  # fmt: skip
    where = f"{source}:{line}"
    if not isinstance(obj, dict):
        raise DataError(f"{where}: expected a JSON object per line, got {type(obj).__name__}")
    if input_key not in obj:
        raise DataError(f"{where}: missing key {input_key!r} (keys present: {', '.join(obj)})")
    messages = obj[input_key]
    if isinstance(messages, str):
        try:
            messages = json.loads(messages)
        except json.JSONDecodeError as e:
            raise DataError(f"{where}: {input_key!r} is a string but not a JSON message list: {e}") from None
    if not isinstance(messages, list) or not messages:
        raise DataError(f"{where}: {input_key!r} must be a non-empty list of messages")
    base = Path(source).resolve().parent
    images: list[str] = []
    for i, msg in enumerate(messages):
        if not isinstance(msg, dict) or msg.get("role") not in ROLES or "content" not in msg:
            raise DataError(f"{where}: message {i} must be an object with role in {ROLES} and a content")
        content = msg["content"]
        if isinstance(content, str):
            continue
        if not isinstance(content, list):
            raise DataError(f"{where}: message {i} content must be a string or a list of items")
        for item in content:
            kind = item.get("type") if isinstance(item, dict) else None
            if kind == "text" and isinstance(item.get("text"), str):
                continue
            if kind == "image" or (isinstance(item, dict) and "image" in item):
                path = _resolve_image(item.get("image"), base, f"{where}: message {i}", base / ".image_cache")
                item["image"] = path
                item.setdefault("min_pixels", min_pixels)  # the reference injects bounds where a row has none
                item.setdefault("max_pixels", max_pixels)
                images.append(path)
                continue
            raise DataError(f"{where}: message {i} has an item that is neither text nor image: {item!r}")
    label = None
    if label_key is not None:
        if label_key not in obj:
            raise DataError(f"{where}: missing label key {label_key!r}")
        label = str(obj[label_key])
    extra = {k: v for k, v in obj.items() if k not in (input_key, label_key)}
    return PromptRow(messages, label, images, source, line, extra)


def load_rows(path: str | Path, *, max_rows: Optional[int] = None, **kwargs: Any) -> list[PromptRow]:
    path = Path(path)
    if not path.is_file():
        raise DataError(f"data file {path} does not exist")
    rows = []
    with path.open() as f:
        for lineno, text in enumerate(f, 1):
            if not text.strip():
                continue
            try:
                obj = json.loads(text)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{lineno}: not valid JSON: {e}") from None
            rows.append(parse_row(obj, source=str(path), line=lineno, **kwargs))
            if max_rows is not None and len(rows) >= max_rows:
                break
    if not rows:
        raise DataError(f"{path}: no rows")
    return rows


def count_rows(path: str | Path) -> int:
    with Path(path).open() as f:
        return sum(1 for line in f if line.strip())


class PromptSampler:
    """A resumable, seeded stream of rows mixed from several data sets.

    Each episode visits every row once, in an order fixed by (seed, episode). With mixing weights, each draw
    picks a data set by weight and takes its next row, so one episode holds `total` rows in the given
    proportions (data sets are cycled when drawn more often than their size). The state is two integers.
    """

    def __init__(self, datasets: list[list[PromptRow]], probs: Optional[list[float]] = None, seed: int = 42):
        if not datasets or any(not d for d in datasets):
            raise DataError("PromptSampler needs at least one non-empty data set")
        self.datasets, self.seed = datasets, seed
        sizes = np.array([len(d) for d in datasets], np.float64)
        self.probs = np.asarray(probs if probs is not None else sizes, np.float64)
        self.probs = self.probs / self.probs.sum()
        self.total = int(sizes.sum())
        self.episode, self.position = 0, 0

    def _order(self, episode: int) -> list[tuple[int, int]]:
        rng = np.random.default_rng([self.seed, episode])
        perms = [rng.permutation(len(d)) for d in self.datasets]
        picks = rng.choice(len(self.datasets), size=self.total, p=self.probs)
        cursor = [0] * len(self.datasets)
        order = []
        for d in picks:
            order.append((int(d), int(perms[d][cursor[d] % len(perms[d])])))
            cursor[d] += 1
        return order

    def take(self, k: int) -> list[PromptRow]:
        out = []
        while len(out) < k:
            order = self._order(self.episode)
            while self.position < len(order) and len(out) < k:
                d, i = order[self.position]
                out.append(self.datasets[d][i])
                self.position += 1
            if self.position >= len(order):
                self.episode, self.position = self.episode + 1, 0
        return out

    def state_dict(self) -> dict[str, int]:
        return {"episode": self.episode, "position": self.position, "seed": self.seed}

    def load_state_dict(self, state: dict[str, int]) -> None:
        if state.get("seed", self.seed) != self.seed:
            raise DataError(f"sampler state has seed {state['seed']}, this run uses {self.seed}")
        self.episode, self.position = int(state["episode"]), int(state["position"])

