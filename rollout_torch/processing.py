"""Prompt and image preprocessing shared by both engines and by the learner's vision inputs.

One route for pixels: images are loaded from their paths and resized with Qwen's `smart_resize` rule by
`shared.images.load_image` (as `qwen_vl_utils.fetch_image` does), then handed to the checkpoint's HF processor,
built exactly as vLLM builds it (`<processor_class>.from_pretrained(path)`, default image-processor backend). The
vLLM engine, the HF engine and `vision_inputs` (what the learner trains on) all go through `load_images` + that
processor, so they see the same pixel values; the two image-processor backends of transformers differ by up to 0.015.
"""
from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np
from PIL import Image

from shared.images import load_image, smart_resize  # noqa: F401  (smart_resize: re-exported with the resize rule)
from shared.records import Prompt, VisionInputs


def load_images(prompt: Prompt) -> list[Image.Image]:
    return [load_image(p, prompt.min_pixels, prompt.max_pixels) for p in prompt.image_paths]


def processor_kwargs(prompt: Prompt) -> dict[str, dict[str, int]]:
    """The pixel bounds in the form both vLLM (`mm_processor_kwargs`) and the HF processor take them: `size`, whose
    `shortest_edge`/`longest_edge` are the Qwen2-VL image processor's min/max pixel counts (transformers 5 warns on
    every call given `min_pixels`/`max_pixels`; vLLM's Qwen2-VL `_get_vision_size` reads either form)."""
    return {"size": {"shortest_edge": prompt.min_pixels, "longest_edge": prompt.max_pixels}}


@lru_cache(maxsize=4)
def load_processor(model_path: str):
    """The checkpoint's processor, constructed as vLLM constructs it (the class named in its config)."""
    import transformers

    cls_name = None
    for name in ("processor_config.json", "preprocessor_config.json", "tokenizer_config.json"):
        f = Path(model_path) / name
        if f.is_file():
            cls_name = json.loads(f.read_text()).get("processor_class")
            if cls_name:
                break
    cls = getattr(transformers, cls_name, None) if cls_name else None
    return (cls or transformers.AutoProcessor).from_pretrained(model_path)


def check_placeholders(processor, prompt: Prompt) -> None:
    n = prompt.text.count(processor.image_token)
    if n != len(prompt.image_paths):
        raise ValueError(
            f"prompt uid={prompt.uid}: the text has {n} {processor.image_token} placeholders but "
            f"{len(prompt.image_paths)} image paths are given"
        )


def process(processor, prompts: Sequence[Prompt], images: Optional[list[list[Image.Image]]] = None, **kwargs: Any):
    """Run the processor on a batch of prompts (torch tensors, left padding). All prompts of one call must share
    their pixel bounds; callers group by bounds."""
    images = images if images is not None else [load_images(p) for p in prompts]
    bounds = {(p.min_pixels, p.max_pixels) for p in prompts if p.image_paths}
    if len(bounds) > 1:
        raise ValueError(f"one processor call needs one pair of pixel bounds, got {sorted(bounds)}")
    for p in prompts:
        check_placeholders(processor, p)
    flat = [img for per_prompt in images for img in per_prompt]
    extra = {}
    if flat:
        first = next(p for p in prompts if p.image_paths)
        extra["size"] = {"shortest_edge": first.min_pixels, "longest_edge": first.max_pixels}
    return processor(
        text=[p.text for p in prompts], images=flat or None, padding=True, padding_side="left",
        return_tensors="pt", **extra, **kwargs,
    )


def vision_inputs(processor, prompt: Prompt, images: Optional[list[Image.Image]] = None) -> VisionInputs:
    """Pixel values and image grids of one prompt, as the engines compute them; numpy, for the learner."""
    if not prompt.image_paths:
        return VisionInputs.empty()
    batch = process(processor, [prompt], None if images is None else [images])
    return VisionInputs(
        pixel_values=batch["pixel_values"].numpy().astype(np.float32),
        image_grid_thw=batch["image_grid_thw"].numpy().astype(np.int64),
    )


def messages_to_prompt(
    processor,
    messages: str | list[dict],
    *,
    label: Optional[str] = None,
    uid: int = 0,
    min_pixels: int = 4 * 28 * 28,
    max_pixels: int = 16384 * 28 * 28,
) -> Prompt:
    """An LMM-R1 message list (or its JSON string) as a Prompt: chat template with the generation prompt, image
    paths in order of appearance. Per-image `min_pixels`/`max_pixels` override the defaults (one pair per prompt)."""
    if isinstance(messages, str):
        messages = json.loads(messages)
    if not isinstance(messages, list) or not all(isinstance(m, dict) and "role" in m for m in messages):
        raise ValueError(f"expected a list of {{'role', 'content'}} messages, got {str(messages)[:120]!r}")
    paths: list[str] = []
    bounds: set[tuple[int, int]] = set()
    for m in messages:
        content = m.get("content")
        if isinstance(content, list):
            for item in content:
                if item.get("type") == "image" or "image" in item:
                    ref = item.get("image") or item.get("image_url")
                    if not isinstance(ref, str):
                        raise ValueError(f"image item without a path: {item!r}")
                    paths.append(ref)
                    bounds.add((int(item.get("min_pixels", min_pixels)), int(item.get("max_pixels", max_pixels))))
    if len(bounds) > 1:
        raise ValueError(f"images of one prompt must share their pixel bounds, got {sorted(bounds)}")
    if bounds:
        min_pixels, max_pixels = bounds.pop()
    text = processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return Prompt(text=text, image_paths=paths, min_pixels=min_pixels, max_pixels=max_pixels, label=label, uid=uid)
