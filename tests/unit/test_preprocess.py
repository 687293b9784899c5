"""Preprocessing shared by training and serving: tokenisation and image arrays (no torch)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from stream.service.preprocess import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    TextTokenizer,
    image_to_array,
    images_to_batch,
    minilm_tokenizer_path,
)


@pytest.fixture(scope="module")
def tokenizer() -> TextTokenizer:
    return TextTokenizer.from_file(minilm_tokenizer_path())


def test_shipped_tokenizer_json_pads_to_128_which_we_override() -> None:
    # Pins the trap the override exists for: if the package ever changes, revisit from_file.
    config = json.loads(minilm_tokenizer_path().read_text())
    assert config["padding"]["strategy"] == {"Fixed": 128}
    assert config["truncation"]["max_length"] == 128


def test_known_words_get_bert_uncased_ids(tokenizer: TextTokenizer) -> None:
    ids, mask = tokenizer.encode(["Hello world"])
    assert ids.tolist() == [[101, 7592, 2088, 102]]
    assert mask.tolist() == [[1, 1, 1, 1]]


def test_batch_is_padded_to_its_longest_text_not_to_128(tokenizer: TextTokenizer) -> None:
    ids, mask = tokenizer.encode(["ok", "this one is a little longer than the other", ""])
    assert ids.dtype == np.int64 and mask.dtype == np.int64
    assert ids.shape == mask.shape
    lengths = mask.sum(1)
    assert ids.shape[1] == lengths.max() < 128
    assert lengths.tolist()[0] == 3 and lengths.tolist()[2] == 2  # [CLS] ok [SEP]; [CLS] [SEP]
    assert (ids[mask == 0] == 0).all()  # padding is [PAD] = 0


def test_long_texts_are_truncated_at_max_length(tokenizer: TextTokenizer) -> None:
    long_text = " ".join(["sentiment"] * 400)
    ids, mask = tokenizer.encode([long_text])
    assert ids.shape == (1, 256) and mask.all()
    assert ids[0, -1] == 102  # truncation keeps the closing [SEP]
    short = TextTokenizer.from_file(minilm_tokenizer_path(), max_length=32)
    assert short.encode([long_text])[0].shape == (1, 32)


def test_empty_batch_gives_empty_arrays(tokenizer: TextTokenizer) -> None:
    ids, mask = tokenizer.encode([])
    assert ids.shape == (0, 0) and mask.shape == (0, 0)


def test_white_image_maps_to_normalised_white() -> None:
    arr = image_to_array(Image.new("RGB", (64, 64), (255, 255, 255)))
    assert arr.shape == (3, 224, 224) and arr.dtype == np.float32
    expected = (1.0 - IMAGENET_MEAN) / IMAGENET_STD
    np.testing.assert_allclose(arr.reshape(3, -1).mean(1), expected, rtol=1e-6)


def test_transparent_pixels_become_white_not_black() -> None:
    clear = Image.new("RGBA", (32, 32), (0, 0, 0, 0))
    np.testing.assert_allclose(image_to_array(clear), image_to_array(Image.new("RGB", (32, 32), "white")))


def test_short_side_resize_then_centre_crop_keeps_the_centre() -> None:
    # a wide image: red left third, green middle, blue right third; the centre crop is all green
    img = Image.new("RGB", (600, 200))
    img.paste((255, 0, 0), (0, 0, 200, 200))
    img.paste((0, 255, 0), (200, 0, 400, 200))
    img.paste((0, 0, 255), (400, 0, 600, 200))
    arr = image_to_array(img, size=128)
    assert arr.shape == (3, 128, 128)
    rgb = arr * IMAGENET_STD[:, None, None] + IMAGENET_MEAN[:, None, None]
    # the crop spans 128 of the 439 resized columns around the centre: green only
    assert rgb[1].min() > 0.99 and rgb[0].max() < 0.01 and rgb[2].max() < 0.01


def test_grey_and_palette_images_are_converted_to_rgb() -> None:
    grey = image_to_array(Image.new("L", (50, 80), 128))
    assert grey.shape == (3, 224, 224)
    channels = grey.reshape(3, -1).mean(1) * IMAGENET_STD + IMAGENET_MEAN
    np.testing.assert_allclose(channels, 128 / 255, atol=1e-6)


def test_batch_stacks_images() -> None:
    batch = images_to_batch([Image.new("RGB", (10, 10)), Image.new("RGB", (40, 20))], size=64)
    assert batch.shape == (2, 3, 64, 64) and batch.dtype == np.float32
    assert images_to_batch([]).shape == (0, 3, 224, 224)
