import json

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.numpy import load_file

from shared.tiny_checkpoint import SPECIAL_TOKENS


def test_hub_layout_and_special_tokens(tiny_ckpt):
    from transformers import AutoTokenizer

    cfg = json.load(open(f"{tiny_ckpt}/config.json"))
    keys = set(load_file(f"{tiny_ckpt}/model.safetensors"))
    assert "model.layers.0.self_attn.q_proj.bias" in keys and "visual.merger.mlp.2.weight" in keys
    assert "lm_head.weight" in keys and not any(k.startswith("model.language_model") for k in keys)
    tok = AutoTokenizer.from_pretrained(tiny_ckpt)
    for t in SPECIAL_TOKENS:
        assert tok.convert_tokens_to_ids(t) < cfg["vocab_size"]
        assert tok.encode(t, add_special_tokens=False) == [tok.convert_tokens_to_ids(t)]
    assert cfg["image_token_id"] == tok.convert_tokens_to_ids("<|image_pad|>")
    assert tok.eos_token == "<|im_end|>"


@pytest.mark.parametrize("fixture", ["tiny_ckpt", "tiny_ckpt_tied"])
def test_loads_in_transformers_without_missing_keys(fixture, request):
    from transformers import AutoModelForImageTextToText, AutoProcessor

    path = request.getfixturevalue(fixture)
    model, info = AutoModelForImageTextToText.from_pretrained(path, dtype=torch.float32, output_loading_info=True)
    assert not any(info.values()), info
    on_disk = load_file(f"{path}/model.safetensors")["model.embed_tokens.weight"]
    np.testing.assert_array_equal(model.get_input_embeddings().weight.detach().numpy(), on_disk)
    processor = AutoProcessor.from_pretrained(path)
    msgs = [{"role": "user", "content": [{"type": "text", "text": "How many?"}, {"type": "image", "image": "x"}]}]
    text = processor.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    assert text.endswith("<|im_start|>assistant\n") and "<|vision_start|><|image_pad|><|vision_end|>" in text
    batch = processor(text=[text], images=[Image.new("RGB", (100, 70), (200, 10, 10))], return_tensors="pt")
    assert batch["image_grid_thw"].tolist() == [[1, 4, 8]]  # smart_resize: 70x100 -> 56x112
    with torch.no_grad():
        logits = model(**batch).logits
    assert logits.shape[-1] == model.config.text_config.vocab_size and torch.isfinite(logits).all()


@pytest.mark.slow
def test_loads_in_vllm_offline(tiny_ckpt):
    """In a fresh process: vLLM's in-process engine state is per process and the rollout tests hold one."""
    import subprocess
    import sys
    import textwrap

    script = textwrap.dedent(f"""
        from PIL import Image
        from vllm import LLM, SamplingParams
        llm = LLM(model={tiny_ckpt!r}, dtype="float32", enforce_eager=True, max_model_len=512, seed=0,
                  limit_mm_per_prompt={{"image": 1, "video": 0}}, kv_cache_memory_bytes=64 << 20)
        text = ("<|im_start|>user\\nHow many?<|vision_start|><|image_pad|><|vision_end|><|im_end|>\\n"
                "<|im_start|>assistant\\n")
        prompt = {{"prompt": text, "multi_modal_data": {{"image": [Image.new("RGB", (56, 56), (0, 0, 255))]}}}}
        out = llm.generate([prompt], SamplingParams(max_tokens=4, temperature=0.0), use_tqdm=False)[0]
        print("TOKENS", len(out.outputs[0].token_ids))
    """)
    p = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600)
    assert "TOKENS 4" in p.stdout, p.stderr[-2000:]
