"""Score a batch of responses in worker processes, each item bounded in time.

math-verify can spend unbounded time on adversarial LaTeX (and its signal-based timeout only works in the main
thread), so every item runs in a process that is killed and replaced when its time is up. The rollout then
gets `error_reward` for that item instead of stalling. Every result that is not a real score carries `error`; the
ones that ran out of time are told apart by `is_timeout`, also after a trip through the reward server.
"""
from __future__ import annotations

import math
import multiprocessing as mp
import pickle
import signal
import threading
import time
import traceback
from collections import deque
from multiprocessing.connection import Connection, wait
from typing import Callable, Optional, Sequence

from shared.rewards.lmmr1 import RewardResult

RewardFn = Callable[[str, str], RewardResult]  # (decoded query, label) -> result
_READY, _FATAL, _OK, _ERROR = "ready", "fatal", "ok", "error"
TIMEOUT_ERROR = "timed out"  # how the error of an item that ran out of time begins


def is_timeout(result: RewardResult) -> bool:
    return result.error is not None and result.error.startswith(TIMEOUT_ERROR)


def _worker_main(fn_blob: bytes, conn: Connection) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle; it kills the workers
    try:
        fn = pickle.loads(fn_blob)
    except BaseException:
        conn.send((_FATAL, traceback.format_exc()))
        return
    conn.send((_READY, None))
    while True:
        try:
            query, label = conn.recv()
        except EOFError:
            return
        try:
            result = fn(query, label)
            if not isinstance(result, RewardResult):
                raise TypeError(f"reward function must return RewardResult, got {type(result).__name__}")
            if not math.isfinite(result.total):  # one NaN would poison the advantages of the whole batch
                raise ValueError(f"reward function returned a non-finite total {result.total}")
            conn.send((_OK, result))
        except Exception as e:
            conn.send((_ERROR, f"{type(e).__name__}: {e}"))


class _Worker:
    def __init__(self, ctx, fn_blob: bytes):
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=_worker_main, args=(fn_blob, child), daemon=True)
        self.proc.start()
        child.close()
        self.ready = False
        self.item: Optional[int] = None
        self.deadline = 0.0

    def kill(self) -> None:
        self.proc.kill()
        self.proc.join()
        self.conn.close()


class RewardPool:
    """`score(queries, labels)` -> one RewardResult per item, in input order.

    Items that time out, raise, or crash their worker get `RewardResult(error_reward, 0, error_reward, error=...)`
    and are counted in `stats`. An item whose worker dies under it (killed from outside, or by the item) is retried
    once on a fresh worker, so a worker lost to an OOM kill costs no score. Calls from several threads are
    serialised; the workers are shared.
    """

    def __init__(self, fn: RewardFn, num_workers: int = 4, timeout_s: float = 10.0, error_reward: float = 0.0):
        if num_workers < 1:
            raise ValueError(f"num_workers: expected >= 1, got {num_workers}")
        if timeout_s <= 0:
            raise ValueError(f"timeout_s: expected > 0, got {timeout_s}")
        try:
            self._fn_blob = pickle.dumps(fn)
        except Exception as e:
            raise ValueError(
                f"reward function {fn!r} cannot be sent to worker processes ({e}); "
                "use a module-level function or a functools.partial of one"
            ) from None
        self.timeout_s = timeout_s
        self.error_reward = error_reward
        self._ctx = mp.get_context("spawn")  # fork is unsafe in a process that runs JAX or Ray threads
        self._lock = threading.Lock()
        self._workers = [_Worker(self._ctx, self._fn_blob) for _ in range(num_workers)]
        self.stats = {"items": 0, "errors": 0, "timeouts": 0, "restarts": 0, "retries": 0}

    def score(self, queries: Sequence[str], labels: Sequence[str]) -> list[RewardResult]:
        if len(queries) != len(labels):
            raise ValueError(f"expected one label per query, got {len(queries)} queries and {len(labels)} labels")
        with self._lock:
            if self._workers is None:
                raise RuntimeError("RewardPool is closed (by close() or by an earlier batch that failed)")
            try:
                return self._run(list(queries), list(labels))
            except BaseException:
                # Workers may still hold items of this batch; their answers must not leak into the next one.
                self._kill_all()
                raise

    def _error(self, message: str) -> RewardResult:
        return RewardResult(total=self.error_reward, format=0.0, accuracy=self.error_reward, error=message)

    def _replace(self, worker: _Worker) -> None:
        worker.kill()
        self._workers[self._workers.index(worker)] = _Worker(self._ctx, self._fn_blob)
        self.stats["restarts"] += 1

    def _run(self, queries: list[str], labels: list[str]) -> list[RewardResult]:
        results: list[Optional[RewardResult]] = [None] * len(queries)
        todo = deque(range(len(queries)))
        crashed: set[int] = set()  # items of this batch that already lost a worker
        remaining = len(queries)
        while remaining:
            for w in self._workers:
                if w.ready and w.item is None and todo:
                    i = todo.popleft()
                    try:
                        w.conn.send((queries[i], labels[i]))
                    except OSError:  # the worker died while idle; not the item's fault
                        todo.appendleft(i)
                        self._replace(w)
                        continue
                    w.item, w.deadline = i, time.monotonic() + self.timeout_s
            busy = [w for w in self._workers if w.item is not None]
            now = time.monotonic()
            wait_s = min((w.deadline for w in busy), default=now + 1.0) - now
            readable = wait([w.conn for w in self._workers], timeout=max(wait_s, 0.0))
            for w in list(self._workers):
                if w.conn in readable:
                    remaining -= self._receive(w, results, todo, crashed)
                elif w.item is not None and time.monotonic() >= w.deadline:
                    results[w.item] = self._error(f"{TIMEOUT_ERROR} after {self.timeout_s:g} s")
                    self.stats["timeouts"] += 1
                    remaining -= 1
                    self._replace(w)
        self.stats["items"] += len(queries)
        return results  # type: ignore[return-value]

    def _receive(self, w: _Worker, results: list, todo: deque, crashed: set) -> int:
        """Handle one message from `w`; returns how many items it finished (0 or 1)."""
        try:
            kind, payload = w.conn.recv()
        except (EOFError, OSError):
            w.proc.join(5.0)
            kind, payload = None, f"worker exited with code {w.proc.exitcode}"
            if not w.ready:  # spawn re-imports the main script; an unguarded one starts pools recursively
                payload += " (see its stderr; a script creating a RewardPool needs `if __name__ == '__main__':`)"
        if kind == _READY:
            w.ready = True
            return 0
        if kind == _FATAL or (kind is None and not w.ready):
            raise RuntimeError(f"reward worker failed to start:\n{payload}")
        if w.item is None:  # died while idle
            self._replace(w)
            return 0
        i, w.item = w.item, None
        if kind is None:
            self._replace(w)
            if i not in crashed:
                crashed.add(i)
                self.stats["retries"] += 1
                todo.appendleft(i)
                return 0
            payload += ", twice on this item"
        if kind == _OK:
            results[i] = payload
            return 1
        results[i] = self._error(payload)
        self.stats["errors"] += 1
        return 1

    def _kill_all(self) -> None:
        for w in self._workers or []:
            w.kill()
        self._workers = None

    def close(self) -> None:
        with self._lock:
            self._kill_all()

    def __enter__(self) -> "RewardPool":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
