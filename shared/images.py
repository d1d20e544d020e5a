"""Images of prompts: where they come from, what is checked when a data set loads, and the one pixel route.

The data loader turns every image reference into a local file: paths (relative to the data), `file://` URIs, base64
`data:` URIs, http(s) URLs (fetched once, with a timeout) and `datasets` Image values ({"bytes", "path"} or a PIL
image); embedded and remote images are written to a cache directory. `check_image` reads each file once at load
time. At rollout `load_image` opens local files only, flattens transparency onto white (as `qwen_vl_utils` does for
RGBA) and resizes with Qwen's `smart_resize` rule; both engines and the learner's vision inputs go through it.
"""
from __future__ import annotations

import base64
import binascii
import hashlib
import io
import math
import os
import urllib.error
import urllib.request
import warnings
from pathlib import Path
from typing import Any

from PIL import Image

PATCH_FACTOR = 28  # patch 14 x spatial merge 2: sides of a resized image are multiples of this
MAX_ASPECT_RATIO = 200
FETCH_TIMEOUT_S = 30.0
MAX_FETCH_BYTES = 64 << 20


class ImageError(ValueError):
    """An image reference that cannot be used, and why."""


def smart_resize(height: int, width: int, min_pixels: int, max_pixels: int, factor: int = PATCH_FACTOR) -> tuple[int, int]:
    """Qwen2-VL's resize rule: both sides multiples of `factor`, pixel count within [min_pixels, max_pixels],
    aspect ratio kept as closely as possible."""
    if height <= 0 or width <= 0:
        raise ValueError(f"image size must be positive, got {height}x{width}")
    if max(height, width) / min(height, width) > MAX_ASPECT_RATIO:
        raise ValueError(f"image aspect ratio must be below {MAX_ASPECT_RATIO}, got {height}x{width}")
    if min_pixels > max_pixels:
        raise ValueError(f"min_pixels {min_pixels} is larger than max_pixels {max_pixels}")
    h_bar = max(factor, round(height / factor) * factor)
    w_bar = max(factor, round(width / factor) * factor)
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt(height * width / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


def image_tokens(height: int, width: int) -> int:
    """Tokens the processor puts in place of one image placeholder: one per merged 28x28 patch of the resized image."""
    return (height // PATCH_FACTOR) * (width // PATCH_FACTOR)


def _local_path(ref: str) -> Path:
    if ref.startswith("file://"):
        ref = ref[len("file://"):]
    elif "://" in ref or ref.startswith("data:"):
        raise ValueError(f"image {ref[:80]!r}: only local paths and file:// URIs are supported; download it first")
    path = Path(ref)
    if not path.is_file():
        raise FileNotFoundError(f"image file {path} does not exist")
    return path


def _open(path: str | Path) -> Image.Image:
    """`Image.open` with PIL's decompression-bomb warning (more pixels than `Image.MAX_IMAGE_PIXELS`) raised as an
    error: PIL itself raises only above twice that limit."""
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        return Image.open(path)


def _to_rgb(img: Image.Image) -> Image.Image:
    """RGB pixels; transparency is flattened onto white, as qwen_vl_utils does for RGBA (dropping the alpha channel
    would turn a transparent background into whatever colour lies under it, often black)."""
    if img.mode not in ("RGBA", "LA", "PA") and "transparency" not in img.info:
        return img.convert("RGB")
    rgba = img.convert("RGBA")
    white = Image.new("RGB", rgba.size, (255, 255, 255))
    white.paste(rgba, mask=rgba.getchannel("A"))
    return white


def load_image(ref: str, min_pixels: int, max_pixels: int) -> Image.Image:
    """An RGB image resized with `smart_resize` under the pixel bounds (bicubic, as qwen_vl_utils does)."""
    with _open(_local_path(ref)) as img:
        img = _to_rgb(img)
    h, w = smart_resize(img.height, img.width, min_pixels, max_pixels)
    return img if (h, w) == (img.height, img.width) else img.resize((w, h), Image.Resampling.BICUBIC)


def check_image(path: str | Path, min_pixels: int, max_pixels: int) -> tuple[int, int]:
    """The (height, width) the image is resized to; `ImageError` for an unreadable, truncated or oversized file.

    A PNG is checked by `verify` (chunk checksums, cheap); other formats carry no checksums, so they are decoded.
    """
    try:
        with _open(path) as img:
            width, height = img.size
            if img.format == "PNG":
                img.verify()
            else:
                img.load()
    except FileNotFoundError:
        raise ImageError(f"image file {path} does not exist; expected a path relative to the data file, an "
                         "absolute path, a URI or a URL") from None  # fmt: skip
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise ImageError(f"image {path} is a decompression bomb ({e}); expected at most {Image.MAX_IMAGE_PIXELS} "
                         "pixels") from None  # fmt: skip
    except (OSError, SyntaxError, ValueError) as e:
        raise ImageError(f"image {path} cannot be read ({e}); expected a complete image file") from None
    if max(width, height) > MAX_ASPECT_RATIO * min(width, height):
        raise ImageError(f"image {path} is {width}x{height}; expected an aspect ratio of at most {MAX_ASPECT_RATIO} "
                         "(Qwen's resize rule refuses more)")  # fmt: skip
    return smart_resize(height, width, min_pixels, max_pixels)


def materialize(ref: Any, base: Path, cache_dir: Path) -> Path:
    """The local file holding the image `ref` refers to; embedded and remote images are written to `cache_dir`."""
    if isinstance(ref, Image.Image):
        return _cached(cache_dir, _png_bytes(ref))
    if isinstance(ref, dict) and ("bytes" in ref or "path" in ref):  # a `datasets` Image value, not decoded
        return _cached(cache_dir, ref["bytes"]) if ref.get("bytes") else _local(ref.get("path"), base)
    if not isinstance(ref, str) or not ref:
        raise ImageError(f"image reference {str(ref)[:80]!r} is not usable; expected a path, URI, URL or image")
    if ref.startswith("data:"):
        return _cached(cache_dir, _data_uri_bytes(ref))
    if ref.startswith(("http://", "https://")):
        out = cache_dir / (hashlib.sha1(ref.encode()).hexdigest() + ".img")
        return out if out.is_file() else _write(out, _fetch(ref))
    return _local(ref[len("file://"):] if ref.startswith("file://") else ref, base)


def _fetch(url: str) -> bytes:
    try:
        with urllib.request.urlopen(url, timeout=FETCH_TIMEOUT_S) as response:
            body = response.read(MAX_FETCH_BYTES + 1)
    except (urllib.error.URLError, OSError) as e:
        reason = e if isinstance(e, urllib.error.HTTPError) else getattr(e, "reason", e)
        raise ImageError(f"cannot fetch image {url} ({reason}); expected a URL answering within "
                         f"{FETCH_TIMEOUT_S:g} s") from None  # fmt: skip
    if len(body) > MAX_FETCH_BYTES:
        raise ImageError(f"image {url} is larger than {MAX_FETCH_BYTES >> 20} MiB; expected a smaller image")
    return body


def _local(ref: Any, base: Path) -> Path:
    if not isinstance(ref, str) or not ref:
        raise ImageError(f"image reference {str(ref)[:80]!r} is not usable; expected a path, URI, URL or image")
    path = Path(ref)
    return path if path.is_absolute() else base / path


def _png_bytes(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    try:
        img.save(buf, format="PNG")  # lossless: the cached file holds the pixels the row gave
    except OSError as e:
        raise ImageError(f"image of mode {img.mode} cannot be stored as PNG ({e}); expected an RGB, RGBA, L or P "
                         "image") from None  # fmt: skip
    return buf.getvalue()


def _data_uri_bytes(ref: str) -> bytes:
    header, _, payload = ref.partition(",")
    if not header.endswith(";base64"):
        raise ImageError(f"image data URI {ref[:40]!r}... is not base64; expected data:image/<type>;base64,<data>")
    try:
        return base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise ImageError("image data URI holds malformed base64; expected data:image/<type>;base64,<data>") from None


def _cached(cache_dir: Path, payload: bytes) -> Path:
    out = cache_dir / (hashlib.sha1(payload).hexdigest() + ".img")
    return out if out.is_file() else _write(out, payload)


def _write(out: Path, payload: bytes) -> Path:
    # Written under a private name, then renamed: learner processes loading the same data race on the same files.
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f"{out.name}.{os.getpid()}.tmp")
    tmp.write_bytes(payload)
    os.replace(tmp, out)
    return out
