"""Recordings, seeded fault injection, replay through the broker, and the robustness report."""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import io
import json
import math
import os
import threading
import time
import tracemalloc
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import msgpack
import numpy as np
import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from PIL import Image

from stream.service.events import LABELS, DeadLetter, Post, PostRejected, SentimentEvent, decode_post
from stream.service.settings import Settings, get_settings
from stream.tools import recording as recording_module
from stream.tools import replay as replay_module
from stream.tools.dataset import benchmark_posts
from stream.tools.faults import MASK_TOKEN
from stream.tools.recording import (
    Record,
    RecordingError,
    RecordingHeader,
    RecordingReader,
    RecordingWriter,
    read_header,
    record_topic,
    write_recording,
)
from stream.tools.replay import (
    MALFORMED_KINDS,
    Faults,
    PublishedPost,
    ReceivedDeadLetter,
    ReceivedEvent,
    ReplayOptions,
    ReplayResult,
    add_arguments,
    malformed_payload,
    parse_rates,
    plan_recording,
    replay,
)
from stream.tools.report import build_report, classification_metrics, compare_reports, prediction_tables, summarize
from stream.tools.roundtrip import produce_posts, sample_posts


def _png(size: int = 16) -> bytes:
    """A noisy image (a flat one would look the same after a blur)."""
    pixels = np.random.default_rng(size).integers(0, 256, (size, size, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels, mode="RGB").save(buf, format="PNG")
    return buf.getvalue()


def _full_posts(n: int, prefix: str = "p") -> list[Post]:
    """Posts that carry all three modalities and a label (so drop rates apply to every post)."""
    png = _png()
    return [
        Post(
            id=f"{prefix}-{i}",
            ts=1_700_000_000.0 + i,
            text=f"this is post number {i} and it is a rather good one overall",
            image=png,
            transcript=f"spoken words of clip {i} sound quite happy today",
            label=LABELS[i % 3],
        )
        for i in range(n)
    ]


# -- the file format -------------------------------------------------------------------------------


def test_recording_round_trip_keeps_header_and_records(tmp_path: Path) -> None:
    path = tmp_path / "r.srec"
    header = RecordingHeader(topic="posts", created=123.0, meta={"why": "test"})
    records = [
        Record(
            ts=1.5 + i, value=bytes([i]) * 10, key=f"k{i}".encode(), headers=(("h", b"v"),), partition=i % 2, offset=i
        )
        for i in range(50)
    ] + [Record(ts=99.0, value=b"", key=None)]
    with RecordingWriter(path, header) as writer:
        for rec in records:
            writer.write(rec)
    reader = RecordingReader(path)
    assert reader.header == header
    assert list(reader) == records
    assert list(reader) == records  # a reader can be iterated again


def test_gzip_recording_round_trips(tmp_path: Path) -> None:
    path = tmp_path / "r.srec.gz"
    write_recording(path, _full_posts(5), start_ts=10.0, rate=1.0)
    assert [decode_post(r.value).id for r in RecordingReader(path)] == [f"p-{i}" for i in range(5)]


def test_reading_a_recording_does_not_hold_it_in_memory(tmp_path: Path) -> None:
    path = tmp_path / "big.srec"
    with RecordingWriter(path, RecordingHeader(topic="posts", created=0.0)) as writer:
        for i in range(2000):
            writer.write(Record(ts=float(i), value=os.urandom(20_000), key=b"k"))
    assert path.stat().st_size > 40_000_000
    tracemalloc.start()
    try:
        count = sum(1 for _ in RecordingReader(path))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert count == 2000
    assert peak < 2_000_000, f"iteration peaked at {peak} bytes for a 40 MB file"


def test_interrupted_recording_reads_up_to_its_last_complete_record(tmp_path: Path) -> None:
    path = tmp_path / "cut.srec"
    with RecordingWriter(path, RecordingHeader(topic="posts", created=0.0)) as writer:
        for i in range(10):
            writer.write(Record(ts=float(i), value=b"x" * 100))
    data = path.read_bytes()
    path.write_bytes(data[:-50])
    assert len(list(RecordingReader(path))) == 9


def test_a_file_that_is_not_a_recording_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "nope.srec"
    path.write_bytes(msgpack.packb({"hello": 1}))
    with pytest.raises(RecordingError):
        RecordingReader(path)


def test_write_recording_has_synthetic_poisson_arrivals_and_contract_fields_only(tmp_path: Path) -> None:
    rows = [
        {"id": f"b{i}", "text": "good day", "label": "positive", "synthetic_pairing": True, "image_id": f"img{i}"}
        for i in range(4000)
    ]
    header = write_recording(tmp_path / "bench.srec", (r for r in rows), start_ts=1000.0, rate=20.0, seed=7)
    assert header.count == 4000  # counted even from a generator
    stored = read_header(tmp_path / "bench.srec")
    assert stored.synthetic_timing and stored.source == "synthetic"
    assert stored.meta["arrivals"] == "poisson" and stored.meta["rate"] == 20.0 and stored.meta["seed"] == 7
    records = list(RecordingReader(tmp_path / "bench.srec"))
    ts = np.array([r.ts for r in records])
    gaps = np.diff(np.concatenate([[1000.0], ts]))
    assert np.all(gaps > 0)
    assert abs(gaps.mean() - 1 / 20.0) < 4 * (1 / 20.0) / math.sqrt(len(gaps))  # exponential: sd = mean
    first = msgpack.unpackb(records[0].value)
    assert set(first) == {"id", "ts", "text", "label"} and first["ts"] == records[0].ts
    assert msgpack.unpackb(records[0].header("meta") or b"") == {"synthetic_pairing": True, "image_id": "img0"}


def test_write_recording_is_byte_identical_for_a_seed(tmp_path: Path) -> None:
    for name in ("a.srec", "b.srec"):
        write_recording(tmp_path / name, _full_posts(50), start_ts=0.0, rate=5.0, seed=3, created=1.0)
    assert (tmp_path / "a.srec").read_bytes() == (tmp_path / "b.srec").read_bytes()


def test_benchmark_posts_resolve_images_and_transcripts_into_a_recording(tmp_path: Path) -> None:
    data = tmp_path / "bench"
    (data / "posts").mkdir(parents=True)
    (data / "pools" / "images").mkdir(parents=True)
    (data / "pools" / "images" / "e1.png").write_bytes(_png())
    image = {
        "id": "img-1",
        "codepoints": "1f600",
        "name": "grin",
        "style": "noto",
        "pool": "test",
        "label": "positive",
        "score": 0.6,
        "occurrences": 100,
        "file": "e1.png",
    }
    transcript = {
        "id": "tr-1",
        "genre": "movie",
        "source_id": "1",
        "text": "what a great film",
        "mean_rating": 2.5,
        "pool": "test",
        "label": "positive",
    }
    row = {"id": "t1", "split": "test", "label": "positive", "text": "love it", "topic": "x", "confidence": 1.0,
           "image_id": "img-1", "image_label": "positive", "transcript_id": "tr-1", "transcript_label": "positive",
           "synthetic_pairing": True}  # fmt: skip
    (data / "pools" / "images.jsonl").write_text(json.dumps(image) + "\n")
    (data / "pools" / "transcripts.jsonl").write_text(json.dumps(transcript) + "\n")
    (data / "posts" / "test.jsonl").write_text(json.dumps(row) + "\n")
    write_recording(tmp_path / "test.srec", benchmark_posts(data, "test"), start_ts=0.0, rate=5.0)
    (record,) = RecordingReader(tmp_path / "test.srec")
    post = decode_post(record.value)
    assert (post.id, post.text, post.transcript, post.label) == ("t1", "love it", "what a great film", "positive")
    assert post.image == _png()
    assert msgpack.unpackb(record.header("meta") or b"")["synthetic_pairing"] is True


# -- recording a real topic ------------------------------------------------------------------------

integration = pytest.mark.integration


@integration
def test_record_captures_a_topic_from_the_beginning(fresh_topics: Settings, tmp_path: Path) -> None:
    posts = sample_posts(300, "rec")
    asyncio.run(produce_posts(fresh_topics, posts))
    out = tmp_path / "posts.srec"
    header = asyncio.run(record_topic(fresh_topics, fresh_topics.topic_posts, out, idle_timeout_s=1.5))
    assert header.count == 300
    reader = RecordingReader(out)
    assert reader.header.topic == fresh_topics.topic_posts and not reader.header.synthetic_timing
    records = list(reader)
    assert {decode_post(r.value).id: decode_post(r.value) for r in records} == {p.id: p for p in posts}
    assert all(r.key == decode_post(r.value).id.encode() for r in records)
    assert all(abs(r.ts - time.time()) < 120 for r in records)  # broker timestamps, in seconds
    assert {(r.partition, r.offset) for r in records}.__len__() == 300


@integration
def test_record_since_filters_on_record_timestamps(fresh_topics: Settings, tmp_path: Path) -> None:
    asyncio.run(produce_posts(fresh_topics, sample_posts(20, "old")))
    time.sleep(1.2)
    since = time.time()
    time.sleep(0.2)
    asyncio.run(produce_posts(fresh_topics, sample_posts(15, "new")))
    out = tmp_path / "since.srec"
    header = asyncio.run(record_topic(fresh_topics, fresh_topics.topic_posts, out, since=since, idle_timeout_s=1.5))
    ids = sorted(decode_post(r.value).id for r in RecordingReader(out))
    assert header.count == 15
    assert ids == sorted(f"new-{i}" for i in range(15))


@integration
def test_record_stops_after_max_records(fresh_topics: Settings, tmp_path: Path) -> None:
    asyncio.run(produce_posts(fresh_topics, sample_posts(50, "m")))
    header = asyncio.run(
        record_topic(fresh_topics, fresh_topics.topic_posts, tmp_path / "m.srec", max_records=10, idle_timeout_s=5)
    )
    assert header.count == 10 == len(list(RecordingReader(tmp_path / "m.srec")))


# -- fault injection -------------------------------------------------------------------------------


@pytest.fixture
def recording(tmp_path: Path) -> Path:
    path = tmp_path / "full.srec"
    write_recording(path, _full_posts(3000), start_ts=1_700_000_000.0, rate=100.0)
    return path


FAULTS = Faults(drop={"image": 0.5, "transcript": 0.3}, corrupt={"text": 0.2, "image": 0.1}, malformed=0.05, seed=11)


def test_fault_injection_is_deterministic_for_a_seed(recording: Path) -> None:
    first = [(p.info, p.payload(1.0)) for p in plan_recording(recording, FAULTS)]
    again = [(p.info, p.payload(1.0)) for p in plan_recording(recording, FAULTS)]
    assert first == again
    other_seed = [p.info for p in plan_recording(recording, Faults(**{**FAULTS.to_dict(), "seed": 12}))]
    assert [i.faults for i, _ in first] != [i.faults for i in other_seed]


def test_faults_do_not_depend_on_the_run_id(recording: Path) -> None:
    a = [p.info for p in plan_recording(recording, FAULTS, run_id="a")]
    b = [p.info for p in plan_recording(recording, FAULTS, run_id="b")]
    assert [i.id for i in a][:2] == ["a:p-0", "a:p-1"]
    assert [(i.original_id, i.faults) for i in a] == [(i.original_id, i.faults) for i in b]


def test_fault_injection_hits_the_requested_rates(recording: Path) -> None:
    infos = [p.info for p in plan_recording(recording, FAULTS)]
    n = len(infos)

    def within(count: int, trials: int, p: float) -> bool:
        return abs(count - trials * p) <= 4 * math.sqrt(trials * p * (1 - p)) + 1

    malformed = sum(i.malformed is not None for i in infos)
    assert within(malformed, n, 0.05)
    valid = [i for i in infos if i.malformed is None]
    assert within(sum("image" in i.dropped for i in valid), len(valid), 0.5)
    assert within(sum("transcript" in i.dropped for i in valid), len(valid), 0.3)
    assert sum("text" in i.dropped for i in valid) == 0
    assert within(sum("text" in i.corrupted for i in valid), len(valid), 0.2)
    kept_image = [i for i in valid if "image" in i.present]
    assert within(sum("image" in i.corrupted for i in kept_image), len(kept_image), 0.1)
    assert all(not i.drop_suppressed for i in infos)  # text is never dropped, so nothing to suppress
    assert set(Counter(i.malformed for i in infos if i.malformed)) == set(MALFORMED_KINDS)


def test_higher_drop_rates_drop_a_superset_of_the_posts(recording: Path) -> None:
    def dropped(rate: float) -> set[str]:
        faults = Faults(drop={"image": rate}, seed=3)
        return {p.info.original_id for p in plan_recording(recording, faults) if p.info.dropped}

    low, high = dropped(0.3), dropped(0.6)
    assert low < high


def test_the_last_modality_is_never_dropped(tmp_path: Path) -> None:
    path = tmp_path / "img.srec"
    write_recording(path, [Post(id=f"i{i}", image=_png(), label="neutral") for i in range(100)], 0.0, 10.0)
    infos = [p.info for p in plan_recording(path, Faults(drop={"image": 1.0}))]
    assert all(i.present == ("image",) and i.drop_suppressed == ("image",) for i in infos)
    assert all(i.expected == "event" for i in infos)


def test_dropped_modalities_are_absent_from_the_published_post(recording: Path) -> None:
    for planned in list(plan_recording(recording, Faults(drop={"image": 0.5}, seed=1)))[:200]:
        post = decode_post(planned.payload(5.0))
        assert post.present == planned.info.present
        assert post.id == planned.info.id and post.ts == 5.0
        assert (post.image is None) == ("image" in planned.info.dropped)


def test_corruption_masks_40_to_80_percent_of_words_and_re_encodes_images_as_png(recording: Path) -> None:
    faults = Faults(corrupt={"text": 1.0, "transcript": 1.0, "image": 1.0}, seed=5)
    original = {p.id: p for p in _full_posts(3000)}
    for planned in list(plan_recording(recording, faults))[:100]:
        assert planned.info.corrupted == ("text", "image", "transcript")
        post = decode_post(planned.payload(None))
        for name in ("text", "transcript"):
            words = getattr(post, name).split()
            masked = sum(w == MASK_TOKEN for w in words) / len(words)
            assert 0.35 <= masked <= 0.85  # 40–80 % of the words, rounded to whole words
        assert post.image is not None and post.image.startswith(b"\x89PNG")
        assert post.pixels is not None and post.pixels.size == (16, 16)
        assert post.image != original[planned.info.original_id].image


@pytest.mark.parametrize("kind", MALFORMED_KINDS)
def test_each_malformed_kind_is_rejected_with_its_reason(kind: str) -> None:
    settings = get_settings()
    fields = {"id": "run:x", "text": "hello there", "image": _png(), "label": "positive", "ts": 3.0}
    with pytest.raises(PostRejected) as rejected:
        decode_post(malformed_payload(kind, "run:x", fields, settings), settings=settings)
    assert rejected.value.reason == kind


def test_every_injected_malformed_post_expects_its_own_reason(recording: Path) -> None:
    infos = [p.info for p in plan_recording(recording, Faults(malformed=1.0, seed=2))]
    assert all(i.malformed is not None and i.expected == i.malformed for i in infos)
    assert all(i.present == () for i in infos)


def test_a_recorded_invalid_post_is_replayed_as_is_and_expected_in_the_dlq(tmp_path: Path) -> None:
    path = tmp_path / "bad.srec"
    with RecordingWriter(path, RecordingHeader(topic="posts", created=0.0)) as writer:
        writer.write(Record(ts=1.0, key=b"b1", value=msgpack.packb({"id": "b1", "label": "positive"})))
        writer.write(Record(ts=2.0, key=None, value=b"\xc1 garbage"))
    first, second = (p.info for p in plan_recording(path, Faults(), run_id="R"))
    assert (first.id, first.expected, first.label) == ("R:b1", "no_modality", "positive")
    assert (second.id, second.expected) == ("R:#1", "not_msgpack")


def test_rates_and_options_are_validated() -> None:
    assert parse_rates("image=0.5, transcript=0.3") == {"image": 0.5, "transcript": 0.3}
    assert parse_rates("") == {}
    with pytest.raises(ValueError):
        parse_rates("image")
    with pytest.raises(ValueError):
        Faults(drop={"video": 0.1})
    with pytest.raises(ValueError):
        Faults(corrupt={"text": 1.5})
    with pytest.raises(ValueError):
        ReplayOptions(speed=0)
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    args = parser.parse_args(["f.srec", "--as-fast-as-possible", "--drop", "image=0.5", "--malformed", "0.05"])
    assert args.as_fast_as_possible and args.drop == "image=0.5" and args.malformed == 0.05
    with pytest.raises(SystemExit):
        parser.parse_args(["f.srec", "--as-fast-as-possible", "--speed", "2"])


# -- the report on hand-made outcomes --------------------------------------------------------------


def _hand_made_result() -> ReplayResult:
    def post(pid: str, label: str | None, present: tuple[str, ...], **kw: object) -> PublishedPost:
        return PublishedPost(id=f"R:{pid}", original_id=pid, label=label, present=present, publish_ts=100.0, **kw)  # type: ignore[arg-type]

    def event(pid: str, label: str, present: tuple[str, ...], latency: float, receive: float) -> ReceivedEvent:
        p = [0.8 if lab == label else 0.1 for lab in LABELS]
        probs = (p[0], p[1], p[2])
        return ReceivedEvent(
            id=f"R:{pid}", label=label, probs=probs, present=present, recovered=(), recovery="fsrf", model="m",
            latency_s=latency, receive_ts=receive,
        )  # fmt: skip

    posts = [
        post("a", "positive", ("text", "image")),
        post("b", "negative", ("text",), dropped=("image",)),
        post("c", "neutral", ("text",)),  # lost
        post("d", "negative", ("text", "transcript"), corrupted=("text",)),
        post("e", "neutral", ("text", "image", "transcript")),
        post("m1", "positive", (), malformed="not_msgpack", expected="not_msgpack"),
        post("m2", "positive", (), malformed="missing_id", expected="missing_id"),
        post("m3", None, (), malformed="no_modality", expected="no_modality"),
        post("u", None, ("image",)),  # unlabelled: counted for delivery, not for accuracy
    ]
    events = [
        event("a", "positive", ("text", "image"), 0.010, 100.02),
        event("b", "neutral", ("text",), 0.020, 100.03),
        event("a", "positive", ("text", "image"), 0.030, 100.50),  # at-least-once duplicate
        event("d", "negative", ("text", "transcript"), 0.040, 100.05),
        event("e", "positive", ("text", "image", "transcript"), 0.050, 100.06),
        event("u", "neutral", ("image",), 0.060, 100.07),
    ]
    letters = [
        ReceivedDeadLetter(id="R:m1", reason="not_msgpack", detail="", receive_ts=100.1),
        ReceivedDeadLetter(id="R:m2", reason="not_a_map", detail="", receive_ts=100.1),  # wrong reason
    ]
    return ReplayResult(
        run_id="R", recording="x.srec", header=RecordingHeader(topic="posts", created=0.0).to_dict(),
        options=ReplayOptions().to_dict(), topics={"posts": "p", "sentiment": "s", "dlq": "d"}, posts=posts,
        events=events, dead_letters=letters, publish_started=100.0, publish_finished=100.5, collect_finished=101.0,
    )  # fmt: skip


def test_classification_metrics_match_scikit_learn() -> None:
    sklearn_metrics = pytest.importorskip("sklearn.metrics")
    rng = np.random.default_rng(0)
    y_true = [LABELS[i] for i in rng.integers(0, 3, 500)]
    y_pred = [LABELS[i] for i in rng.integers(0, 2, 500)]  # never predicts positive
    got = classification_metrics(y_true, y_pred)
    assert got["accuracy"] == pytest.approx(sklearn_metrics.accuracy_score(y_true, y_pred))
    assert got["weighted_f1"] == pytest.approx(sklearn_metrics.f1_score(y_true, y_pred, average="weighted"))
    assert got["macro_f1"] == pytest.approx(sklearn_metrics.f1_score(y_true, y_pred, average="macro"))


def test_report_counts_losses_duplicates_and_dlq_outcomes() -> None:
    report = summarize(_hand_made_result())
    d = report["delivery"]
    assert d["lost_events"] == 1 and d["lost_event_ids"] == ["R:c"]
    assert d["duplicated_event_ids"] == 1 and d["duplicate_event_copies"] == 1
    assert d["missing_dead_letters"] == 1 and d["missing_dead_letter_ids"] == ["R:m3"]
    assert d["dead_letters_with_unexpected_reason"] == 1
    assert d["invalid_posts_scored"] == 0 and d["present_mismatch"] == 0
    assert report["dlq"]["by_reason"] == {"not_a_map": 1, "not_msgpack": 1}
    by_kind = report["malformed"]["by_kind"]
    assert by_kind["not_msgpack"]["dlq_expected_reason"] == 1
    assert by_kind["missing_id"]["dlq_other_reason"] == 1
    assert by_kind["no_modality"]["missing"] == 1
    assert not report["malformed"]["all_in_dlq_with_expected_reason"]
    assert set(report["malformed"]["failure_ids"]) == {"R:m2", "R:m3"}


def test_report_scores_the_first_event_per_post_by_pattern_and_fault() -> None:
    served = summarize(_hand_made_result())["metrics"]["served"]
    # scored: a (right), b (wrong), d (right), e (wrong); c is lost, u unlabelled
    assert served["coverage"] == {"labelled_valid": 5, "scored": 4}
    assert served["overall"]["accuracy"] == pytest.approx(0.5)
    expected = classification_metrics(
        ["positive", "negative", "negative", "neutral"], ["positive", "neutral", "negative", "positive"]
    )
    assert served["overall"] == expected
    assert served["missing_pattern"]["text"]["n"] == 1 and served["missing_pattern"]["text"]["accuracy"] == 0.0
    assert served["missing_pattern"]["text+image"]["accuracy"] == 1.0
    assert served["fault"]["drop:image"]["accuracy"] == 0.0
    assert served["fault"]["corrupt:text"]["accuracy"] == 1.0
    assert served["fault"]["clean"]["n"] == 2


def test_report_latency_and_throughput() -> None:
    report = summarize(_hand_made_result())
    event = report["latency_s"]["event"]
    firsts = [0.010, 0.020, 0.040, 0.050, 0.060]  # the duplicate of a is not a new latency sample
    assert event["n"] == 5
    assert event["p50"] == pytest.approx(np.percentile(firsts, 50))
    assert event["p99"] == pytest.approx(np.percentile(firsts, 99))
    transport = report["latency_s"]["publish_to_receive"]
    assert transport["p50"] == pytest.approx(np.percentile([0.02, 0.03, 0.05, 0.06, 0.07], 50))
    assert report["throughput"]["published_per_s"] == pytest.approx(9 / 0.5)
    assert report["throughput"]["events_per_s"] == pytest.approx(5 / 0.07)


def test_baseline_predictions_get_the_same_tables_side_by_side(tmp_path: Path) -> None:
    result = _hand_made_result()
    # by original id or run id, label or probabilities only
    baseline = [("a", None, (0.1, 0.1, 0.8)), ("R:b", "negative", None), ("c", "neutral", None), ("d", "neutral", None)]
    report = build_report(result, tmp_path, baselines={"zero_fill": baseline})
    zero_fill = report["metrics"]["zero_fill"]
    assert zero_fill["coverage"] == {"labelled_valid": 5, "scored": 4}
    assert zero_fill["overall"]["accuracy"] == pytest.approx(3 / 4)
    assert zero_fill["fault"]["drop:image"]["accuracy"] == 1.0
    assert prediction_tables(result, baseline) == zero_fill
    for name in (
        "report.json",
        "report.md",
        "result.json",
        "missing_pattern.png",
        "fault.png",
        "latency.png",
        "outcomes.png",
    ):
        assert (tmp_path / name).stat().st_size > 0, name
    assert "zero_fill acc" in (tmp_path / "report.md").read_text()
    assert json.loads((tmp_path / "report.json").read_text())["delivery"]["lost_events"] == 1
    assert ReplayResult.load(tmp_path / "result.json") == result

    again = build_report(result, tmp_path / "again", baselines={"zero_fill": baseline})
    comparison = compare_reports([(0.3, again), (0.0, report)], tmp_path / "cmp")
    assert [(r["x"], r["scorer"]) for r in comparison["rows"]] == [
        (0.0, "served"),
        (0.0, "zero_fill"),
        (0.3, "served"),
        (0.3, "zero_fill"),
    ]
    assert (tmp_path / "cmp" / "comparison.png").stat().st_size > 0


# -- replay through the broker, with a test double of the worker -----------------------------------


async def _worker_double(settings: Settings, stop: asyncio.Event, duplicate_first: bool = True) -> None:
    """A stand-in for the worker (not the system under test): one event per valid post, a dead letter
    per invalid one. It predicts the post's own label when an image is present, else ``neutral``, and
    sends the first event twice (an at-least-once redelivery)."""
    consumer = AIOKafkaConsumer(
        bootstrap_servers=settings.bootstrap_servers,
        group_id=None,
        auto_offset_reset="earliest",
        fetch_max_wait_ms=25,
    )
    producer = AIOKafkaProducer(bootstrap_servers=settings.bootstrap_servers, acks="all", linger_ms=2)
    await consumer.start()
    await producer.start()
    try:
        parts = consumer.partitions_for_topic(settings.topic_posts) or set()
        while not parts:
            await consumer.topics()
            parts = consumer.partitions_for_topic(settings.topic_posts) or set()
        consumer.assign([TopicPartition(settings.topic_posts, p) for p in parts])
        sent_first = False
        while not stop.is_set():
            batches = await consumer.getmany(timeout_ms=100)
            for batch in batches.values():
                for msg in batch:
                    try:
                        post = decode_post(msg.value, default_ts=msg.timestamp / 1000)
                    except PostRejected as exc:
                        letter = DeadLetter(value=msg.value, reason=exc.reason, detail=exc.detail, key=msg.key)
                        await producer.send(settings.topic_dlq, letter.encode(), key=msg.key)
                        continue
                    label = post.label if post.image is not None and post.label else "neutral"
                    now = time.time()
                    ev = SentimentEvent(
                        id=post.id, label=label, probs=tuple(0.9 if lab == label else 0.05 for lab in LABELS),  # type: ignore[arg-type]
                        present=post.present, recovered=(), quality={}, recovery="fsrf", model="double",
                        event_ts=post.ts or now, emit_ts=now,
                    )  # fmt: skip
                    copies = 2 if duplicate_first and not sent_first else 1
                    sent_first = True
                    for _ in range(copies):
                        await producer.send(settings.topic_sentiment, ev.encode(), key=post.id.encode())
            await producer.flush()
    finally:
        await producer.stop()
        await consumer.stop()


@integration
def test_replay_publishes_faulted_posts_and_collects_every_outcome(fresh_topics: Settings, tmp_path: Path) -> None:
    rec = tmp_path / "e2e.srec"
    write_recording(rec, _full_posts(120, "e2e"), start_ts=1_700_000_000.0, rate=500.0)
    options = ReplayOptions(
        faults=Faults(drop={"image": 0.5}, corrupt={"text": 0.3}, malformed=0.15, seed=4),
        speed=None,
        timeout_s=30,
        settle_s=0.5,
    )

    async def scenario() -> ReplayResult:
        stop = asyncio.Event()
        double = asyncio.create_task(_worker_double(fresh_topics, stop))
        try:
            return await replay(fresh_topics, rec, options)
        finally:
            stop.set()
            await double

    result = asyncio.run(scenario())
    assert not result.timed_out
    report = build_report(result, tmp_path / "report")
    d = report["delivery"]
    assert d["published"] == 120 and d["lost_events"] == 0 and d["missing_dead_letters"] == 0
    assert d["duplicate_event_copies"] == 1
    assert report["malformed"]["all_in_dlq_with_expected_reason"]
    assert report["headline"]["malformed_injected"] == sum(p.malformed is not None for p in result.posts) > 0
    assert all(p.id.startswith(f"{result.run_id}:") for p in result.posts)
    served = report["metrics"]["served"]
    assert served["coverage"]["scored"] == d["expected_events"]
    # the double is right exactly when the image is present
    assert served["missing_pattern"]["text+image+transcript"]["accuracy"] == 1.0
    assert served["fault"]["drop:image"]["accuracy"] == pytest.approx(
        np.mean([p.label == "neutral" for p in result.posts if "image" in p.dropped])
    )
    assert report["latency_s"]["event"]["n"] == d["expected_events"]
    assert 0 <= report["latency_s"]["event"]["p99"] < 10  # measured from the publish time we set
    assert (tmp_path / "report" / "report.md").exists()
    # a baseline can be scored offline on exactly the inputs the worker saw
    offline = [p.info for p in plan_recording(rec, Faults.from_dict(result.options["faults"]), run_id=result.run_id)]
    assert offline == [dataclasses.replace(p, publish_ts=0.0) for p in result.posts]


def _worker_double_in_a_thread(settings: Settings) -> Callable[[], None]:
    """Start :func:`_worker_double` on its own loop (for code under test that calls asyncio.run); returns stop()."""
    ready = threading.Event()
    loop_and_stop: list[Any] = []

    async def main() -> None:
        stop = asyncio.Event()
        loop_and_stop.extend([asyncio.get_running_loop(), stop])
        ready.set()
        await _worker_double(settings, stop, duplicate_first=False)

    thread = threading.Thread(target=asyncio.run, args=(main(),), daemon=True)
    thread.start()
    ready.wait(10)

    def stop() -> None:
        loop, event = loop_and_stop
        loop.call_soon_threadsafe(event.set)
        thread.join(30)

    return stop


@integration
def test_record_and_replay_commands(fresh_topics: Settings, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(recording_module, "get_settings", lambda: fresh_topics)
    monkeypatch.setattr(replay_module, "get_settings", lambda: fresh_topics)
    asyncio.run(produce_posts(fresh_topics, sample_posts(40, "cli")))

    record_parser = argparse.ArgumentParser()
    recording_module.add_arguments(record_parser)
    out = tmp_path / "cli.srec"
    args = record_parser.parse_args(
        ["--topic", fresh_topics.topic_posts, "--out", str(out), "--from-beginning", "--idle-timeout", "1.5"]
    )
    assert recording_module.run(args) == 0
    assert read_header(out).topic == fresh_topics.topic_posts and len(list(RecordingReader(out))) == 40

    replay_parser = argparse.ArgumentParser()
    add_arguments(replay_parser)
    report_dir = tmp_path / "cli-report"
    args = replay_parser.parse_args(
        [str(out), "--as-fast-as-possible", "--drop", "transcript=0.5", "--corrupt", "text=0.5", "--malformed",
         "0.1", "--seed", "9", "--report", str(report_dir), "--timeout", "30", "--no-progress"]
    )  # fmt: skip
    stop_double = _worker_double_in_a_thread(fresh_topics)
    try:
        assert replay_module.run(args) == 0
    finally:
        stop_double()
    report = json.loads((report_dir / "report.json").read_text())  # strict JSON: no NaN
    assert report["delivery"]["published"] == 40 and report["delivery"]["lost_events"] == 0
    assert report["run"]["options"]["faults"]["seed"] == 9 and report["run"]["options"]["speed"] is None


@integration
def test_replay_is_time_scaled_and_rate_limited(fresh_topics: Settings, tmp_path: Path) -> None:
    rec = tmp_path / "paced.srec"
    posts = _full_posts(21, "pace")
    with RecordingWriter(rec, RecordingHeader(topic="posts", created=0.0)) as writer:
        for i, post in enumerate(posts):
            writer.write(Record(ts=1000.0 + 0.1 * i, key=post.id.encode(), value=msgpack.packb(post.to_dict())))

    def publish_seconds(options: ReplayOptions) -> float:
        result = asyncio.run(replay(fresh_topics, rec, options))
        assert len(result.posts) == 21 and not result.publish_errors
        return result.posts[-1].publish_ts - result.posts[0].publish_ts

    assert publish_seconds(ReplayOptions(speed=4.0, collect=False)) == pytest.approx(0.5, abs=0.15)
    assert publish_seconds(ReplayOptions(speed=None, rate=40.0, collect=False)) == pytest.approx(0.5, abs=0.15)
    assert publish_seconds(ReplayOptions(speed=None, collect=False)) < 0.3
