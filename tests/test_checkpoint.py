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
