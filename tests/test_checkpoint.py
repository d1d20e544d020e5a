import signal
import subprocess
import sys
import textwrap
import time

import jax.numpy as jnp
import numpy as np

from learner_jax.checkpoint import Checkpointer


def test_save_restore_round_trip_with_metadata(tmp_path):
    ck = Checkpointer(tmp_path / "ck", max_to_keep=2)
    tree = {"policy": {"w": jnp.arange(6.0).reshape(2, 3)}, "opt": [jnp.zeros(3), jnp.ones((), jnp.int32)]}
    for step in (1, 2, 3):
        ck.save(step, jax_tree_scale(tree, step), {"step": step, "data": {"episode": 0, "position": step * 8}})
    assert ck.latest_step() == 3
    arrays, meta, step = ck.restore(tree)
    np.testing.assert_array_equal(arrays["policy"]["w"], 3 * np.arange(6.0).reshape(2, 3))
    assert meta["data"]["position"] == 24 and step == 3
    assert sorted(p.name for p in (tmp_path / "ck").iterdir() if p.name.isdigit()) == ["2", "3"]  # max_to_keep


def jax_tree_scale(tree, k):
    import jax

    return jax.tree.map(lambda x: x * k, tree)


def test_a_crash_mid_save_leaves_the_previous_checkpoint_loadable(tmp_path):
    script = textwrap.dedent(f"""
        import sys, numpy as np, jax.numpy as jnp
        from learner_jax.checkpoint import Checkpointer
        ck = Checkpointer({str(tmp_path / 'ck')!r})
        ck.save(1, {{"w": jnp.ones(4)}}, {{"step": 1}})
        print("saving2", flush=True)
        ck.save(2, {{"w": jnp.asarray(np.ones(128 << 20, np.float32))}}, {{"step": 2}})
        print("saved2", flush=True)
    """)
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "saving2"
    deadline = time.monotonic() + 60
    while not any("tmp" in p.name for p in (tmp_path / "ck").iterdir()):  # step 2 is being written
        assert time.monotonic() < deadline and proc.poll() is None, "step 2 never started writing"
        time.sleep(0.002)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (tmp_path / "ck" / "2").exists(), "the kill landed after the save finished"
    ck = Checkpointer(tmp_path / "ck")
    assert ck.latest_step() == 1
    arrays, meta, _ = ck.restore({"w": jnp.zeros(4)})
    np.testing.assert_array_equal(arrays["w"], np.ones(4))
    assert meta == {"step": 1}


# ---------------------------------------------------------------- manifest: what is sealed, and what is refused

import errno  # noqa: E402
import hashlib  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

from learner_jax import checkpoint as ckpt_module  # noqa: E402
from learner_jax.checkpoint import MANIFEST, CheckpointError, last_intact_checkpoint, normalize_selection  # noqa: E402


def state_tree(seed: int = 0):
    """A training-state-like tree: a float32 matrix big enough for its own data file, bf16 and int leaves."""
    rng = np.random.default_rng(seed)
    return {
        "actor": {"params": {"w": jnp.asarray(rng.standard_normal((384, 1024), dtype=np.float32)),
                             "b": jnp.asarray(rng.standard_normal(64, dtype=np.float32)).astype(jnp.bfloat16)},
                  "opt": [jnp.zeros(3), jnp.asarray(seed + 1, jnp.int32)]},
    }  # fmt: skip


@pytest.fixture
def two_steps(tmp_path):
    """Steps 1 and 2 of a checkpoint directory, and the tree of step 2."""
    ck = Checkpointer(tmp_path / "ck")
    ck.save(1, state_tree(1), {"step": 1})
    ck.save(2, state_tree(2), {"step": 2, "data": {"position": 16}})
    yield ck, state_tree(2)
    ck.close()


def flip_byte(path: Path, at: float = 0.5) -> None:
    data = bytearray(path.read_bytes())
    data[int(len(data) * at)] ^= 0x20
    path.write_bytes(bytes(data))


def test_manifest_seals_every_array_the_metadata_and_every_file(two_steps):
    ck, tree = two_steps
    manifest = ck.verify(2)
    w = np.asarray(tree["actor"]["params"]["w"])
    assert manifest["arrays"]["actor/params/w"] == {
        "dtype": "float32", "shape": [384, 1024], "sha256": hashlib.sha256(w.tobytes()).hexdigest()}
    assert set(manifest["arrays"]) == {"actor/params/w", "actor/params/b", "actor/opt/0", "actor/opt/1"}
    assert manifest["arrays"]["actor/params/b"]["dtype"] == "bfloat16"
    on_disk = {p.relative_to(ck.step_dir(2)).as_posix() for p in ck.step_dir(2).rglob("*") if p.is_file()}
    assert set(manifest["files"]) == on_disk - {MANIFEST}
    unhashed = [k for k, v in manifest["files"].items() if "sha256" not in v]
    assert unhashed and all("/d/" in k and manifest["files"][k]["size"] > ckpt_module.DATA_HASH_LIMIT
                            for k in unhashed)  # fmt: skip
    arrays, meta, step = ck.restore(tree)
    assert step == 2 and meta == {"step": 2, "data": {"position": 16}}
    np.testing.assert_array_equal(arrays["actor"]["params"]["w"], w)
    assert not list(ck.step_dir(2).glob("*.tmp"))


def _files_of_each_kind(step_dir: Path) -> dict[str, Path]:
    files = [p for p in step_dir.rglob("*") if p.is_file()]
    data = [p for p in files if "d" in p.relative_to(step_dir).parts[:-1]]
    return {
        "array data (the chunks of actor/params/w)": max(data, key=lambda p: p.stat().st_size),
        "array data (ocdbt index / inlined small arrays)": min(data, key=lambda p: p.stat().st_size),
        "orbax tree metadata (arrays/_METADATA)": step_dir / "arrays" / "_METADATA",
        "orbax sharding JSON (arrays/_sharding)": step_dir / "arrays" / "_sharding",
        "orbax step metadata (_CHECKPOINT_METADATA)": step_dir / "_CHECKPOINT_METADATA",
        "orbax ocdbt manifest (arrays/manifest.ocdbt)": step_dir / "arrays" / "manifest.ocdbt",
        "our metadata (meta/metadata)": step_dir / "meta" / "metadata",
        "the manifest": step_dir / MANIFEST,
    }


@pytest.mark.parametrize("kind", [
    "array data (the chunks of actor/params/w)", "array data (ocdbt index / inlined small arrays)",
    "orbax tree metadata (arrays/_METADATA)", "orbax sharding JSON (arrays/_sharding)",
    "orbax step metadata (_CHECKPOINT_METADATA)", "orbax ocdbt manifest (arrays/manifest.ocdbt)",
    "our metadata (meta/metadata)", "the manifest"])  # fmt: skip
@pytest.mark.parametrize("damage", ["one byte flipped", "truncated"])
def test_a_damaged_file_of_each_kind_is_refused_naming_the_path_and_what_differs(two_steps, kind, damage):
    ck, tree = two_steps
    path = _files_of_each_kind(ck.step_dir(2))[kind]
    rel = path.relative_to(ck.step_dir(2)).as_posix()
    if damage == "truncated":
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    else:
        flip_byte(path)
    with pytest.raises(CheckpointError) as err:
        ck.restore(tree)
    msg = str(err.value)
    assert str(ck.step_dir(2)) in msg
    if rel == MANIFEST:
        assert MANIFEST in msg and ("corrupted" in msg or "unreadable" in msg)
    elif kind.startswith("array data (the chunks") and damage == "one byte flipped":
        assert "array actor/params/w" in msg and err.value.what == "actor/params/w"  # the bytes are array data
    else:
        assert f"file {rel}" in msg and err.value.what == rel
    assert "--load_checkpoint=latest_intact" in msg and "[1]" in msg  # what to do instead
    if err.value.what != "actor/params/w":  # damage the file checks see is refused without reading any array
        with pytest.raises(CheckpointError):
            ck.verify(2)
        assert last_intact_checkpoint(ck.directory) == (1, ck.step_dir(1))
    arrays, meta, step = ck.restore(tree, select="latest_intact")  # only when asked
    assert step == 1 and meta == {"step": 1}
    np.testing.assert_array_equal(arrays["actor"]["params"]["w"], np.asarray(state_tree(1)["actor"]["params"]["w"]))
    assert (ck.directory / "2.refused").is_dir() and not ck.step_dir(2).exists()  # kept for inspection
    assert ck.all_steps() == [1]
    ck.save(2, state_tree(2), {"step": 2})  # the resumed run writes step 2 again
    assert ck.restore(tree)[2] == 2


def test_latest_intact_names_what_it_skipped_and_why(two_steps, capsys):
    ck, tree = two_steps
    ck.save(3, state_tree(3), {"step": 3})
    flip_byte(ck.step_dir(3) / "meta" / "metadata")
    (ck.step_dir(2) / MANIFEST).unlink()  # as if the save of step 2 had been cut short before its manifest
    _, meta, step = ck.restore(tree, select="latest_intact")
    err = capsys.readouterr().err
    assert step == 1 and meta == {"step": 1}
    assert "skipping step 3" in err and "file meta/metadata differs" in err
    assert "skipping step 2" in err and "partial: it has no manifest" in err
    assert "resuming from step 1" in err
    assert sorted(p.name for p in ck.directory.iterdir()) == ["1", "2.refused", "3.refused"]


def test_a_step_can_be_picked_and_newer_steps_are_set_aside_not_deleted(two_steps):
    ck, tree = two_steps
    _, meta, step = ck.restore(tree, select="1")
    assert step == 1 and meta == {"step": 1}
    assert (ck.directory / "2.superseded" / MANIFEST).is_file() and ck.all_steps() == [1]
    with pytest.raises(FileNotFoundError, match=r"no checkpoint step 7 in .* \(it holds steps \[1\]\)"):
        ck.restore(tree, select=7)


def test_partial_checkpoint_without_manifest_is_refused_by_default(two_steps):
    ck, tree = two_steps
    (ck.step_dir(2) / MANIFEST).unlink()
    with pytest.raises(CheckpointError, match=r"2: partial: it has no manifest .*latest_intact.*\[1\]"):
        ck.restore(tree)
    assert last_intact_checkpoint(ck.directory) == (1, ck.step_dir(1))
    assert ck.last_intact() == 1


def test_selection_values():
    assert [normalize_selection(v) for v in (None, False, True, "", "latest", "latest_intact", "12", 5)] == [
        None, None, "latest", "latest", "latest", "latest_intact", "12", "5"]
    with pytest.raises(ValueError, match="latest_intact or a step number"):
        normalize_selection("newest")


def test_a_failed_save_raises_naming_the_step_and_the_intact_previous_one(tmp_path, monkeypatch):
    """orbax's writer failing mid-save (here: the final rename raising ENOSPC, as a full disk would make any of
    its writes fail): a clear error, the debris removed, the previous checkpoint intact and still the newest."""
    import orbax.checkpoint._src.path.async_path as async_path

    ck = Checkpointer(tmp_path / "ck")
    ck.save(1, state_tree(1), {"step": 1})
    real = async_path.rename

    async def rename(src, dst):
        if Path(dst).name == "2":
            raise OSError(errno.ENOSPC, "No space left on device", str(dst))
        return await real(src, dst)

    monkeypatch.setattr(async_path, "rename", rename)
    with pytest.raises(CheckpointError) as err:
        ck.save(2, state_tree(2), {"step": 2})
    msg = str(err.value)
    assert f"{ck.step_dir(2)}: could not be written (no space left on the device): " in msg
    assert f"the previous checkpoint, step 1 ({ck.step_dir(1)}), is intact" in msg
    assert sorted(p.name for p in ck.directory.iterdir()) == ["1"]  # no temporary directory left behind
    monkeypatch.setattr(async_path, "rename", real)
    assert ck.restore(state_tree(0))[2] == 1
    ck.save(2, state_tree(2), {"step": 2})  # the step can be written once there is room
    assert ck.restore(state_tree(0))[2] == 2


def test_a_failed_manifest_write_removes_the_unsealed_step(tmp_path, monkeypatch):
    ck = Checkpointer(tmp_path / "ck")
    ck.save(1, state_tree(1), {"step": 1})

    def full(step_dir):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(ckpt_module, "_file_entries", full)
    with pytest.raises(CheckpointError, match=r"2: could not write its manifest \(no space left on the device\): "
                                              r"OSError: .*No space left.*step 1"):  # fmt: skip
        ck.save(2, state_tree(2), {"step": 2})
    assert sorted(p.name for p in ck.directory.iterdir()) == ["1"] and ck.latest_step() == 1


def test_a_kill_between_orbax_commit_and_manifest_leaves_a_partial_step_that_is_refused(tmp_path):
    """The one window the manifest adds (orbax has renamed the step, ours is not yet written): the step is partial;
    the default resume refuses it and names the way out; latest_intact takes the previous step."""
    marker = tmp_path / "in_manifest"
    script = textwrap.dedent(f"""
        import time, jax.numpy as jnp
        from learner_jax import checkpoint as m
        real = m.write_manifest
        def paused(step_dir, body):
            if step_dir.name == "2":
                open({str(marker)!r}, "w").close()
                time.sleep(600)
            return real(step_dir, body)
        m.write_manifest = paused
        ck = m.Checkpointer({str(tmp_path / 'ck')!r})
        ck.save(1, {{"w": jnp.ones(4)}}, {{"step": 1}})
        ck.save(2, {{"w": jnp.full(4, 2.0)}}, {{"step": 2}})
    """)
    proc = subprocess.Popen([sys.executable, "-c", script], stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while not marker.exists():
        assert time.monotonic() < deadline and proc.poll() is None, "step 2 never reached its manifest"
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    ck = Checkpointer(tmp_path / "ck")
    assert ck.all_steps() == [1, 2] and not (ck.step_dir(2) / MANIFEST).exists()
    with pytest.raises(CheckpointError, match="partial: it has no manifest"):
        ck.restore({"w": jnp.zeros(4)})
    arrays, meta, step = ck.restore({"w": jnp.zeros(4)}, select="latest_intact")
    assert step == 1 and meta == {"step": 1}
    np.testing.assert_array_equal(arrays["w"], np.ones(4))


def test_multi_process_shard_digests_compare_by_shard_index(monkeypatch):
    """Arrays spread over processes are recorded shard by shard; a restored shard of the same index that differs
    is named, a shard recorded by another process (or another layout) is left to the file checks."""
    manifest = {"meta_sha256": ckpt_module._sha_json({}), "arrays": {
        "x": {"dtype": "float32", "shape": [4, 4], "shards": {"0:2,0:4": "a" * 64, "2:4,0:4": "b" * 64}}}}
    restored = {"x": {"dtype": "float32", "shape": [4, 4], "shards": {"0:2,0:4": "a" * 64}}}
    monkeypatch.setattr(ckpt_module, "array_digests", lambda tree: restored)
    assert ckpt_module.check_restored(Path("/ck/1"), manifest, None, {}) is None
    restored["x"]["shards"] = {"2:4,0:4": "c" * 64, "4:6,0:4": "d" * 64}
    problem = ckpt_module.check_restored(Path("/ck/1"), manifest, None, {})
    assert "array x, shard 2:4,0:4, differs" in str(problem) and problem.what == "x"
    x = jnp.arange(12.0).reshape(3, 4)  # the digest of one shard is the sha256 of its bytes
    assert ckpt_module._index_key(x.addressable_shards[0].index, x.shape) == "0:3,0:4"
    assert ckpt_module._sha_array(ckpt_module._host(x)) == hashlib.sha256(np.asarray(x).tobytes()).hexdigest()
