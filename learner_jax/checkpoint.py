"""Orbax checkpoints of the whole training state: arrays (policy, critic, optimizer states) plus JSON metadata
(step, data position, RNG state, policy version, metrics history), each step sealed by a manifest.

Atomicity: orbax writes each step into a temporary directory and renames it when complete, so a crash mid-write
leaves the previous checkpoint as the newest one; `cleanup_tmp_directories` removes the debris on the next start.
The manifest (`<step>/lmmrl_manifest.json`) is written last, atomically (temporary file, fsync, rename), once
orbax has committed the step: a step directory without one is a partial checkpoint (the save was cut short in
the few milliseconds between orbax's rename and ours) and is refused like a corrupted one. SIGINT is held back
while the manifest is written. A save that fails (disk full, ...) raises `CheckpointError` naming the step and
the previous intact checkpoint, and removes what it left of the failed step.

The manifest holds
  arrays   per array (tree path "actor/params/..."): dtype, shape and the sha256 of its bytes in C order,
           computed on the host from the arrays being saved, before orbax writes them;
  meta     the sha256 of the JSON metadata (canonical form);
  files    every file orbax wrote, by relative path: its size, and the sha256 of its bytes, except for array
           data files (`.../d/<hash>`) larger than 1 MiB: those hold array chunks, checked through the arrays
           restored from them (their small siblings, index nodes and inlined small arrays, are hashed);
  sha256   of the manifest itself.
`verify(step)` checks the manifest and the files (cheap: it reads the small files only); `restore` also checks
every restored array against its digest, and refuses a checkpoint that differs anywhere with a `CheckpointError`
naming the checkpoint's path and the array or file.

Several learner processes: every process computes the digests of what it can address; an array spread over
processes (not fully addressable) is digested shard by shard (`shards`: shard index -> sha256 of the shards of
replica 0 this process holds), and process 0, which writes the manifest, records its own shards only. On restore
those shard digests are compared where the restoring process holds a shard of the same index (same layout);
arrays it cannot address whole, or whose layout changed, are covered by the file checks only. Every process
checks the files; the verdict on the arrays is agreed by all processes before one is used.

Which checkpoint `restore` takes (`select`, from `--load_checkpoint[=...]`):
  "latest" (default)  the newest step, verified; refused (with the reason) if it is not intact;
  "latest_intact"     the newest step that verifies; each newer one skipped is named with the reason;
  "<step>"            that step, verified.
Steps after the one restored are renamed `<step>.refused` (they failed verification) or `<step>.superseded`
(resuming from an older step), so that the resumed run can write those steps again; nothing is deleted.
Restoring against an abstract tree with shardings places arrays directly into another strategy's layout.
"""
from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import shutil
import signal
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Optional

import numpy as np

MANIFEST = "lmmrl_manifest.json"
MANIFEST_FORMAT = 1
LATEST, LATEST_INTACT = "latest", "latest_intact"


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be trusted or written; `path` is the checkpoint, `what` the array or file."""

    def __init__(self, path: str | Path, why: str, what: Optional[str] = None):
        self.path, self.why, self.what = Path(path), why, what
        super().__init__(f"checkpoint {self.path}: {why}")


def normalize_selection(value: Any) -> Optional[str]:
    """`--load_checkpoint` as given -> "latest", "latest_intact", a step as digits, or None (no resume)."""
    if value is None or value is False:
        return None
    if value is True or value == "" or value == LATEST:
        return LATEST
    if value == LATEST_INTACT:
        return LATEST_INTACT
    if isinstance(value, int) or (isinstance(value, str) and value.isdigit()):
        return str(int(value))
    raise ValueError(f"--load_checkpoint={value!r}: expected nothing (the newest checkpoint), {LATEST}, "
                     f"{LATEST_INTACT} or a step number")  # fmt: skip


class Checkpointer:
    def __init__(self, directory: str | Path, max_to_keep: int = 3):
        import orbax.checkpoint as ocp

        self.directory = Path(directory).resolve()
        options = ocp.CheckpointManagerOptions(
            max_to_keep=max_to_keep, create=True, cleanup_tmp_directories=True, enable_async_checkpointing=False
        )
        self.manager = ocp.CheckpointManager(self.directory, options=options)

    def latest_step(self) -> Optional[int]:
        return self.manager.latest_step()

    def all_steps(self) -> list[int]:
        return sorted(int(s) for s in self.manager.all_steps())

    def step_dir(self, step: int) -> Path:
        return self.directory / str(int(step))

    # ------------------------------------------------------------------ save

    def save(self, step: int, arrays: Any, meta: dict) -> None:
        import orbax.checkpoint as ocp

        meta = json.loads(json.dumps(meta))  # as it reads back (string keys), so its digest matches on restore
        digests = array_digests(arrays)  # from the arrays being saved, before anything is written
        try:
            self.manager.save(
                step, args=ocp.args.Composite(arrays=ocp.args.StandardSave(arrays), meta=ocp.args.JsonSave(meta))
            )
            self.manager.wait_until_finished()
        except Exception as exc:
            self._discard_failed(step)
            raise CheckpointError(self.step_dir(step), f"could not be written{_disk_full(exc)}: {_one_line(exc)}; "
                                  f"{self._previous_note(step)}") from exc  # fmt: skip
        if not _leader():
            return
        body = {"format": MANIFEST_FORMAT, "step": int(step), "arrays": digests, "meta_sha256": _sha_json(meta),
                "process_count": _process_count()}  # fmt: skip
        try:
            with _sigint_held():
                write_manifest(self.step_dir(step), body)
        except Exception as exc:
            self._discard_failed(step, committed=True)
            raise CheckpointError(self.step_dir(step), f"could not write its manifest{_disk_full(exc)}: "
                                  f"{_one_line(exc)}; "
                                  f"{self._previous_note(step)}") from exc  # fmt: skip

    def _discard_failed(self, step: int, committed: bool = False) -> None:
        """Remove what a failed save of `step` left (orbax's temporary directory, or the committed step without a
        manifest), so the previous checkpoint stays the newest and the space is given back."""
        if not _leader():
            return
        for p in self.directory.glob(f"{int(step)}.orbax-checkpoint-tmp*"):
            shutil.rmtree(p, ignore_errors=True)
        if committed and not (self.step_dir(step) / MANIFEST).exists():
            shutil.rmtree(self.step_dir(step), ignore_errors=True)
        with contextlib.suppress(Exception):
            self.manager.reload()

    def _previous_note(self, step: int) -> str:
        prev = last_intact_checkpoint(self.directory, before=step)
        if prev is None:
            return f"no earlier intact checkpoint in {self.directory}"
        return f"the previous checkpoint, step {prev[0]} ({prev[1]}), is intact"

    # ------------------------------------------------------------------ verify and restore

    def verify(self, step: int) -> dict:
        """The step's manifest after checking it and the files against it (not the arrays: see `restore`)."""
        return verify_files(self.step_dir(step))

    def last_intact(self) -> Optional[int]:
        found = last_intact_checkpoint(self.directory)
        return None if found is None else found[0]

    def restore(self, abstract_arrays: Any, step: Optional[int] = None, *, select: Any = None,
                set_aside_newer: bool = True) -> tuple[Any, dict, int]:  # fmt: skip
        """Restore into the structure, dtypes and shardings of `abstract_arrays` (arrays or ShapeDtypeStructs),
        verified against the manifest. `step` (or `select`, see the module docstring) picks the checkpoint."""
        import jax

        sel = normalize_selection(step if step is not None else select) or LATEST
        steps = self.all_steps()
        if not steps:
            raise FileNotFoundError(f"no checkpoint in {self.directory}")
        if sel == LATEST:
            candidates = [steps[-1]]
        elif sel == LATEST_INTACT:
            candidates = steps[::-1]
        else:
            if int(sel) not in steps:
                raise FileNotFoundError(f"no checkpoint step {sel} in {self.directory} (it holds steps {steps})")
            candidates = [int(sel)]
        target = jax.tree.map(_abstract, abstract_arrays)
        refused: list[int] = []
        for s in candidates:
            try:
                arrays, meta = self._restore_verified(s, target)
            except CheckpointError as exc:
                if sel != LATEST_INTACT:
                    older = [x for x in steps if x < s]
                    hint = (f"; pass --load_checkpoint={LATEST_INTACT} to resume from the newest intact one of the "
                            f"older steps {older}" if older else "")  # fmt: skip
                    raise CheckpointError(exc.path, exc.why + hint, exc.what) from exc
                refused.append(s)
                _say(f"checkpoint: skipping step {s}: {exc}")
                continue
            if refused:
                _say(f"checkpoint: resuming from step {s} ({self.step_dir(s)}), the newest intact one")
            if set_aside_newer:
                self._set_aside([x for x in steps if x > s], refused)
            return arrays, meta, s
        raise CheckpointError(self.directory, f"no intact checkpoint among steps {steps}")

    def _restore_verified(self, step: int, target: Any) -> tuple[Any, dict]:
        import orbax.checkpoint as ocp

        path = self.step_dir(step)
        manifest = verify_files(path)
        try:
            out = self.manager.restore(
                step, args=ocp.args.Composite(arrays=ocp.args.StandardRestore(target), meta=ocp.args.JsonRestore())
            )
        except Exception as exc:
            raise CheckpointError(path, f"orbax could not read it: {_one_line(exc)}") from exc
        problem = check_restored(path, manifest, out["arrays"], out["meta"])
        if not _all_processes_agree(problem is None):
            raise problem or CheckpointError(path, "another learner process found restored arrays that differ "
                                                   "from the manifest")  # fmt: skip
        return out["arrays"], out["meta"]

    def _set_aside(self, newer: list[int], refused: list[int]) -> None:
        if not newer:
            return
        if _leader():
            for s in newer:
                suffix = "refused" if s in refused else "superseded"
                dst = _free_name(self.directory / f"{s}.{suffix}")
                os.rename(self.step_dir(s), dst)
                why = "not intact" if s in refused else "newer than the step resumed from"
                _say(f"checkpoint: moved step {s} aside to {dst} ({why}), so the resumed run can write step {s} again")
        _barrier("lmmrl_checkpoint_set_aside")
        self.manager.reload()

    def meta(self, step: Optional[int] = None) -> dict:
        """The JSON metadata of a checkpoint (loop counters, data position, the resolved config) without its
        arrays, after checking the checkpoint's files against its manifest."""
        import orbax.checkpoint as ocp

        step = self.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"no checkpoint in {self.directory}")
        manifest = verify_files(self.step_dir(step))
        meta = self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
        if _sha_json(meta) != manifest["meta_sha256"]:
            raise CheckpointError(self.step_dir(step), "its metadata differs from the manifest", "meta")
        return meta

    def close(self) -> None:
        self.manager.close()


# ---------------------------------------------------------------------- manifest: writing and checking files


DATA_HASH_LIMIT = 1 << 20  # data files above this hold array chunks, checked through the restored arrays


def _is_data_file(rel: Path) -> bool:
    return "d" in rel.parts[:-1]  # ocdbt's data files: `arrays/[ocdbt.process_N/]d/<hash>`


def _file_entries(step_dir: Path) -> dict[str, dict]:
    out = {}
    for p in sorted(step_dir.rglob("*")):
        if not p.is_file() or p.name in (MANIFEST, MANIFEST + ".tmp"):
            continue
        rel = p.relative_to(step_dir)
        entry: dict[str, Any] = {"size": p.stat().st_size}
        if not _is_data_file(rel) or entry["size"] <= DATA_HASH_LIMIT:
            entry["sha256"] = _sha_file(p)
        out[rel.as_posix()] = entry
    return out


def write_manifest(step_dir: Path, body: dict) -> None:
    """Seal `step_dir`: the files' sizes and digests plus `body`, written to a temporary file, synced, renamed."""
    body = {**body, "files": _file_entries(step_dir)}
    doc = {**body, "sha256": _sha_json(body)}
    tmp = step_dir / (MANIFEST + ".tmp")
    with open(tmp, "w") as f:
        f.write(json.dumps(doc, indent=1, sort_keys=True))
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, step_dir / MANIFEST)
    _fsync_dir(step_dir)


def read_manifest(step_dir: Path) -> dict:
    path = Path(step_dir)
    m = path / MANIFEST
    if not path.is_dir():
        raise CheckpointError(path, "does not exist")
    if not m.is_file():
        raise CheckpointError(path, f"partial: it has no manifest ({MANIFEST}), so its save did not finish (or it "
                                    f"was written before checkpoints carried manifests)", MANIFEST)  # fmt: skip
    try:
        doc = json.loads(m.read_text())
        body = {k: v for k, v in doc.items() if k != "sha256"}
        ok = doc.get("sha256") == _sha_json(body) and doc.get("format") == MANIFEST_FORMAT
    except (ValueError, UnicodeDecodeError, AttributeError) as exc:
        raise CheckpointError(path, f"its manifest {MANIFEST} is unreadable ({_one_line(exc)})", MANIFEST) from exc
    if not ok:
        raise CheckpointError(path, f"its manifest {MANIFEST} is corrupted (its own sha256 does not match)", MANIFEST)
    return body


def verify_files(step_dir: Path) -> dict:
    """Check a step directory's manifest and every file it lists (size; sha256 for all but array data files)."""
    step_dir = Path(step_dir)
    manifest = read_manifest(step_dir)
    for rel, want in manifest["files"].items():
        p = step_dir / rel
        if not p.is_file():
            raise CheckpointError(step_dir, f"file {rel} is missing", rel)
        size = p.stat().st_size
        if size != want["size"]:
            raise CheckpointError(step_dir, f"file {rel} has {size} bytes, the manifest says {want['size']} "
                                            f"(truncated or overwritten)", rel)  # fmt: skip
        if "sha256" in want and _sha_file(p) != want["sha256"]:
            raise CheckpointError(step_dir, f"file {rel} differs from the manifest (sha256)", rel)
    return manifest


def check_restored(step_dir: Path, manifest: dict, arrays: Any, meta: dict) -> Optional[CheckpointError]:
    """The first difference between what was restored and the manifest, or None."""
    if _sha_json(meta) != manifest["meta_sha256"]:
        return CheckpointError(step_dir, "its metadata (meta) differs from the manifest", "meta")
    got = array_digests(arrays)
    for name, have in got.items():
        want = manifest["arrays"].get(name)
        if want is None:
            return CheckpointError(step_dir, f"array {name} is not in its manifest", name)
        if (want["dtype"], want["shape"]) != (have["dtype"], have["shape"]):
            continue  # restored into another dtype or shape on purpose: the file checks cover it
        if "sha256" in want and "sha256" in have and want["sha256"] != have["sha256"]:
            return CheckpointError(step_dir, f"array {name} ({have['dtype']}{have['shape']}) differs from the "
                                             f"manifest (sha256 of its bytes)", name)  # fmt: skip
        for index, digest in have.get("shards", {}).items():
            if want.get("shards", {}).get(index, digest) != digest:
                return CheckpointError(step_dir, f"array {name}, shard {index}, differs from the manifest", name)
    return None


def last_intact_checkpoint(directory: str | Path, before: Optional[int] = None) -> Optional[tuple[int, Path]]:
    """(step, path) of the newest step directory whose files match its manifest (arrays unchecked), optionally
    older than `before`; None if there is none. Needs neither orbax nor JAX."""
    directory = Path(directory)
    if not directory.is_dir():
        return None
    steps = sorted((int(p.name) for p in directory.iterdir() if p.is_dir() and p.name.isdigit()), reverse=True)
    for s in steps:
        if before is not None and s >= before:
            continue
        try:
            verify_files(directory / str(s))
        except CheckpointError:
            continue
        return s, directory / str(s)
    return None


# ---------------------------------------------------------------------- array digests


def array_digests(tree: Any, threads: Optional[int] = None) -> dict[str, dict]:
    """Tree path -> {dtype, shape, sha256} (or `shards` for an array spread over processes) of every leaf."""
    import jax

    flat = jax.tree_util.tree_flatten_with_path(tree)[0]
    names = [jax.tree_util.keystr(p, simple=True, separator="/") for p, _ in flat]
    workers = threads or min(4, os.cpu_count() or 1)
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="ckpt-digest") as pool:  # hashlib frees the GIL
        digests = list(pool.map(_digest, [x for _, x in flat]))
    return dict(zip(names, digests))


def _digest(x: Any) -> dict:
    import jax

    if isinstance(x, jax.Array) and not x.is_fully_addressable:
        shards = {_index_key(s.index, x.shape): _sha_array(_host(s.data))
                  for s in x.addressable_shards if s.replica_id == 0}  # fmt: skip
        return {"dtype": str(x.dtype), "shape": list(x.shape), "shards": shards}
    a = _host(x)
    return {"dtype": str(a.dtype), "shape": list(a.shape), "sha256": _sha_array(a)}


def _host(x: Any) -> np.ndarray:
    """A host copy the jax.Array does not keep: `np.asarray` on a device or sharded array caches the copy on the
    array (`_npy_value`), which would hold the whole state on the host until the arrays die. A copy onto the
    local CPU device is a temporary, read without a further copy."""
    import jax

    if not isinstance(x, jax.Array):
        return np.asarray(x)
    try:
        cpu = jax.local_devices(backend="cpu")[0]
    except RuntimeError:  # no CPU backend (JAX_PLATFORMS without cpu): np.asarray caches the copy on the array
        return np.asarray(x)
    # keep the array's memory kind: a pinned_host array (offloaded optimizer state) cannot land in device memory
    return np.asarray(jax.device_put(x, jax.sharding.SingleDeviceSharding(cpu, memory_kind=x.sharding.memory_kind)))


def _index_key(index: tuple, shape: tuple) -> str:
    """A shard's place in its array as "start:stop" per axis (the same whatever the slices' spelling)."""
    return ",".join("{}:{}".format(*s.indices(n)[:2]) for s, n in zip(index, shape))


def _sha_array(a: np.ndarray) -> str:
    a = np.ascontiguousarray(a)
    return hashlib.sha256(a.reshape(-1).view(np.uint8).data).hexdigest()


def _sha_file(path: Path, chunk: int = 16 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def _sha_json(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


# ---------------------------------------------------------------------- small helpers


def _abstract(x: Any) -> Any:
    import jax

    if isinstance(x, jax.ShapeDtypeStruct):
        return x
    sharding = getattr(x, "sharding", None)
    return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding)


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text[:500]}{'...' if len(text) > 500 else ''}"


def _disk_full(exc: BaseException) -> str:
    """" (no space left on the device)" when that is why `exc` happened (orbax's tensorstore says it in text)."""
    while exc is not None:
        if getattr(exc, "errno", None) == errno.ENOSPC or "No space left on device" in str(exc):
            return " (no space left on the device)"
        exc = exc.__cause__ or exc.__context__
    return ""


def _say(msg: str) -> None:
    if _leader():
        print(msg, file=sys.stderr, flush=True)


def _free_name(path: Path) -> Path:
    if not path.exists():
        return path
    k = 2
    while (p := path.with_name(f"{path.name}{k}")).exists():
        k += 1
    return p


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _jax_loaded():
    return sys.modules.get("jax")


def _leader() -> bool:
    jax = _jax_loaded()
    return jax is None or jax.process_index() == 0


def _process_count() -> int:
    jax = _jax_loaded()
    return 1 if jax is None else jax.process_count()


def _barrier(name: str) -> None:
    if _process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


def _all_processes_agree(ok: bool) -> bool:
    if _process_count() == 1:
        return ok
    from jax.experimental import multihost_utils

    return bool(np.all(multihost_utils.process_allgather(np.int32(ok))))


@contextlib.contextmanager
def _sigint_held():
    """Hold back SIGINT (Ctrl-C) for the block, then deliver it: the manifest is written whole or not at all."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    caught: list = []
    previous = signal.signal(signal.SIGINT, lambda sig, frame: caught.append((sig, frame)))
    if previous is None:  # a handler installed outside Python
        previous = signal.SIG_DFL
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
        if caught and callable(previous):
            previous(*caught[0])
        elif caught and previous != signal.SIG_IGN:
            raise KeyboardInterrupt
