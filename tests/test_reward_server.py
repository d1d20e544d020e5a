"""The HTTP reward server and its client, speaking the reference's /get_reward protocol."""
import json
import signal
import socket
import subprocess
import sys
import threading
import urllib.error
import urllib.request

import pytest

from shared.rewards import RemoteReward, RewardPool, get_reward_fn, make_scorer
from shared.rewards.client import RewardServerError
from shared.rewards.server import RewardServer

GOOD = "<|im_start|>user\nq<|im_end|>\n<|im_start|>assistant\n<think>x</think><answer>$\\boxed{2}$</answer><|im_end|>"
NO_FORMAT = "<|im_start|>assistant\nso the answer is $\\boxed{3}$<|im_end|>"


@pytest.fixture(scope="module")
def url():
    with RewardPool(get_reward_fn("lmmr1_math"), num_workers=1, timeout_s=10.0) as pool:
        server = RewardServer(("127.0.0.1", 0), pool)
        thread = threading.Thread(target=server.serve_forever, daemon=True)
        thread.start()
        yield f"http://127.0.0.1:{server.server_port}/get_reward"
        server.shutdown()
        server.server_close()


def _post(url, body: bytes):
    request = urllib.request.Request(url, data=body, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=30) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def test_reference_wire_format(url):
    body = {"query": [GOOD, NO_FORMAT, GOOD], "prompts": ["p"] * 3, "labels": ["2", "3", "5"]}
    status, out = _post(url, json.dumps(body).encode())
    assert status == 200
    assert out == {"rewards": [1.5, 1.0, 0.5], "format_rewards": [0.5, 0.0, 0.5], "acc_rewards": [1.0, 1.0, 0.0]}


def test_client_round_trip(url):
    results = RemoteReward(url).score([GOOD, NO_FORMAT], ["2", "4"])
    assert [(r.total, r.format, r.accuracy) for r in results] == [(1.5, 0.5, 1.0), (0.0, 0.0, 0.0)]
    # a bare host:port means the standard endpoint
    assert RemoteReward(url.rsplit("/", 1)[0]).score([GOOD], ["2"])[0].total == 1.5


@pytest.mark.parametrize(
    "body,message",
    [
        (b"{not json", "not valid JSON"),
        (b"[1, 2]", "JSON object"),
        (json.dumps({"query": ["a"]}).encode(), "labels: expected a list of strings"),
        (json.dumps({"query": ["a", "b"], "labels": ["1"]}).encode(), "one label per query"),
    ],
)
def test_bad_requests_get_400_with_a_message(url, body, message):
    status, out = _post(url, body)
    assert status == 400
    assert message in out["error"]


def test_unknown_path_is_404(url):
    status, out = _post(url.replace("get_reward", "other"), b"{}")
    assert status == 404 and "/get_reward" in out["error"]


def test_client_does_not_retry_a_rejected_request(url):
    client = RemoteReward(url, retries=5, backoff_s=30.0)  # a retry would make this test hang
    with pytest.raises(RewardServerError, match="rejected the request: 400.*list of strings"):
        client.score([1], ["2"])


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_client_gives_up_after_retries_with_a_clear_message():
    client = RemoteReward(f"http://127.0.0.1:{_free_port()}/get_reward", timeout_s=2.0, retries=3, backoff_s=0.01)
    with pytest.raises(RewardServerError, match=r"failed 3 attempts; last error: .*(refused|URLError)"):
        client.score(["q"], ["a"])


def test_client_rejects_bad_arguments():
    with pytest.raises(ValueError, match="http"):
        RemoteReward("localhost:5000")
    with pytest.raises(ValueError, match="one label per query"):
        RemoteReward("http://127.0.0.1:1/get_reward").score(["a", "b"], ["1"])


def test_make_scorer_picks_the_remote_client():
    from shared.config import RewardConfig

    scorer = make_scorer(RewardConfig(remote_url="http://127.0.0.1:5000/get_reward"))
    assert isinstance(scorer, RemoteReward)


def test_command_line_server():
    port = _free_port()
    cmd = [sys.executable, "-m", "shared.rewards.server", "--port", str(port), "--num-workers", "1"]
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True)
    try:
        assert "reward server on http://127.0.0.1" in proc.stderr.readline()
        client = RemoteReward(f"http://127.0.0.1:{port}/get_reward", timeout_s=30.0, retries=5, backoff_s=0.2)
        assert client.score([GOOD], ["2"])[0].total == 1.5
    finally:
        proc.send_signal(signal.SIGTERM)  # the server closes its worker pool and exits
        try:
            assert proc.wait(timeout=60) == 0
        except subprocess.TimeoutExpired:
            proc.kill()
            raise
