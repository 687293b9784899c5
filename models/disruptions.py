"""Disruptions of posts and the evaluation protocol grid (DESIGN.md §6).

Two kinds of disruption:

* **discard** (D, inter-modal missingness): a modality is absent. In feature space this is a presence
  mask, never a feature variant.
* **corrupt** (C, intra-modal missingness / low quality): content-level damage to the raw input —
  mask a fraction of the words of a text or transcript, mask a fraction of an image's pixels, or
  blur / downscale an image. Corrupted inputs are encoded for real (``models/features.py``).

Everything here is torch-free (numpy + Pillow) and works on raw ``str`` and ``PIL.Image`` so the
replay tool can inject the same disruptions into a live stream. Every random choice takes an
explicit :class:`numpy.random.Generator`; :func:`post_rng` derives one per (seed, post id) so a post is
disrupted the same way wherever it is replayed.

The protocol grid (:func:`protocol_grid`) is data: a list of :class:`Condition` that the evaluation
iterates, and :func:`plan_condition` turns one condition into per-post presence and corruption masks.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from itertools import combinations
from typing import Final, Literal

import numpy as np
from PIL import Image, ImageFilter

from stream.events import MODALITIES

__all__ = [
    "CORRUPTION_RANGE",
    "INTRA_RATES",
    "MASK_TOKEN",
    "RANDOM_RATIOS",
    "Condition",
    "Plan",
    "blur",
    "corrupt_image",
    "corrupt_text",
    "discard",
    "downscale",
    "mask_pixels",
    "mask_words",
    "pixel_mask",
    "plan_condition",
    "post_rng",
    "protocol_grid",
    "rate_variant",
    "sample_rate",
]

# DESIGN.md §6: content-level corruption masks 40–80 % of a modality's content.
CORRUPTION_RANGE: Final = (0.4, 0.8)
RANDOM_RATIOS: Final = (0.2, 0.4, 0.6, 0.8, 1.0)
INTRA_RATES: Final = tuple(round(0.1 * i, 1) for i in range(10))
# MiniLM's tokenizer maps the literal "[MASK]" to its mask token, so a masked word costs one token.
MASK_TOKEN: Final = "[MASK]"

Disruption = Literal["none", "C", "D", "C+D"]
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

    Transparent images are composited on white first, as :func:`stream.preprocess.image_to_array`
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


def rate_variant(modality: str, rate: float) -> str:
    """Feature-variant name of modality corrupted at a fixed intra-modal rate, e.g. ``rate_text_0.3``."""
    if modality not in MODALITIES:
        raise ValueError(f"unknown modality {modality!r}")
    return f"rate_{modality}_{rate:.1f}"


# -- the evaluation protocol -------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Condition:
    """One cell of the robustness protocol.

    ``family``: ``clean`` | ``fixed`` | ``random`` | ``subset`` | ``rate``.
    ``modalities``: the modalities the disruption may hit (for ``subset``: the modalities kept).
    ``disruption``: C = corrupt (use the ``corrupt_<modality>`` feature variant), D = discard (presence
    mask), C+D = each disrupted (post, modality) is corrupted or discarded with probability 1/2.
    ``ratio``: fraction of posts disrupted. ``rate``: fixed intra-modal rate for ``rate`` (its feature
    variant is :func:`rate_variant`; the ``rate`` family uses the documented test subset).
    """

    name: str
    family: Literal["clean", "fixed", "random", "subset", "rate"]
    modalities: tuple[str, ...] = ()
    disruption: Disruption = "none"
    ratio: float = 0.0
    rate: float | None = None

    @property
    def variants(self) -> dict[str, str]:
        """Feature variant to load per modality when that modality is corrupted (only C or rate)."""
        if self.family == "rate" and self.rate is not None:
            return {m: rate_variant(m, self.rate) for m in self.modalities}
        if "C" in self.disruption:
            return {m: f"corrupt_{m}" for m in self.modalities}
        return {}


def protocol_grid() -> list[Condition]:
    """Every condition of the protocol, in report order.

    clean; Fixed C / D / C+D on each modality (every post); Random ratios 0.2…1.0 with C, D and C+D
    (one random modality per disrupted post); every non-empty subset of modalities (the rest
    discarded); intra-modal rates 0.0…0.9 per modality.
    """
    grid = [Condition("clean", "clean")]
    kinds: tuple[Disruption, ...] = ("C", "D", "C+D")
    for modality in MODALITIES:
        for kind in kinds:
            grid.append(Condition(f"fixed_{kind}_{modality}", "fixed", (modality,), kind, 1.0))
    for kind in kinds:
        for ratio in RANDOM_RATIOS:
            grid.append(Condition(f"random_{kind}_{ratio:.1f}", "random", MODALITIES, kind, ratio))
    for size in range(1, len(MODALITIES) + 1):
        for subset in combinations(MODALITIES, size):
            grid.append(Condition("subset_" + "+".join(subset), "subset", subset, "D" if size < 3 else "none"))
    for modality in MODALITIES:
        for rate in INTRA_RATES:
            grid.append(Condition(rate_variant(modality, rate), "rate", (modality,), "C", 1.0, rate))
    return grid


@dataclass(frozen=True, slots=True)
class Plan:
    """Per-post masks for one condition: ``present`` and ``corrupted`` are bool ``[N, 3]`` in MODALITIES order.

    A modality that is not present is never marked corrupted. At least one modality stays present in
    every post (a post with nothing left cannot be scored and would be rejected by the service).
    """

    present: np.ndarray
    corrupted: np.ndarray


def plan_condition(condition: Condition, n: int, rng: np.random.Generator) -> Plan:
    """Draw presence and corruption masks for ``n`` posts under ``condition``."""
    present = np.ones((n, len(MODALITIES)), dtype=bool)
    corrupted = np.zeros((n, len(MODALITIES)), dtype=bool)
    index = {m: i for i, m in enumerate(MODALITIES)}
    if condition.family == "clean":
        return Plan(present, corrupted)
    if condition.family == "subset":
        keep = [index[m] for m in condition.modalities]
        present[:] = False
        present[:, keep] = True
        return Plan(present, corrupted)
    if condition.family == "rate":
        corrupted[:, index[condition.modalities[0]]] = (condition.rate or 0.0) > 0.0
        return Plan(present, corrupted)

    hit = rng.random(n) < condition.ratio if condition.ratio < 1.0 else np.ones(n, dtype=bool)
    if condition.family == "fixed":
        column = np.full(n, index[condition.modalities[0]])
    else:
        column = rng.integers(0, len(MODALITIES), size=n)
    if condition.disruption == "C":
        as_discard = np.zeros(n, dtype=bool)
    elif condition.disruption == "D":
        as_discard = np.ones(n, dtype=bool)
    else:
        as_discard = rng.random(n) < 0.5
    rows = np.flatnonzero(hit)
    present[rows[as_discard[rows]], column[rows[as_discard[rows]]]] = False
    corrupted[rows[~as_discard[rows]], column[rows[~as_discard[rows]]]] = True
    return Plan(present, corrupted)
