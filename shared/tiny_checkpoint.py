"""Write a small Qwen2.5-VL checkpoint directory in the exact Hugging Face Hub format, offline.

Tests and the demo cannot download a model, so they build one: `config.json` in the flat Hub layout that the real
Qwen2.5-VL-3B-Instruct uses, `model.safetensors` with Hub key names, a byte-level BPE tokenizer trained here with
Qwen's 14 special tokens and chat template, and the processor configs. Weights are random from a seed; biases and
norm scales are random too, so parity tests notice a dropped bias or a misplaced norm.

    python -m shared.tiny_checkpoint --out models/tiny --seed 0 --text-hidden 128 --text-layers 2
    python -m shared.tiny_checkpoint --out models/3b_shapes --like qwen2.5-vl-3b --text-layers 2 --vision-depth 4

`--like` takes every width of a released model's config.json (`shared.models.qwen2_5_vl_presets`): vocabulary,
heads, head dims, MLP, vision tower, window, tied embeddings. Only the depth is cut (full-attention blocks kept
inside it), so the real shapes run end to end on a CPU.
"""
from __future__ import annotations

import argparse
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from safetensors.numpy import save_file

from shared.models import qwen2_5_vl_params as params_table
from shared.models.qwen2_5_vl_presets import preset
from shared.models.qwen2_5_vl_config import Qwen25VLConfig

SPECIAL_TOKENS = (
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>", "<|box_start|>",
    "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>", "<|vision_end|>", "<|vision_pad|>",
    "<|image_pad|>", "<|video_pad|>",
)  # fmt: skip

CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}"
    "{% if add_vision_id %}Picture {{ image_count.value }}: {% endif %}"
    "<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}"
    "{% set video_count.value = video_count.value + 1 %}"
    "{% if add_vision_id %}Video {{ video_count.value }}: {% endif %}"
    "<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

# Text the tokenizer's merges are learned from: the prompts and answers the synthetic tasks produce.
_CORPUS = [
    "Solve the question. The user asks a question, and you solves it. You first thinks about the reasoning process "
    "in the mind and then provides the user with the answer. The answer is in latex format and wrapped in $...$. "
    "The final answer must be wrapped using the \\boxed{} command.",
    "<think> Since $1+1=2$, so the answer is $2$. </think><answer> The answer is $\\boxed{2}$ </answer>",
    "What is the sum? How many squares are in the image? Compute the value of the expression. You are a helpful "
    "assistant. The image shows numbers and shapes: red green blue yellow circle square triangle count total.",
    "\\frac{1}{2} \\sqrt{3} 60^\\circ x = 3 + - * / ( ) = , . ? !",
] + [f"{a} + {b} = {a + b}. {a} * {b} = {a * b}. {a} - {b} = {a - b}." for a in range(0, 60, 7) for b in range(1, 30, 3)]


@dataclass
class TinySpec:
    seed: int = 0
    text_hidden: int = 128
    text_layers: int = 2
    text_heads: int = 4  # head_dim = hidden / heads must be >= 32 for vLLM's CPU attention
    kv_heads: int = 2
    text_intermediate: int = 256
    mrope_section: list[int] = field(default_factory=lambda: [4, 6, 6])  # sums to head_dim / 2
    vision_hidden: int = 64
    vision_depth: int = 4
    vision_heads: int = 2
    vision_intermediate: int = 128
    window_size: int = 56
    fullatt_block_indexes: list[int] = field(default_factory=lambda: [1, 3])
    tie_word_embeddings: bool = False
    bpe_vocab: int = 600
    vocab_size: int = 0  # embedding rows; 0 = the tokenizer's size padded to 64 (a real model pads far beyond it)
    min_pixels: int = 4 * 28 * 28
    max_pixels: int = 16384 * 28 * 28


def build_tokenizer(vocab_size: int):
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(byte_fallback=False))
    tok.normalizer = normalizers.NFC()
    # Qwen2's split pattern, then byte-level mapping, as in the real tokenizer.json.
    split = Regex(
        r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
    )
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Split(split, behavior="isolated"), pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
    )
    tok.train_from_iterator(_CORPUS, trainer=trainer)
    tok.add_special_tokens(list(SPECIAL_TOKENS))
    return tok


def _weights(config: dict, seed: int) -> dict[str, np.ndarray]:
    """Every tensor of the parameter table, drawn in table order: norm scales near 1, the rest N(0, 0.02^2)."""
    rng = np.random.default_rng(seed)
    out: dict[str, np.ndarray] = {}
    for e in params_table.name_table(Qwen25VLConfig.from_hf(config)):
        noise = rng.standard_normal(e.hf_shape)
        norm = e.flax_path[-1] == "scale"
        out[e.hf_name] = (1.0 + 0.1 * noise if norm else 0.02 * noise).astype(np.float32)
    return out


def spec_like(name: str, text_layers: int = 2, vision_depth: int = 4, seed: int = 0) -> TinySpec:
    """The widths of a released model (`--like`) at a cut depth. The vision tower keeps one full-attention block,
    the last of the cut, as the real tower ends every 8 blocks with one."""
    raw = preset(name)
    v = raw["vision_config"]
    return TinySpec(
        seed=seed, text_hidden=raw["hidden_size"], text_layers=text_layers, text_heads=raw["num_attention_heads"],
        kv_heads=raw["num_key_value_heads"], text_intermediate=raw["intermediate_size"],
        mrope_section=list(raw["rope_scaling"]["mrope_section"]), vision_hidden=v["hidden_size"],
        vision_depth=vision_depth, vision_heads=v["num_heads"], vision_intermediate=v["intermediate_size"],
        window_size=v["window_size"], fullatt_block_indexes=[vision_depth - 1],
        tie_word_embeddings=raw["tie_word_embeddings"], vocab_size=raw["vocab_size"],
    )  # fmt: skip


def write_checkpoint(out_dir: str | Path, spec: TinySpec | None = None) -> Path:
    spec = spec or TinySpec()
    if spec.text_hidden % spec.text_heads or spec.text_heads % spec.kv_heads:
        raise ValueError("text_hidden must divide by text_heads, and text_heads by kv_heads")
    if sum(spec.mrope_section) * 2 != spec.text_hidden // spec.text_heads:
        raise ValueError(f"mrope_section {spec.mrope_section} must sum to head_dim/2 = {spec.text_hidden // spec.text_heads // 2}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tok = build_tokenizer(spec.bpe_vocab)
    ids = {t: tok.token_to_id(t) for t in SPECIAL_TOKENS}
    vocab = spec.vocab_size or -(-tok.get_vocab_size() // 64) * 64  # padded, as Qwen pads its embedding table
    if vocab < tok.get_vocab_size():
        raise ValueError(f"vocab_size {vocab} is smaller than the tokenizer's {tok.get_vocab_size()} tokens")

    config = {
        "architectures": ["Qwen2_5_VLForConditionalGeneration"],
        "model_type": "qwen2_5_vl",
        "attention_dropout": 0.0,
        "bos_token_id": ids["<|endoftext|>"],
        "eos_token_id": ids["<|im_end|>"],
        "pad_token_id": ids["<|endoftext|>"],
        "vision_start_token_id": ids["<|vision_start|>"],
        "vision_end_token_id": ids["<|vision_end|>"],
        "vision_token_id": ids["<|vision_pad|>"],
        "image_token_id": ids["<|image_pad|>"],
        "video_token_id": ids["<|video_pad|>"],
        "hidden_act": "silu",
        "hidden_size": spec.text_hidden,
        "initializer_range": 0.02,
        "intermediate_size": spec.text_intermediate,
        "max_position_embeddings": 32768,
        "max_window_layers": spec.text_layers,
        "num_attention_heads": spec.text_heads,
        "num_hidden_layers": spec.text_layers,
        "num_key_value_heads": spec.kv_heads,
        "rms_norm_eps": 1e-6,
        "rope_theta": 1000000.0,
        "rope_scaling": {"type": "mrope", "mrope_section": list(spec.mrope_section)},
        "sliding_window": 32768,
        "use_sliding_window": False,
        "tie_word_embeddings": spec.tie_word_embeddings,
        "torch_dtype": "float32",
        "use_cache": True,
        "vocab_size": vocab,
        "vision_config": {
            "depth": spec.vision_depth,
            "hidden_act": "silu",
            "hidden_size": spec.vision_hidden,
            "intermediate_size": spec.vision_intermediate,
            "num_heads": spec.vision_heads,
            "in_chans": 3,
            "out_hidden_size": spec.text_hidden,
            "patch_size": 14,
            "spatial_merge_size": 2,
            "spatial_patch_size": 14,
            "window_size": spec.window_size,
            "fullatt_block_indexes": list(spec.fullatt_block_indexes),
            "tokens_per_second": 2,
            "temporal_patch_size": 2,
        },
    }
    (out / "config.json").write_text(json.dumps(config, indent=2))
    (out / "generation_config.json").write_text(json.dumps(
        {"bos_token_id": config["bos_token_id"], "eos_token_id": [ids["<|im_end|>"], ids["<|endoftext|>"]],
         "pad_token_id": config["pad_token_id"], "do_sample": False}, indent=2))  # fmt: skip
    save_file(_weights(config, spec.seed), str(out / "model.safetensors"), metadata={"format": "pt"})

    tok.save(str(out / "tokenizer.json"))
    added = {
        str(ids[t]): {"content": t, "lstrip": False, "normalized": False, "rstrip": False, "single_word": False,
                      "special": True}
        for t in SPECIAL_TOKENS
    }  # fmt: skip
    (out / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "Qwen2Tokenizer", "added_tokens_decoder": added, "bos_token": None,
        "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>", "unk_token": None, "model_max_length": 32768,
        "errors": "replace", "split_special_tokens": False, "clean_up_tokenization_spaces": False,
        "additional_special_tokens": [t for t in SPECIAL_TOKENS if t not in ("<|endoftext|>", "<|im_end|>")],
        "chat_template": CHAT_TEMPLATE,
    }, indent=2))  # fmt: skip
    (out / "chat_template.json").write_text(json.dumps({"chat_template": CHAT_TEMPLATE}, indent=2))
    (out / "preprocessor_config.json").write_text(json.dumps({
        "min_pixels": spec.min_pixels, "max_pixels": spec.max_pixels, "patch_size": 14, "temporal_patch_size": 2,
        "merge_size": 2, "image_mean": [0.48145466, 0.4578275, 0.40821073],
        "image_std": [0.26862954, 0.26130258, 0.27577711], "image_processor_type": "Qwen2VLImageProcessor",
        "processor_class": "Qwen2_5_VLProcessor",
    }, indent=2))  # fmt: skip
    (out / "lmmrl_tiny_spec.json").write_text(json.dumps(asdict(spec), indent=2))
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True, help="directory to write (created)")
    defaults = TinySpec()
    for f, value in asdict(defaults).items():
        flag = "--" + f.replace("_", "-")
        if isinstance(value, bool):
            ap.add_argument(flag, action="store_true", default=value)
        elif isinstance(value, list):
            ap.add_argument(flag, type=int, nargs="+", default=value)
        else:
            ap.add_argument(flag, type=type(value), default=value)
    ap.add_argument("--like", help="take every width from this released model (qwen2.5-vl-3b, qwen2.5-vl-7b); only "
                                   "--text-layers, --vision-depth and --seed apply")  # fmt: skip
    args = vars(ap.parse_args(argv))
    out, like = args.pop("out"), args.pop("like")
    spec = spec_like(like, args["text_layers"], args["vision_depth"], args["seed"]) if like else TinySpec(**args)
    path = write_checkpoint(out, spec)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
