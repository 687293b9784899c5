"""Realistic content faults: seeded, rate-true, and free of any marker a model could key on."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from stream.tools.faults import (
    IMAGE_CORRUPTIONS,
    MASK_TOKEN,
    TEXT_CORRUPTIONS,
    corrupt_image,
    corrupt_text,
    crop,
    delete_words,
    jpeg_recompress,
    truncate_words,
    typo_words,
)
from stream.tools.replay import Faults
from stream.tools.replay_results import PublishedPost

TEXT = "@united the flight was late and the crew was rude but the seats were fine and the food was ok today"
N_WORDS = len(TEXT.split())


@pytest.mark.parametrize("kind", TEXT_CORRUPTIONS)
def test_every_text_kind_is_seeded_per_generator(kind: str) -> None:
    a = corrupt_text(TEXT, 0.5, np.random.default_rng(3), kind)  # type: ignore[arg-type]
    b = corrupt_text(TEXT, 0.5, np.random.default_rng(3), kind)  # type: ignore[arg-type]
    assert a == b and a != TEXT


@pytest.mark.parametrize("kind", [k for k in TEXT_CORRUPTIONS if k != "mask"])
def test_realistic_text_faults_leave_no_mask_token(kind: str) -> None:
    for seed in range(20):
        assert MASK_TOKEN not in corrupt_text(TEXT, 0.8, np.random.default_rng(seed), kind)  # type: ignore[arg-type]


def test_delete_and_truncate_remove_the_stated_share_of_words() -> None:
    rng = np.random.default_rng(0)
    assert len(delete_words(TEXT, 0.4, rng).split()) == N_WORDS - round(0.4 * N_WORDS)
    cut = truncate_words(TEXT, 0.4, rng)
    assert TEXT.startswith(cut) and len(cut.split()) == N_WORDS - round(0.4 * N_WORDS)


def test_typos_change_exactly_the_stated_share_of_words_and_keep_the_rest() -> None:
    out = typo_words(TEXT, 0.5, np.random.default_rng(1)).split()
    changed = sum(a != b for a, b in zip(TEXT.split(), out, strict=True))
    assert 0 < changed <= round(0.5 * N_WORDS)


def test_rate_zero_changes_nothing_and_a_bad_rate_is_refused() -> None:
    for kind in ("mask", "delete", "truncate", "typos"):
        assert corrupt_text(TEXT, 0.0, np.random.default_rng(0), kind) == TEXT  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="rate"):
        corrupt_text(TEXT, 1.5, np.random.default_rng(0), "delete")
    with pytest.raises(ValueError, match="unknown text corruption"):
        corrupt_text(TEXT, 0.5, np.random.default_rng(0), "shout")  # type: ignore[arg-type]


@pytest.mark.parametrize("kind", IMAGE_CORRUPTIONS)
def test_every_image_kind_returns_a_changed_rgb_image(kind: str) -> None:
    rng = np.random.default_rng(0)
    img = Image.fromarray(rng.integers(0, 256, (96, 128, 3), dtype=np.uint8), "RGB")
    out = corrupt_image(img, 0.6, np.random.default_rng(5), kind)  # type: ignore[arg-type]
    assert out.mode == "RGB"
    assert out.size != img.size or not np.array_equal(np.asarray(out), np.asarray(img))


def test_crop_keeps_the_stated_share_of_each_side_and_jpeg_degrades_more_at_higher_rates() -> None:
    rng = np.random.default_rng(0)
    img = Image.fromarray(rng.integers(0, 256, (100, 200, 3), dtype=np.uint8), "RGB")
    assert crop(img, 0.25, np.random.default_rng(1)).size == (150, 75)
    ref = np.asarray(img, np.float32)
    errors = [np.abs(np.asarray(jpeg_recompress(img, r), np.float32) - ref).mean() for r in (0.1, 0.5, 0.9)]
    assert errors[0] < errors[1] < errors[2]


def test_replay_faults_accept_text_kinds_and_label_each_corrupted_post_by_kind() -> None:
    faults = Faults(corrupt={"text": 1.0}, text_corruption=("delete", "typos"))
    assert Faults.from_dict(faults.to_dict()) == faults
    with pytest.raises(ValueError, match="text corruptions"):
        Faults(text_corruption=("shout",))
    post = PublishedPost(
        id="p",
        original_id="p",
        label="positive",
        present=("text",),
        corrupted=("text",),
        corruption_kinds=("text:delete",),
    )
    assert post.faults == ("corrupt:text", "corrupt:text:delete")
    assert PublishedPost.from_dict(post.to_dict()) == post
