"""HTTP reward server compatible with the reference's `math_verifier.py`.

`POST /get_reward` with `{"query": [...], "prompts": [...], "labels": [...]}` ("prompts" optional, unused) answers
`{"rewards": [...], "format_rewards": [...], "acc_rewards": [...], "errors": [...]}`, so either trainer can use either
server. `errors[i]` is null for a real score, else why sample i got the error reward (the reward function raised,
e.g. on an unparsable gold; its worker crashed; or it timed out, message starting "timed out").
A bad request gets a 4xx with `{"error": "..."}`. Binds 127.0.0.1 unless told otherwise: the endpoint runs reward
code on whatever it is sent.

    python -m shared.rewards.server --port 5000 [--host 127.0.0.1] [--fn lmmr1_math] [--num-workers 16]
"""
from __future__ import annotations

import argparse
import json
import logging
import re
import signal
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from shared.rewards import RewardPool, get_reward_fn

log = logging.getLogger(__name__)

MAX_BODY_BYTES = 64 << 20
REQUEST_TIMEOUT_S = 60.0


class RequestError(ValueError):
    def __init__(self, status: HTTPStatus, message: str):
        super().__init__(message)
        self.status = status


def _string_list(data: dict, key: str) -> list[str]:
    value = data.get(key)
    if not isinstance(value, list) or not all(isinstance(x, str) for x in value):
        raise RequestError(HTTPStatus.BAD_REQUEST, f"{key}: expected a list of strings, got {value!r:.100}")
    return value


def _parse_request(body: bytes) -> tuple[list[str], list[str]]:
    """(queries, labels) from a request body; RequestError names what is wrong."""
    try:
        data = json.loads(body)
    except ValueError as e:
        raise RequestError(HTTPStatus.BAD_REQUEST, f"body is not valid JSON: {e}") from None
    if not isinstance(data, dict):
        raise RequestError(HTTPStatus.BAD_REQUEST, "expected a JSON object with keys query, prompts, labels")
    queries, labels = _string_list(data, "query"), _string_list(data, "labels")
    lengths = {"query": len(queries), "labels": len(labels)}
    if data.get("prompts") is not None:
        lengths["prompts"] = len(_string_list(data, "prompts"))
    if len(set(lengths.values())) > 1:
        raise RequestError(HTTPStatus.BAD_REQUEST, f"expected one label (and prompt) per query, got lengths {lengths}")
    return queries, labels


def _content_length(raw: str | None, limit: int) -> int:
    if raw is None:
        raise RequestError(HTTPStatus.LENGTH_REQUIRED, "Content-Length is required")
    if not re.fullmatch(r"[0-9]+", raw.strip()):
        raise RequestError(HTTPStatus.BAD_REQUEST, f"Content-Length: expected a non-negative integer, got {raw!r:.50}")
    n = int(raw)
    if n > limit:
        raise RequestError(HTTPStatus.REQUEST_ENTITY_TOO_LARGE,
                           f"body of {n} bytes is over this server's limit of {limit} (--max-body-bytes); "
                           "send fewer samples per request")  # fmt: skip
    return n


class _Handler(BaseHTTPRequestHandler):
    server: "RewardServer"

    def setup(self) -> None:
        # A client that stops sending (or declares more body than it sends) frees its thread after this long.
        self.timeout = self.server.request_timeout_s
        super().setup()

    def _reply(self, code: int, payload: dict) -> None:
        body = json.dumps(payload).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def send_error(self, code: int, message: str | None = None, explain: str | None = None) -> None:
        """Errors of the HTTP layer (unsupported method, malformed request line) in JSON like all others."""
        self.close_connection = True
        self._reply(code, {"error": message or HTTPStatus(code).phrase})

    def _read_body(self) -> bytes:
        n = _content_length(self.headers.get("Content-Length"), self.server.max_body_bytes)
        try:
            body = self.rfile.read(n)
        except TimeoutError:
            raise RequestError(HTTPStatus.REQUEST_TIMEOUT,
                               f"the body did not arrive within {self.server.request_timeout_s:g} s "
                               f"(Content-Length {n})") from None  # fmt: skip
        if len(body) < n:
            raise RequestError(HTTPStatus.BAD_REQUEST, f"body ended after {len(body)} of {n} bytes (Content-Length)")
        return body

    def do_POST(self) -> None:
        if self.path.rstrip("/") != "/get_reward":
            self.send_error(HTTPStatus.NOT_FOUND, f"unknown path {self.path}; the endpoint is POST /get_reward")
            return
        try:
            queries, labels = _parse_request(self._read_body())
        except RequestError as e:
            self.send_error(e.status, str(e))
            return
        try:
            results = self.server.pool.score(queries, labels)
        except Exception as e:
            log.exception("scoring failed")
            self.send_error(HTTPStatus.INTERNAL_SERVER_ERROR, f"scoring failed: {type(e).__name__}: {e}")
            return
        self._reply(
            HTTPStatus.OK,
            {
                "rewards": [r.total for r in results],
                "format_rewards": [r.format for r in results],
                "acc_rewards": [r.accuracy for r in results],
                "errors": [r.error for r in results],
            },
        )

    def log_message(self, fmt: str, *args) -> None:
        log.debug(fmt, *args)


class RewardServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, address: tuple[str, int], pool: RewardPool, max_body_bytes: int = MAX_BODY_BYTES,
                 request_timeout_s: float = REQUEST_TIMEOUT_S):  # fmt: skip
        if max_body_bytes < 1:
            raise ValueError(f"max_body_bytes: expected >= 1, got {max_body_bytes}")
        if not request_timeout_s > 0:
            raise ValueError(f"request_timeout_s: expected > 0, got {request_timeout_s}")
        super().__init__(address, _Handler)
        self.pool = pool
        self.max_body_bytes = max_body_bytes
        self.request_timeout_s = request_timeout_s


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--fn", default="lmmr1_math", help="builtin reward name or package.module:function")
    p.add_argument("--disable-format-reward", action="store_true")
    p.add_argument("--num-workers", type=int, default=16)
    p.add_argument("--timeout-s", type=float, default=10.0, help="per sample")
    p.add_argument("--error-reward", type=float, default=0.0)
    p.add_argument("--max-body-bytes", type=int, default=MAX_BODY_BYTES, help="larger requests get 413")
    p.add_argument("--request-timeout-s", type=float, default=REQUEST_TIMEOUT_S,
                   help="a client silent this long while sending gets 408")  # fmt: skip
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO)
    # Stop cleanly (closing the worker pool) on SIGTERM and on SIGINT, even when started with SIGINT ignored,
    # as background jobs of a non-interactive shell are.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    fn = get_reward_fn(args.fn, format_reward=not args.disable_format_reward)
    with RewardPool(fn, args.num_workers, args.timeout_s, args.error_reward) as pool:
        server = RewardServer((args.host, args.port), pool, args.max_body_bytes, args.request_timeout_s)
        log.info("reward server on http://%s:%d/get_reward (%s)", args.host, server.server_port, args.fn)
        try:
            server.serve_forever()
        except KeyboardInterrupt:
            pass
        finally:
            server.server_close()


if __name__ == "__main__":
    main()
