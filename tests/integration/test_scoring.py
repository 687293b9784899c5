"""The broker-free scorer and the worker's batch service, on the real exported model."""

from __future__ import annotations

import asyncio
from pathlib import Path

import msgpack
import numpy as np
import pytest

from stream.service.events import MODALITIES, Post, encode_post
from stream.service.feature_queue import QueueStats
from stream.service.manifest import Manifest
from stream.service.metrics import Metrics
from stream.service.processing import ScoringService
from stream.service.scoring import InputRecord, PostScorer
from stream.service.settings import Settings


@pytest.fixture(scope="module")
def scorer(served_model: Path) -> PostScorer:
    return PostScorer(Manifest.load(served_model), Settings(model_dir=served_model))


def _records(posts: list[Post]) -> list[InputRecord]:
    return [InputRecord(value=encode_post(p), key=p.id.encode(), timestamp=100.0) for p in posts]


def test_every_valid_post_gets_one_event_and_every_invalid_one_a_dead_letter(
    scorer: PostScorer, benchmark_posts: list[Post]
) -> None:
    posts = benchmark_posts[:40]
    records = _records(posts)
    records.insert(5, InputRecord(value=b"\xc1", key=b"junk", topic="posts", partition=2, offset=7))
    out = scorer.score(records, None)
    assert [e.id for e in out.events] == [p.id for p in posts]
    assert [(d.reason, d.key, d.partition, d.offset) for d in out.dead_letters] == [("not_msgpack", b"junk", 2, 7)]
    for ev, post in zip(out.events, posts, strict=True):
        assert ev.present == post.present
        assert ev.recovered == tuple(m for m in MODALITIES if m not in post.present)
        assert set(ev.quality) == set(post.present) and all(0 <= q <= 1 for q in ev.quality.values())
        assert ev.event_ts == 100.0 and ev.flags == ()  # frozen training moments: no queue, nothing degraded
        assert ev.label == ("negative", "neutral", "positive")[int(np.argmax(ev.probs))]


def test_scores_do_not_depend_on_batch_composition(scorer: PostScorer, benchmark_posts: list[Post]) -> None:
    posts = benchmark_posts[:24]
    together = scorer.score(_records(posts), None).events
    alone = [scorer.score(_records([p]), None).events[0] for p in posts]
    for a, b in zip(together, alone, strict=True):
        np.testing.assert_allclose(a.probs, b.probs, atol=1e-5)


def test_int8_scores_do_not_depend_on_batch_composition_either(
    scorer: PostScorer, benchmark_posts: list[Post]
) -> None:
    # dynamic int8 quantisation scales per run: batched, a post's embedding moved with its neighbours
    int8 = PostScorer(scorer.manifest, scorer.settings.model_copy(update={"text_encoder": "int8"}))
    assert int8.text_variant == "int8" and int8.sub_batch == 1
    posts = [p for p in benchmark_posts[:60] if p.text is not None][:24]
    together = int8.score(_records(posts), None).events
    alone = [int8.score(_records([p]), None).events[0] for p in posts]
    for a, b in zip(together, alone, strict=True):  # batched, this moved by up to 5e-3 (0.18 on the full model)
        np.testing.assert_allclose(a.probs, b.probs, atol=1e-5)


def test_only_complete_confident_posts_are_enqueued(scorer: PostScorer, benchmark_posts: list[Post]) -> None:
    posts = benchmark_posts[:70]
    permissive = PostScorer(
        scorer.manifest, scorer.settings.model_copy(update={"enqueue_min_confidence": 0.0, "enqueue_min_quality": 0.0})
    )
    out = permissive.score(_records(posts), None)
    complete = sum(len(p.present) == 3 for p in posts)
    assert complete > 0
    assert {m: v.shape for m, v in out.enqueue.items()} == {m: (complete, scorer.queue_dim) for m in MODALITIES}
    strict = PostScorer(scorer.manifest, scorer.settings.model_copy(update={"enqueue_min_confidence": 1.0}))
    assert strict.score(_records(posts), None).enqueue == {}


def _flat_stats(d: int, status: str) -> QueueStats:
    """Queue statistics unlike the training queue's: mean 0.5, variance 2 in every dimension."""
    return QueueStats(
        status,
        count=dict.fromkeys(MODALITIES, 50),
        mean={m: np.full(d, 0.5, np.float32) for m in MODALITIES},
        var={m: np.full(d, 2.0, np.float32) for m in MODALITIES},
    )


def test_by_default_the_training_moments_score_whatever_the_live_queue_holds(
    scorer: PostScorer, benchmark_posts: list[Post]
) -> None:
    stats = _flat_stats(scorer.queue_dim, "queue_stale")
    mean, var = scorer.moments(stats)
    np.testing.assert_array_equal(mean, scorer.manifest.queue_moments()[0])
    np.testing.assert_array_equal(var, scorer.manifest.queue_moments()[1])
    records = _records(benchmark_posts[:20])
    with_queue, without = scorer.score(records, stats).events, scorer.score(records, None).events
    assert [e.probs for e in with_queue] == [e.probs for e in without]
    assert all(e.flags == () for e in with_queue)


def test_live_moments_replace_the_training_queue_and_degraded_ones_are_flagged(
    scorer: PostScorer, benchmark_posts: list[Post]
) -> None:
    scorer = PostScorer(scorer.manifest, scorer.settings.model_copy(update={"queue_moments": "live"}))
    stats = _flat_stats(scorer.queue_dim, "ok")
    mean, var = scorer.moments(stats)
    assert np.all(mean == 0.5) and np.all(var == 2.0)
    fallback_mean, _ = scorer.moments(None)
    np.testing.assert_array_equal(fallback_mean, scorer.manifest.queue_moments()[0])
    stale = QueueStats("queue_stale", stats.count, stats.mean, stats.var)
    assert scorer.score(_records(benchmark_posts[:3]), stale).events[0].flags == ("queue_stale",)
    assert scorer.score(_records(benchmark_posts[:3]), stats).events[0].flags == ()
    assert scorer.score(_records(benchmark_posts[:3]), None).events[0].flags == ("queue_unavailable",)


def test_an_oversized_dead_letter_keeps_a_prefix_and_says_so(scorer: PostScorer) -> None:
    small = PostScorer(
        scorer.manifest, scorer.settings.model_copy(update={"max_dead_letter_bytes": 2048, "max_text_chars": 10})
    )
    raw = msgpack.packb({"id": "long", "text": "x" * 5000})
    out = small.score([InputRecord(value=raw)], None)
    (letter,) = out.dead_letters
    assert letter.reason == "field_too_long" and letter.truncated and raw.startswith(letter.value)
    # the whole encoded letter fits the cap, and keeps as much of the original as fits
    assert 2048 - 200 < len(letter.encode()) <= 2048 and len(letter.value) > 1500


def test_a_post_that_breaks_the_model_path_goes_alone_to_the_dlq(
    served_model: Path, benchmark_posts: list[Post], redis_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    settings = Settings(model_dir=served_model, redis_url=redis_url)
    service = ScoringService(settings, Manifest.load(served_model), Metrics(settings, process_metrics=False))
    poison = benchmark_posts[3].id
    real_score = service.scorer.score

    def fragile(records: list[InputRecord], stats: QueueStats | None = None):  # type: ignore[no-untyped-def]
        if any(msgpack.unpackb(r.value)["id"] == poison for r in records):
            raise RuntimeError("model path failure")
        return real_score(records, stats)

    monkeypatch.setattr(service.scorer, "score", fragile)

    async def go():  # type: ignore[no-untyped-def]
        try:
            return await service.score(_records(benchmark_posts[:8]))
        finally:
            await service.stop()

    outcome = asyncio.run(go())
    assert [e.id for e in outcome.events] == [p.id for p in benchmark_posts[:8] if p.id != poison]
    assert [(d.reason, d.key) for d in outcome.dead_letters] == [("internal_error", poison.encode())]


def test_encoder_cache_gives_the_same_outputs_and_counts_hits(
    scorer: PostScorer, benchmark_posts: list[Post]
) -> None:
    """Equal outputs with and without the cache, on a stream that repeats texts, images and transcripts."""
    base = benchmark_posts[:16]
    reposts = [Post(id=f"re-{p.id}", text=p.text, image=p.image, transcript=p.transcript) for p in base]
    records = _records(base + reposts[:8]) + _records(reposts[8:] + base[:4])
    # fp32: the int8 encoder quantises activations per batch, so its outputs move with the batch's other
    # rows (|Δprob| ≈ 5e-3); a cached row is exactly what fp32 computes for that content in any batch.
    fp32 = scorer.settings.model_copy(update={"text_encoder": "fp32"})
    metrics = Metrics(fp32, process_metrics=False)
    cached = PostScorer(scorer.manifest, fp32.model_copy(update={"encode_cache_entries": 64}), None, metrics)
    scorer = PostScorer(scorer.manifest, fp32)
    assert cached.cache is not None and scorer.cache is None
    for batch in (records[:24], records[24:]):
        plain, hit = scorer.score(batch, None), cached.score(batch, None)
        assert [e.id for e in hit.events] == [e.id for e in plain.events]
        for a, b in zip(plain.events, hit.events, strict=True):
            np.testing.assert_allclose(a.probs, b.probs, atol=1e-5)
            assert a.label == b.label and a.quality.keys() == b.quality.keys()
    hits = metrics.registry.get_sample_value(
        "sentiment_encode_cache_lookups_total", {"modality": "text", "result": "hit"}
    )
    misses = metrics.registry.get_sample_value(
        "sentiment_encode_cache_lookups_total", {"modality": "text", "result": "miss"}
    )
    assert misses == len({p.text for p in base if p.text is not None})
    assert hits == sum(r is not None for r in [_text_of(rec) for rec in records]) - misses
    with_image = sum(p.image is not None for p in base)
    if with_image:
        image_hits = metrics.registry.get_sample_value(
            "sentiment_encode_cache_lookups_total", {"modality": "image", "result": "hit"}
        )
        assert image_hits is not None and image_hits >= with_image


def test_text_encoder_auto_follows_the_exports_int8_gate(
    served_model: Path, caplog: pytest.LogCaptureFixture
) -> None:
    import dataclasses
    import logging

    manifest = Manifest.load(served_model, check_graphs=False)
    auto = Settings(model_dir=served_model)
    assert auto.text_encoder == "auto"
    passed = dataclasses.replace(manifest, int8_gate={"passed": True, "reason": "Δ macro-F1 +0.0001"})
    failed = dataclasses.replace(manifest, int8_gate={"passed": False, "reason": "macro-F1 drops by 0.02"})
    assert passed.serving_text_encoder(auto)[0] == "int8"
    assert failed.serving_text_encoder(auto) == ("fp32", "auto: the int8 gate did not pass (macro-F1 drops by 0.02)")
    assert dataclasses.replace(manifest, int8_gate=None).serving_text_encoder(auto)[0] == "fp32"
    explicit = auto.model_copy(update={"text_encoder": "int8"})
    assert failed.serving_text_encoder(explicit)[0] == "int8"  # the operator's explicit choice stands
    assert passed.serving_keys(auto)[0] == "text_encoder_int8"
    with caplog.at_level(logging.INFO, logger="stream.service.scoring"):
        assert PostScorer(passed, auto).text_variant == "int8"
        assert PostScorer(failed, auto).text_variant == "fp32"
    lines = [r.getMessage() for r in caplog.records]
    assert any(line.startswith("serving configuration: ") and "text_encoder=int8" in line for line in lines)
    assert any(r.levelno == logging.WARNING and "int8 gate did not pass" in r.getMessage() for r in caplog.records)


def _text_of(record: InputRecord) -> str | None:
    return msgpack.unpackb(record.value, raw=False).get("text")
