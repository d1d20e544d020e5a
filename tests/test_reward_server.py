"""The HTTP reward server and its client, speaking the reference's /get_reward protocol."""
import json
import math
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from shared.rewards import RemoteReward, RewardPool, RewardResult, get_reward_fn, is_timeout, make_scorer
from shared.rewards.client import RewardServerError
from shared.rewards.server import RewardServer

GOOD = "<|im_start|>user\nq<|im_end|>\n<|im_start|>assistant\n<think>x</think><answer>$\\boxed{2}$</answer><|im_end|>"
NO_FORMAT = "<|im_start|>assistant\nso the answer is $\\boxed{3}$<|im_end|>"
MAX_BODY = 64 << 10
REQUEST_TIMEOUT_S = 1.5


def _serve(pool: RewardPool, **limits):
    server = RewardServer(("127.0.0.1", 0), pool, **limits)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


@pytest.fixture(scope="module")
def url():
    with RewardPool(get_reward_fn("lmmr1_math"), num_workers=1, timeout_s=10.0) as pool:
        server = _serve(pool, max_body_bytes=MAX_BODY, request_timeout_s=REQUEST_TIMEOUT_S)
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
    assert out == {"rewards": [1.5, 1.0, 0.5], "format_rewards": [0.5, 0.0, 0.5], "acc_rewards": [1.0, 1.0, 0.0],
                   "errors": [None, None, None]}  # fmt: skip


def test_prompts_are_optional(url):
    status, out = _post(url, json.dumps({"query": [GOOD], "labels": ["2"]}).encode())
    assert status == 200 and out["rewards"] == [1.5]


def test_a_sample_that_cannot_be_scored_comes_back_with_its_error(url):
    status, out = _post(url, json.dumps({"query": [GOOD, GOOD], "labels": ["", "2"]}).encode())
    assert status == 200
    assert out["rewards"] == [0.0, 1.5]  # the error reward, not the reference's 1.0 for an unparsable gold
    assert out["errors"][0].startswith("GoldError: the gold answer is empty") and out["errors"][1] is None


def test_client_round_trip(url):
    results = RemoteReward(url).score([GOOD, NO_FORMAT, GOOD], ["2", "4", ""])
    assert [(r.total, r.format, r.accuracy) for r in results[:2]] == [(1.5, 0.5, 1.0), (0.0, 0.0, 0.0)]
    assert results[0].error is None and "GoldError" in results[2].error
    # a bare host:port means the standard endpoint
    assert RemoteReward(url.rsplit("/", 1)[0]).score([GOOD], ["2"])[0].total == 1.5


def test_client_splits_a_batch_into_requests_under_the_size_limit(url):
    padded = GOOD.replace("<think>x", "<think>" + "x" * 4000)
    queries = [padded] * 30  # ~120 KiB in one request, over the server's 64 KiB
    assert len(json.dumps(queries)) > MAX_BODY
    results = RemoteReward(url, batch_size=8).score(queries, ["2"] * 29 + ["3"])
    assert [r.total for r in results] == [1.5] * 29 + [0.5]


# --------------------------------------------------------------------------- hardening


def _raw(url, data: bytes, half_close: bool = False, timeout: float = 30.0):
    """(status, JSON body) of one raw HTTP exchange; the server must answer and close within `timeout`."""
    port = int(url.split(":")[2].split("/")[0])
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall(data)
        if half_close:
            s.shutdown(socket.SHUT_WR)
        reply = b""
        while chunk := s.recv(65536):
            reply += chunk
    head, _, body = reply.partition(b"\r\n\r\n")
    return int(head.split()[1]), json.loads(body)


def _request(body: bytes, length: str | None = "auto", path: str = "/get_reward", method: str = "POST") -> bytes:
    lines = [f"{method} {path} HTTP/1.1", "Host: 127.0.0.1", "Content-Type: application/json"]
    if length is not None:
        lines.append(f"Content-Length: {len(body) if length == 'auto' else length}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


def _json(**fields) -> bytes:
    return json.dumps(fields).encode()


BAD_REQUESTS = {
    "body over the limit": (_request(b"", length=str(MAX_BODY + 1)), 413, "over this server's limit of 65536"),
    "huge Content-Length": (_request(b"", length="99999999999999"), 413, "--max-body-bytes"),
    "non-numeric Content-Length": (_request(b"{}", length="12abc"), 400, "Content-Length: expected a non-negative"),
    "negative Content-Length": (_request(b"{}", length="-5"), 400, "Content-Length: expected a non-negative"),
    "missing Content-Length": (_request(b"{}", length=None), 411, "Content-Length is required"),
    "malformed JSON": (_request(b"{not json"), 400, "not valid JSON"),
    "not an object": (_request(b"[1, 2]"), 400, "JSON object"),
    "query not a list": (_request(_json(query="a", labels=["1"])), 400, "query: expected a list of strings"),
    "query of numbers": (_request(_json(query=[1], labels=["1"])), 400, "query: expected a list of strings"),
    "labels missing": (_request(_json(query=["a"])), 400, "labels: expected a list of strings"),
    "labels not strings": (_request(_json(query=["a"], labels=[1])), 400, "labels: expected a list of strings"),
    "prompts not a list": (_request(_json(query=["a"], labels=["1"], prompts=3)), 400, "prompts: expected a list"),
    "fewer labels": (_request(_json(query=["a", "b"], labels=["1"])), 400, "one label (and prompt) per query"),
    "fewer prompts": (_request(_json(query=["a"], labels=["1"], prompts=[])), 400, "'prompts': 0"),
    "unknown path": (_request(b"{}", path="/other"), 404, "the endpoint is POST /get_reward"),
    "GET": (_request(b"", length=None, method="GET"), 501, "Unsupported method"),
}


@pytest.mark.parametrize("name", BAD_REQUESTS)
def test_bad_requests_get_a_4xx_json_message_and_the_server_keeps_serving(url, name):
    data, code, message = BAD_REQUESTS[name]
    status, out = _raw(url, data)
    assert (status, message in out["error"]) == (code, True), out
    assert _post(url, _json(query=[GOOD], labels=["2"])) == (
        200, {"rewards": [1.5], "format_rewards": [0.5], "acc_rewards": [1.0], "errors": [None]})  # fmt: skip


def test_a_body_shorter_than_its_content_length_times_out(url):
    start = time.monotonic()
    status, out = _raw(url, _request(b'{"query": [', length="100"))  # the client then waits, as does the server
    assert status == 408 and "did not arrive within 1.5 s" in out["error"]
    assert REQUEST_TIMEOUT_S <= time.monotonic() - start < 20
    status, out = _raw(url, _request(b'{"query": [', length="100"), half_close=True)  # the client stops sending
    assert status == 400 and "body ended after 11 of 100 bytes" in out["error"]


def test_client_does_not_retry_a_rejected_request(url):
    client = RemoteReward(url, retries=5, backoff_s=30.0)  # a retry would make this test hang
    with pytest.raises(RewardServerError, match="rejected the request: 400.*list of strings"):
        client.score([1], ["2"])


# --------------------------------------------------------------------------- the client against the protocol


class _ReferenceServer(ThreadingHTTPServer):
    """A reward server written from the protocol alone: answers each request with `answer(request)`."""

    def __init__(self, answer):
        self.answer, self.requests = answer, []
        super().__init__(("127.0.0.1", 0), _ReferenceHandler)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_port}/get_reward"


class _ReferenceHandler(BaseHTTPRequestHandler):
    def do_POST(self):
        request = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        self.server.requests.append((self.path, self.headers["Content-Type"], request))
        body = json.dumps(self.server.answer(request)).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.fixture
def reference():
    servers = []

    def start(answer):
        servers.append(_ReferenceServer(answer))
        threading.Thread(target=servers[-1].serve_forever, daemon=True).start()
        return servers[-1]

    yield start
    for s in servers:
        s.shutdown()
        s.server_close()


def _lengths(request):
    return [float(len(q)) for q in request["query"]]


def test_client_sends_the_reference_request(reference):
    server = reference(lambda req: {"rewards": _lengths(req)})
    RemoteReward(server.url).score(["a", "bb"], ["1", "2"], prompts=["p", "q"])
    RemoteReward(server.url).score(["c"], ["3"])
    assert server.requests == [
        ("/get_reward", "application/json", {"query": ["a", "bb"], "prompts": ["p", "q"], "labels": ["1", "2"]}),
        ("/get_reward", "application/json", {"query": ["c"], "prompts": [""], "labels": ["3"]}),
    ]


def test_client_reads_rewards_alone_with_unknown_parts_as_nan(reference):
    server = reference(lambda req: {"rewards": _lengths(req)})
    results = RemoteReward(server.url).score(["a", "bbb"], ["1", "2"])
    assert [r.total for r in results] == [1.0, 3.0]
    assert all(math.isnan(r.format) and math.isnan(r.accuracy) and r.error is None for r in results)


def test_client_reads_lmm_r1_parts(reference):
    server = reference(lambda req: {"rewards": [1.5, 0.5], "format_rewards": [0.5, 0.5], "acc_rewards": [1.0, 0.0]})
    results = RemoteReward(server.url).score(["a", "b"], ["1", "2"])
    assert [(r.total, r.format, r.accuracy, r.error) for r in results] == [(1.5, 0.5, 1.0, None), (0.5, 0.5, 0.0, None)]


def test_client_reads_openrlhf_extra_logs(reference):
    answer = {"rewards": [1.0, 0.5], "scores": [1.0, 0.0],
              "extra_logs": {"format_rewards": [0.0, 0.5], "acc_rewards": [1.0, 0.0], "other": [3, 4]}}  # fmt: skip
    server = reference(lambda req: answer)
    results = RemoteReward(server.url).score(["a", "b"], ["1", "2"])
    assert [(r.total, r.format, r.accuracy) for r in results] == [(1.0, 0.0, 1.0), (0.5, 0.5, 0.0)]


def test_client_carries_per_sample_errors(reference):
    server = reference(lambda req: {"rewards": [0.0, 1.0, 0.0], "errors": ["timed out after 10 s", None, "boom"]})
    results = RemoteReward(server.url).score(["a", "b", "c"], ["1", "2", "3"])
    assert [r.error for r in results] == ["timed out after 10 s", None, "boom"]
    assert [is_timeout(r) for r in results] == [True, False, False]


def test_client_splits_batches_and_keeps_order(reference):
    server = reference(lambda req: {"rewards": _lengths(req)})
    queries = ["x" * k for k in range(1, 8)]
    results = RemoteReward(server.url, batch_size=3).score(queries, ["l"] * 7)
    assert [r.total for r in results] == [float(k) for k in range(1, 8)]
    assert [len(req["query"]) for _, _, req in server.requests] == [3, 3, 1]
    assert RemoteReward(server.url).score([], []) == [] and len(server.requests) == 3


@pytest.mark.parametrize(
    "answer, message",
    [
        ({"scores": [1.0]}, "with 'rewards'"),
        ([1.0], "with 'rewards'"),
        ({"rewards": [1.0, 2.0]}, "expected 1 finite numbers in 'rewards'"),
        ({"rewards": [None]}, "'rewards'"),
        ({"rewards": [float("nan")]}, "'rewards'"),
        ({"rewards": [True]}, "'rewards'"),
        ({"rewards": [1.0], "acc_rewards": ["1"]}, "'acc_rewards'"),
        ({"rewards": [1.0], "errors": [3]}, "errors"),
        ({"rewards": [1.0], "errors": []}, "errors"),
        ({"rewards": [1.0], "extra_logs": [1]}, "extra_logs"),
    ],
)
def test_client_rejects_an_answer_it_cannot_trust(reference, answer, message):
    server = reference(lambda req: answer)
    with pytest.raises(RewardServerError, match=message):
        RemoteReward(server.url, retries=1).score(["a"], ["1"])


# --------------------------------------------------------------------------- failures of the scoring itself


def _slow_or_crashing(query: str, label: str) -> RewardResult:
    if query == "slow":
        time.sleep(60)
    if query == "crash":
        os._exit(7)
    return RewardResult(1.0, 0.0, 1.0)


def test_timeouts_and_crashes_reach_the_client_as_errors():
    with RewardPool(_slow_or_crashing, num_workers=1, timeout_s=1.0, error_reward=-1.0) as pool:
        server = _serve(pool)
        try:
            results = RemoteReward(f"http://127.0.0.1:{server.server_port}").score(["ok", "slow", "crash"], ["l"] * 3)
        finally:
            server.shutdown()
            server.server_close()
    assert [r.total for r in results] == [1.0, -1.0, -1.0]
    assert [is_timeout(r) for r in results] == [False, True, False]
    assert results[0].error is None and "exited with code 7, twice on this item" in results[2].error


# --------------------------------------------------------------------------- connection failures and wiring


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
    with pytest.raises(ValueError, match="batch_size"):
        RemoteReward("http://127.0.0.1:1/get_reward", batch_size=0)
    with pytest.raises(ValueError, match="one label per query"):
        RemoteReward("http://127.0.0.1:1/get_reward").score(["a", "b"], ["1"])
    with pytest.raises(ValueError, match="one prompt per query"):
        RemoteReward("http://127.0.0.1:1/get_reward").score(["a"], ["1"], prompts=[])


def test_server_rejects_bad_limits():
    with pytest.raises(ValueError, match="max_body_bytes"):
        RewardServer(("127.0.0.1", 0), pool=None, max_body_bytes=0)
    with pytest.raises(ValueError, match="request_timeout_s"):
        RewardServer(("127.0.0.1", 0), pool=None, request_timeout_s=float("nan"))


def test_make_scorer_picks_the_remote_client():
    from shared.config import RewardConfig

    scorer = make_scorer(RewardConfig(remote_url="http://127.0.0.1:5000/get_reward", remote_batch_size=32))
    assert isinstance(scorer, RemoteReward) and scorer.batch_size == 32


def test_command_line_server():
    port = _free_port()
    cmd = [sys.executable, "-m", "shared.rewards.server", "--port", str(port), "--num-workers", "1",
           "--max-body-bytes", "1000", "--request-timeout-s", "5"]  # fmt: skip
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True)
    try:
        assert "reward server on http://127.0.0.1" in proc.stderr.readline()
        client = RemoteReward(f"http://127.0.0.1:{port}/get_reward", timeout_s=30.0, retries=5, backoff_s=0.2)
        assert client.score([GOOD], ["2"])[0].total == 1.5
        status, out = _raw(client.url, _request(b"", length="1001"))
        assert status == 413 and "limit of 1000" in out["error"]
    finally:
        proc.send_signal(signal.SIGTERM)  # the server closes its worker pool and exits
        try:
            assert proc.wait(timeout=60) == 0
        except subprocess.TimeoutExpired:
            proc.kill()
            raise
