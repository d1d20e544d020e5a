import json

import pytest

from shared.data import DataError, PromptSampler, load_rows


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
    "line, message",
    [
        ("not json", "not valid JSON"),
        ('{"answer": "1"}', "missing key 'message'"),
        ('{"message": "[bad", "answer": "1"}', "not a JSON message list"),
        ('{"message": [{"role": "robot", "content": "x"}], "answer": "1"}', "role in"),
        ('{"message": [{"role": "user", "content": [{"type": "image", "image": "missing.png"}]}], "answer": "1"}',
         "missing.png does not exist"),
        ('{"message": [{"role": "user", "content": "hi"}]}', "missing label key 'answer'"),
    ],
)
def test_bad_rows_name_file_and_line(tmp_path, line, message):
    path = tmp_path / "d.jsonl"
    good = json.dumps({"message": [{"role": "user", "content": "1+1?"}], "answer": "2"})
    path.write_text(good + "\n" + line + "\n")
    with pytest.raises(DataError) as e:
        load_rows(path)
    assert f"{path}:2" in str(e.value) and message in str(e.value)


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

    import numpy as np
    from PIL import Image

    from shared.synthetic import write_split

    path = write_split(tmp_path, "img", 12, seed=3, kind="image", max_operand=9, image_tasks=("count_add",))
    for row in load_rows(path):
        question = row.messages[1]["content"][0]["text"]
        b = int(re.search(r"plus (\d+)\?$", question).group(1))
        pixels = np.asarray(Image.open(row.image_paths[0]).convert("RGB"))
        half = pixels.shape[0] // 2
        quadrants = [pixels[y:y + half, x:x + half] for y in (0, half) for x in (0, half)]
        drawn = sum(bool((q != 255).any()) for q in quadrants)
        assert 1 <= b <= 9 and int(row.label) == drawn + b
        assert row.extra["solution"].endswith(f"$\\boxed{{{drawn + b}}}$</answer>")


def test_unknown_image_task_is_named(tmp_path):
    from shared.synthetic import write_split

    with pytest.raises(ValueError, match="'spot'.*count_add"):
        write_split(tmp_path, "img", 2, seed=0, kind="image", image_tasks=("spot",))
