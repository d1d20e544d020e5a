"""HF export: from the learner's weights and from saved training checkpoints (`python -m learner_jax.export`), in
the source model's dtype or a chosen one; transformers loads the result with no missing or unexpected keys and
computes our logits. Every stage config exports at its end."""
from __future__ import annotations

import json
import shutil
import struct

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
import torch
from PIL import Image
from transformers import AutoModelForImageTextToText, AutoProcessor

from learner_jax.checkpoint import Checkpointer
from learner_jax.export import export_hf, main as export_main, source_dtype
from learner_jax.models.config import ModelOptions
from learner_jax.models.hf_io import load_checkpoint, read_safetensors
from learner_jax.models.qwen2_5_vl import forward
from shared.config import load_config
from shared.models.qwen2_5_vl_params import flax_to_hf
from shared.records import VisionInputs


def _perturbed(params, seed, scale=0.02):
    """A visibly different policy: every weight moved by noise (numpy, float32)."""
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda x: (np.asarray(x) + scale * rng.standard_normal(x.shape)).astype(np.float32), params)


def _save(ckpt_dir, by_step: dict, cfg) -> None:
    """A checkpoint as `Run.save` writes one: actor params and optimizer state, the resolved config in the meta."""
    ck = Checkpointer(ckpt_dir)
    for step, params in by_step.items():
        p = jax.tree.map(jnp.asarray, params)
        ck.save(step, {"actor": {"params": p, "opt": {"mu": jax.tree.map(jnp.zeros_like, p)}}},
                {"iteration": step, "version": step, "config": cfg.to_dict()})  # fmt: skip
    ck.close()


def _header(path) -> dict:
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
    header.pop("__metadata__", None)
    return header


def _inputs(ckpt):
    """A text-and-image sample and a text-only one, left-padded, from the checkpoint's own processor."""
    proc = AutoProcessor.from_pretrained(ckpt)
    proc.tokenizer.padding_side = "left"
    rng = np.random.default_rng(0)
    texts = []
    for content in ([{"type": "image"}, {"type": "text", "text": "Count the squares."}],
                    [{"type": "text", "text": "What is 3 + 4?"}]):  # fmt: skip
        chat = proc.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)
        texts.append(chat + "<think> 3+4=7 </think><answer> $\\boxed{7}$ </answer><|im_end|>")
    image = Image.fromarray(rng.integers(0, 256, (84, 112, 3), dtype=np.uint8))
    return proc(text=texts, images=[image], padding=True, return_tensors="pt"), proc.tokenizer.pad_token_id


def _logits(export_dir, params, ckpt, lora=None):
    """transformers' logits of the exported model (loaded in float32) and ours from `params`, on valid tokens."""
    model, info = AutoModelForImageTextToText.from_pretrained(str(export_dir), dtype=torch.float32,
                                                              output_loading_info=True)  # fmt: skip
    assert not any(info.values()), info  # missing, unexpected, mismatched keys, errors
    inputs, pad = _inputs(ckpt)
    with torch.no_grad():
        pos, _ = model.model.get_rope_index(inputs["input_ids"], inputs["mm_token_type_ids"], inputs["image_grid_thw"],
                                            attention_mask=inputs["attention_mask"])  # fmt: skip
        ref = model.eval()(**inputs, position_ids=pos).logits.numpy()
    cfg, _ = load_checkpoint(ckpt)
    ids, mask = inputs["input_ids"].numpy(), inputs["attention_mask"].numpy().astype(bool)
    vision = [VisionInputs(inputs["pixel_values"].numpy(), inputs["image_grid_thw"].numpy()), None]
    from learner_jax.models.batch import build_batch

    batch = build_batch([ids[b][mask[b]].tolist() for b in range(len(ids))], vision, cfg, pad_token_id=pad)
    ours = np.asarray(forward(params, batch, cfg, ModelOptions(), return_hidden=False, lora=lora)["logits_BTV"])
    T = ids.shape[1]
    return ref[mask], ours[:, -T:][mask]


def _rel(a, b) -> float:
    return float(np.abs(a - b).max() / np.abs(b).max())


def test_cli_exports_a_saved_checkpoint_that_transformers_loads_with_our_logits(tiny_ckpt, tmp_path):
    cfg = load_config("demo", [f"model.path={tiny_ckpt}", "pipeline=rl"])
    _, base = load_checkpoint(tiny_ckpt)
    step1, step2 = _perturbed(base, 1), _perturbed(base, 2)
    _save(tmp_path / "ckpt", {1: step1, 2: step2}, cfg)

    assert export_main(["--ckpt", str(tmp_path / "ckpt"), "--out", str(tmp_path / "latest")]) == 0
    header = _header(tmp_path / "latest" / "model.safetensors")
    assert {h["dtype"] for h in header.values()} == {"F32"}  # auto: the tiny source declares float32
    ref, ours = _logits(tmp_path / "latest", step2, tiny_ckpt)  # the newest step by default
    assert _rel(ref, ours) <= 1e-4, _rel(ref, ours)
    for name in ("tokenizer.json", "preprocessor_config.json", "chat_template.json", "generation_config.json"):
        assert (tmp_path / "latest" / name).is_file(), name

    assert export_main(["--ckpt", str(tmp_path / "ckpt"), "--out", str(tmp_path / "first"), "--step", "1"]) == 0
    written = read_safetensors(tmp_path / "first" / "model.safetensors")
    expected = dict(flax_to_hf(step1, load_checkpoint(tiny_ckpt)[0]))
    assert set(written) == set(expected)
    for name, value in expected.items():
        np.testing.assert_array_equal(written[name], value, err_msg=name)


def test_bfloat16_export_writes_bf16_tensors_and_says_so(tiny_ckpt, tmp_path):
    cfg = load_config("demo", [f"model.path={tiny_ckpt}", "pipeline=rl"])
    _, base = load_checkpoint(tiny_ckpt)
    params = _perturbed(base, 3)
    _save(tmp_path / "ckpt", {5: params}, cfg)
    out = tmp_path / "bf16"
    assert export_main(["--ckpt", str(tmp_path / "ckpt"), "--out", str(out), "--dtype", "bfloat16"]) == 0
    assert {h["dtype"] for h in _header(out / "model.safetensors").values()} == {"BF16"}
    assert json.loads((out / "config.json").read_text())["torch_dtype"] == "bfloat16"
    assert AutoModelForImageTextToText.from_pretrained(str(out)).dtype == torch.bfloat16  # dtype "auto" follows it
    # Loaded in float32, the bf16 weights are exactly ours rounded to bf16 (nearest-even, as torch rounds).
    rounded = jax.tree.map(lambda x: x.astype(ml_dtypes.bfloat16).astype(np.float32), params)
    ref, ours = _logits(out, rounded, tiny_ckpt)
    assert _rel(ref, ours) <= 1e-4, _rel(ref, ours)
    written = read_safetensors(out / "model.safetensors")
    for name, value in flax_to_hf(params, load_checkpoint(tiny_ckpt)[0]):
        np.testing.assert_array_equal(written[name].astype(np.float32),
                                      torch.from_numpy(np.ascontiguousarray(value)).bfloat16().float().numpy(),
                                      err_msg=name)  # fmt: skip


def test_auto_takes_the_source_checkpoints_dtype(tiny_ckpt, tmp_path):
    src = tmp_path / "src"
    shutil.copytree(tiny_ckpt, src)
    config = json.loads((src / "config.json").read_text())
    config.pop("torch_dtype", None)
    config["dtype"] = "bfloat16"  # transformers 5 spells it so
    (src / "config.json").write_text(json.dumps(config))
    assert source_dtype(src) == "bfloat16" and source_dtype(tiny_ckpt) == "float32"
    model_cfg, params = load_checkpoint(src)
    out = export_hf(params, model_cfg, src, tmp_path / "out")  # dtype="auto", Run.finish's default
    assert {h["dtype"] for h in _header(out / "model.safetensors").values()} == {"BF16"}
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    out32 = export_hf(params, model_cfg, src, tmp_path / "out32", dtype="float32")
    assert {h["dtype"] for h in _header(out32 / "model.safetensors").values()} == {"F32"}
    assert json.loads((out32 / "config.json").read_text())["dtype"] == "float32"
    with pytest.raises(ValueError, match="not one of"):
        export_hf(params, model_cfg, src, tmp_path / "bad", dtype="int8")
    assert not (tmp_path / "bad").exists()


def test_lora_checkpoint_exports_the_merged_model_and_the_adapter(tiny_ckpt, tmp_path):
    from learner_jax.adapters import init_adapters, lora_spec
    from learner_jax.models.lora import merge_lora

    cfg = load_config("demo", [f"model.path={tiny_ckpt}", "pipeline=rl", "model.lora.rank=4", "model.lora.alpha=8"])
    model_cfg, base = load_checkpoint(tiny_ckpt)
    spec = lora_spec(cfg.model.lora, model_cfg)
    adapters = jax.device_get(init_adapters(model_cfg, spec, jax.random.key(0)))
    adapters = _perturbed(adapters, 4, scale=0.05)  # B is zero at init: make the adapter do something
    _save(tmp_path / "ckpt", {3: adapters}, cfg)
    out = tmp_path / "lora_export"
    assert export_main(["--ckpt", str(tmp_path / "ckpt"), "--out", str(out)]) == 0
    ref, ours = _logits(out, merge_lora(base, adapters), tiny_ckpt, lora=spec)  # ours: adapters unmerged
    assert _rel(ref, ours) <= 1e-4, _rel(ref, ours)
    base_ref, _ = _logits(tiny_ckpt, base, tiny_ckpt)
    assert _rel(ref, base_ref) > 1e-3  # the adapter changed the model
    assert json.loads((out / "adapter" / "adapter_config.json").read_text())["r"] == 4
    assert (out / "adapter" / "adapter_model.safetensors").is_file()


def test_cli_errors_name_what_is_missing(tiny_ckpt, tmp_path, capsys):
    assert export_main(["--ckpt", str(tmp_path / "nowhere"), "--out", str(tmp_path / "o")]) == 2
    assert "no such directory" in capsys.readouterr().err
    cfg = load_config("demo", [f"model.path={tmp_path / 'moved'}", "pipeline=rl"])
    _save(tmp_path / "ckpt", {1: load_checkpoint(tiny_ckpt)[1]}, cfg)
    assert export_main(["--ckpt", str(tmp_path / "ckpt"), "--out", str(tmp_path / "o"), "--step", "7"]) == 2
    assert "no step 7; steps saved: [1]" in capsys.readouterr().err
    assert export_main(["--ckpt", str(tmp_path / "ckpt"), "--out", str(tmp_path / "o")]) == 2
    assert "--model-path" in capsys.readouterr().err
    assert export_main(["--ckpt", str(tmp_path / "ckpt"), "--out", str(tmp_path / "o"), "--model-path", tiny_ckpt]) == 0
    assert not (tmp_path / "nowhere").exists()  # reading never creates the directory


STAGES = ("fre_text", "fre_multi", "mgt_geo", "mgt_percereason", "direct_rl_geo")


@pytest.mark.parametrize("name", STAGES)
def test_every_stage_config_exports_at_its_end(name):
    cfg = load_config(name)
    assert cfg.train.export_dir == f"checkpoints/{name}/export"
    if name.startswith("mgt_"):  # stage 2 starts from stage 1's export
        assert cfg.model.path == load_config("fre_text").train.export_dir
