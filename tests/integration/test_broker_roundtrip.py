"""Posts survive a trip through the real broker the stack starts."""

from __future__ import annotations

import asyncio

import pytest
from aiokafka.admin import AIOKafkaAdminClient

from stream.service.settings import Settings
from stream.tools.roundtrip import consume_posts, produce_posts, sample_posts

pytestmark = pytest.mark.integration


def test_thousand_posts_round_trip_through_a_consumer_group(fresh_topics: Settings) -> None:
    posts = sample_posts(1000, "rt")
    asyncio.run(produce_posts(fresh_topics, posts))
    seen = asyncio.run(consume_posts(fresh_topics, {p.id for p in posts}, timeout_s=60))
    assert len(seen) == 1000
    assert all(seen[p.id] == p for p in posts)
    # equality ignores the decoded pixels; check they are there for posts with images
    assert all((seen[p.id].pixels is not None) == (p.image is not None) for p in posts)


def test_topics_are_created_with_the_configured_partition_count(fresh_topics: Settings) -> None:
    async def partitions() -> dict[str, int]:
        admin = AIOKafkaAdminClient(bootstrap_servers=fresh_topics.bootstrap_servers)
        await admin.start()
        try:
            described = await admin.describe_topics(list(fresh_topics.topics))
        finally:
            await admin.close()
        return {t["topic"]: len(t["partitions"]) for t in described}

    assert asyncio.run(partitions()) == {name: fresh_topics.partitions for name in fresh_topics.topics}
