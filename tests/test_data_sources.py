"""Data sources beyond one JSONL file (Parquet, `datasets` directories), image sources, bad images and prompt length."""
from __future__ import annotations

import base64
import functools
import http.server
import io
import json
import socket
import struct
import threading
import zlib
from pathlib import Path

import datasets
import numpy as np
import pytest
from PIL import Image

from shared import images
from shared.data import (
    DataError,
    PromptLength,
    RowError,
    count_rows,
    load_options,
    load_rows,
    load_rows_with_report,
    parse_row,
)
from shared.synthetic import write_split


@pytest.fixture(autouse=True)
def hf_cache(tmp_path, monkeypatch):
    """Data sets `datasets` prepares (Parquet to Arrow) are cached under the test's directory, not the user's."""
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf_cache")


def _png(path: Path, size=(80, 60), seed=0) -> Path:
    rng = np.random.default_rng(seed)
    Image.fromarray((rng.random((size[1], size[0], 3)) * 255).astype(np.uint8)).save(path)
    return path


def _row(content, answer="2") -> dict:
    return {"message": [{"role": "user", "content": content}], "answer": answer}


def _jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def _image_item(ref) -> list:
    return [{"type": "text", "text": "How many?"}, {"type": "image", "image": ref}]


# ------------------------------------------------------------------------------------------------ formats


def test_parquet_rows_equal_the_jsonl_rows_and_errors_name_the_row(tmp_path):
    jsonl = write_split(tmp_path, "img", 6, seed=1, kind="image")
    objs = [json.loads(line) for line in jsonl.read_text().splitlines()]
    datasets.Dataset.from_list(objs).to_parquet(str(tmp_path / "img.parquet"))
    want, got = load_rows(jsonl), load_rows(tmp_path / "img.parquet")
    assert [(r.messages, r.label, r.image_paths, r.extra) for r in got] == [
        (r.messages, r.label, r.image_paths, r.extra) for r in want]  # fmt: skip
    assert [(r.source, r.line) for r in got] == [(str(tmp_path / "img.parquet"), i) for i in range(6)]
    assert count_rows(tmp_path / "img.parquet") == 6
    objs[2]["answer"] = "$"
    datasets.Dataset.from_list(objs).to_parquet(str(tmp_path / "bad.parquet"))
    with pytest.raises(RowError, match=f"{tmp_path / 'bad.parquet'}:row 2: math-verify cannot parse"):
        load_rows(tmp_path / "bad.parquet")


def test_arrow_null_keys_are_dropped_so_a_text_item_stays_text(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    _png(tmp_path / "a.png")
    rows = [_row(_image_item("a.png")), _row([{"type": "text", "text": "Only text"}], answer="3")]
    table = pa.Table.from_pylist(rows)  # one struct type for all items: the text item gains "image": null
    assert table.to_pylist()[0]["message"][0]["content"][0]["image"] is None
    pq.write_table(table, tmp_path / "d.parquet")
    first, second = load_rows(tmp_path / "d.parquet")
    assert first.messages[0]["content"][0] == {"type": "text", "text": "How many?"}
    assert first.image_paths == [str(tmp_path / "a.png")] and second.image_paths == []


def test_jsonl_rows_are_read_as_written(tmp_path):
    # What the `datasets` JSON builder would change: null keys added to items (a blank line is enough to make it
    # build one struct type) and string labels decoded as JSON.
    _png(tmp_path / "a.png")
    path = _jsonl(tmp_path / "d.jsonl", [_row(_image_item("a.png"), "2.50"), "", _row([{"type": "text", "text": "t"}])])
    first, second = load_rows(path)
    assert first.label == "2.50" and first.messages[0]["content"][0] == {"type": "text", "text": "How many?"}
    assert second.messages[0]["content"] == [{"type": "text", "text": "t"}] and second.line == 3


def test_a_saved_dataset_dict_needs_a_split_and_embedded_images_are_cached(tmp_path):
    from datasets import Features, List, Value
    from datasets import Image as ImageFeature

    png = _png(tmp_path / "a.png").read_bytes()
    item = {"type": Value("string"), "text": Value("string"), "image": ImageFeature()}
    features = Features({"message": List({"role": Value("string"), "content": List(item)}), "answer": Value("string")})
    content = [{"type": "text", "text": "How many?", "image": None},
               {"type": "image", "text": None, "image": {"bytes": png, "path": None}}]  # fmt: skip
    rows = {"message": [[{"role": "user", "content": content}]] * 3, "answer": ["1", "2", "3"]}
    split = datasets.Dataset.from_dict(rows, features=features)
    datasets.DatasetDict({"train": split, "test": split.select([1])}).save_to_disk(str(tmp_path / "saved"))
    with pytest.raises(DataError, match="has splits train, test; expected one named as .*saved:<split>"):
        load_rows(tmp_path / "saved")
    with pytest.raises(DataError, match="no split 'dev'; expected one of train, test"):
        load_rows(f"{tmp_path / 'saved'}:dev")
    (row,) = load_rows(f"{tmp_path / 'saved'}:test")
    assert row.label == "2" and row.source == f"{tmp_path / 'saved'}:test" and row.line == 0
    assert Path(row.image_paths[0]).read_bytes() == png and Path(row.image_paths[0]).parent.name == ".image_cache"
    assert row.messages[0]["content"][0] == {"type": "text", "text": "How many?"}
    assert count_rows(f"{tmp_path / 'saved'}:train") == 3 and count_rows(f"{tmp_path / 'saved'}:test") == 1


def test_load_dataset_directories_of_parquet_and_of_jsonl_files(tmp_path):
    pq_dir, json_dir = tmp_path / "pq", tmp_path / "js"
    pq_dir.mkdir(), json_dir.mkdir()
    good = [_row("1+1?"), _row("2+2?", "4")]
    datasets.Dataset.from_list(good).to_parquet(str(pq_dir / "train-00000-of-00001.parquet"))
    datasets.Dataset.from_list(good[:1]).to_parquet(str(pq_dir / "test-00000-of-00001.parquet"))
    assert [r.label for r in load_rows(f"{pq_dir}:train")] == ["2", "4"] and count_rows(f"{pq_dir}:test") == 1
    _jsonl(json_dir / "train.jsonl", good)
    _jsonl(json_dir / "test.jsonl", [good[0], "", "{broken"])
    assert [r.line for r in load_rows(f"{json_dir}:train")] == [1, 2] and count_rows(f"{json_dir}:test") == 2
    with pytest.raises(RowError, match=f"{json_dir / 'test.jsonl'}:3: not valid JSON"):
        load_rows(f"{json_dir}:test")


def test_unknown_formats_and_missing_sources_are_named(tmp_path):
    (tmp_path / "d.xyz").write_text("?")
    with pytest.raises(DataError, match="d.xyz: the datasets library cannot read it"):
        load_rows(tmp_path / "d.xyz")
    with pytest.raises(DataError, match="data file .*nope.jsonl does not exist"):
        count_rows(tmp_path / "nope.jsonl")


# ------------------------------------------------------------------------------------------- image sources


@pytest.fixture
def http_root(tmp_path, monkeypatch):
    """A directory served over http on 127.0.0.1, and its URL."""
    monkeypatch.setenv("no_proxy", "127.0.0.1")
    root = tmp_path / "www"
    root.mkdir()

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Quiet, directory=str(root)))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield root, f"http://127.0.0.1:{server.server_port}"
    server.shutdown()
    server.server_close()


def test_every_image_source_becomes_a_local_file_with_the_same_bytes(tmp_path, http_root):
    www, url = http_root
    png = _png(tmp_path / "a.png").read_bytes()
    (www / "b.png").write_bytes(png)
    data_uri = "data:image/png;base64," + base64.b64encode(png).decode()
    content = [
        {"type": "image", "image": "a.png"},
        {"type": "image", "image": f"file://{tmp_path / 'a.png'}"},
        {"type": "image", "image": data_uri},
        {"type": "image", "image": f"{url}/b.png"},
        {"type": "image_url", "image_url": {"url": f"{url}/b.png"}},  # OpenAI's form
        {"type": "image_url", "image_url": data_uri},  # qwen_vl_utils' form
        {"type": "text", "text": "Same?"},
    ]
    (row,) = load_rows(_jsonl(tmp_path / "d.jsonl", [_row(content)]), min_pixels=3136, max_pixels=12544)
    assert len(row.image_paths) == 6 and all(Path(p).read_bytes() == png for p in row.image_paths)
    items = row.messages[0]["content"][:6]
    assert all(it == {"type": "image", "image": p, "min_pixels": 3136, "max_pixels": 12544}
               for it, p in zip(items, row.image_paths))  # fmt: skip
    (www / "b.png").unlink()  # fetched once: a second load reads the cache
    assert load_rows(tmp_path / "d.jsonl")[0].image_paths[3] == row.image_paths[3]


def test_unreachable_urls_are_bad_rows_naming_the_url(tmp_path, http_root, monkeypatch):
    _, url = http_root
    path = _jsonl(tmp_path / "d.jsonl", [_row(_image_item(f"{url}/missing.png"))])
    expected = rf"{path}:1: message 0: cannot fetch image {url}/missing.png \(HTTP Error 404: File not found\); "
    with pytest.raises(RowError, match=expected) as e:
        load_rows(path)
    assert e.value.reason == "image"
    monkeypatch.setattr(images, "FETCH_TIMEOUT_S", 0.3)
    with socket.create_server(("127.0.0.1", 0)) as silent:  # accepts connections, never answers
        port = silent.getsockname()[1]
        _jsonl(path, [_row(_image_item(f"http://127.0.0.1:{port}/x.png"))])
        with pytest.raises(RowError, match=f"{path}:1: .*cannot fetch image .*timed out.*within 0.3 s"):
            load_rows(path)


def test_datasets_image_values_and_pil_images_are_accepted(tmp_path):
    png = _png(tmp_path / "a.png").read_bytes()
    content = [{"type": "image", "image": {"bytes": png, "path": "ignored.png"}},
               {"type": "image", "image": {"bytes": None, "path": "a.png"}},
               {"type": "image", "image": Image.open(io.BytesIO(png))}]  # fmt: skip
    row = parse_row(_row(content), source=str(tmp_path / "d.jsonl"), line=1)
    cached, relative, encoded = map(Path, row.image_paths)
    assert cached.read_bytes() == png and relative == tmp_path / "a.png"
    assert np.array_equal(np.asarray(Image.open(encoded)), np.asarray(Image.open(relative)))  # PIL: saved as PNG


# ---------------------------------------------------------------------------------------------- bad images


def _png_claiming(path: Path, width: int, height: int) -> Path:
    """A PNG whose header claims width x height (checksum fixed), as a decompression bomb's does."""
    buf = io.BytesIO()
    Image.new("L", (1, 1)).save(buf, "PNG")
    data = bytearray(buf.getvalue())
    data[16:24] = struct.pack(">II", width, height)
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])))
    path.write_bytes(bytes(data))
    return path


def _truncated(path: Path) -> Path:
    data = _png(path, size=(120, 90)).read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return path


BAD_IMAGES = {
    "truncated": (_truncated, "cannot be read .*Truncated"),
    "bomb": (lambda p: _png_claiming(p, 20000, 20000), "is a decompression bomb .*expected at most"),
    "bomb_warning": (lambda p: _png_claiming(p, 10000, 9000), "is a decompression bomb .*expected at most"),
    "aspect": (lambda p: Image.new("RGB", (500, 1)).save(p, "PNG") or p, "is 500x1; expected an aspect ratio of at"),
    "not_an_image": (lambda p: p.write_bytes(b"hello") and p, "cannot be read .*cannot identify image file"),
}


@pytest.mark.parametrize("kind", sorted(BAD_IMAGES))
def test_bad_images_are_named_at_load_and_refused_at_rollout(tmp_path, kind):
    make, message = BAD_IMAGES[kind]
    _png(tmp_path / "ok.png")
    bad = make(tmp_path / "bad.png")
    path = _jsonl(tmp_path / "d.jsonl", [_row(_image_item("ok.png")), _row(_image_item("bad.png"))])
    with pytest.raises(RowError, match=f"{path}:2: image {bad} {message}") as e:
        load_rows(path)
    assert e.value.reason == "image"
    rows, report = load_rows_with_report(path, on_bad_row="skip")
    assert len(rows) == 1 and report.skipped["image"] == 1
    refused = (OSError, ValueError, Image.DecompressionBombError, Image.DecompressionBombWarning)
    with pytest.raises(refused):  # the same checks at rollout
        images.load_image(str(bad), 3136, 12845056)


def test_transparency_is_flattened_onto_white(tmp_path):
    rgba = np.zeros((56, 56, 4), np.uint8)
    rgba[:, :28] = (10, 20, 30, 255)  # left half opaque, right half transparent black
    Image.fromarray(rgba, "RGBA").save(tmp_path / "a.png")
    pixels = np.asarray(images.load_image(str(tmp_path / "a.png"), 3136, 12845056))
    assert (pixels[:, :28] == (10, 20, 30)).all() and (pixels[:, 28:] == 255).all()
    palette = Image.fromarray(rgba[..., :3]).convert("P")
    palette.save(tmp_path / "p.png", transparency=palette.getpixel((40, 0)))
    assert (np.asarray(images.load_image(str(tmp_path / "p.png"), 3136, 12845056))[:, 28:] == 255).all()


# -------------------------------------------------------------------------------------------- prompt length


def test_prompt_length_is_what_the_processor_makes_and_long_prompts_are_bad_rows(tiny_ckpt, tmp_path):
    from rollout_torch.processing import load_processor, messages_to_prompt, process

    for i, size in enumerate([(80, 60), (300, 140), (56, 56)]):
        _png(tmp_path / f"{i}.png", size=size, seed=i)
    content = [{"type": "text", "text": "Compare"}, {"type": "image", "image": "0.png"},
               {"type": "image", "image": "1.png"}, {"type": "text", "text": "and say which is larger."}]  # fmt: skip
    path = _jsonl(tmp_path / "d.jsonl", [_row("What is 1 + 1?"), _row(content), _row(_image_item("2.png"), "7")])
    rows = load_rows(path, min_pixels=3136, max_pixels=50176)
    counter, proc = PromptLength(tiny_ckpt), load_processor(tiny_ckpt)
    lengths = []
    for row in rows:
        prompt = messages_to_prompt(proc, json.loads(json.dumps(row.messages)))
        assert counter.render(row.messages) == prompt.text
        sizes = [images.check_image(p, prompt.min_pixels, prompt.max_pixels) for p in row.image_paths]
        lengths.append(counter(row.messages, sizes))
        assert lengths[-1] == process(proc, [prompt])["input_ids"].shape[1]
    assert lengths[1] > lengths[2] > lengths[0]
    kwargs = {"min_pixels": 3136, "max_pixels": 50176, "model_path": tiny_ckpt}
    assert len(load_rows(path, prompt_max_len=lengths[1], **kwargs)) == 3
    with pytest.raises(RowError, match=f"{path}:2: the prompt has {lengths[1]} tokens .*expected at most "
                                       f"data.prompt_max_len = {lengths[1] - 1}") as e:  # fmt: skip
        load_rows(path, prompt_max_len=lengths[1] - 1, **kwargs)
    assert e.value.reason == "too_long"
    rows, report = load_rows_with_report(path, prompt_max_len=lengths[2] - 1, on_bad_row="skip", **kwargs)
    assert [r.line for r in rows] == [1] and report.skipped["too_long"] == 2


def test_load_options_follow_the_config(tiny_ckpt, tmp_path):
    from shared.config import Config

    cfg = Config()
    cfg.model.path, cfg.data.prompt_max_len, cfg.data.on_bad_row = tiny_ckpt, 40, "skip"
    path = _jsonl(tmp_path / "d.jsonl", [_row("Hi"), _row("Hi " * 40), _row("Hi", "$")])
    rows, report = load_rows_with_report(path, **load_options(cfg))
    assert [r.line for r in rows] == [1] and report.skipped == {"malformed": 0, "gold": 1, "image": 0, "too_long": 1}
    cfg.reward.fn = "my.module:reward"  # labels another reward reads are not math-verify's business
    assert load_options(cfg)["check_gold"] is False
