"""HTTP reward server compatible with the reference's `math_verifier.py`.

`POST /get_reward` with `{"query": [...], "prompts": [...], "labels": [...]}` answers
`{"rewards": [...], "format_rewards": [...], "acc_rewards": [...]}`, so either trainer can use either server.
Binds 127.0.0.1 unless told otherwise: the endpoint runs reward code on whatever it is sent.

    python -m shared.rewards.server --port 5000 [--host 127.0.0.1] [--fn lmmr1_math] [--num-workers 16]
"""
from __future__ import annotations

import argparse
import json
import logging
import signal
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from shared.rewards import RewardPool, get_reward_fn

log = logging.getLogger(__name__)


def _parse_request(body: bytes) -> tuple[list[str], list[str]]:
    """(queries, labels) from a request body; ValueError names what is wrong."""
    try:
        data = json.loads(body)
    except ValueError as e:
        raise ValueError(f"body is not valid JSON: {e}") from None
    if not isinstance(data, dict):
        raise ValueError("expected a JSON object with keys query, prompts, labels")
    queries, labels = data.get("query"), data.get("labels")
    for key, value in (("query", queries), ("labels", labels)):
        if not isinstance(value, list) or not all(isinstance(x, str) for x in value):
            raise ValueError(f"{key}: expected a list of strings")
    if len(queries) != len(labels):
        raise ValueError(f"expected one label per query, got {len(queries)} queries and {len(labels)} labels")
    return queries, labels


class _Handler(BaseHTTPRequestHandler):
    server: "RewardServer"

    def _reply(self, code: int, payload: dict) -> None:
        body = json.dumps(payload).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_POST(self) -> None:
        if self.path.rstrip("/") != "/get_reward":
            self._reply(404, {"error": f"unknown path {self.path}; the endpoint is POST /get_reward"})
            return
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        try:
            queries, labels = _parse_request(body)
        except ValueError as e:
            self._reply(400, {"error": str(e)})
            return
        try:
            results = self.server.pool.score(queries, labels)
        except Exception as e:
            log.exception("scoring failed")
            self._reply(500, {"error": f"scoring failed: {type(e).__name__}: {e}"})
            return
        self._reply(
            200,
            {
                "rewards": [r.total for r in results],
                "format_rewards": [r.format for r in results],
                "acc_rewards": [r.accuracy for r in results],
            },
        )

    def log_message(self, fmt: str, *args) -> None:
        log.debug(fmt, *args)


class RewardServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, address: tuple[str, int], pool: RewardPool):
        super().__init__(address, _Handler)
        self.pool = pool


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--fn", default="lmmr1_math", help="builtin reward name or package.module:function")
    p.add_argument("--disable-format-reward", action="store_true")
    p.add_argument("--num-workers", type=int, default=16)
    p.add_argument("--timeout-s", type=float, default=10.0)
    p.add_argument("--error-reward", type=float, default=0.0)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO)
    # Stop cleanly (closing the worker pool) on SIGTERM and on SIGINT, even when started with SIGINT ignored,
    # as background jobs of a non-interactive shell are.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    fn = get_reward_fn(args.fn, format_reward=not args.disable_format_reward)
    with RewardPool(fn, args.num_workers, args.timeout_s, args.error_reward) as pool:
        server = RewardServer((args.host, args.port), pool)
        log.info("reward server on http://%s:%d/get_reward (%s)", args.host, server.server_port, args.fn)
        try:
            server.serve_forever()
        except KeyboardInterrupt:
            pass
        finally:
            server.server_close()


if __name__ == "__main__":
    main()
