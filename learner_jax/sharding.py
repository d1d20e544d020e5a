"""Device mesh, partition rules and sharding strategies of the learner.

One mesh with axes (data, fsdp, tensor). The model's parameter table (`shared.models.qwen2_5_vl_params`)
declares, for every parameter, which dimension is split for tensor parallelism (Megatron layout: q/k/v/gate/up
column-parallel, o/down row-parallel, vocabulary-parallel embedding and head); `PARAM_RULES` reads it.
ZeRO/FSDP sharding is generic on top of it: the largest remaining dimension that divides evenly goes to the
sharding axes. The strategy picks what gets that sharding:

    strategy     parameters     gradients      optimizer state      batch split over
    replicated   -              -              -                    data x fsdp
    zero1        -              -              data x fsdp          data x fsdp
    zero2        -              data x fsdp    data x fsdp          data x fsdp
    zero3        fsdp           data x fsdp    data x fsdp          data x fsdp
    tensor       tensor         tensor         tensor               data x fsdp

Tensor-parallel rules apply under any zero strategy as well when the mesh's tensor axis is > 1 (2-D sharding).
All strategies compute the same function: GSPMD inserts the collectives, so only speed and memory differ.
With `offload_optimizer` the optimizer state lives in `pinned_host` memory and the optimizer step moves it to the
device and back; a backend without that memory kind keeps it on the device (with a warning).

    strategy = Strategy.from_config(cfg.sharding, model_cfg)        # or Strategy.abstract(...) for planning
    params = strategy.place(numpy_params, strategy.param_shardings(params))
    step = TrainStep(strategy, loss_fn, tx, params)                  # jitted accumulate + apply
    opt_state = step.init_opt_state(params)
    params, opt_state, metrics = step(params, opt_state, [(batch, inputs), ...], scalars)
"""
from __future__ import annotations

import itertools
import logging
import math
import re
import time
from dataclasses import dataclass, field
from functools import partial
from typing import Any, Callable, Iterable, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import AbstractMesh, AxisType, Mesh, NamedSharding, PartitionSpec

from shared.config import ShardingConfig

from shared.models import qwen2_5_vl_params as table

from .models.config import Qwen25VLConfig
from .models.lora import merge_lora
from .net import wait_for_port

log = logging.getLogger(__name__)

AXES = ("data", "fsdp", "tensor")
ZERO_AXES = ("data", "fsdp")  # every data-parallel device: the batch, gradients and optimizer state split here

def _param_rules() -> tuple[tuple[str, tuple[Optional[str], ...], bool], ...]:
    """(path pattern, logical tensor-parallel axis per dim after the stacking axis, stacked) for every parameter of
    the model's table, and for the LoRA adapters a linear layer may carry: A [in, r] splits like the kernel's input,
    B [r, out] like its output. Matched at the end of a path, so the same rules serve gradients and the optimizer
    state's moment trees (".../mu/text/layers/q/kernel")."""
    rules = []
    for r in table.RULES:
        stacked = r.stack is not None
        rules.append((re.escape(r.flax), r.axes, stacked))
        if r.layout is table.LINEAR and r.flax.endswith("/kernel"):
            module = re.escape(r.flax[: -len("/kernel")])
            rules += [(module + "/lora/lora_a", (r.axes[0], None), stacked),
                      (module + "/lora/lora_b", (None, r.axes[1]), stacked)]  # fmt: skip
    return tuple(rules)


PARAM_RULES = _param_rules()
_COMPILED = [(re.compile(rf"(?:^|/){pattern}$"), template, stacked) for pattern, template, stacked in PARAM_RULES]


def tensor_units(cfg: Qwen25VLConfig) -> dict[str, int]:
    """Granularity of each tensor-parallel logical axis: head dimensions split only at whole heads."""
    return {"vocab": 1, "mlp": 1, "heads": cfg.text.head_dim, "kv_heads": cfg.text.head_dim}


# --------------------------------------------------------------------------- mesh


def initialize_distributed(coordinator_address: Optional[str], num_processes: int = 1, process_id: int = 0,
                           local_device_ids: Optional[Sequence[int]] = None,
                           timeout_s: Optional[float] = None) -> None:  # fmt: skip
    """Join a multi-host JAX runtime; a no-op for a single process (`coordinator_address` None).

    Every learner process calls this before touching devices, with the same `coordinator_address`
    ("host:port" of process 0) and its own `process_id`; under Ray the driver hands these to each learner
    actor (`learner_jax.launch`). Afterwards `jax.devices()` lists all hosts' devices and `make_mesh` spans them.
    On CPU the processes' collectives go through gloo. `timeout_s` bounds the wait for the coordinator and the
    other processes (jax's `initialization_timeout`); a coordinator that does not answer raises a
    `TimeoutError` naming the address instead of hanging.
    """
    if coordinator_address is None:
        if num_processes != 1:
            raise ValueError(f"num_processes={num_processes} needs a coordinator_address (host:port of process 0)")
        return
    jax.config.update("jax_cpu_collectives_implementation", "gloo")  # CPU cross-process collectives
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    if process_id != 0 and deadline is not None:
        # jax's client aborts the whole process (no exception) when the coordinator misses its deadline, so the
        # address is probed first: a coordinator that never listens fails here, in Python, naming it.
        wait_for_coordinator(coordinator_address, deadline, f"learner process {process_id}/{num_processes}")
    kwargs: dict[str, Any] = {}
    if deadline is not None:  # what is left of the budget; jax takes whole seconds
        kwargs["initialization_timeout"] = max(1, int(math.ceil(deadline - time.monotonic())))
    jax.distributed.initialize(coordinator_address=coordinator_address, num_processes=num_processes,
                               process_id=process_id, local_device_ids=local_device_ids, **kwargs)  # fmt: skip


def wait_for_coordinator(address: str, deadline: float, who: str = "this process") -> None:
    """Block until `address` ("host:port") accepts a TCP connection; `TimeoutError` naming it at `deadline`."""
    timeout_s = max(0.0, deadline - time.monotonic())
    if (last := wait_for_port(address, timeout_s)) is not None:
        raise TimeoutError(
            f"{who}: the JAX coordinator at {address} did not answer within {timeout_s:.0f}s "
            f"(learner.coordinator_timeout_s); last error: {last}. Is learner process 0 running, and is the "
            f"port reachable from this node?"
        )


def is_leader() -> bool:
    """True in learner process 0 (the only one in a single-process run): it owns engines, rewards and logs."""
    return jax.process_index() == 0


def broadcast_object(obj: Any) -> Any:
    """Process 0's `obj` in every learner process (pickled bytes through a device broadcast); the object itself
    when there is a single process. Every process must call it at the same point of the program."""
    if jax.process_count() == 1:
        return obj
    import pickle

    from jax.experimental import multihost_utils

    payload = pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL) if jax.process_index() == 0 else b""
    size = int(multihost_utils.broadcast_one_to_all(np.int64(len(payload))))
    buf = np.zeros(1 << max(size - 1, 1).bit_length(), np.uint8)  # powers of two: few shapes, few compilations
    if jax.process_index() == 0:
        buf[:size] = np.frombuffer(payload, np.uint8)
    return pickle.loads(np.asarray(multihost_utils.broadcast_one_to_all(buf))[:size].tobytes())


def host_copy(tree: Any) -> Any:
    """A tree of (possibly cross-process) arrays as numpy in every process; a collective when processes > 1."""
    if jax.process_count() == 1:
        return jax.device_get(tree)
    from jax.experimental import multihost_utils

    return multihost_utils.process_allgather(tree, tiled=True)


def simulated_cpu_env(num_devices: int) -> dict[str, str]:
    """Environment for `num_devices` simulated CPU devices, to set before JAX first touches a device (tests,
    benchmarks, CPU demos of a sharded run).

    XLA:CPU runs all devices' programs, and the asynchronous dispatch of the next program, on one thread pool of
    max(cores, devices) threads. A device waiting in a collective holds its thread, so one thread per device
    can deadlock (seen with tensor-parallel layouts on 2 cores); four per device leave room.
    """
    return {"XLA_FLAGS": f"--xla_force_host_platform_device_count={num_devices}", "PJRT_NPROC": str(4 * num_devices)}


def axis_sizes(cfg: ShardingConfig, num_devices: int) -> dict[str, int]:
    """The mesh shape {data, fsdp, tensor} for `num_devices`; data = -1 takes the devices the others leave."""
    inner = cfg.fsdp * cfg.tensor
    if cfg.fsdp < 1 or cfg.tensor < 1 or (cfg.data < 1 and cfg.data != -1):
        raise ValueError(f"sharding axis sizes must be >= 1 (data may be -1), got data={cfg.data} "
                         f"fsdp={cfg.fsdp} tensor={cfg.tensor}")  # fmt: skip
    data = num_devices // inner if cfg.data == -1 else cfg.data
    if data < 1 or data * inner != num_devices:
        raise ValueError(f"sharding data={cfg.data} x fsdp={cfg.fsdp} x tensor={cfg.tensor} does not match the "
                         f"{num_devices} devices (their product must equal the device count)")  # fmt: skip
    return {"data": data, "fsdp": cfg.fsdp, "tensor": cfg.tensor}


def make_mesh(cfg: ShardingConfig, devices: Optional[Sequence[jax.Device]] = None) -> Mesh:
    """A (data, fsdp, tensor) mesh over `devices` (default: all, every host). Tensor is the innermost axis, so
    tensor-parallel groups are neighbouring devices (same host, fastest links)."""
    devices = list(jax.devices() if devices is None else devices)
    sizes = axis_sizes(cfg, len(devices))
    return jax.make_mesh(tuple(sizes[a] for a in AXES), AXES, axis_types=(AxisType.Auto,) * 3, devices=devices)


# --------------------------------------------------------------------------- partition specs


def path_str(path: tuple) -> str:
    return "/".join(str(getattr(k, "key", getattr(k, "idx", getattr(k, "name", k)))) for k in path)


def match_rule(path: str) -> Optional[tuple[tuple[Optional[str], ...], str, bool]]:
    """The rule matching `path`: its template, the parameter path it matched (a suffix of `path`), stacked."""
    for pattern, template, stacked in _COMPILED:
        m = pattern.search(path)
        if m:
            return template, path[m.start():].lstrip("/"), stacked
    return None


def leaf_spec(path: str, shape: tuple[int, ...], sizes: dict[str, int], units: dict[str, int],
              zero_axes: tuple[str, ...], notes: Optional[list[str]] = None) -> PartitionSpec:  # fmt: skip
    """PartitionSpec of one array: tensor-parallel dims from the rule table, then `zero_axes` on the largest
    remaining dim that divides evenly. A dim that does not divide stays replicated (recorded in `notes`).
    Paths without a rule (optimizer counters, unknown leaves) are replicated."""
    ndim = len(shape)
    rule = match_rule(path)
    if rule is None or ndim == 0:
        return PartitionSpec()
    template, param, stacked = rule  # notes name the parameter, so its gradient and moments share one note
    if len(template) + stacked != ndim:
        raise ValueError(f"{path}: shape {shape} has {ndim} dims; the partition rule expects "
                         f"{len(template) + stacked} ({'stacked ' if stacked else ''}{template})")  # fmt: skip
    logical = ((None,) if stacked else ()) + template
    spec: list[Any] = [None] * ndim
    tp = sizes["tensor"]
    for d, name in enumerate(logical):
        if name is None or tp == 1:
            continue
        unit = units.get(name, 1)
        if shape[d] % unit == 0 and (shape[d] // unit) % tp == 0:
            spec[d] = "tensor"
        elif notes is not None:
            notes.append(f"{param} {shape}: dim {d} ({name}, {shape[d] // unit} x {unit}) does not split over "
                         f"tensor={tp}; replicated on tensor")  # fmt: skip
    zero_axes = tuple(a for a in zero_axes if sizes[a] > 1)
    n = math.prod(sizes[a] for a in zero_axes)
    if n > 1:
        free = [d for d in range(int(stacked), ndim) if spec[d] is None]
        fits = [d for d in sorted(free, key=lambda d: -shape[d]) if shape[d] % n == 0]
        if fits:
            spec[fits[0]] = zero_axes[0] if len(zero_axes) == 1 else zero_axes
        elif notes is not None:
            notes.append(f"{param} {shape}: no dim divides by {'x'.join(zero_axes)}={n}; replicated there")
    while spec and spec[-1] is None:
        spec.pop()
    return PartitionSpec(*spec)


def tree_specs(tree: Any, sizes: dict[str, int], units: dict[str, int], zero_axes: tuple[str, ...],
               notes: Optional[list[str]] = None, require_rule: bool = False) -> Any:  # fmt: skip
    def one(path, leaf):
        name = path_str(path)
        if require_rule and match_rule(name) is None:
            raise ValueError(f"no partition rule for parameter {name} {tuple(leaf.shape)}; add it to the model's "
                             f"parameter table (shared.models)")
        return leaf_spec(name, tuple(leaf.shape), sizes, units, zero_axes, notes)

    return jax.tree_util.tree_map_with_path(one, tree)


def batch_spec(name: str, shape: tuple[int, ...], sizes: dict[str, int]) -> PartitionSpec:
    """Split a batch array on its B dimension, read from the name's shape suffix (`input_ids_BT`,
    `position_ids_3BT`). Arrays without B (concatenated image patches, vision plan) stay replicated."""
    suffix = name.rsplit("_", 1)[-1]
    if not suffix.isupper() or len(suffix) != len(shape) or "B" not in suffix:
        return PartitionSpec()
    return split_spec(suffix.index("B"), shape, sizes, name)


def split_spec(dim: int, shape: tuple[int, ...], sizes: dict[str, int], what: str) -> PartitionSpec:
    """`dim` split over every data-parallel device (data x fsdp); it must divide evenly."""
    axes = tuple(a for a in ZERO_AXES if sizes[a] > 1)
    n = math.prod(sizes[a] for a in axes)
    if n == 1:
        return PartitionSpec()
    if shape[dim] % n:
        raise ValueError(f"{what} has {shape[dim]} rows, not divisible by the {n} data-parallel devices "
                         f"({' x '.join(axes)}); make the micro-batch a multiple of {n}")  # fmt: skip
    return PartitionSpec(*([None] * dim), axes[0] if len(axes) == 1 else axes)


# --------------------------------------------------------------------------- strategies


@dataclass(frozen=True)
class _Stages:
    params: tuple[str, ...]
    grads: tuple[str, ...]
    opt: tuple[str, ...]


_STAGES = {
    "replicated": _Stages((), (), ()),
    "zero1": _Stages((), (), ZERO_AXES),
    "zero2": _Stages((), ZERO_AXES, ZERO_AXES),
    "zero3": _Stages(("fsdp",), ZERO_AXES, ZERO_AXES),
    "tensor": _Stages((), (), ()),
}


@dataclass
class Strategy:
    """Shardings of params, gradients, optimizer state and batches for one strategy on one mesh.

    `mesh` may be an `AbstractMesh` (planning without devices): every `*_shardings` method works, `place` and
    training do not.
    """

    name: str
    mesh: Mesh | AbstractMesh
    model: Qwen25VLConfig
    offload_optimizer: bool = False
    platform: str = ""  # backend of the mesh's devices; given for an abstract mesh ("gpu" plans by default)
    notes: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.name not in _STAGES:
            raise ValueError(f"sharding strategy {self.name!r}: expected one of {', '.join(_STAGES)}")
        sizes = self.sizes
        if not self.platform:
            self.platform = "gpu" if self.is_abstract else self.mesh.devices.flat[0].platform
        if self.name == "replicated" and sizes["tensor"] > 1:
            raise ValueError("strategy 'replicated' with sharding.tensor > 1: use strategy 'tensor' (or a zero "
                             "strategy) for tensor parallelism")  # fmt: skip
        if self.name == "tensor" and sizes["tensor"] < 2:
            raise ValueError("strategy 'tensor' needs sharding.tensor >= 2")
        if self.name == "zero3" and sizes["fsdp"] < 2:
            raise ValueError("strategy 'zero3' shards parameters over the fsdp axis; set sharding.fsdp >= 2")
        self.offload_active = False
        if self.offload_optimizer:
            self.offload_active = self._host_memory_supported()
            if not self.offload_active:
                log.warning("offload_optimizer: the %s backend has no pinned_host memory; optimizer state stays "
                            "in device memory", self.platform)  # fmt: skip

    @classmethod
    def from_config(cls, cfg: ShardingConfig, model: Qwen25VLConfig,
                    devices: Optional[Sequence[jax.Device]] = None) -> "Strategy":  # fmt: skip
        return cls(cfg.strategy, make_mesh(cfg, devices), model, cfg.offload_optimizer)

    @classmethod
    def abstract(cls, cfg: ShardingConfig, model: Qwen25VLConfig, num_devices: int,
                 platform: str = "gpu") -> "Strategy":  # fmt: skip
        """A strategy on an `AbstractMesh` of `num_devices` (no devices needed): shardings and memory plans only."""
        sizes = axis_sizes(cfg, num_devices)
        mesh = AbstractMesh(tuple(sizes[a] for a in AXES), AXES, axis_types=(AxisType.Auto,) * 3)
        return cls(cfg.strategy, mesh, model, cfg.offload_optimizer, platform=platform)

    # ----------------------------------------------------------------- properties

    @property
    def sizes(self) -> dict[str, int]:
        return dict(zip(self.mesh.axis_names, self.mesh.axis_sizes))

    @property
    def is_abstract(self) -> bool:
        return isinstance(self.mesh, AbstractMesh)

    @property
    def data_parallel_size(self) -> int:
        """Devices that each take a different slice of the batch (data x fsdp)."""
        return self.sizes["data"] * self.sizes["fsdp"]

    def _host_memory_supported(self) -> bool:
        if self.is_abstract:
            return True  # GPU and TPU runtimes (and the CPU one) provide pinned_host memory
        kinds = {m.kind for m in self.mesh.devices.flat[0].addressable_memories()}
        return "pinned_host" in kinds

    # ----------------------------------------------------------------- shardings

    def _shardings(self, tree: Any, zero_axes: tuple[str, ...], memory_kind: Optional[str] = None,
                   require_rule: bool = False) -> Any:  # fmt: skip
        notes: list[str] = []
        specs = tree_specs(tree, self.sizes, tensor_units(self.model), zero_axes, notes, require_rule)
        for note in notes:
            if note not in self.notes:
                self.notes.append(note)
                log.debug("sharding fallback: %s", note)
        return jax.tree.map(lambda s: NamedSharding(self.mesh, s, memory_kind=memory_kind), specs,
                            is_leaf=lambda x: isinstance(x, PartitionSpec))  # fmt: skip

    def param_shardings(self, abstract_params: Any) -> Any:
        """Every leaf must have a rule in the parameter table (a new parameter fails loudly instead of replicating)."""
        return self._shardings(abstract_params, _STAGES[self.name].params, require_rule=True)

    def grad_shardings(self, abstract_params: Any) -> Any:
        """Layout the accumulated gradients are reduced into: for zero2/zero3 a reduce-scatter onto the shards."""
        return self._shardings(abstract_params, _STAGES[self.name].grads)

    def opt_shardings(self, abstract_opt_state: Any, on_host: Optional[bool] = None) -> Any:
        """Shardings of an optimizer state (moments follow their parameter's rule; counters are replicated).
        With offload, in pinned host memory (`on_host=False` gives the device-memory twin used inside a step)."""
        host = self.offload_active if on_host is None else on_host
        return self._shardings(abstract_opt_state, _STAGES[self.name].opt, "pinned_host" if host else None)

    def batch_sharding(self, batch: dict[str, Any]) -> dict[str, NamedSharding]:
        return {k: NamedSharding(self.mesh, batch_spec(k, tuple(np.shape(v)), self.sizes)) for k, v in batch.items()}

    def sample_sharding(self, x: Any, batch_size: int) -> NamedSharding:
        """Per-sample arrays (leading dim = batch size) split like the batch; anything else replicated."""
        shape = tuple(np.shape(x))
        split = bool(shape) and shape[0] == batch_size
        return NamedSharding(self.mesh, split_spec(0, shape, self.sizes, "a per-sample array") if split
                             else PartitionSpec())  # fmt: skip

    @property
    def replicated(self) -> NamedSharding:
        return NamedSharding(self.mesh, PartitionSpec())

    # ----------------------------------------------------------------- placement

    def place(self, tree: Any, shardings: Any) -> Any:
        """Put a tree on the mesh. Host (numpy) leaves are cut per device, so no device ever holds a whole array
        it should only hold a shard of, and each host passes only its own devices' slices (multi-host safe)."""
        if self.is_abstract:
            raise ValueError("an abstract strategy (planning mesh) cannot place arrays; use Strategy.from_config")

        def put(x, s):
            if isinstance(x, jax.Array):
                return jax.device_put(x, s)
            x = np.asarray(x)
            return jax.make_array_from_callback(x.shape, s, lambda idx: x[idx])

        return jax.tree.map(put, tree, shardings)

    def listing(self, tree: Any, shardings: Any) -> str:
        """One line per leaf: path, shape, spec, bytes per device; then the fallbacks taken so far."""
        rows = []
        for (path, leaf), s in zip(jax.tree_util.tree_flatten_with_path(tree)[0], jax.tree.leaves(shardings)):
            per = shard_bytes(leaf, s)
            rows.append(f"{path_str(path):70s} {str(tuple(leaf.shape)):22s} {str(s.spec):40s} {per:>14,d}")
        return "\n".join(rows + [f"fallback: {n}" for n in self.notes])


def shard_bytes(leaf: Any, sharding: NamedSharding) -> int:
    """Bytes of the largest shard of `leaf` on one device under `sharding`."""
    return math.prod(sharding.shard_shape(tuple(leaf.shape))) * np.dtype(leaf.dtype).itemsize


# --------------------------------------------------------------------------- train step


class TrainStep:
    """Micro-batch gradient accumulation and one optimizer step, jitted with the strategy's shardings.

    `loss_fn(params, batch, inputs, scalars) -> (loss, metrics)`: `batch` the model inputs, `inputs` a record
    (NamedTuple) of per-sample arrays split like the batch, `scalars` a record shared by every micro-batch. Each
    micro-batch's gradient (of its loss times `grad_scale`) is added into an accumulator laid out by
    `grad_shardings` (donated, so it is updated in place): for zero2/zero3 this makes the cross-device reduction a
    reduce-scatter. A step of one micro-batch takes its gradient as the sum, with no accumulator. Metrics are summed
    on device and read once per step.

    The optimizer runs as two programs so that neither holds a parameter-sized temporary: the gradient processing
    (`learner_jax.optim.Optimizer.pre`: frozen leaves zeroed, global-norm clip) overwrites the donated sum, then
    AdamW (`post`) reads it and updates params and state in place. One program with the clip inside kept the clipped
    gradient and the update as temporaries (4.5 GB for 2.3 GB of fp32 params). A non-finite gradient norm keeps the
    old params and optimizer state (a conditional on device, so donation stays safe). A plain optax
    transformation (no `pre`) runs whole in the second program.
    """

    def __init__(self, strategy: Strategy, loss_fn: Callable, tx: optax.GradientTransformation, abstract_params: Any,
                 frozen: Any = None):  # fmt: skip
        if strategy.is_abstract:
            raise ValueError("TrainStep needs a strategy on real devices (Strategy.from_config)")
        # `frozen`: placed arrays the loss sees beside the trained params (a LoRA base) with no gradient, no
        # accumulator and no optimizer state; the loss gets both as one tree.
        self.frozen = {} if frozen is None else frozen
        loss_fn = partial(_with_frozen, loss_fn)
        self.strategy, self.tx, self.loss_fn = strategy, tx, loss_fn
        self._metric_shapes: Optional[dict] = None
        self.grad_bytes: dict[str, int] = {}  # per-device bytes of the step's gradient sum, measured on the first step
        abstract_params = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), abstract_params)
        abstract_opt = jax.eval_shape(tx.init, abstract_params)
        self.param_shardings = strategy.param_shardings(abstract_params)
        self.grad_shardings = strategy.grad_shardings(abstract_params)
        self.opt_shardings = strategy.opt_shardings(abstract_opt)
        opt_on_device = strategy.opt_shardings(abstract_opt, on_host=False)
        rep = strategy.replicated
        pre, split = getattr(tx, "pre", None), getattr(tx, "split", 0)

        def scaled_loss(params, frozen, batch, inputs, scalars, scale):
            loss, metrics = loss_fn(params, frozen, batch, inputs, scalars)
            return loss * scale, {"loss": loss, **metrics}

        def grad(params, frozen, batch, inputs, scalars, scale):
            (_, metrics), g = jax.value_and_grad(scaled_loss, has_aux=True)(params, frozen, batch, inputs, scalars,
                                                                            scale)  # fmt: skip
            return g, metrics

        def accumulate(params, frozen, acc, sums, batch, inputs, scalars, scale):
            g, metrics = grad(params, frozen, batch, inputs, scalars, scale)
            return jax.tree.map(jnp.add, acc, g), jax.tree.map(jnp.add, sums, metrics)

        def prepare(pre_state, grads):
            gnorm = optax.global_norm(grads)  # before frozen leaves are zeroed, as logged so far
            if pre is not None:  # stateless: its state stays as initialised
                grads, _ = pre.update(grads, pre_state)
            return grads, gnorm, jnp.isfinite(gnorm)

        def apply(params, opt_state, grads, finite):
            if strategy.offload_active:  # compute on device memory, store back on host (out_shardings)
                opt_state = jax.device_put(opt_state, opt_on_device)

            def update(operands):
                params, opt_state = operands
                if pre is None:
                    updates, new_opt = tx.update(grads, opt_state, params)
                else:
                    updates, post_state = tx.post.update(grads, opt_state[split:], params)
                    new_opt = (*opt_state[:split], *post_state)
                return optax.apply_updates(params, updates), new_opt

            return jax.lax.cond(finite, update, lambda operands: operands, (params, opt_state))

        self._grad = jax.jit(grad, out_shardings=(self.grad_shardings, rep))
        self._accumulate = jax.jit(accumulate, out_shardings=(self.grad_shardings, rep), donate_argnums=(2, 3))
        self._prepare = jax.jit(prepare, out_shardings=(self.grad_shardings, rep, rep), donate_argnums=1)
        self._pre_state = (lambda opt_state: opt_state[:split]) if pre is not None else (lambda opt_state: ())
        self._apply = jax.jit(apply, in_shardings=(self.param_shardings, self.opt_shardings, self.grad_shardings, rep),
                              out_shardings=(self.param_shardings, self.opt_shardings),
                              donate_argnums=(0, 1))  # fmt: skip
        self._zeros = jax.jit(lambda: jax.tree.map(lambda a: jnp.zeros(a.shape, a.dtype), abstract_params),
                              out_shardings=self.grad_shardings)  # fmt: skip
        self._init = jax.jit(tx.init, in_shardings=(self.param_shardings,), out_shardings=self.opt_shardings)

    def init_opt_state(self, params: Any) -> Any:
        return self._init(params)

    def place_micro_batch(self, batch: dict[str, Any], inputs: Any = ()) -> tuple[dict[str, jax.Array], Any]:
        """The batch split on its B dims; per-sample inputs split likewise, anything else replicated. Arrays
        already in place are left as they are."""
        s = self.strategy
        B = int(np.shape(batch["input_ids_BT"])[0])
        placed = s.place(batch, s.batch_sharding(batch))
        return placed, jax.tree.map(lambda a: s.place(a, s.sample_sharding(a, B)), inputs)

    def __call__(self, params: Any, opt_state: Any, micro_batches: Iterable[tuple[dict[str, Any], Any]],
                 scalars: Any = (), grad_scale: float = 1.0) -> tuple[Any, Any, dict[str, float]]:  # fmt: skip
        """One optimizer step over `micro_batches` of (batch, inputs). Returns new params, optimizer state and
        metrics: losses (keys ending in "loss") combined as the gradients are (summed, times `grad_scale`), so they
        do not depend on how the step is cut into micro-batches; other metrics averaged; grad_norm, skipped."""
        scalars = jax.device_put(scalars, self.strategy.replicated)
        scale = jax.device_put(jnp.float32(grad_scale), self.strategy.replicated)
        micro_batches = iter(micro_batches)
        first, second = next(micro_batches, None), next(micro_batches, None)
        if first is None:
            raise ValueError("TrainStep needs at least one micro-batch")
        if second is None:  # the micro-batch's gradient is the sum: no accumulator
            grads, sums = self._grad(params, self.frozen, *self.place_micro_batch(*first), scalars, scale)
            n = 1
        else:
            grads, sums, n = self._zeros(), None, 0
            for batch, inputs in itertools.chain([first, second], micro_batches):
                batch, inputs = self.place_micro_batch(batch, inputs)
                if self._metric_shapes is None:  # metric names are known once the loss is traced
                    loss, metrics = jax.eval_shape(self.loss_fn, params, self.frozen, batch, inputs, scalars)
                    self._metric_shapes = {"loss": loss, **metrics}
                if sums is None:  # placed like the step's own output, so the first call compiles the same program
                    sums = jax.device_put(jax.tree.map(lambda a: np.zeros(a.shape, a.dtype), self._metric_shapes),
                                          self.strategy.replicated)  # fmt: skip
                grads, sums = self._accumulate(params, self.frozen, grads, sums, batch, inputs, scalars, scale)
                n += 1
        if not self.grad_bytes:
            self.grad_bytes = device_bytes(grads)
        grads, gnorm, finite = self._prepare(self._pre_state(opt_state), grads)
        params, opt_state = self._apply(params, opt_state, grads, finite)
        del grads
        sums, gnorm, finite = jax.device_get((sums, gnorm, finite))  # the step's one read from the devices
        metrics = {k: float(v) * (grad_scale if k.endswith("loss") else 1.0 / n) for k, v in sums.items()}
        metrics["grad_norm"] = float(gnorm)
        metrics["skipped"] = 0.0 if bool(finite) else 1.0
        return params, opt_state, metrics


def _with_frozen(loss_fn: Callable, params: Any, frozen: Any, *args: Any) -> Any:
    return loss_fn(merge_lora(frozen, params) if frozen else params, *args)


def device_bytes(tree: Any) -> dict[str, int]:
    """Bytes each leaf of a placed tree takes on one device (its largest addressable shard), by path."""
    flat = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {path_str(p): max(s.data.nbytes for s in x.addressable_shards) for p, x in flat}
