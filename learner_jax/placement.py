"""Ray placement for the learner: start or join Ray, and host torch-side objects in actors by import path.

The learner process never imports torch, so it cannot hold a `rollout_torch` class; `spawn("module:Class", ...)`
builds the object inside a Ray actor and returns a proxy whose method calls are remote and synchronous.
"""
from __future__ import annotations

import importlib
import logging
import os
import re
import sys
import threading
import time
from collections import deque
from pathlib import Path
from typing import Any, Optional

import ray

from shared.config import RayConfig

from .net import wait_for_port

# Facts of the machines every worker needs (README): offline hub, single-process vLLM, no Ray token auth.
WORKER_ENV = {
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
    "TOKENIZERS_PARALLELISM": "false",
    "RAY_AUTH_MODE": "disabled",
}


def start_ray(cfg: RayConfig, verbose: Optional[bool] = None, log_file: Optional[str | Path] = None) -> None:
    """Start a local Ray, or join `cfg.address` ("host:port" of a head node, or "auto"); an address that does not
    answer within `cfg.connect_timeout_s` raises ConnectionError naming it instead of waiting.

    Library output (the actors' stdout/stderr: vLLM, transformers, XLA, gloo; Ray's own INFO lines) goes to
    `log_file` (`<train.log_dir>/engines.log`), and to the console only as far as `LogRouter` lets it: everything
    with `verbose`, else the lines that mean something (errors, tracebacks, our own warnings, Ray's raylet and
    autoscaler messages). `verbose=None` takes the process-wide setting (`set_verbose`, default quiet). Called
    again with another `log_file` (the next stage of the demo), the lines go to that file from then on."""
    verbose = _VERBOSE if verbose is None else verbose
    if ray.is_initialized():
        if _is_driver():
            route_logs(log_file, verbose)
        return
    if cfg.address not in (None, "auto", "local") and not cfg.address.startswith("ray://"):
        check_reachable(cfg.address, cfg.connect_timeout_s)
    for key, value in WORKER_ENV.items():
        os.environ.setdefault(key, value)
    env = {k: os.environ[k] for k in WORKER_ENV} | {
        k: v for k, v in os.environ.items() if k.startswith(("VLLM_", "XLA_", "JAX_"))
    }
    _quiet_ray_console(verbose)  # before ray.init: its "Started a local Ray instance" line is an INFO line
    # log_to_driver=True: Ray streams every actor's output, from every node, to this process, where `LogRouter`
    # replaces Ray's printer (the lines reach engines.log as they are written, a crash included).
    ray.init(
        address=cfg.address, num_cpus=cfg.num_cpus if cfg.address is None else None, include_dashboard=False,
        _temp_dir=cfg.temp_dir if cfg.address is None else None, log_to_driver=True,
        runtime_env={"env_vars": env},
    )  # fmt: skip
    route_logs(log_file, verbose)


# ------------------------------------------------------------------------------------------------ log routing

_VERBOSE = False


def set_verbose(verbose: bool) -> None:
    """The process-wide console mode for `start_ray` calls that do not pass `verbose` (main.py's --verbose)."""
    global _VERBOSE
    _VERBOSE = bool(verbose)
    _router().verbose = _VERBOSE
    _quiet_ray_console(_VERBOSE)


_PROJECT = str(Path(__file__).resolve().parent.parent)
# A worker line that reaches the console even when quiet. Errors and tracebacks; warnings raised by this project's
# own code (`<repo>/pkg/file.py:N: UserWarning: ...`) or logged by it (`WARNING:rollout_torch...`); lines marked
# "[lmmrl]"; our progress bar and evaluation summaries when the learner runs in actors; a layer of an engine that
# received no weights in a push. Other library warnings (vLLM's, transformers' FutureWarnings, torch's) stay in the
# log file. An engine that dies reaches the console anyway: Ray's raylet reports it on its own channel.
CONSOLE_LINE = re.compile(
    r"Traceback \(most recent call last\)|\b(ERROR|CRITICAL|FATAL)\b|^\S*Error\b|\[lmmrl\]|^\[eval\]"
    r"|^(WARNING|ERROR):(learner_jax|rollout_torch|bridge|shared)\b"
    r"|" + re.escape(_PROJECT) + r"/(learner_jax|rollout_torch|bridge|shared)/\S+:\d+: \w*Warning:"
    r"|\d+%\|.*\| *\d+/\d+ \["  # tqdm
    r"|^[EF]\d{4} "  # absl/glog errors and fatal errors (XLA, gloo)
    # vLLM's layerwise reload found no weights for a layer in a push; rotary embeddings hold only a cos/sin cache
    # that no push carries, so they warn on every push and mean nothing
    r"|(?<!RotaryEmbedding): Failed to load weights"
)
ALWAYS_SHOWN = ("raylet", "autoscaler")  # Ray's own messages about the cluster: a node lost, resources missing


class LogRouter:
    """Replaces Ray's printer of worker output in the driver (the dispatcher handler "ray_print_logs"): every line
    is appended to the log file with its source, "(ActorName pid=N)"; the console gets all of them (`verbose`, as
    Ray would print them) or only `CONSOLE_LINE`s and Ray's raylet/autoscaler messages, written above the
    progress bar. Lines that arrive before a file is named are kept (up to `pending_max`) and written to the first
    one."""

    def __init__(self, verbose: bool = False, printer=None, pending_max: int = 20_000):
        self.verbose = verbose
        self.printer = printer  # Ray's own handler: used for the console when verbose
        self.path: Optional[Path] = None
        self._file = None
        self._pending: deque[str] = deque(maxlen=pending_max)
        self._lock = threading.Lock()

    def set_file(self, path: Optional[str | Path]) -> None:
        if path is None:
            return
        path = Path(path)
        with self._lock:
            if self.path is not None and path.resolve() == self.path.resolve():
                return
            if self._file is not None:
                self._file.close()
            path.parent.mkdir(parents=True, exist_ok=True)
            self._file, self.path = path.open("a", buffering=1, errors="replace"), path
            while self._pending:
                self._file.write(self._pending.popleft())

    def write(self, text: str) -> None:
        with self._lock:
            if self._file is not None:
                self._file.write(text)
            else:
                self._pending.append(text)

    def close(self) -> None:
        with self._lock:
            if self._file is not None:
                self._file.close()
            self._file, self.path = None, None

    def __call__(self, data: dict) -> None:
        """One batch of lines of one worker, as Ray's log subscriber delivers it."""
        try:
            lines = [line for line in data.get("lines", []) if "__ray_tqdm_magic_token__" not in line]
            if data.get("pid") == "autoscaler":  # the monitor's whole log: only its events are news, as Ray prints
                lines = list(_autoscaler_events(lines))
            source = _source(data)
            stamp = time.strftime("%H:%M:%S")
            self.write("".join(f"{stamp} {source} {line}\n" for line in lines))
            if self.verbose:
                if self.printer is not None:
                    self.printer(data)
                return
            if data.get("pid") in ALWAYS_SHOWN:
                shown = lines
            else:
                # from a traceback's first line on, the rest of the batch (the frames and the error) belongs to it
                first = next((i for i, line in enumerate(lines) if line.startswith("Traceback (most recent")), None)
                shown = [line for i, line in enumerate(lines)
                         if (first is not None and i >= first) or CONSOLE_LINE.search(line)]  # fmt: skip
            if shown:
                _console("".join(f"{source} {line}\n" for line in shown))
        except Exception as exc:  # the log thread must survive anything a line holds
            _console(f"lmmrl: a worker log line could not be routed: {exc!r}\n")


_ROUTER: Optional[LogRouter] = None  # one per process, across Ray sessions (tests start several)


def _router() -> LogRouter:
    global _ROUTER
    if _ROUTER is None:
        _ROUTER = LogRouter(_VERBOSE)
        handler = _RayLoggerToFile(_ROUTER)
        logging.getLogger("ray").addHandler(handler)
    return _ROUTER


def route_logs(log_file: Optional[str | Path], verbose: bool = False) -> Optional[LogRouter]:
    """Hook the router into this driver's Ray (once per Ray session) and point it at `log_file`. Returns it, or
    None when this Ray has no dispatcher to hook (another Ray version): its output then stays on the console."""
    router = _router()
    router.verbose = verbose
    router.set_file(log_file)
    _quiet_ray_console(verbose)
    try:
        from ray._private.ray_logging import global_worker_stdstream_dispatcher as dispatcher
    except ImportError:
        return None
    with dispatcher._lock:
        current = dict(dispatcher.handlers).get("ray_print_logs")
    if current is not router:
        router.printer = current  # Ray's printer of this session, for verbose
        dispatcher.remove_handler("ray_print_logs")
        dispatcher.add_handler("ray_print_logs", router)  # ray.shutdown() removes it under this name
    return router


def log_to(path: str | Path) -> None:
    """Name the file library output goes to from now on (`MetricsLogger` names `<log_dir>/engines.log`, so every
    run and every demo stage gets its own). Only in the driver: a learner actor receives no worker output."""
    if ray.is_initialized() and not _is_driver():
        return
    _router().set_file(path)


def engines_log() -> Optional[Path]:
    """The file library output goes to now, if one was named."""
    return None if _ROUTER is None else _ROUTER.path


class _RayLoggerToFile(logging.Handler):
    """The driver's "ray" logger (INFO lines such as "Started a local Ray instance") into the router's file."""

    def __init__(self, router: LogRouter):
        super().__init__(logging.INFO)
        self.router = router
        self.setFormatter(logging.Formatter("%(asctime)s (driver) %(levelname)s %(name)s: %(message)s", "%H:%M:%S"))

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self.router.write(self.format(record) + "\n")
        except Exception:
            self.handleError(record)


def _quiet_ray_console(verbose: bool) -> None:
    """Ray's console handler in this process shows warnings and errors only (INFO too with `verbose`); its INFO
    lines go to the log file (kept until a file is named)."""
    _router()
    for h in logging.getLogger("ray").handlers:
        if not isinstance(h, _RayLoggerToFile):
            h.setLevel(logging.NOTSET if verbose else logging.WARNING)


def _autoscaler_events(lines: list[str]):
    try:
        from ray._private.worker import filter_autoscaler_events
    except ImportError:
        return lines
    return filter_autoscaler_events(lines)


def _source(data: dict) -> str:
    pid = data.get("pid")
    if pid in ALWAYS_SHOWN:
        return f"({pid})"
    name = data.get("actor_name") or data.get("task_name") or ""
    ip = data.get("ip")
    where = f", ip={ip}" if ip and ip != data.get("localhost") else ""
    return f"({name + ' ' if name else ''}pid={pid}{where})"


def _console(text: str) -> None:
    """Above a running tqdm bar when there is one (the bar is redrawn below), else plainly to stderr."""
    try:
        from tqdm import tqdm

        tqdm.write(text.rstrip("\n"), file=sys.stderr)
    except Exception:
        sys.stderr.write(text)
        sys.stderr.flush()


def _is_driver() -> bool:
    try:
        return ray._private.worker.global_worker.mode == ray.SCRIPT_MODE
    except AttributeError:
        return True


def check_reachable(address: str, timeout_s: float) -> None:
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        raise ValueError(f"ray.address {address!r}: expected host:port of a Ray head node, or auto")
    if (exc := wait_for_port(address, timeout_s)) is not None:
        raise ConnectionError(f"ray.address {address}: no Ray head answers there ({exc}) after {timeout_s:.0f} s; "
                              f"start one with `ray start --head --port={port}` or fix the address")


@ray.remote
class _Host:
    def __init__(self, target: str, args: tuple, kwargs: dict):
        module, name = target.split(":")
        self.obj = getattr(importlib.import_module(module), name)(*args, **kwargs)

    def call(self, method: str, args: tuple, kwargs: dict) -> Any:
        return getattr(self.obj, method)(*args, **kwargs)


class Remote:
    """Synchronous proxy of an object living in a Ray actor."""

    def __init__(self, handle: ray.actor.ActorHandle):
        self.handle = handle

    def __getattr__(self, method: str):
        def call(*args: Any, **kwargs: Any) -> Any:
            return ray.get(self.handle.call.remote(method, args, kwargs))

        return call

    def submit(self, method: str, *args: Any, **kwargs: Any) -> ray.ObjectRef:
        return self.handle.call.remote(method, args, kwargs)

    def close(self) -> None:
        """Let the object release what it holds (`shutdown()` if it has one), then end the actor."""
        try:
            ray.get(self.handle.call.remote("shutdown", (), {}))
        finally:
            ray.kill(self.handle)


def spawn(target: str, *args: Any, num_cpus: float = 0, name: Optional[str] = None, **kwargs: Any) -> Remote:
    options: dict[str, Any] = {"num_cpus": num_cpus, "max_concurrency": 1}
    if name:
        options["name"] = name
    return Remote(_Host.options(**options).remote(target, args, kwargs))
