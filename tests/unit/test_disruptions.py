"""Seeded discard and content-level corruption, and the protocol grid the evaluation iterates."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from models.disruptions import INTRA_RATES, Condition, plan_condition, protocol_grid
from stream.service.vocabulary import MODALITIES
from stream.tools.faults import (
    CORRUPTION_RANGE,
    MASK_TOKEN,
    blur,
    corrupt_image,
    corrupt_text,
    discard,
    downscale,
    mask_pixels,
    mask_words,
    post_rng,
    sample_rate,
)

TEXT = "the flight was late and the crew was rude but the seats were fine and the food ok"


def _noise_image(seed: int = 0, size: tuple[int, int] = (40, 30)) -> Image.Image:
    rng = np.random.default_rng(seed)
    # values 1..255 so no pixel is already black (the mask fill)
    return Image.fromarray(rng.integers(1, 256, size=(size[1], size[0], 3), dtype=np.uint8), mode="RGB")


@pytest.mark.parametrize("rate", [0.0, 0.1, 0.4, 0.55, 0.8, 1.0])
def test_mask_words_masks_the_requested_fraction(rate: float) -> None:
    words = TEXT.split()
    masked = mask_words(TEXT, rate, np.random.default_rng(1)).split()
    assert len(masked) == len(words)
    changed = sum(a != b for a, b in zip(words, masked, strict=True))
    assert changed == round(rate * len(words))
    assert all(m == MASK_TOKEN for a, m in zip(words, masked, strict=True) if a != m)


def test_word_masking_is_deterministic_for_a_seed_and_differs_across_seeds() -> None:
    a = corrupt_text(TEXT, 0.5, np.random.default_rng(7))
    b = corrupt_text(TEXT, 0.5, np.random.default_rng(7))
    c = corrupt_text(TEXT, 0.5, np.random.default_rng(8))
    assert a == b != c


def test_empty_text_is_returned_unchanged() -> None:
    assert mask_words("   ", 0.8, np.random.default_rng(0)) == "   "


@pytest.mark.parametrize("rate", [0.0, 0.25, 0.4, 0.8, 1.0])
def test_mask_pixels_blackens_exactly_the_requested_fraction(rate: float) -> None:
    img = _noise_image()
    out = np.asarray(mask_pixels(img, rate, np.random.default_rng(3)))
    black = (out == 0).all(axis=2)
    assert black.sum() == round(rate * 40 * 30)
    untouched = ~black
    np.testing.assert_array_equal(out[untouched], np.asarray(img)[untouched])


def test_transparent_emoji_is_masked_on_white() -> None:
    img = Image.new("RGBA", (20, 20), (0, 0, 0, 0))
    out = np.asarray(corrupt_image(img, 0.5, np.random.default_rng(0)))
    assert out.shape == (20, 20, 3)
    assert (out == 0).all(axis=2).sum() == 200 and (out == 255).all(axis=2).sum() == 200


def test_blur_and_downscale_keep_size_and_lose_detail() -> None:
    img = _noise_image(1, (64, 64))
    original = np.asarray(img, dtype=np.float32)
    for degraded in (blur(img, 0.6), downscale(img, 0.6), corrupt_image(img, 0.6, np.random.default_rng(0), "blur")):
        arr = np.asarray(degraded, dtype=np.float32)
        assert arr.shape == original.shape
        # noise is high-frequency: degrading removes variance between neighbours
        assert np.abs(np.diff(arr, axis=1)).mean() < 0.7 * np.abs(np.diff(original, axis=1)).mean()
    np.testing.assert_array_equal(np.asarray(downscale(img, 0.0)), original.astype(np.uint8))


def test_sampled_rates_stay_in_the_40_to_80_percent_band() -> None:
    rng = np.random.default_rng(0)
    rates = np.array([sample_rate(rng) for _ in range(2000)])
    assert CORRUPTION_RANGE == (0.4, 0.8)
    assert rates.min() >= 0.4 and rates.max() < 0.8
    assert abs(rates.mean() - 0.6) < 0.01


def test_post_rng_depends_on_seed_and_post_not_on_order() -> None:
    first = [post_rng(0, k).random() for k in ("a", "b", "c")]
    again = [post_rng(0, k).random() for k in ("c", "b", "a")][::-1]
    assert first == again
    assert post_rng(0, "a").random() != post_rng(1, "a").random()


def test_invalid_rate_is_refused() -> None:
    with pytest.raises(ValueError):
        mask_words(TEXT, 1.5, np.random.default_rng(0))


def test_discard_removes_the_field() -> None:
    post = {"id": "p1", "text": "hi", "image": b"png", "transcript": "hello"}
    assert discard(post, ["image", "transcript"]) == {"id": "p1", "text": "hi"}
    with pytest.raises(ValueError):
        discard(post, ["audio"])


def test_protocol_grid_covers_every_family_once() -> None:
    grid = protocol_grid()
    names = [c.name for c in grid]
    assert len(names) == len(set(names))
    families = {f: [c for c in grid if c.family == f] for f in ("clean", "fixed", "random", "subset", "rate")}
    assert len(families["clean"]) == 1
    assert len(families["fixed"]) == 3 * 3  # C, D, C+D per modality
    assert sorted({c.ratio for c in families["random"]}) == [0.2, 0.4, 0.6, 0.8, 1.0]
    assert len(families["subset"]) == 7  # every non-empty subset of 3 modalities
    assert len(families["rate"]) == 3 * len(INTRA_RATES) and INTRA_RATES[0] == 0.0 and INTRA_RATES[-1] == 0.9
    assert {c.variants["text"] for c in families["fixed"] if c.name == "fixed_C_text"} == {"corrupt_text"}
    assert next(c for c in grid if c.name == "rate_image_0.3").variants == {"image": "rate_image_0.3"}


@pytest.mark.parametrize("condition", protocol_grid(), ids=lambda c: c.name)
def test_every_plan_keeps_a_modality_and_only_corrupts_present_ones(condition: Condition) -> None:
    plan = plan_condition(condition, 500, np.random.default_rng(0))
    assert plan.present.shape == plan.corrupted.shape == (500, len(MODALITIES))
    assert plan.present.any(axis=1).all()
    assert not (plan.corrupted & ~plan.present).any()


def test_fixed_discard_drops_the_modality_from_every_post() -> None:
    grid = {c.name: c for c in protocol_grid()}
    plan = plan_condition(grid["fixed_D_image"], 100, np.random.default_rng(0))
    assert not plan.present[:, 1].any() and plan.present[:, [0, 2]].all() and not plan.corrupted.any()
    mixed = plan_condition(grid["fixed_C+D_text"], 2000, np.random.default_rng(0))
    discarded, corrupted = (~mixed.present[:, 0]).mean(), mixed.corrupted[:, 0].mean()
    assert discarded + corrupted == 1.0 and 0.45 < discarded < 0.55


def test_random_ratio_disrupts_that_share_of_posts() -> None:
    grid = {c.name: c for c in protocol_grid()}
    plan = plan_condition(grid["random_D_0.4"], 5000, np.random.default_rng(0))
    hit = (~plan.present).any(axis=1)
    assert 0.37 < hit.mean() < 0.43
    assert (~plan.present).sum(axis=1).max() == 1  # one modality per disrupted post


def test_subset_keeps_exactly_those_modalities() -> None:
    grid = {c.name: c for c in protocol_grid()}
    plan = plan_condition(grid["subset_text+transcript"], 10, np.random.default_rng(0))
    assert plan.present.tolist() == [[True, False, True]] * 10


# -- per-kind content faults -------------------------------------------------------------------


def test_corrupt_variant_names_keep_masking_unchanged_and_round_trip() -> None:
    from models.disruptions import CORRUPT_KINDS, corrupt_variant, parse_corrupt_variant
    from stream.tools.faults import IMAGE_CORRUPTIONS, TEXT_CORRUPTIONS

    assert corrupt_variant("text") == "corrupt_text" and corrupt_variant("image", "mask") == "corrupt_image"
    assert corrupt_variant("text", "typos") == "corrupt_text_typos"
    assert corrupt_variant("transcript", "asr") == "corrupt_transcript_asr"
    for modality, kinds in CORRUPT_KINDS.items():
        assert kinds[0] == "mask"
        # every kind is one the replay tool can inject
        assert set(kinds) <= set(IMAGE_CORRUPTIONS if modality == "image" else TEXT_CORRUPTIONS)
        for kind in kinds:
            assert parse_corrupt_variant(corrupt_variant(modality, kind)) == (modality, kind)
    with pytest.raises(ValueError):
        corrupt_variant("text", "asr")  # tweets are typed: no ASR confusions
    with pytest.raises(ValueError):
        corrupt_variant("image", "typos")
    for name in ("clean", "rate_text_0.3", "corrupt_text_mask", "corrupt_audio", "corrupt_image_typos"):
        assert parse_corrupt_variant(name) is None


def test_fault_conditions_corrupt_every_post_with_their_own_variant() -> None:
    from models.disruptions import CORRUPT_KINDS

    grid = {c.name: c for c in protocol_grid()}
    faults = [c for c in grid.values() if c.family == "fault"]
    assert len(faults) == sum(len(k) - 1 for k in CORRUPT_KINDS.values())
    assert grid["fixed_C_text_typos"].variants == {"text": "corrupt_text_typos"}
    assert grid["fixed_C_image_jpeg"].variants == {"image": "corrupt_image_jpeg"}
    assert grid["fixed_C_text"].variants == {"text": "corrupt_text"}  # masking keeps its name
    plan = plan_condition(grid["fixed_C_transcript_asr"], 50, np.random.default_rng(0))
    assert plan.present.all() and plan.corrupted[:, 2].all() and not plan.corrupted[:, :2].any()
