"""The LMM-R1 math reward, its registry, and the time-bounded worker pool."""
import functools
import os
import signal
import threading
import time

import pytest

from shared.rewards import RewardPool, RewardResult, get_reward_fn, is_timeout, lmmr1
from shared.rewards.lmmr1 import GoldError, extract_response, format_score, lmmr1_math

T = "<think>x</think>"

# (response, gold, format, accuracy): the recipe note's test vectors, section 2.1.
RECIPE_VECTORS = [
    (r"<think>1+1=2</think><answer>The answer is $\boxed{2}$</answer>", "2", 0.5, 1.0),
    (r"<think>1+1=2</think> <answer>The answer is $\boxed{2}$</answer>", "2", 0.0, 1.0),
    (r"<think>try \boxed{3}</think><answer>$\boxed{2}$</answer>", "2", 0.5, 1.0),
    (r"<think>x</think><answer>\boxed{2}</answer> then \boxed{5}", "2", 0.0, 0.0),
    (r"<think>x</think><answer>2</answer>", "2", 0.5, 0.0),
    (r"<think>x</think><answer>The answer is $2$</answer>", "2", 0.5, 1.0),
    (T + r"<answer>$\boxed{A}$</answer>", r"$\boxed{A}$", 0.5, 1.0),
    (T + r"<answer>$\boxed{B}$</answer>", r"$\boxed{A}$", 0.5, 0.0),
    (T + r"<answer>$\boxed{\frac{1}{2}}$</answer>", "0.5", 0.5, 1.0),
    (T + r"<answer>$\boxed{60^\circ}$</answer>", "60", 0.5, 1.0),
    (T + r"<answer>$\boxed{x=3}$</answer>", "3", 0.5, 1.0),
]

MORE_VECTORS = [
    # multiple choice: letters are symbols, so only a boxed/anchored letter counts
    (T + r"<answer>\boxed{C}</answer>", "C", 0.5, 1.0),
    (T + r"<answer>The answer is C</answer>", "C", 0.5, 0.0),
    (T + r"<answer>\boxed{D}</answer>", r"$\boxed{C}$", 0.5, 0.0),
    # fractions and decimals
    (T + r"<answer>$\boxed{\frac{3}{4}}$</answer>", r"\frac{3}{4}", 0.5, 1.0),
    (T + r"<answer>$\boxed{0.75}$</answer>", r"\frac{3}{4}", 0.5, 1.0),
    (T + r"<answer>$\boxed{\dfrac{6}{8}}$</answer>", "0.75", 0.5, 1.0),
    (T + r"<answer>$\boxed{\frac{2}{3}}$</answer>", r"\frac{3}{4}", 0.5, 0.0),
    # degrees
    (T + r"<answer>$\boxed{45^{\circ}}$</answer>", r"45^\circ", 0.5, 1.0),
    (T + r"<answer>$\boxed{30^\circ}$</answer>", "45", 0.5, 0.0),
    # a wrong boxed answer is not rescued by a right one in the text
    (T + r"<answer>The answer is $\boxed{7}$, not 2</answer>", "2", 0.5, 0.0),
    # malformed responses
    ("", "2", 0.0, 0.0),
    (r"\boxed{", "2", 0.0, 0.0),
    (r"<think><think>x</think><answer>\boxed{2}</answer>", "2", 0.0, 1.0),
    (r"<think>x</think><answer>\boxed{2}</answer><answer>\boxed{2}</answer>", "2", 0.0, 1.0),
    (r"<answer>\boxed{2}</answer>", "2", 0.0, 1.0),
    (r"<think>x</think><answer>\boxed{2}</answer>trailing", "2", 0.0, 1.0),
    (r"garbage {{{ \frac{ $$ \boxed{\sqrt{}}", "2", 0.0, 0.0),
]


@pytest.mark.parametrize("response,gold,fmt,acc", RECIPE_VECTORS + MORE_VECTORS)
def test_vectors(response, gold, fmt, acc):
    r = lmmr1_math(response, gold)
    assert (r.format, r.accuracy, r.total) == (fmt, acc, fmt + acc)
    assert r.error is None


@pytest.mark.parametrize("gold", ["", "  ", "None", "\\boxed{}", "\\"])
def test_unparsable_gold_is_an_error_not_a_score(gold):
    # the reference scores such a sample 1.0 whatever the response: a reward that teaches nothing
    with pytest.raises(GoldError):
        lmmr1_math(T + "<answer>\\boxed{5}</answer>", gold)


def test_extraction_from_full_chatml_sequence():
    pad = "<|endoftext|>" * 3
    query = (
        f"{pad}<|im_start|>system\nSolve.<|im_end|>\n<|im_start|>user\nWhat is 1+1?<|im_end|>\n"
        f"<|im_start|>assistant\n<think>1+1=2</think><answer>$\\boxed{{2}}$</answer><|im_end|>{pad}"
    )
    assert extract_response(query) == "<think>1+1=2</think><answer>$\\boxed{2}$</answer>"
    assert lmmr1_math(query, "2").total == 1.5


def test_extraction_uses_first_assistant_turn_and_strips_end_tokens():
    first = "<|im_start|>assistant\n"
    query = f"p{first} <think>a</think><answer>b</answer><｜end▁of▁sentence｜><end_of_turn>\n"
    assert extract_response(query) == "<think>a</think><answer>b</answer>"
    assert extract_response(f"p{first}x{first}y") == f"x{first}y"
    assert extract_response("  no prefix here<|im_end|> ") == "no prefix here"


def test_prompt_content_is_not_scored():
    # the prompt's own example answer must not count: only the text after the assistant prefix is parsed
    query = "<|im_start|>user\nthe answer is $\\boxed{2}$<|im_end|>\n<|im_start|>assistant\n<think>x</think><answer>no</answer>"
    assert lmmr1_math(query, "2").accuracy == 0.0


def test_format_reward_can_be_disabled():
    fn = get_reward_fn("lmmr1_math", format_reward=False)
    r = fn(RECIPE_VECTORS[0][0], "2")
    assert (r.format, r.accuracy, r.total) == (0.0, 1.0, 1.0)


def test_format_needs_exact_structure():
    assert format_score("<think>a\nb</think><answer>c\nd</answer>") == 0.5  # newlines inside are fine
    assert format_score("<think>a</think>\n<answer>c</answer>") == 0.0
    assert format_score("<think>a</think><answer>c</answer>\n") == 0.0  # \Z: nothing after </answer>


def test_registry_builtin_and_import_path():
    assert get_reward_fn("lmmr1_math").func is lmmr1_math
    fn = get_reward_fn("shared.rewards.lmmr1:lmmr1_math", format_reward=False)
    assert fn.keywords == {"format_reward": False}
    assert get_reward_fn("operator:add") is __import__("operator").add


def test_registry_errors_name_the_choices():
    with pytest.raises(ValueError, match="lmmr1_math.*package.module:function"):
        get_reward_fn("nope")
    with pytest.raises(ValueError, match="cannot import module"):
        get_reward_fn("no_such_module_xyz:fn")
    with pytest.raises(ValueError, match="has no function 'missing'"):
        get_reward_fn("shared.rewards.lmmr1:missing")
    with pytest.raises(ValueError, match="no format_reward parameter"):
        get_reward_fn("operator:add", format_reward=False)


# --------------------------------------------------------------------------- pool

NESTED = T + "<answer>$\\boxed{" + "\\frac{1}{" * 5000 + "2" + "}" * 5001 + "}$</answer>"
HUGE = "<think>" + "step $x$ so the answer: $\\frac{1}{2}$ " * 120_000 + "</think><answer>$\\boxed{2}$</answer>"


@pytest.fixture(scope="module")
def pool():
    with RewardPool(get_reward_fn("lmmr1_math"), num_workers=2, timeout_s=3.0, error_reward=-1.0) as p:
        yield p


def test_pool_bounds_pathological_inputs_and_keeps_order(pool):
    good, bad = RECIPE_VECTORS[0][0], RECIPE_VECTORS[4][0]
    queries = [good, NESTED, bad, HUGE, good]
    before = dict(pool.stats)
    start = time.monotonic()
    results = pool.score(queries, ["2", "2", "2", "2", "3"])
    assert time.monotonic() - start < 30
    assert len(HUGE) > 4_000_000
    assert [r.total for r in results] == [1.5, -1.0, 0.5, 1.5, 0.5]
    assert results[1].error.startswith("timed out") and is_timeout(results[1])
    assert not any(is_timeout(r) for r in results[:1] + results[2:])
    assert pool.stats["timeouts"] - before["timeouts"] == 1
    assert pool.stats["restarts"] - before["restarts"] == 1
    # the replacement worker scores normally
    assert [r.total for r in pool.score([good] * 3, ["2"] * 3)] == [1.5] * 3


def test_pool_returns_a_bad_gold_as_an_error(pool):
    results = pool.score([RECIPE_VECTORS[0][0]] * 2, ["", "2"])
    assert (results[0].total, results[1].total) == (-1.0, 1.5)
    assert results[0].error.startswith("GoldError: the gold answer is empty") and not is_timeout(results[0])
    assert results[1].error is None


def test_pool_from_another_thread(pool):
    out = []
    thread = threading.Thread(target=lambda: out.append(pool.score([RECIPE_VECTORS[2][0]], ["2"])))
    thread.start()
    thread.join(60)
    assert out and out[0][0].total == 1.5


def test_pool_empty_batch_and_length_mismatch(pool):
    assert pool.score([], []) == []
    with pytest.raises(ValueError, match="one label per query"):
        pool.score(["a"], [])


def _crash_on_boom(query: str, label: str) -> RewardResult:
    if query == "boom":
        os._exit(3)
    if query == "raise":
        raise ZeroDivisionError("no")
    if query == "wrong type":
        return 1.0
    if query == "nan":
        return RewardResult(float("nan"), 0.0, 0.0)
    return RewardResult(1.0, 0.0, 1.0)


def test_pool_counts_errors_and_survives_crashes():
    with RewardPool(_crash_on_boom, num_workers=1, timeout_s=20.0, error_reward=0.25) as p:
        results = p.score(["ok", "raise", "boom", "wrong type", "nan", "ok"], [""] * 6)
        assert [r.total for r in results] == [1.0, 0.25, 0.25, 0.25, 0.25, 1.0]
        assert "ZeroDivisionError" in results[1].error
        assert "exited with code 3, twice on this item" in results[2].error  # retried once on a fresh worker
        assert "must return RewardResult" in results[3].error
        assert "non-finite total nan" in results[4].error
        assert not any(map(is_timeout, results))
        assert p.stats == {"items": 6, "errors": 4, "timeouts": 0, "restarts": 2, "retries": 1}


def _killed_once(query: str, marker: str) -> RewardResult:
    """Scores len(query); the item "victim" first parks its worker, named in `marker`, for the test to kill."""
    if query == "victim" and not os.path.exists(marker):
        with open(marker + ".tmp", "w") as f:
            f.write(str(os.getpid()))
        os.replace(marker + ".tmp", marker)  # the test never reads a half-written pid
        time.sleep(120)
    return RewardResult(float(len(query)), 0.0, float(len(query)))


def test_pool_rescores_the_item_of_a_killed_worker(tmp_path):
    marker = tmp_path / "victim.pid"
    queries = ["a", "bb", "victim", "dddd", "eeeee", "ffffff", "g"]
    out = []
    with RewardPool(_killed_once, num_workers=2, timeout_s=100.0) as p:
        scoring = threading.Thread(target=lambda: out.append(p.score(queries, [str(marker)] * len(queries))))
        scoring.start()
        deadline = time.monotonic() + 60
        while not marker.exists() and time.monotonic() < deadline:
            time.sleep(0.01)
        os.kill(int(marker.read_text()), signal.SIGKILL)  # as the OOM killer would
        scoring.join(90)
        stats = dict(p.stats)
    (results,) = out  # one result per sample, each the sample's own
    assert [r.total for r in results] == [float(len(q)) for q in queries]
    assert all(r.error is None for r in results)
    assert stats == {"items": len(queries), "errors": 0, "timeouts": 0, "restarts": 1, "retries": 1}


def test_pool_rejects_unpicklable_fn_and_bad_arguments():
    with pytest.raises(ValueError, match="module-level function"):
        RewardPool(lambda q, l: RewardResult(0, 0, 0), num_workers=1)
    with pytest.raises(ValueError, match="num_workers"):
        RewardPool(lmmr1.lmmr1_math, num_workers=0)


def test_pool_reports_a_worker_that_cannot_start():
    p = RewardPool(functools.partial(_needs_missing_module, dep=_Unloadable()), num_workers=1, timeout_s=5.0)
    with pytest.raises(RuntimeError, match="failed to start"):
        p.score(["x"], ["y"])
    with pytest.raises(RuntimeError, match="closed"):
        p.score(["x"], ["y"])


class _Unloadable:
    """Pickles fine but cannot be unpickled in the worker: a stand-in for a reward module that fails to import."""

    def __reduce__(self):
        return (__import__, ("no_such_module_xyz",))


def _needs_missing_module(query, label, dep=None):
    return RewardResult(0.0, 0.0, 0.0)
