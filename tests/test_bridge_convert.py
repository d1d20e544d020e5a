"""bridge conversion, buckets, wire payloads and checksums, without engines: HF checkpoint -> Flax -> HF is bit-exact,
the engine-side readers rebuild exactly the checkpoint's tensors, and the learner side never imports torch."""
from __future__ import annotations

import subprocess
import sys

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
import torch

from shared.checksum import Checksum
from bridge.convert import gather, plan_buckets, policy_entries, to_flax, to_hf, wire_itemsizes
from shared.models.qwen2_5_vl_params import engine_tensors, fused_group
from bridge.payload import ShmTensors, Tensors, write_safetensors
from learner_jax.models.config import Qwen25VLConfig
from learner_jax.models.hf_io import read_checkpoint_tensors
from learner_jax.models.qwen2_5_vl import init_value_head


def _load(ckpt):
    cfg = Qwen25VLConfig.from_hf(ckpt)
    tensors = {k: np.array(v) for k, v in read_checkpoint_tensors(ckpt).items()}
    return cfg, tensors, to_flax(tensors, cfg)


@pytest.mark.parametrize("which", ["untied", "tied"])
def test_round_trip_is_bit_exact_for_every_tensor(tiny_ckpt, tiny_ckpt_tied, which):
    cfg, ref, params = _load(tiny_ckpt if which == "untied" else tiny_ckpt_tied)
    expected = set(ref) - ({"lm_head.weight"} if cfg.tie_word_embeddings else set())
    for tree in (params, jax.tree.map(jnp.asarray, params)):  # numpy leaves and device arrays
        out = dict(to_hf(tree, cfg, bucket_bytes=100_000))
        assert set(out) == expected
        for name, array in out.items():
            assert array.dtype == np.float32 and array.flags.c_contiguous
            assert np.array_equal(array, ref[name]), name
            assert array.tobytes() == ref[name].tobytes(), name


def test_device_path_and_wire_readers_rebuild_the_checkpoint(tiny_ckpt, tmp_path):
    cfg, ref, params = _load(tiny_ckpt)
    entries = policy_entries(cfg)
    on_device = gather(jax.tree.map(jnp.asarray, params), entries, None, on_device=True)
    assert all(w.layout is None and isinstance(w.array, jax.Array) for w in on_device)
    for w in on_device:
        assert np.array_equal(np.asarray(w.array), ref[w.name]), w.name
    deferred = gather(params, entries, None)  # host views: the layout is applied by the receiver
    assert {w.layout for w in deferred} == {"copy", "linear", "patch"}
    path = tmp_path / "bucket.safetensors"
    write_safetensors(path, deferred)
    for reader in (Tensors(deferred), ShmTensors(str(path), len(deferred))):
        got = dict(reader)
        assert set(got) == {e.hf_name for e in entries}
        for name, t in got.items():
            assert isinstance(t, torch.Tensor) and torch.equal(t, torch.from_numpy(ref[name])), name
    from safetensors.numpy import load_file  # the file is a valid safetensors file for other readers too

    assert np.array_equal(load_file(str(path))["visual.patch_embed.proj.weight"],
                          params["visual"]["patch_embed"]["kernel"])  # fmt: skip


def test_bfloat16_wire_rounds_like_torch(tiny_ckpt):
    cfg, ref, params = _load(tiny_ckpt)
    out = dict(to_hf(params, cfg, dtype="bfloat16"))
    for name, array in out.items():
        assert array.dtype == ml_dtypes.bfloat16 and array.shape == ref[name].shape
        assert np.isfinite(array.astype(np.float32)).all()
    # The engine side casts the same way: torch's fp32 -> bf16 rounding gives the same bits.
    for name in ("model.layers.1.mlp.down_proj.weight", "visual.patch_embed.proj.weight"):
        theirs = torch.from_numpy(ref[name]).to(torch.bfloat16).view(torch.int16).numpy()
        assert np.array_equal(out[name].view(np.int16), theirs), name
    got = dict(Tensors(gather(params, policy_entries(cfg), np.dtype(ml_dtypes.bfloat16))))
    t = got["model.layers.0.self_attn.q_proj.weight"]
    assert t.dtype == torch.bfloat16
    assert torch.equal(t, torch.from_numpy(ref["model.layers.0.self_attn.q_proj.weight"]).to(torch.bfloat16))


def test_value_head_is_not_part_of_the_policy(tiny_ckpt):
    cfg, ref, params = _load(tiny_ckpt)
    params = {**params, "value_head": init_value_head(jax.random.key(0), cfg)}
    assert "score.weight" not in {e.hf_name for e in policy_entries(cfg)}
    assert "score.weight" not in dict(to_hf(params, cfg))
    with_head = dict(to_hf(params, cfg, include_value_head=True))
    assert with_head["score.weight"].shape == (1, cfg.text.hidden_size)


def test_buckets_respect_the_bound_and_keep_fused_groups_whole(tiny_ckpt):
    cfg, ref, params = _load(tiny_ckpt)
    entries = policy_entries(cfg)
    groups: dict[str, list[str]] = {}
    for e in entries:
        groups.setdefault(fused_group(e.hf_name), []).append(e.hf_name.rsplit(".", 2)[-2:][0])
    assert groups["model.layers.1.self_attn.qkv_proj"] == ["q_proj", "q_proj", "k_proj", "k_proj", "v_proj", "v_proj"]
    assert groups["visual.blocks.0.mlp.gate_up_proj"] == ["gate_proj", "gate_proj", "up_proj", "up_proj"]
    assert groups["model.layers.0.self_attn.o_proj"] == ["o_proj"]
    sizes = wire_itemsizes(params, entries, None)
    bound = 40_000
    buckets = plan_buckets(entries, bound, sizes)
    assert [e.hf_name for b in buckets for e in b.entries] == [e.hf_name for e in entries]
    where = {e.hf_name: k for k, b in enumerate(buckets) for e in b.entries}
    for e in entries:
        group = [x for x in entries if fused_group(x.hf_name) == fused_group(e.hf_name)]
        assert {where[x.hf_name] for x in group} == {where[e.hf_name]}
    for b in buckets:
        assert b.nbytes == sum(ref[e.hf_name].nbytes for e in b.entries)
        if len({fused_group(e.hf_name) for e in b.entries}) > 1:
            assert b.nbytes <= bound  # only a single group larger than the bound may exceed it
    assert len(plan_buckets(entries, 1 << 40, sizes)) == 1


def test_engine_naming_fuses_in_row_order(tiny_ckpt_tied):
    cfg = Qwen25VLConfig.from_hf(tiny_ckpt_tied)
    names = [e.hf_name for e in policy_entries(cfg)]
    vllm = {t.name: t.parts for t in engine_tensors("vllm", names, tied=True)}
    assert vllm["language_model.model.layers.1.self_attn.qkv_proj.bias"] == tuple(
        f"model.layers.1.self_attn.{p}_proj.bias" for p in "qkv")  # fmt: skip
    assert vllm["visual.blocks.2.mlp.gate_up_proj.weight"] == (
        "visual.blocks.2.mlp.gate_proj.weight", "visual.blocks.2.mlp.up_proj.weight")  # fmt: skip
    assert vllm["language_model.lm_head.weight"] == ("model.embed_tokens.weight",)  # tied: the embedding
    hf = {t.name: t.parts for t in engine_tensors("transformers", names, tied=True)}
    assert hf["model.visual.merger.mlp.2.bias"] == ("visual.merger.mlp.2.bias",)
    assert hf["lm_head.weight"] == ("model.embed_tokens.weight",)
    assert len(hf) == len(names) + 1
    with pytest.raises(ValueError, match="missing its"):
        engine_tensors("vllm", ["model.layers.0.self_attn.q_proj.weight"], tied=False)


def test_checksum_of_parts_equals_checksum_of_the_concatenation():
    rng = np.random.default_rng(0)
    parts = [rng.standard_normal((n, 8)).astype(np.float32) for n in (3, 5, 2)]
    whole, split = Checksum.of(np.concatenate(parts)), Checksum.of_parts(parts)
    assert (whole.shape, whole.crc) == (split.shape, split.crc) and not whole.differs(split)
    assert abs(whole.sum - split.sum) < 1e-9 and abs(whole.sumsq - split.sumsq) < 1e-9
    flipped = np.concatenate(parts)
    flipped[4, 3] = np.nextafter(flipped[4, 3], np.float32(np.inf))  # one ulp of one element
    assert "bytes differ" in whole.differs(Checksum.of(flipped))
    assert whole.differs(Checksum.of(flipped), exact=False) == ""
    assert "sum" in whole.differs(Checksum.of(flipped * 1.01), exact=False)
    assert "shape" in whole.differs(Checksum.of(flipped[:-1]))


def test_bad_params_and_options_are_named(tiny_ckpt):
    cfg, ref, params = _load(tiny_ckpt)
    broken = {**params, "text": {k: v for k, v in params["text"].items() if k != "norm"}}
    with pytest.raises(KeyError, match="text/norm/scale"):
        list(to_hf(broken, cfg))
    wrong = {**params, "lm_head": {"kernel": params["lm_head"]["kernel"][:, :-1]}}
    with pytest.raises(ValueError, match="lm_head/kernel"):
        list(to_hf(wrong, cfg))
    with pytest.raises(ValueError, match="wire dtype"):
        list(to_hf(params, cfg, dtype="int8"))


def test_sender_is_importable_without_torch_and_receiver_without_jax():
    code = (
        "import sys\n"
        "import bridge.sync, bridge.convert, bridge.verify, bridge.transport, bridge.targets, bridge.nccl\n"
        "assert 'torch' not in sys.modules, 'sender imported torch'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
    code = (
        "import sys\n"
        "import bridge.payload, bridge.receiver, shared.checksum, shared.models.qwen2_5_vl_params\n"
        "assert 'jax' not in sys.modules, 'receiver imported jax'\n"
        "assert 'torch' not in sys.modules, 'receiver imported torch before any tensor arrived'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_gpu_transport_is_gated_with_a_clear_error():
    from bridge.transport import make_transport

    try:
        import cupy  # noqa: F401
    except ImportError:
        with pytest.raises(ImportError, match="CuPy"):
            make_transport("nccl", client=object(), world_size=2)
    else:  # a CUDA machine: the learner's arrays must be on a GPU
        if not any(d.platform == "gpu" for d in jax.devices()):
            with pytest.raises(RuntimeError, match="GPU"):
                make_transport("nccl", client=object(), world_size=2)
    with pytest.raises(ValueError, match="transport 'tcp'"):
        make_transport("tcp")
