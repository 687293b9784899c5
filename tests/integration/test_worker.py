"""The streaming service end to end: real broker, real Redis, real ONNX files, real worker processes."""

from __future__ import annotations

import asyncio
import io
import json
import subprocess
import time
from collections import Counter
from pathlib import Path

import msgpack
import numpy as np
import pytest
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families

from stream.service.events import Post, encode_post
from stream.service.feature_queue import FeatureQueue, SyncFeatureQueue
from stream.service.manifest import Manifest
from stream.service.metrics import METRIC_NAMES, latency_buckets
from stream.service.scoring import InputRecord, PostScorer
from stream.service.settings import Settings
from stream.tools.services import redis_server_argv
from tests.support.prometheus import (  # noqa: F401 - the fixture
    StartPrometheus,
    expected_quantile,
    prometheus_server_fixture,
)
from tests.support.worker import WorkerProcess, collect, free_port, produce

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def _malformed(i: int) -> tuple[bytes, str]:
    """One malformed post of each kind in the contract, keyed by its index."""
    pid = f"bad-{i}"
    big = io.BytesIO()
    Image.new("RGB", (8, 8)).save(big, format="PNG")
    kinds: list[tuple[bytes, str]] = [
        (b"\xc1\xc1 not msgpack", "not_msgpack"),
        (msgpack.packb([pid, "text"]), "not_a_map"),
        (msgpack.packb({"text": "no id here"}), "missing_id"),
        (msgpack.packb({"id": pid}), "no_modality"),
        (msgpack.packb({"id": pid, "image": b"\x89PNG\r\n\x1a\n broken"}, use_bin_type=True), "image_undecodable"),
        (msgpack.packb({"id": pid, "text": "x" * 5000}), "field_too_long"),
        (msgpack.packb({"id": pid, "text": 42}), "wrong_type"),
        (msgpack.packb({"id": pid, "text": "ok", "label": "ecstatic"}), "invalid_label"),
        (msgpack.packb({"id": pid, "text": "ok", "ts": -5}), "invalid_ts"),
        # worker_settings caps images at 500 kB, below the broker's 1 MB message limit
        (msgpack.packb({"id": pid, "image": b"\0" * 600_000}, use_bin_type=True), "image_too_large"),
    ]
    return kinds[i % len(kinds)]


def mixed_stream(posts: list[Post], malformed_every: int = 20) -> tuple[list[tuple[bytes | None, bytes]], dict]:
    """Valid posts with every 20th message malformed (5 %): (key, value) pairs and the expected outcomes."""
    messages: list[tuple[bytes | None, bytes]] = []
    bad: dict[bytes, str] = {}
    for i, post in enumerate(posts):
        messages.append((post.id.encode(), encode_post(post)))
        if i % malformed_every == malformed_every - 1:
            value, reason = _malformed(len(bad))
            key = f"bad-key-{len(bad)}".encode()
            bad[key] = reason
            messages.append((key, value))
    return messages, bad


def _run(coro):  # type: ignore[no-untyped-def]
    return asyncio.run(coro)


def test_every_valid_post_scored_and_every_malformed_in_dlq(
    worker_settings: Settings, benchmark_posts: list[Post], tmp_path: Path
) -> None:
    posts = benchmark_posts[:2000]
    messages, bad = mixed_stream(posts)
    worker = WorkerProcess(worker_settings, tmp_path / "worker.log").start()
    try:
        worker.wait_ready()
        _run(produce(worker_settings, messages))
        got = _run(collect(worker_settings, [p.id for p in posts], bad.keys(), timeout=300))
        assert worker.alive(), "the worker must never exit on input"
        pid = worker.pid
        metrics = worker.metrics_text()
    finally:
        worker.terminate()

    missing = [p.id for p in posts if p.id not in got.events]
    assert not missing, f"{len(missing)} valid posts have no sentiment event"
    assert got.duplicates == 0 or got.duplicates < len(posts)  # counted; only at-least-once redelivery makes them
    for key, reason in bad.items():
        assert [d.reason for d in got.dead[key]][:1] == [reason], key
    assert len(bad) >= 100 and set(bad.values()) >= {
        "not_msgpack",
        "missing_id",
        "no_modality",
        "image_undecodable",
        "field_too_long",
        "wrong_type",
        "image_too_large",
    }
    # the original bytes are kept in the dead letter
    first_key = next(iter(bad))
    assert got.dead[first_key][0].value == dict(messages)[first_key]
    # every event is well-formed and tells what was present and what was recovered
    by_id = {p.id: p for p in posts}
    for pid_, evs in got.events.items():
        ev, post = evs[0], by_id[pid_]
        assert ev.present == post.present
        assert set(ev.recovered) == {"text", "image", "transcript"} - set(post.present)
        assert set(ev.quality) == set(post.present)
        assert abs(sum(ev.probs) - 1) < 1e-4 and ev.label in ("negative", "neutral", "positive")
        assert ev.recovery == "fsrf" and ev.latency_s >= 0
    # one process throughout: no restart
    assert "process_start_time_seconds" in metrics and pid > 0


def test_metrics_endpoint_exposes_every_metric_with_sane_values(
    worker_settings: Settings, benchmark_posts: list[Post], tmp_path: Path
) -> None:
    posts = benchmark_posts[:300]
    messages, bad = mixed_stream(posts)
    worker = WorkerProcess(worker_settings, tmp_path / "worker.log").start()
    try:
        worker.wait_ready()
        _run(produce(worker_settings, messages))
        _run(collect(worker_settings, [p.id for p in posts], bad.keys(), timeout=180))
        time.sleep(0.5)
        text = worker.metrics_text()
        health = json.loads(worker.health())
    finally:
        worker.terminate()

    families = {f.name: f for f in text_string_to_metric_families(text)}
    exposed = set(families)
    for name in METRIC_NAMES:
        assert name.removesuffix("_total") in exposed or name in exposed, f"{name} missing from /metrics"

    def value(name: str, **labels: str) -> float:
        fam = families[name]
        return sum(
            s.value
            for s in fam.samples
            if s.name == name + ("_total" if fam.type == "counter" else "")
            and all(s.labels.get(k) == v for k, v in labels.items())
        )

    assert value("sentiment_events", outcome="scored") >= len(posts)
    assert value("sentiment_events", outcome="dead_letter") == len(bad)
    e2e = {s.name: s.value for s in families["sentiment_e2e_latency_seconds"].samples if not s.labels.get("le")}
    assert e2e["sentiment_e2e_latency_seconds_count"] >= len(posts)
    assert 0 < e2e["sentiment_e2e_latency_seconds_sum"] / e2e["sentiment_e2e_latency_seconds_count"] < 60
    assert time.time() - value("sentiment_last_processed_timestamp_seconds") < 120
    assert value("sentiment_onnx_session_info", provider="CPUExecutionProvider") >= 3
    assert health["status"] == "ok" and health["last_processed_ts"]


def test_two_workers_share_partitions_and_keep_the_queue_consistent(
    worker_settings: Settings, benchmark_posts: list[Post], tmp_path: Path
) -> None:
    # enqueue generously so both workers push into the shared queue concurrently
    extra = {"enqueue_min_confidence": 0.0, "enqueue_min_quality": 0.0, "queue_length": 256}
    settings = worker_settings.model_copy(update=extra)
    posts = [p for p in benchmark_posts if len(p.present) == 3][:1200] or benchmark_posts[:1200]
    a = WorkerProcess(settings, tmp_path / "a.log").start()
    b = WorkerProcess(settings, tmp_path / "b.log").start()
    try:
        a.wait_ready()
        b.wait_ready()
        time.sleep(settings.session_timeout_s)  # let the group settle with two members
        _run(produce(settings, [(p.id.encode(), encode_post(p)) for p in posts], rate=400))
        got = _run(collect(settings, [p.id for p in posts], [], timeout=300))
        per_worker = [_scored(w.metrics_text()) for w in (a, b)]
    finally:
        a.terminate()
        b.terminate()
    assert not [p.id for p in posts if p.id not in got.events]
    assert all(n > 0 for n in per_worker), f"both workers must score posts, got {per_worker}"
    version = Manifest.load(settings.model_dir).version
    queue = SyncFeatureQueue(version, settings)
    try:
        lengths = queue.lengths()
        report = queue.verify(rtol=1e-6)
    finally:
        queue.close()
    assert all(0 < n <= 256 for n in lengths.values()), lengths
    assert report.ok, report


def _scored(metrics_text: str) -> float:
    for fam in text_string_to_metric_families(metrics_text):
        if fam.name == "sentiment_events":
            return sum(
                s.value for s in fam.samples if s.labels.get("outcome") == "scored" and s.name.endswith("_total")
            )
    return 0.0


def test_redis_outage_loses_nothing_flags_events_and_recovers(
    worker_settings: Settings, benchmark_posts: list[Post], tmp_path: Path
) -> None:
    port = free_port()
    redis_cmd = redis_server_argv(port, tmp_path)
    redis = subprocess.Popen(redis_cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"redis://127.0.0.1:{port}/0"
    # live moments: the setting under which a Redis outage changes scores, so events must say so
    extra = {"redis_url": url, "redis_timeout_s": 0.2, "queue_stats_ttl_s": 0.2, "queue_moments": "live"}
    settings = worker_settings.model_copy(update=extra)
    posts = benchmark_posts[:900]
    worker = WorkerProcess(settings, tmp_path / "worker.log").start()
    before, during, after = posts[:300], posts[300:600], posts[600:]

    def send_and_wait(batch: list[Post]) -> None:
        _run(produce(settings, [(p.id.encode(), encode_post(p)) for p in batch], rate=100))
        _run(collect(settings, [p.id for p in batch], [], timeout=240))

    try:
        worker.wait_ready()
        send_and_wait(before)  # caught up, with Redis healthy
        redis.terminate()
        redis.wait(10)
        outage_started = time.time()
        send_and_wait(during)  # produced and scored while Redis is down
        time.sleep(max(0.0, 10 - (time.time() - outage_started)))
        redis = subprocess.Popen(redis_cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(3)  # longer than the worker's Redis back-off
        send_and_wait(after)
        got = _run(collect(settings, [p.id for p in posts], [], timeout=120))
        assert worker.alive()
    finally:
        worker.terminate()
        redis.terminate()
        redis.wait(10)
    assert not [p.id for p in posts if p.id not in got.events], "no post may be lost while Redis is down"
    assert all(not got.events[p.id][0].flags for p in before)
    outage_flags = Counter(f for p in during for f in got.events[p.id][0].flags)
    # the worker had read good statistics before the outage, so it falls back to them and says so
    assert outage_flags["queue_stale"] == len(during), outage_flags
    assert all(not got.events[p.id][0].flags for p in after[-200:]), "after Redis returns, events are not flagged"


def test_worker_killed_mid_stream_and_restarted_loses_nothing(
    worker_settings: Settings, benchmark_posts: list[Post], tmp_path: Path
) -> None:
    posts = benchmark_posts[:1500]
    worker = WorkerProcess(worker_settings, tmp_path / "first.log").start()
    try:
        worker.wait_ready()
        _run(produce(worker_settings, [(p.id.encode(), encode_post(p)) for p in posts[:500]]))
        # kill while the rest is arriving
        producer = asyncio.new_event_loop()
        task = producer.create_task(
            produce(worker_settings, [(p.id.encode(), encode_post(p)) for p in posts[500:]], rate=300)
        )
        producer.run_until_complete(asyncio.sleep(1.0))
        worker.kill()
        producer.run_until_complete(task)
        producer.close()
    finally:
        worker.kill()
    restarted = WorkerProcess(worker_settings, tmp_path / "second.log").start()
    try:
        restarted.wait_ready()
        got = _run(collect(worker_settings, [p.id for p in posts], [], timeout=300))
    finally:
        restarted.terminate()
    assert not [p.id for p in posts if p.id not in got.events], "a SIGKILL may duplicate, never lose"


def test_sigterm_finishes_the_batch_and_exits_cleanly(
    worker_settings: Settings, benchmark_posts: list[Post], tmp_path: Path
) -> None:
    posts = benchmark_posts[:200]
    worker = WorkerProcess(worker_settings, tmp_path / "worker.log").start()
    worker.wait_ready()
    _run(produce(worker_settings, [(p.id.encode(), encode_post(p)) for p in posts]))
    _run(collect(worker_settings, [p.id for p in posts], [], timeout=120))
    started = time.monotonic()
    code = worker.terminate(timeout=40)
    assert code == 0 and time.monotonic() - started < 30


def test_stream_outputs_equal_the_offline_scorer(
    worker_settings: Settings, benchmark_posts: list[Post], tmp_path: Path
) -> None:
    # The default frozen (training) moments: the worker pushes confident complete posts into the live queue as
    # it goes, and still scores exactly as the offline scorer with no queue at all.
    settings = worker_settings
    assert settings.queue_moments == "training"
    posts = benchmark_posts[:400]
    worker = WorkerProcess(settings, tmp_path / "worker.log").start()
    try:
        worker.wait_ready()
        _run(produce(settings, [(p.id.encode(), encode_post(p)) for p in posts]))
        got = _run(collect(settings, [p.id for p in posts], [], timeout=180))
    finally:
        worker.terminate()

    manifest = Manifest.load(settings.model_dir)
    scorer = PostScorer(manifest, settings)

    async def stats():  # type: ignore[no-untyped-def]
        async with FeatureQueue(manifest.version, settings) as queue:
            return await queue.stats(refresh=True)

    live = _run(stats())
    assert live.count and min(live.count.values()) > 0, "the live queue is kept (drift monitoring)"
    offline = scorer.score([InputRecord(value=encode_post(p)) for p in posts], None)
    assert len(offline.events) == len(posts)
    for ev in offline.events:
        streamed = got.events[ev.id][0]
        assert streamed.label == ev.label
        np.testing.assert_allclose(streamed.probs, ev.probs, atol=1e-5)
        assert streamed.quality.keys() == ev.quality.keys()


def test_real_prometheus_scrapes_a_running_worker_and_computes_p99(
    worker_settings: Settings,
    benchmark_posts: list[Post],
    tmp_path: Path,
    prometheus_server: StartPrometheus,
) -> None:
    worker = WorkerProcess(worker_settings, tmp_path / "worker.log").start()
    warmup, posts = benchmark_posts[:1], benchmark_posts[1:201]
    try:
        worker.wait_ready()
        # the first post waits for the consumer group to form; the rest measure steady-state latency
        _run(produce(worker_settings, [(p.id.encode(), encode_post(p)) for p in warmup]))
        _run(collect(worker_settings, [p.id for p in warmup], [], timeout=120))
        prom = prometheus_server([f"127.0.0.1:{worker.metrics_port}"])
        _run(produce(worker_settings, [(p.id.encode(), encode_post(p)) for p in posts], rate=10))
        got = _run(collect(worker_settings, [p.id for p in warmup + posts], [], timeout=240))
        deadline = time.monotonic() + 60
        while prom.query_value('sum(sentiment_events_total{outcome="scored"})') != len(warmup + posts):
            assert time.monotonic() < deadline, "Prometheus never scraped the final counts"
            time.sleep(0.5)
        # over every observation (the cumulative buckets), and as a dashboard computes it (rate over 1 m)
        p99_all = prom.wait_for_value("histogram_quantile(0.99, sum by (le) (sentiment_e2e_latency_seconds_bucket))")
        p99_rate = prom.wait_for_value(
            "histogram_quantile(0.99, sum by (le) (rate(sentiment_e2e_latency_seconds_bucket[1m])))", timeout=30
        )
    finally:
        worker.terminate()
    latencies = tuple(got.events[p.id][0].latency_s for p in warmup + posts)
    buckets = latency_buckets(worker_settings.latency_slo_s)
    rank = sorted(latencies)[int(0.99 * len(latencies)) - 1]
    expected = expected_quantile(0.99, latencies, buckets) if rank <= buckets[-1] else buckets[-1]
    print(f"\nPrometheus p99 end-to-end latency of a real worker: {p99_rate:.3f} s over the last minute, "
          f"{p99_all:.3f} s over the run (from the events: {expected:.3f} s)")
    assert p99_all == pytest.approx(expected, rel=0.02)
    assert 0 < p99_rate <= buckets[-1]
