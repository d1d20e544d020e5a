"""Prompt data in the LMM-R1 format: rows whose `message` is an OpenAI-style message list (often a JSON string) and
whose `answer` is the gold label.

A data source is a JSON lines file (.jsonl, .json, .ndjson; read line by line, so errors name the line), a file in
another format of the `datasets` library (Parquet, Arrow, CSV; errors name the row), or a directory `datasets`
reads: one written by `save_to_disk`, or data files laid out as `load_dataset` expects (JSON lines files among them
are again read line by line). A source with several splits is named `<directory>:<split>`.

Images are resolved by `shared.images` (paths relative to the data, URIs, URLs, `datasets` Image values) to local
files. Every row is checked when it loads: its structure, its gold answer (math-verify must parse it), its images
(readable, no decompression bomb, aspect ratio within Qwen's limit) and, given the model, its prompt length in
tokens including image tokens. With `on_bad_row="error"` the first bad row stops the load, naming its file, line
and what was expected; with "skip" bad rows are dropped and counted by reason in a `LoadReport`.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any, Iterable, Iterator, NamedTuple, Optional

import numpy as np

from shared.images import ImageError, check_image, image_tokens, materialize

ROLES = ("system", "user", "assistant")
REASONS = ("malformed", "gold", "image", "too_long")  # why a row is dropped: data/skipped_<reason>
JSON_LINES = (".jsonl", ".json", ".ndjson")
DATASET_MARKERS = ("dataset_info.json", "dataset_dict.json", "state.json")  # what `save_to_disk` writes


class DataError(ValueError):
    pass


class RowError(DataError):
    """One unusable row; `reason` is one of REASONS."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


@dataclass
class PromptRow:
    messages: list[dict[str, Any]]
    label: Optional[str]
    image_paths: list[str]
    source: str  # file (or data set) the row came from
    line: int  # line of a JSON lines file, row index of a `datasets` table
    extra: dict[str, Any] = field(default_factory=dict)  # other keys of the row (e.g. a worked solution for SFT)


class Record(NamedTuple):
    """One raw row: its file and line (or row index), its position in messages, and where its relative image paths
    start."""

    source: str
    line: int
    where: str
    raw: Any  # the bytes of a JSON line, or a `datasets` row
    base: Path


@dataclass
class LoadReport:
    """What a load kept and dropped: counts of skipped rows by reason and the first message of each reason."""

    source: str
    kept: int = 0
    skipped: dict[str, int] = field(default_factory=lambda: dict.fromkeys(REASONS, 0))
    first: dict[str, str] = field(default_factory=dict)

    def add(self, error: RowError) -> None:
        self.skipped[error.reason] += 1
        self.first.setdefault(error.reason, str(error))

    def summary(self) -> str:
        return f"{self.source}: {self.kept} rows{self._dropped()}"

    def _dropped(self) -> str:
        dropped = "; ".join(f"{n} {r} (first: {self.first[r]})" for r, n in self.skipped.items() if n)
        return f", skipped {dropped}" if dropped else ""


def skip_metrics(reports: Iterable[LoadReport]) -> dict[str, float]:
    """`data/skipped_<reason>` summed over the loads, every reason present (zero when nothing was skipped)."""
    reports = list(reports)
    return {f"data/skipped_{r}": float(sum(rep.skipped[r] for rep in reports)) for r in REASONS}


# ------------------------------------------------------------------------------------------- prompt length


class PromptLength:
    """Prompt tokens as the rollout makes them: the checkpoint's chat template rendered as transformers renders it
    (`apply_chat_template(..., add_generation_prompt=True)`), tokenized with its `tokenizer.json`, and each image
    placeholder replaced by one token per merged 28x28 patch of the resized image."""

    def __init__(self, model_path: str | Path):
        from tokenizers import Tokenizer

        model = Path(model_path)
        if not (model / "tokenizer.json").is_file():
            raise DataError(f"{model}: no tokenizer.json; expected a Hugging Face checkpoint to count prompt tokens")
        self.tokenizer = Tokenizer.from_file(str(model / "tokenizer.json"))
        self.template = _compile_template(_chat_template(model))
        self.special_tokens = _special_tokens(model)

    def render(self, messages: list[dict[str, Any]]) -> str:
        return self.template.render(messages=messages, tools=None, documents=None, add_generation_prompt=True,
                                    **self.special_tokens)  # fmt: skip

    def __call__(self, messages: list[dict[str, Any]], image_sizes: list[tuple[int, int]]) -> int:
        text = len(self.tokenizer.encode(self.render(messages)).ids)
        return text + sum(image_tokens(h, w) - 1 for h, w in image_sizes)


@lru_cache(maxsize=4)
def prompt_length(model_path: str) -> PromptLength:
    return PromptLength(model_path)


def _chat_template(model: Path) -> str:
    # The processor's own template first, as transformers loads it: chat_template.jinja, then the legacy json.
    if (model / "chat_template.jinja").is_file():
        return (model / "chat_template.jinja").read_text()
    for name in ("chat_template.json", "tokenizer_config.json"):
        template = json.loads((model / name).read_text()).get("chat_template") if (model / name).is_file() else None
        if isinstance(template, str):
            return template
    raise DataError(f"{model}: no chat template; expected chat_template.jinja, chat_template.json or one in "
                    "tokenizer_config.json")  # fmt: skip


def _compile_template(source: str):
    # The environment transformers renders chat templates in (utils/chat_template_utils.py).
    from datetime import datetime

    import jinja2
    from jinja2.ext import loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message: str):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env.from_string(source)


def _special_tokens(model: Path) -> dict[str, str]:
    config = model / "tokenizer_config.json"
    if not config.is_file():
        return {}
    names = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")
    tokens = {k: v.get("content") if isinstance(v, dict) else v for k, v in json.loads(config.read_text()).items()}
    return {k: tokens[k] for k in names if isinstance(tokens.get(k), str)}


# ------------------------------------------------------------------------------------------------ one row


@lru_cache(maxsize=1 << 16)
def _gold_problem(label: Optional[str]) -> Optional[str]:
    from shared.rewards.lmmr1 import GoldError, parse_gold

    try:
        parse_gold(label)
    except GoldError as e:
        return str(e)
    return None


def _without_nulls(obj: Any) -> Any:
    # Arrow tables give every struct the union of all keys, null where a row had none; Qwen's chat template tests
    # key presence ('image' in item), so a text item carrying "image": None would render as an image.
    return {k: v for k, v in obj.items() if v is not None} if isinstance(obj, dict) else obj


@dataclass
class RowParser:
    """Checks one row and normalizes it: messages decoded, image items as {"type": "image", "image": <local path>,
    "min_pixels", "max_pixels"} (OpenAI `image_url` items included), label as a string."""

    cache_dir: Path  # embedded and fetched images are written here
    input_key: str = "message"
    label_key: Optional[str] = "answer"
    min_pixels: int = 4 * 28 * 28
    max_pixels: int = 16384 * 28 * 28
    check_gold: bool = True
    prompt_length: Optional[PromptLength] = None
    prompt_max_len: Optional[int] = None

    def parse(self, obj: Any, record: Record) -> PromptRow:
        where = record.where
        if not isinstance(obj, dict):
            raise RowError("malformed", f"{where}: got a {type(obj).__name__}; expected a JSON object per row")
        messages = self._messages(obj, where)
        paths, sizes = self._images(messages, record.base, where)
        label = self._label(obj, where)
        if self.prompt_length is not None and self.prompt_max_len is not None:
            self._check_length(messages, sizes, where)
        extra = {k: v for k, v in obj.items() if k not in (self.input_key, self.label_key)}
        return PromptRow(messages, label, paths, record.source, record.line, extra)

    def _messages(self, obj: dict, where: str) -> list[dict[str, Any]]:
        if self.input_key not in obj:
            raise RowError("malformed", f"{where}: missing key {self.input_key!r} (keys present: {', '.join(obj)}); "
                                        "expected the message list under data.input_key")  # fmt: skip
        messages = obj[self.input_key]
        if isinstance(messages, str):
            try:
                messages = json.loads(messages)
            except json.JSONDecodeError as e:
                raise RowError("malformed", f"{where}: {self.input_key!r} is a string but not a JSON message list "
                                            f"({e}); expected a JSON list of messages") from None  # fmt: skip
        if not isinstance(messages, list) or not messages:
            raise RowError("malformed", f"{where}: {self.input_key!r} is empty or not a list; expected a non-empty "
                                        "list of messages")  # fmt: skip
        messages = [_without_nulls(m) for m in messages]
        for i, msg in enumerate(messages):
            if not isinstance(msg, dict) or msg.get("role") not in ROLES or "content" not in msg:
                raise RowError("malformed", f"{where}: message {i} is {str(msg)[:80]!r}; expected an object with "
                                            f"role in {ROLES} and a content")  # fmt: skip
            if not isinstance(msg["content"], (str, list)):
                raise RowError("malformed", f"{where}: message {i} content is a {type(msg['content']).__name__}; "
                                            "expected a string or a list of items")  # fmt: skip
        return messages

    def _images(self, messages: list[dict], base: Path, where: str) -> tuple[list[str], list[tuple[int, int]]]:
        paths, sizes, bounds = [], [], set()
        for i, msg in enumerate(messages):
            if isinstance(msg["content"], str):
                continue
            msg["content"] = [self._item(_without_nulls(it), base, f"{where}: message {i}") for it in msg["content"]]
            for item in msg["content"]:
                if item["type"] == "image":
                    paths.append(item["image"])
                    bounds.add((item["min_pixels"], item["max_pixels"]))
                    sizes.append(self._checked_size(item, where))
        if len(bounds) > 1:
            raise RowError("malformed", f"{where}: images with different pixel bounds {sorted(bounds)}; expected one "
                                        "min_pixels/max_pixels pair per row")  # fmt: skip
        return paths, sizes

    def _item(self, item: Any, base: Path, where: str) -> dict[str, Any]:
        kind = item.get("type") if isinstance(item, dict) else None
        if kind == "text" and isinstance(item.get("text"), str):
            return item
        if not isinstance(item, dict) or not (kind in ("image", "image_url") or "image" in item or "image_url" in item):
            raise RowError("malformed", f"{where} has an item that is neither text nor image: {str(item)[:120]!r}; "
                                        "expected {'type': 'text', 'text': ...} or an image item")  # fmt: skip
        ref = item["image"] if "image" in item else item.get("image_url")
        ref = ref.get("url") if isinstance(ref, dict) and "url" in ref else ref  # OpenAI: {"url": ...}
        try:
            path = materialize(ref, base, self.cache_dir)
        except ImageError as e:
            raise RowError("image", f"{where}: {e}") from None
        rest = {k: v for k, v in item.items() if k not in ("type", "image", "image_url")}
        # The reference injects the configured pixel bounds where an item has none.
        lo, hi = rest.pop("min_pixels", self.min_pixels), rest.pop("max_pixels", self.max_pixels)
        if not (isinstance(lo, int) and isinstance(hi, int) and 0 < lo <= hi):
            raise RowError("malformed", f"{where}: image pixel bounds {lo!r}, {hi!r}; expected integers with "
                                        "0 < min_pixels <= max_pixels")  # fmt: skip
        return {"type": "image", "image": str(path), "min_pixels": lo, "max_pixels": hi, **rest}

    def _checked_size(self, item: dict, where: str) -> tuple[int, int]:
        try:
            return check_image(item["image"], item["min_pixels"], item["max_pixels"])
        except ImageError as e:
            raise RowError("image", f"{where}: {e}") from None

    def _label(self, obj: dict, where: str) -> Optional[str]:
        if self.label_key is None:
            return None
        if self.label_key not in obj:
            raise RowError("malformed", f"{where}: missing label key {self.label_key!r}; expected the gold answer "
                                        "under data.label_key")  # fmt: skip
        raw = obj[self.label_key]
        label = None if raw is None else str(raw)
        problem = _gold_problem(label) if self.check_gold else None
        if problem:
            raise RowError("gold", f"{where}: {problem}; expected a gold answer math-verify parses, such as 2 or "
                                   "$\\boxed{\\frac{1}{2}}$")  # fmt: skip
        return label

    def _check_length(self, messages: list[dict], sizes: list[tuple[int, int]], where: str) -> None:
        n = self.prompt_length(messages, sizes)
        if n > self.prompt_max_len:
            images = sum(image_tokens(h, w) for h, w in sizes)
            raise RowError("too_long", f"{where}: the prompt has {n} tokens ({images} of them for images); expected "
                                       f"at most data.prompt_max_len = {self.prompt_max_len}")  # fmt: skip


def parse_row(obj: Any, *, source: str, line: int, **options: Any) -> PromptRow:
    """One row of the JSON lines file `source`, checked and normalized; `options` as `RowParser`'s fields."""
    base = Path(source).resolve().parent
    options.setdefault("cache_dir", base / ".image_cache")
    return RowParser(**options).parse(obj, Record(source, line, f"{source}:{line}", obj, base))


# --------------------------------------------------------------------------------------------- data sources


def _locate(path: str | Path) -> tuple[Path, Optional[str]]:
    """The file or directory, and the split named by a `<directory>:<split>` suffix."""
    if Path(path).exists():
        return Path(path), None
    head, sep, split = str(path).rpartition(":")
    if sep and Path(head).is_dir():
        return Path(head), split
    raise DataError(f"data file {path} does not exist")


def _is_json_lines(path: Path) -> bool:
    return path.is_file() and path.suffix.lower() in JSON_LINES


def _json_lines(path: Path) -> Iterator[Record]:
    # Read here rather than by `datasets`: its JSON builder infers one Arrow schema per file, adding null keys to
    # message items and decoding string labels as JSON ("2" -> 2), and it names blocks' rows, not lines.
    base = path.resolve().parent
    with path.open("rb") as f:
        for lineno, raw in enumerate(f, 1):
            if raw.strip():
                yield Record(str(path), lineno, f"{path}:{lineno}", raw, base)


def _decode_line(raw: bytes, where: str) -> Any:
    try:
        text = raw.decode("utf-8-sig" if raw.startswith(b"\xef\xbb\xbf") else "utf-8")
    except UnicodeDecodeError as e:
        raise RowError("malformed", f"{where}: byte {raw[e.start]:#04x} at column {e.start + 1} is not UTF-8; "
                                    "expected UTF-8 text") from None  # fmt: skip
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise RowError("malformed", f"{where}: not valid JSON ({e}); expected one JSON object per line") from None


def _choose_split(names: list[str], split: Optional[str], path: Path) -> str:
    if split is not None and split not in names:
        raise DataError(f"{path}: no split {split!r}; expected one of {', '.join(names)}")
    if split is None and len(names) > 1:
        raise DataError(f"{path} has splits {', '.join(names)}; expected one named as {path}:<split>")
    return split or names[0]


def _open_dataset(path: Path, split: Optional[str]):
    """A `datasets.Dataset`, or the JSON lines files of the chosen split (read by `_json_lines`)."""
    import datasets

    if path.is_dir() and any((path / m).is_file() for m in DATASET_MARKERS):
        data = datasets.load_from_disk(str(path))
        return data[_choose_split(list(data), split, path)] if isinstance(data, datasets.DatasetDict) else data
    directory, files = (path, None) if path.is_dir() else (path.parent, path.name)
    try:
        builder = datasets.load_dataset_builder(str(directory.resolve()), data_files=files)
    except (FileNotFoundError, ValueError) as e:
        raise DataError(f"{path}: the datasets library cannot read it ({e}); expected JSON lines, a file format of "
                        "datasets (Parquet, Arrow, CSV) or a directory save_to_disk or load_dataset reads") from None
    name = _choose_split([str(s) for s in builder.config.data_files], split, path)
    if builder.name == "json":
        return [Path(f) for f in builder.config.data_files[name]]
    builder.download_and_prepare()
    return builder.as_dataset(split=name)


def _undecoded(feature: Any) -> Any:
    """`datasets` features with Image values left as stored ({"bytes", "path"}): the loader caches the bytes as
    they are instead of decoding every image and encoding it again."""
    import dataclasses

    from datasets import Features, Image

    if isinstance(feature, Image):
        return Image(mode=feature.mode, decode=False)
    if isinstance(feature, dict):
        return (Features if isinstance(feature, Features) else dict)({k: _undecoded(v) for k, v in feature.items()})
    if dataclasses.is_dataclass(feature) and hasattr(feature, "feature"):
        return dataclasses.replace(feature, feature=_undecoded(feature.feature))
    return feature


def _table_rows(data, source: str, base: Path) -> Iterator[Record]:
    features = _undecoded(data.features)
    i = 0
    for batch in data.with_format("arrow").iter(batch_size=1000):
        for row in batch.to_pylist():
            yield Record(source, i, f"{source}:row {i}", features.decode_example(row), base)
            i += 1


def _records(path: Path, split: Optional[str], source: str) -> Iterator[Record]:
    if _is_json_lines(path):
        yield from _json_lines(path)
        return
    data = _open_dataset(path, split)
    if isinstance(data, list):
        for f in data:
            yield from _json_lines(f)
    else:
        yield from _table_rows(data, source, (path if path.is_dir() else path.parent).resolve())


def load_rows_with_report(
    path: str | Path, *, max_rows: Optional[int] = None, on_bad_row: str = "error", model_path: Optional[str] = None,
    prompt_max_len: Optional[int] = None, cache_dir: Optional[str | Path] = None, **options: Any,
) -> tuple[list[PromptRow], LoadReport]:  # fmt: skip
    """The checked rows of a data source and what was skipped.

    `options`: input_key, label_key, min_pixels, max_pixels, check_gold (see `RowParser`). With `model_path` and
    `prompt_max_len`, rows whose prompt has more tokens (images included) are bad rows of reason "too_long".
    Embedded and fetched images go to `cache_dir` (default: `.image_cache` beside the data).
    """
    if on_bad_row not in ("error", "skip"):
        raise ValueError(f"on_bad_row must be 'error' or 'skip', got {on_bad_row!r}")
    if (model_path is None) != (prompt_max_len is None):
        raise ValueError("the prompt length check needs both model_path and prompt_max_len")
    where, split = _locate(path)
    root = (where if where.is_dir() else where.parent).resolve()
    parser = RowParser(cache_dir=Path(cache_dir) if cache_dir else root / ".image_cache",
                       prompt_length=prompt_length(str(model_path)) if model_path else None,
                       prompt_max_len=prompt_max_len, **options)  # fmt: skip
    report, rows = LoadReport(str(path)), []
    for record in _records(where, split, str(path)):
        try:
            obj = _decode_line(record.raw, record.where) if isinstance(record.raw, bytes) else record.raw
            rows.append(parser.parse(obj, record))
        except RowError as e:
            if on_bad_row == "error":
                raise
            report.add(e)
        if max_rows is not None and len(rows) >= max_rows:
            break
    report.kept = len(rows)
    if not rows:
        raise DataError(f"{path}: no usable rows{report._dropped()}; expected at least one")
    return rows, report


def load_options(cfg: Any) -> dict[str, Any]:
    """The keyword arguments of `load_rows(_with_report)` a run's `Config` asks for. Gold answers are checked with
    math-verify only for the math reward, the one that parses them."""
    d = cfg.data
    return {"input_key": d.input_key, "label_key": d.label_key, "min_pixels": d.min_pixels,
            "max_pixels": d.max_pixels, "on_bad_row": d.on_bad_row, "model_path": cfg.model.path,
            "prompt_max_len": d.prompt_max_len, "check_gold": cfg.reward.fn == "lmmr1_math"}  # fmt: skip


def load_rows(path: str | Path, **kwargs: Any) -> list[PromptRow]:
    """`load_rows_with_report` without the report."""
    return load_rows_with_report(path, **kwargs)[0]


def count_rows(path: str | Path) -> int:
    """Rows of a data source before any check (blank lines of JSON lines files do not count)."""
    where, split = _locate(path)
    if _is_json_lines(where):
        return _count_lines(where)
    data = _open_dataset(where, split)
    return sum(_count_lines(f) for f in data) if isinstance(data, list) else data.num_rows


def _count_lines(path: Path) -> int:
    with path.open("rb") as f:
        return sum(1 for line in f if line.strip())


# ------------------------------------------------------------------------------------------------ sampling


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
