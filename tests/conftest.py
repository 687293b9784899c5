"""Shared fixtures: the real local stack (broker + Redis), started by the project's own code."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Iterator

import pytest

from stream.services import LocalStack, create_topics
from stream.settings import Settings, get_settings


@pytest.fixture(scope="session")
def settings() -> Settings:
    return get_settings()


@pytest.fixture(scope="session")
def stack(settings: Settings) -> Iterator[LocalStack]:
    """The broker and Redis at the configured addresses; started here if the test command did not."""
    local = LocalStack(settings)
    before = {s.name: s.running for s in local.status()}
    local.start()
    yield local
    if not any(before.values()):
        local.stop()


@pytest.fixture(scope="session")
def redis_url(stack: LocalStack, settings: Settings) -> str:
    return settings.redis_url


@pytest.fixture
def fresh_topics(stack: LocalStack, settings: Settings) -> Settings:
    """Settings whose three topics are new and empty (unique names), created with explicit partitions."""
    suffix = uuid.uuid4().hex[:8]
    isolated = settings.model_copy(
        update={
            "topic_posts": f"posts-{suffix}",
            "topic_sentiment": f"sentiment-{suffix}",
            "topic_dlq": f"posts-dlq-{suffix}",
            "consumer_group": f"sentiment-{suffix}",
        }
    )
    asyncio.run(create_topics(isolated))
    return isolated
