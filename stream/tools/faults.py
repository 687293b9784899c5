"""Content faults injected into raw posts: torch-free (numpy + Pillow), shared by replay and training.

Two kinds of disruption:

* **discard** (inter-modal missingness): a modality is absent; :func:`discard` removes the field.
* **corrupt** (intra-modal missingness / low quality): content-level damage to the raw input — mask a
  fraction of the words of a text or transcript, mask a fraction of an image's pixels, or blur /
  downscale an image.

Every random choice takes an explicit :class:`numpy.random.Generator`; :func:`post_rng` derives one per
(seed, post id) so a post is disrupted the same way wherever it is replayed or encoded. The replay tool
injects these into a live stream; ``models/features.py`` encodes the same corrupted inputs for training
and evaluation, and ``models/disruptions.py`` builds the evaluation protocol on top of them.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from typing import Final, Literal

import numpy as np
from PIL import Image, ImageFilter

from stream.service.vocabulary import MODALITIES

__all__ = [
    "CORRUPTION_RANGE",
    "MASK_TOKEN",
    "ImageCorruption",
    "blur",
    "corrupt_image",
    "corrupt_text",
    "discard",
    "downscale",
    "mask_pixels",
    "mask_words",
    "pixel_mask",
    "post_rng",
    "sample_rate",
]

# The papers' protocol (docs/data.md): content-level corruption masks 40–80 % of a modality's content.
CORRUPTION_RANGE: Final = (0.4, 0.8)
# MiniLM's tokenizer maps the literal "[MASK]" to its mask token, so a masked word costs one token.
MASK_TOKEN: Final = "[MASK]"

ImageCorruption = Literal["mask", "blur", "downscale"]


def post_rng(seed: int, key: str) -> np.random.Generator:
    """A generator determined by ``seed`` and ``key`` (a post id), independent of processing order."""
    digest = hashlib.sha256(key.encode("utf-8")).digest()
    return np.random.default_rng([seed, int.from_bytes(digest[:8], "little")])


def sample_rate(rng: np.random.Generator, low: float = CORRUPTION_RANGE[0], high: float = CORRUPTION_RANGE[1]) -> float:
    """A corruption rate drawn uniformly from ``[low, high)`` (default 40–80 %)."""
    return float(rng.uniform(low, high))


def _check_rate(rate: float) -> None:
    if not 0.0 <= rate <= 1.0:
        raise ValueError(f"rate must be in [0, 1], got {rate}")


def mask_words(text: str, rate: float, rng: np.random.Generator, mask_token: str = MASK_TOKEN) -> str:
    """Replace ``round(rate * n_words)`` whitespace-separated words, chosen at random, by ``mask_token``.

    Whitespace is normalised to single spaces. A text without words is returned unchanged.
    """
    _check_rate(rate)
    words = text.split()
    k = round(rate * len(words))
    if k == 0:
        return text
    for i in rng.choice(len(words), size=k, replace=False):
        words[int(i)] = mask_token
    return " ".join(words)


def corrupt_text(text: str, rate: float, rng: np.random.Generator) -> str:
    """Content-level corruption of a text or transcript: :func:`mask_words` at ``rate``."""
    return mask_words(text, rate, rng)


def pixel_mask(height: int, width: int, rate: float, rng: np.random.Generator) -> np.ndarray:
    """bool ``[height, width]`` with exactly ``round(rate * height * width)`` True cells at random places."""
    _check_rate(rate)
    total = height * width
    flat = np.zeros(total, dtype=bool)
    flat[rng.choice(total, size=round(rate * total), replace=False)] = True
    return flat.reshape(height, width)


def mask_pixels(
    img: Image.Image, rate: float, rng: np.random.Generator, fill: tuple[int, int, int] = (0, 0, 0)
) -> Image.Image:
    """An RGB copy of ``img`` with ``round(rate * pixels)`` random pixels set to ``fill`` (black).

    Transparent images are composited on white first, as :func:`stream.service.preprocess.image_to_array`
    does, so masked pixels stay visible to the encoder.
    """
    rgb = _to_rgb(img)
    arr = np.array(rgb, dtype=np.uint8)
    arr[pixel_mask(arr.shape[0], arr.shape[1], rate, rng)] = fill
    return Image.fromarray(arr, mode="RGB")


def blur(img: Image.Image, rate: float) -> Image.Image:
    """Gaussian blur with radius ``rate * short side / 8`` (rate 0.8 leaves only the coarse shape)."""
    _check_rate(rate)
    rgb = _to_rgb(img)
    return rgb.filter(ImageFilter.GaussianBlur(radius=rate * min(rgb.size) / 8))


def downscale(img: Image.Image, rate: float) -> Image.Image:
    """Downscale each side to ``(1 - rate)`` of its length (at least 1 px), then back up to the original size."""
    _check_rate(rate)
    rgb = _to_rgb(img)
    width, height = rgb.size
    small = rgb.resize(
        (max(1, round(width * (1 - rate))), max(1, round(height * (1 - rate)))), Image.Resampling.BILINEAR
    )
    return small.resize((width, height), Image.Resampling.NEAREST)


def corrupt_image(
    img: Image.Image, rate: float, rng: np.random.Generator, kind: ImageCorruption = "mask"
) -> Image.Image:
    """Content-level corruption of an image at ``rate``: pixel masking (default), blur or downscale."""
    if kind == "mask":
        return mask_pixels(img, rate, rng)
    if kind == "blur":
        return blur(img, rate)
    if kind == "downscale":
        return downscale(img, rate)
    raise ValueError(f"unknown image corruption {kind!r}")


def discard(post: Mapping[str, object], modalities: Sequence[str]) -> dict[str, object]:
    """A copy of a raw post dict without the given modalities (the fields are removed, not blanked)."""
    unknown = set(modalities) - set(MODALITIES)
    if unknown:
        raise ValueError(f"unknown modalities {sorted(unknown)}")
    return {k: v for k, v in post.items() if k not in modalities}


def _to_rgb(img: Image.Image) -> Image.Image:
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        canvas = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(canvas, rgba).convert("RGB")
    return img.convert("RGB")
