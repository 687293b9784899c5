"""A running worker as operators see it: a post at the image limit goes through, outputs carry the contract's
headers, /metrics has build, Kafka-client and drift metrics, and the drift gauge moves when the stream comes
from another split (the held-out topic) than the model was trained on."""

from __future__ import annotations

import asyncio
import io
import re
import struct
import subprocess
import time
import uuid
import zlib
from pathlib import Path

import numpy as np
import pytest
from aiokafka import AIOKafkaConsumer
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families

from stream.service.events import SCHEMA_VERSION, Post, decode_post, decode_sentiment, encode_post
from stream.service.manifest import Manifest
from stream.service.settings import Settings
from stream.tools.dataset import benchmark_posts
from stream.tools.services import redis_server_argv
from tests.support.worker import WorkerProcess, free_port, produce

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def png_of_exactly(size: int, seed: int = 0) -> bytes:
    """A valid PNG of exactly ``size`` bytes: random pixels (incompressible) padded by a private ancillary chunk."""
    side = int(np.sqrt(size / 3 * 0.95))
    pixels = np.random.default_rng(seed).integers(0, 256, (side, side, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG", compress_level=0)
    png = buf.getvalue()
    pad = size - len(png) - 12  # a chunk is length + type + data + crc
    assert pad >= 0, f"{len(png)} bytes before padding"
    chunk_type = b"prVt"  # lower-case first letter: ancillary, decoders skip it
    chunk = struct.pack(">I", pad) + chunk_type + b"\0" * pad + struct.pack(">I", zlib.crc32(chunk_type + b"\0" * pad))
    iend = png.rindex(b"IEND") - 4
    out = png[:iend] + chunk + png[iend:]
    assert len(out) == size
    return out


def _gauge(text: str, name: str) -> dict[str, float]:
    return {
        ",".join(f"{k}={v}" for k, v in sorted(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
        if s.name == name
    }


async def _read_sentiment(settings: Settings, ids: set[str], timeout: float) -> dict[str, tuple[object, dict]]:
    consumer = AIOKafkaConsumer(
        settings.topic_sentiment,
        bootstrap_servers=settings.bootstrap_servers,
        group_id=f"read-{uuid.uuid4().hex[:8]}",
        auto_offset_reset="earliest",
        max_partition_fetch_bytes=settings.max_message_bytes,
    )
    await consumer.start()
    out: dict[str, tuple[object, dict]] = {}
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline and not ids <= out.keys():
            for records in (await consumer.getmany(timeout_ms=500)).values():
                for rec in records:
                    ev = decode_sentiment(rec.value)
                    out[ev.id] = (ev, {k: v.decode() for k, v in rec.headers})
    finally:
        await consumer.stop()
    return out


def test_image_at_the_limit_headers_metrics_and_drift(
    fresh_topics: Settings, served_model: Path, sample_benchmark: Path, tmp_path: Path
) -> None:
    port = free_port()
    redis = subprocess.Popen(redis_server_argv(port, tmp_path), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    # Its own Redis: the queue is seeded fresh from the model's training-time snapshot, so drift starts at 0.
    settings = fresh_topics.model_copy(
        update={"model_dir": served_model, "redis_url": f"redis://127.0.0.1:{port}/0", "drift_interval_s": 0.5}
    )
    assert settings.max_image_bytes == Settings.model_construct().max_image_bytes == 5_000_000  # the default
    worker = WorkerProcess(settings, tmp_path / "worker.log", overrides={"enqueue_min_confidence": 0.0}).start()
    version = Manifest.load(served_model).version
    try:
        worker.wait_ready(timeout=120)

        # 1. a post whose image is exactly at the limit, through the real broker and worker
        image = png_of_exactly(settings.max_image_bytes)
        big = Post(id=f"big-{uuid.uuid4().hex[:6]}", text="look at this", image=image)
        raw = encode_post(big)
        assert decode_post(raw, settings=settings).image == big.image
        print(f"\nimage-at-limit post: image {len(big.image or b'')} bytes, message {len(raw)} bytes, "
              f"max_message_bytes {settings.max_message_bytes}")
        asyncio.run(produce(settings, [(big.id.encode(), raw)]))
        got = asyncio.run(_read_sentiment(settings, {big.id}, timeout=120))
        assert big.id in got, worker.log_tail()
        event, headers = got[big.id]
        print(f"its event: {event}")
        assert "image" in event.present  # type: ignore[attr-defined]
        assert headers == {"content-type": "application/msgpack", "schema-version": SCHEMA_VERSION,
                           "model-version": version}

        # 2. drift: the queue starts as the training queue; posts from the held-out topic move it
        time.sleep(1.5)
        before = _gauge(worker.metrics_text(), "sentiment_queue_mean_shift_stddevs")
        run = uuid.uuid4().hex[:6]
        rows = list(benchmark_posts(sample_benchmark, "topic_test"))
        posts = [Post(id=f"{run}-{r['id']}", text=r["text"], image=r["image"], transcript=r["transcript"])
                 for r in rows]
        asyncio.run(produce(settings, [(p.id.encode(), encode_post(p)) for p in posts]))
        assert len(asyncio.run(_read_sentiment(settings, {p.id for p in posts}, timeout=300))) >= len(posts)
        time.sleep(1.5)
        text = worker.metrics_text()
        after = _gauge(text, "sentiment_queue_mean_shift_stddevs")
        ratio = _gauge(text, "sentiment_queue_variance_ratio")
        print(f"queue mean shift before: {before}\nafter {len(posts)} held-out-topic posts: {after}\n"
              f"variance ratio after: {ratio}")
        print("pattern share:", _gauge(text, "sentiment_missing_pattern_share_ratio"))
        print("mean quality:", _gauge(text, "sentiment_quality_mean_ratio"))
        assert all(v < 1e-3 for v in before.values()) and len(before) == 3
        assert all(after[k] > before[k] + 0.01 for k in after)

        # 3. what operators grep for
        lines = [line for line in text.splitlines()
                 if re.search(r"build_info|rebalance|commit|produce", line) and not line.startswith("#")]
        print("\n".join(lines))
        (info,) = _gauge(text, "sentiment_build_info")
        assert f"model_version={version}" in info and "provider=CPUExecutionProvider" in info
        assert sum(_gauge(text, "sentiment_rebalances_total").values()) >= 1
        assert sum(_gauge(text, "sentiment_commit_latency_seconds_count").values()) >= 1
        assert _gauge(text, "sentiment_produced_messages_total")[f"topic={settings.topic_sentiment}"] >= len(posts) + 1
    finally:
        worker.terminate()
        redis.terminate()
        redis.wait(10)
