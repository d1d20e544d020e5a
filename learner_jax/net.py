"""Waiting for a TCP port: how the learner tells a peer that is not there (a Ray head, the JAX coordinator) from
one that is slow, within a bound, instead of hanging in a library that never gives up."""
from __future__ import annotations

import socket
import time
from typing import Optional


def wait_for_port(address: str, timeout_s: float) -> Optional[OSError]:
    """Try "host:port" until it accepts a TCP connection: None once it does, else the last error after
    `timeout_s`. Raises ValueError when `address` is not host:port."""
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        raise ValueError(f"{address!r}: expected host:port")
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            with socket.create_connection((host.strip("[]"), int(port)),
                                          timeout=max(0.1, min(2.0, deadline - time.monotonic()))):  # fmt: skip
                return None
        except OSError as exc:
            if time.monotonic() >= deadline:
                return exc
        time.sleep(0.2)
