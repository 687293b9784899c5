"""Round-trip posts through the broker: produce encoded posts, read them back in a consumer group.

``sentiment-stream roundtrip`` is the smoke test of a running stack (``services start`` first).
"""

from __future__ import annotations

import argparse
import asyncio
import io
import time
import uuid
from collections.abc import Sequence

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from PIL import Image

from stream.service.events import Post, PostRejected, decode_post, encode_post
from stream.service.settings import Settings, get_settings

__all__ = ["add_arguments", "consume_posts", "produce_messages", "produce_posts", "run", "sample_posts"]


def sample_posts(n: int, prefix: str) -> list[Post]:
    """``n`` varied posts (text, image, transcript present in turn) with ids ``{prefix}-{i}``."""
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), (250, 200, 20)).save(buf, format="PNG")
    png = buf.getvalue()
    posts = []
    for i in range(n):
        posts.append(
            Post(
                id=f"{prefix}-{i}",
                ts=1_700_000_000.0 + i,
                text=f"post number {i} is great" if i % 4 != 2 else None,  # i % 4 == 2 has an image
                image=png if i % 2 == 0 else None,
                transcript=f"spoken words {i}" if i % 3 == 0 else None,
                label=("negative", "neutral", "positive")[i % 3],
            )
        )
    return posts


async def produce_messages(
    settings: Settings,
    messages: Sequence[tuple[bytes | None, bytes]],
    topic: str | None = None,
    rate: float = 0,
) -> None:
    """Send (key, value) pairs to ``topic`` (default: posts) and wait for every ack; ``rate`` > 0 paces them."""
    producer = AIOKafkaProducer(
        bootstrap_servers=settings.bootstrap_servers,
        acks="all",
        linger_ms=5,
        max_request_size=settings.max_message_bytes,
    )
    await producer.start()
    try:
        futures = []
        for i, (key, value) in enumerate(messages):
            futures.append(await producer.send(topic or settings.topic_posts, value, key=key))
            if rate > 0 and i % 10 == 9:
                await asyncio.sleep(10 / rate)
        await asyncio.gather(*futures)
    finally:
        await producer.stop()


async def produce_posts(settings: Settings, posts: Sequence[Post], topic: str | None = None) -> None:
    await produce_messages(settings, [(post.id.encode(), encode_post(post)) for post in posts], topic)


async def consume_posts(
    settings: Settings,
    ids: set[str],
    topic: str | None = None,
    group: str | None = None,
    timeout_s: float = 60,
) -> dict[str, Post]:
    """Read ``topic`` from the earliest offset in a fresh group until every id in ``ids`` is seen."""
    consumer = AIOKafkaConsumer(
        topic or settings.topic_posts,
        bootstrap_servers=settings.bootstrap_servers,
        group_id=group or f"roundtrip-{uuid.uuid4().hex[:8]}",
        auto_offset_reset="earliest",  # Tansu's ListOffsets(LATEST) is wrong; never rely on "latest"
        enable_auto_commit=False,
        session_timeout_ms=int(settings.session_timeout_s * 1000),
        heartbeat_interval_ms=1000,
    )
    await consumer.start()
    seen: dict[str, Post] = {}
    deadline = time.monotonic() + timeout_s
    try:
        while not ids <= seen.keys() and time.monotonic() < deadline:
            records = await consumer.getmany(timeout_ms=500)
            for batch in records.values():
                for record in batch:
                    try:
                        post = decode_post(record.value, settings=settings)
                    except PostRejected:
                        continue  # someone else's invalid post on a shared topic
                    if post.id in ids:
                        seen[post.id] = post
            await consumer.commit()
    finally:
        await consumer.stop()
    return seen


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("-n", type=int, default=100, help="number of posts (default 100)")


def run(args: argparse.Namespace) -> int:
    settings = get_settings()
    posts = sample_posts(args.n, f"roundtrip-{uuid.uuid4().hex[:8]}")
    start = time.perf_counter()
    asyncio.run(produce_posts(settings, posts))
    seen = asyncio.run(consume_posts(settings, {p.id for p in posts}))
    elapsed = time.perf_counter() - start
    equal = sum(seen.get(p.id) == p for p in posts)
    print(
        f"produced {len(posts)} posts to {settings.topic_posts!r} on {settings.bootstrap_servers}, "
        f"read back {len(seen)}, equal {equal}, in {elapsed:.2f} s"
    )
    return 0 if equal == len(posts) else 1
