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
import io
from collections.abc import Mapping, Sequence
from typing import Final, Literal

import numpy as np
from PIL import Image, ImageFilter

from stream.service.vocabulary import MODALITIES

__all__ = [
    "CORRUPTION_RANGE",
    "IMAGE_CORRUPTIONS",
    "MASK_TOKEN",
    "TEXT_CORRUPTIONS",
    "ImageCorruption",
    "TextCorruption",
    "asr_words",
    "blur",
    "corrupt_image",
    "corrupt_text",
    "crop",
    "delete_words",
    "discard",
    "downscale",
    "jpeg_recompress",
    "mask_pixels",
    "mask_words",
    "pixel_mask",
    "post_rng",
    "sample_rate",
    "truncate_words",
    "typo_words",
]

# The papers' protocol (docs/data.md): content-level corruption masks 40–80 % of a modality's content.
CORRUPTION_RANGE: Final = (0.4, 0.8)
# MiniLM's tokenizer maps the literal "[MASK]" to its mask token, so a masked word costs one token.
MASK_TOKEN: Final = "[MASK]"

IMAGE_CORRUPTIONS: Final = ("mask", "blur", "downscale", "jpeg", "crop")
ImageCorruption = Literal["mask", "blur", "downscale", "jpeg", "crop"]


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


def _pick_words(text: str, rate: float, rng: np.random.Generator) -> tuple[list[str], list[int]]:
    """The whitespace-separated words of ``text`` and ``round(rate * n_words)`` distinct random indices of them."""
    _check_rate(rate)
    words = text.split()
    k = round(rate * len(words))
    return words, ([int(i) for i in rng.choice(len(words), size=k, replace=False)] if k else [])


def mask_words(text: str, rate: float, rng: np.random.Generator, mask_token: str = MASK_TOKEN) -> str:
    """Replace ``round(rate * n_words)`` whitespace-separated words, chosen at random, by ``mask_token``.

    Whitespace is normalised to single spaces. A text without words is returned unchanged.
    """
    words, chosen = _pick_words(text, rate, rng)
    if not chosen:
        return text
    for i in chosen:
        words[i] = mask_token
    return " ".join(words)


def delete_words(text: str, rate: float, rng: np.random.Generator) -> str:
    """Remove ``round(rate * n_words)`` words chosen at random (words lost, no marker left behind)."""
    words, chosen = _pick_words(text, rate, rng)
    if not chosen:
        return text
    gone = set(chosen)
    return " ".join(w for i, w in enumerate(words) if i not in gone)


def truncate_words(text: str, rate: float, rng: np.random.Generator) -> str:
    """Keep the first ``n_words - round(rate * n_words)`` words: a post or transcript cut off at the end."""
    _check_rate(rate)
    words = text.split()
    k = round(rate * len(words))
    return text if k == 0 else " ".join(words[: len(words) - k])


# Neighbouring keys of a QWERTY keyboard, for substitution typos.
_KEYBOARD: Final = {
    row[i]: row[max(0, i - 1) : i] + row[i + 1 : i + 2]
    for row in ("qwertyuiop", "asdfghjkl", "zxcvbnm")
    for i in range(len(row))
}


def _typo(word: str, rng: np.random.Generator) -> str:
    """One character-level edit: swap two neighbours, drop, double, or hit a neighbouring key."""
    if len(word) < 2:
        return word + word
    i = int(rng.integers(len(word) - 1))
    edit = int(rng.integers(4))
    if edit == 0:
        return word[:i] + word[i + 1] + word[i] + word[i + 2 :]
    if edit == 1:
        return word[:i] + word[i + 1 :]
    if edit == 2:
        return word[: i + 1] + word[i:]
    near = _KEYBOARD.get(word[i].lower(), "")
    return word if not near else word[:i] + near[int(rng.integers(len(near)))] + word[i + 1 :]


def typo_words(text: str, rate: float, rng: np.random.Generator) -> str:
    """Give ``round(rate * n_words)`` random words one typo each (swap, drop, double or neighbouring key)."""
    words, chosen = _pick_words(text, rate, rng)
    if not chosen:
        return text
    for i in chosen:
        words[i] = _typo(words[i], rng)
    return " ".join(words)


# Confusions a speech recogniser makes: homophones and near-homophones, both ways.
_HOMOPHONES: Final = {
    a: b
    for pair in (
        ("to", "too"),
        ("two", "to"),
        ("their", "there"),
        ("there", "they're"),
        ("your", "you're"),
        ("its", "it's"),
        ("hear", "here"),
        ("no", "know"),
        ("right", "write"),
        ("great", "grate"),
        ("would", "wood"),
        ("for", "four"),
        ("by", "buy"),
        ("new", "knew"),
        ("see", "sea"),
        ("one", "won"),
        ("weather", "whether"),
        ("flight", "fight"),
        ("late", "lay"),
        ("good", "could"),
        ("bad", "bat"),
        ("love", "laugh"),
        ("hate", "eight"),
        ("happy", "hoppy"),
        ("sad", "said"),
        ("not", "knot"),
        ("can't", "can"),
        ("don't", "done"),
        ("never", "ever"),
        ("thanks", "tanks"),
    )
    for a, b in (pair, pair[::-1])
}
_FILLERS: Final = ("uh", "um", "the", "a", "and")


def asr_words(text: str, rate: float, rng: np.random.Generator) -> str:
    """ASR-like damage to ``round(rate * n_words)`` random words: a homophone, a dropped word or a filler.

    Punctuation and case are lost first, as in a recogniser's raw output.
    """
    _check_rate(rate)
    words = [w.strip('.,!?;:"()').lower() for w in text.split()]
    words = [w for w in words if w] or words
    k = round(rate * len(words))
    if k == 0:
        return " ".join(words) if words else text
    out: list[str] = []
    chosen = {int(i) for i in rng.choice(len(words), size=k, replace=False)}
    for i, word in enumerate(words):
        if i not in chosen:
            out.append(word)
        elif word in _HOMOPHONES:
            out.append(_HOMOPHONES[word])
        elif rng.random() < 0.5:
            continue  # the recogniser missed the word
        else:
            out.append(_FILLERS[int(rng.integers(len(_FILLERS)))])
    return " ".join(out)


TEXT_CORRUPTIONS: Final = ("mask", "delete", "truncate", "typos", "asr")
TextCorruption = Literal["mask", "delete", "truncate", "typos", "asr"]


def corrupt_text(text: str, rate: float, rng: np.random.Generator, kind: TextCorruption = "mask") -> str:
    """Content-level corruption of a text or transcript at ``rate``.

    ``mask`` (default) is the papers' protocol: words replaced by ``[MASK]``. The others are what real posts
    suffer, and carry no marker a model could key on: words deleted, the end cut off, typos, ASR confusions.
    """
    if kind == "mask":
        return mask_words(text, rate, rng)
    if kind == "delete":
        return delete_words(text, rate, rng)
    if kind == "truncate":
        return truncate_words(text, rate, rng)
    if kind == "typos":
        return typo_words(text, rate, rng)
    if kind == "asr":
        return asr_words(text, rate, rng)
    raise ValueError(f"unknown text corruption {kind!r} (known: {', '.join(TEXT_CORRUPTIONS)})")


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


def jpeg_recompress(img: Image.Image, rate: float) -> Image.Image:
    """Re-encode as JPEG at quality ``round(95 - 90 * rate)`` (rate 0.8 → quality 23): blocks and ringing."""
    _check_rate(rate)
    buf = io.BytesIO()
    _to_rgb(img).save(buf, format="JPEG", quality=max(1, round(95 - 90 * rate)))
    buf.seek(0)
    with Image.open(buf) as out:
        return out.convert("RGB")


def crop(img: Image.Image, rate: float, rng: np.random.Generator) -> Image.Image:
    """A random window holding ``1 - rate`` of each side (at least 1 px): what a careless repost keeps."""
    _check_rate(rate)
    rgb = _to_rgb(img)
    width, height = rgb.size
    w, h = max(1, round(width * (1 - rate))), max(1, round(height * (1 - rate)))
    left, top = int(rng.integers(width - w + 1)), int(rng.integers(height - h + 1))
    return rgb.crop((left, top, left + w, top + h))


def corrupt_image(
    img: Image.Image, rate: float, rng: np.random.Generator, kind: ImageCorruption = "mask"
) -> Image.Image:
    """Content-level corruption of an image at ``rate``.

    ``mask`` (default) and ``blur`` follow the papers' protocol; ``downscale``, ``jpeg`` and ``crop`` are
    what reposted images suffer.
    """
    if kind == "mask":
        return mask_pixels(img, rate, rng)
    if kind == "blur":
        return blur(img, rate)
    if kind == "downscale":
        return downscale(img, rate)
    if kind == "jpeg":
        return jpeg_recompress(img, rate)
    if kind == "crop":
        return crop(img, rate, rng)
    raise ValueError(f"unknown image corruption {kind!r} (known: {', '.join(IMAGE_CORRUPTIONS)})")


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
