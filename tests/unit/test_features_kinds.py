"""Per-kind corrupted feature variants: the --corrupt-kinds option, variant naming, a tiny real build."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from models.features import MASK_ONLY, parse_corrupt_kinds, variant_names


def test_corrupt_kinds_default_is_masking_only() -> None:
    assert parse_corrupt_kinds("mask") == MASK_ONLY == {m: ("mask",) for m in ("text", "image", "transcript")}
    assert parse_corrupt_kinds("") == MASK_ONLY


def test_corrupt_kinds_all_bare_and_per_modality() -> None:
    everything = parse_corrupt_kinds("all")
    assert everything["text"] == ("mask", "delete", "truncate", "typos")
    assert everything["transcript"] == ("mask", "asr", "delete", "truncate")
    assert everything["image"] == ("mask", "blur", "downscale", "jpeg", "crop")
    # a bare kind goes to every modality that has it; mask is always kept; order is canonical
    assert parse_corrupt_kinds("delete") == {"text": ("mask", "delete"), "image": ("mask",),
                                             "transcript": ("mask", "delete")}
    assert parse_corrupt_kinds("image:crop,text:typos,image:jpeg") == {
        "text": ("mask", "typos"), "image": ("mask", "jpeg", "crop"), "transcript": ("mask",)}
    for bad in ("text:asr", "image:typos", "audio:mask", "smudge"):
        with pytest.raises(ValueError):
            parse_corrupt_kinds(bad)


def test_variant_names_follow_the_build_options() -> None:
    assert variant_names("train") == ["clean"]  # the default build corrupts test splits only
    kinds = parse_corrupt_kinds("text:typos,image:jpeg")
    names = variant_names("train", corrupt_splits=("train", "val", "test"), kinds=kinds)
    assert names == ["clean", "corrupt_text", "corrupt_text_typos", "corrupt_image", "corrupt_image_jpeg",
                     "corrupt_transcript"]
    assert len(variant_names("test", corrupt_splits=("test",), kinds=kinds)) == 1 + 5 + 30


@pytest.mark.slow
def test_tiny_build_writes_per_kind_variants_for_train_and_val(tmp_path: Path) -> None:
    pytest.importorskip("torch")
    from models.data import build_benchmark, fetch_sources, sources_dir
    from models.features import build_features, built_corrupt_variants, load_features
    from models.train import attach_corrupted, load_table
    from stream.tools.dataset import read_posts

    fetch_sources(sources_dir())
    build_benchmark(tmp_path, seed=2, sample=120, sources=sources_dir())
    kinds = parse_corrupt_kinds("text:typos,text:truncate,transcript:asr,image:jpeg")
    folder = build_features(tmp_path, rate_subset=0, threads=1, splits_to_corrupt=("train", "val"),
                            corrupt_kinds=kinds)
    assert (tmp_path / "READY_ALL").is_file()
    for split in ("train", "val"):
        files = sorted(p.stem for p in (folder / "variants" / split).glob("*.npz"))
        assert files == sorted(variant_names(split, corrupt_splits=("train", "val"), kinds=kinds)[1:])
    assert not (folder / "variants" / "test").exists()
    assert built_corrupt_variants(tmp_path, "train") == {
        "text": ["corrupt_text", "corrupt_text_truncate", "corrupt_text_typos"],
        "image": ["corrupt_image", "corrupt_image_jpeg"],
        "transcript": ["corrupt_transcript", "corrupt_transcript_asr"],
    }

    clean = load_features(tmp_path, "train")
    n = len(read_posts(tmp_path, "train"))
    typos = load_features(tmp_path, "train", "corrupt_text_typos")
    assert typos.meta["corruption_kind"] == "typos" and typos.meta["corrupted_modality"] == "text"
    assert list(typos.ids) == list(clean.ids) and typos.text.shape == (n, 384)
    rates = typos.meta["corruption_rate"]
    assert rates.min() >= 0.4 and rates.max() < 0.8
    np.testing.assert_array_equal(typos.image, clean.image)
    masked = load_features(tmp_path, "train", "corrupt_text")
    # each fault moves the embedding, and differently from masking
    for variant in (typos, masked, load_features(tmp_path, "train", "corrupt_text_truncate")):
        assert not np.allclose(variant.text, clean.text)
    assert not np.allclose(typos.text, masked.text)
    jpeg = load_features(tmp_path, "train", "corrupt_image_jpeg")
    assert jpeg.meta["corruption_kind"] == "jpeg" and not np.allclose(jpeg.image, clean.image)

    # resumable: a second build re-encodes nothing (file times unchanged)
    stamps = {p: p.stat().st_mtime_ns for p in (folder / "variants").rglob("*.npz")}
    build_features(tmp_path, rate_subset=0, threads=1, splits_to_corrupt=("train", "val"), corrupt_kinds=kinds)
    assert {p: p.stat().st_mtime_ns for p in (folder / "variants").rglob("*.npz")} == stamps

    # another split family reuses the cached corrupted tweets: a control post's text variant is the same row
    build_features(tmp_path, rate_subset=0, threads=1, splits_to_corrupt=("control_train",), corrupt_kinds=kinds)
    control = load_features(tmp_path, "control_train", "corrupt_text_typos")
    by_id = {str(i): n for n, i in enumerate(typos.ids)}
    shared = [n for n, i in enumerate(control.ids) if str(i) in by_id]
    assert shared
    np.testing.assert_array_equal(control.text[shared], typos.text[[by_id[str(control.ids[n])] for n in shared]])

    # the trainer attaches every variant, aligned by post id
    table = attach_corrupted(load_table(tmp_path, "train"), tmp_path, "train")
    assert table.corrupted_variants["text"] == ["corrupt_text", "corrupt_text_truncate", "corrupt_text_typos"]
    assert table.corrupted["text"].shape == (3, n, 384) and table.corrupted["image"].shape == (2, n, 1280)
    np.testing.assert_allclose(table.corrupted["text"][2], typos.text)
