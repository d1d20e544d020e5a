import json

import pytest

from shared.data import DataError, PromptSampler, RowError, load_rows, load_rows_with_report, skip_metrics


def test_synthetic_rows_load_with_images_and_pixel_bounds(synth_data):
    rows = load_rows(synth_data["image_train"], min_pixels=3136, max_pixels=12544)
    assert len(rows) == 24
    row = rows[0]
    assert row.label.isdigit() and len(row.image_paths) == 1
    item = row.messages[1]["content"][1]
    assert item["image"] == row.image_paths[0] and item["min_pixels"] == 3136 and item["max_pixels"] == 12544
    assert row.extra["solution"].startswith("<think>")
    assert all(not r.image_paths for r in load_rows(synth_data["text_train"]))


@pytest.mark.parametrize(
    "line, message, reason",
    [
        ("not json", "not valid JSON", "malformed"),
        ('{"answer": "1"}', "missing key 'message'", "malformed"),
        ('{"message": "[bad", "answer": "1"}', "not a JSON message list", "malformed"),
        ('{"message": [{"role": "robot", "content": "x"}], "answer": "1"}', "role in", "malformed"),
        ('{"message": [{"role": "user", "content": [{"type": "video", "video": "v.mp4"}]}], "answer": "1"}',
         "neither text nor image", "malformed"),
        ('{"message": [{"role": "user", "content": [{"type": "image", "image": "missing.png"}]}], "answer": "1"}',
         "missing.png does not exist", "image"),
        ('{"message": [{"role": "user", "content": "hi"}]}', "missing label key 'answer'", "malformed"),
        ('{"message": [{"role": "user", "content": "hi"}], "answer": ""}', "gold answer is empty", "gold"),
        ('{"message": [{"role": "user", "content": "hi"}], "answer": null}', "gold answer is empty", "gold"),
        ('{"message": [{"role": "user", "content": "hi"}], "answer": "$"}', "cannot parse the gold answer '$'", "gold"),
        ('{"message": [{"role": "user", "content": "hi"}], "answer": "\\\\boxed{}"}', "cannot parse the gold", "gold"),
    ],
)  # fmt: skip
def test_bad_rows_name_file_line_and_what_was_expected(tmp_path, line, message, reason):
    path = tmp_path / "d.jsonl"
    good = json.dumps({"message": [{"role": "user", "content": "1+1?"}], "answer": "2"})
    path.write_text(good + "\n" + line + "\n")
    with pytest.raises(RowError) as e:
        load_rows(path)
    assert str(e.value).startswith(f"{path}:2") and message in str(e.value) and "; expected " in str(e.value)
    assert e.value.reason == reason


def test_non_utf8_bytes_are_a_bad_row_naming_line_and_byte(tmp_path):
    path = tmp_path / "d.jsonl"
    good = json.dumps({"message": [{"role": "user", "content": "1+1?"}], "answer": "2"}).encode()
    path.write_bytes(b"\xef\xbb\xbf" + good + b"\n\n" + good.replace(b"1+1?", b"caf\xe9?") + b"\n")
    column = good.index(b"1+1?") + 4  # 1-based column of the byte after "caf"
    with pytest.raises(DataError, match=f"{path}:3: byte 0xe9 at column {column} is not UTF-8; expected UTF-8 text"):
        load_rows(path)
    rows, report = load_rows_with_report(path, on_bad_row="skip")
    assert [r.line for r in rows] == [1] and report.skipped["malformed"] == 1


def test_skip_drops_bad_rows_counts_them_by_reason_and_keeps_the_rest(tmp_path):
    path = tmp_path / "d.jsonl"
    row = lambda answer: json.dumps({"message": [{"role": "user", "content": "q"}], "answer": answer})  # noqa: E731
    missing = {"message": [{"role": "user", "content": [{"type": "image", "image": "nope.png"}]}], "answer": "1"}
    path.write_text("\n".join([row("2"), row(""), "{", row("\\boxed{}"), json.dumps(missing), row("3")]) + "\n")
    rows, report = load_rows_with_report(path, on_bad_row="skip")
    assert [r.label for r in rows] == ["2", "3"] and [r.line for r in rows] == [1, 6]
    assert report.kept == 2 and report.skipped == {"malformed": 1, "gold": 2, "image": 1, "too_long": 0}
    assert report.first["gold"].startswith(f"{path}:2: ") and "skipped 1 malformed" in report.summary()
    again = load_rows_with_report(path, on_bad_row="skip", max_rows=2)[1]  # stops at the second good row
    assert skip_metrics([report, again]) == {"data/skipped_malformed": 2.0, "data/skipped_gold": 4.0,
                                             "data/skipped_image": 2.0, "data/skipped_too_long": 0.0}  # fmt: skip
    path.write_text(row("") + "\n" + row("$") + "\n")
    with pytest.raises(DataError, match="no usable rows.*skipped 2 gold"):
        load_rows_with_report(path, on_bad_row="skip")
    with pytest.raises(ValueError, match="on_bad_row"):
        load_rows(path, on_bad_row="drop")


def test_sampler_is_resumable_and_mixes_by_weight(synth_data):
    text, image = load_rows(synth_data["text_train"]), load_rows(synth_data["image_train"])
    a = PromptSampler([text, image], [0.75, 0.25], seed=3)
    first = a.take(30)
    state = a.state_dict()
    rest = a.take(40)  # crosses an episode boundary (48 rows per episode)
    b = PromptSampler([text, image], [0.75, 0.25], seed=3)
    b.load_state_dict(state)
    assert [(r.source, r.line) for r in b.take(40)] == [(r.source, r.line) for r in rest]
    frac_text = sum(r in text for r in first + rest) / 70
    assert 0.6 < frac_text < 0.9


def test_count_add_rows_answer_the_drawn_count_plus_the_asked_number(tmp_path):
    import re

    from shared.synthetic import write_split

    path = write_split(tmp_path, "img", 12, seed=3, kind="image", max_operand=9, image_tasks=("count_add",))
    for row in load_rows(path):
        question = row.messages[1]["content"][0]["text"]
        b = int(re.search(r"plus (\d+)\?$", question).group(1))
        drawn = _drawn_squares(row.image_paths[0])
        assert 1 <= b <= 9 and int(row.label) == drawn + b
        assert row.extra["solution"].endswith(f"$\\boxed{{{drawn + b}}}$</answer>")


def _drawn_squares(image_path) -> int:
    import numpy as np
    from PIL import Image

    pixels = np.asarray(Image.open(image_path).convert("RGB"))
    half = pixels.shape[0] // 2
    return sum(bool((pixels[y:y + half, x:x + half] != 255).any()) for y in (0, half) for x in (0, half))


BOXED = "<answer>The answer is $\\boxed{{{}}}$</answer>"


def test_slipped_solutions_box_the_first_number_and_miss_squares_but_labels_stay_right(tmp_path):
    import re

    from shared.synthetic import write_split

    for row in load_rows(write_split(tmp_path, "t", 50, seed=5, kind="text", max_operand=9, ops="+", slip=1.0)):
        a, b = map(int, re.search(r"What is (\d+) \+ (\d+)\?", row.messages[1]["content"][0]["text"]).groups())
        assert int(row.label) == a + b
        assert row.extra["solution"] == f"<think>{a} + {b} = {a + b}</think>{BOXED.format(a)}"
    images = load_rows(write_split(tmp_path, "i", 60, seed=5, kind="image", max_operand=9,
                                   image_tasks=("count_add",), slip=1.0))  # fmt: skip
    counts = set()
    for row in images:
        k = _drawn_squares(row.image_paths[0])
        b = int(re.search(r"plus (\d+)\?$", row.messages[1]["content"][0]["text"]).group(1))
        seen = k - 1 if k >= 3 else k
        counts.add(k)
        assert int(row.label) == k + b
        assert row.extra["solution"].startswith(f"<think>I count {seen} ")
        assert row.extra["solution"].endswith(f"{seen} + {b} = {seen + b}</think>{BOXED.format(seen)}")
    assert counts == {1, 2, 3, 4}


def test_slip_is_the_chance_of_each_mistake_and_zero_changes_nothing(tmp_path):
    from shared.synthetic import write_split

    rows = load_rows(write_split(tmp_path, "t", 2000, seed=1, kind="text", max_operand=9, ops="+", slip=0.6))
    wrong = [r for r in rows if not r.extra["solution"].endswith(f"{{{r.label}}}$</answer>")]
    assert 0.55 < len(wrong) / len(rows) < 0.65
    assert all(f"= {r.label}</think>" in r.extra["solution"] for r in rows)  # the working itself stays right
    plain = write_split(tmp_path / "a", "s", 50, seed=2, kind="image", image_tasks=("count_add", "sum"))
    zero = write_split(tmp_path / "b", "s", 50, seed=2, kind="image", image_tasks=("count_add", "sum"), slip=0.0)
    assert plain.read_text() == zero.read_text()
    with pytest.raises(ValueError, match="slip: expected a probability"):
        write_split(tmp_path, "t", 1, seed=0, kind="text", slip=1.5)


def test_synthetic_cli_reports_a_bad_slip_as_a_usage_error(tmp_path, capsys):
    from shared.synthetic import main

    with pytest.raises(SystemExit) as exit_info:
        main(["--out", str(tmp_path / "d"), "--train", "2", "--test", "1", "--slip", "1.5"])
    assert exit_info.value.code == 2
    assert "slip: expected a probability in [0, 1], got 1.5" in capsys.readouterr().err


def test_unknown_image_task_is_named(tmp_path):
    from shared.synthetic import write_split

    with pytest.raises(ValueError, match="'spot'.*count_add"):
        write_split(tmp_path, "img", 2, seed=0, kind="image", image_tasks=("spot",))
