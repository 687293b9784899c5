"""Read topics from their earliest offset without a consumer group: what record, replay and bench collect with.

A :class:`TopicReader` assigns every partition of its topics to one aiokafka consumer and seeks each
to its earliest offset. With no group there is no JoinGroup wait (Tansu holds a join for half the
session timeout) and nothing is ever committed, so a reader sees the same records however often it
runs. It never asks the broker to translate times to offsets (Tansu answers ``offsets_for_times``
and ListOffsets(LATEST) wrongly): a caller that wants a time window filters on record timestamps.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncGenerator, Sequence
from types import TracebackType
from typing import Any

__all__ = ["TopicNotFound", "TopicReader"]


class TopicNotFound(LookupError):
    """A topic to read does not exist on the broker."""


async def _topic_partitions(consumer: Any, topic: str, timeout_s: float = 10.0) -> list[int]:
    """Partition ids of an existing topic (waits for metadata; never auto-creates the topic)."""
    deadline = time.monotonic() + timeout_s
    while True:
        # topics() fetches metadata for all topics: unlike a per-topic request it does not make
        # Tansu auto-create a topic that is missing.
        if topic in await consumer.topics():
            found = consumer.partitions_for_topic(topic)
            if found:
                return sorted(found)
        if time.monotonic() > deadline:
            raise TopicNotFound(f"topic {topic!r} does not exist on the broker")
        await asyncio.sleep(0.2)


class TopicReader:
    """Every partition of ``topics``, from the earliest offset; use as an async context manager.

    ``poll()`` is one fetch (possibly empty); ``records()`` iterates record by record until idle or
    stopped. ``consumer_options`` go to :class:`aiokafka.AIOKafkaConsumer` (fetch sizes and waits).
    """

    def __init__(
        self,
        bootstrap_servers: str,
        topics: Sequence[str],
        *,
        poll_timeout_s: float = 0.2,
        max_records: int | None = None,
        **consumer_options: Any,
    ) -> None:
        self.bootstrap_servers = bootstrap_servers
        self.topics = tuple(topics)
        self.poll_timeout_ms = int(poll_timeout_s * 1000)
        self.max_records = max_records
        self.consumer_options = consumer_options
        self._consumer: Any = None

    async def start(self) -> TopicReader:
        """Connect, assign every partition of every topic and seek each to its earliest offset.

        Raises :class:`TopicNotFound` when a topic does not exist.
        """
        from aiokafka import AIOKafkaConsumer, TopicPartition

        consumer = AIOKafkaConsumer(
            bootstrap_servers=self.bootstrap_servers,
            group_id=None,
            enable_auto_commit=False,
            auto_offset_reset="earliest",
            **self.consumer_options,
        )
        await consumer.start()
        try:
            partitions = [
                TopicPartition(topic, p) for topic in self.topics for p in await _topic_partitions(consumer, topic)
            ]
            consumer.assign(partitions)
            await consumer.seek_to_beginning(*partitions)
        except BaseException:
            await consumer.stop()
            raise
        self._consumer = consumer
        return self

    async def stop(self) -> None:
        if self._consumer is not None:
            consumer, self._consumer = self._consumer, None
            await consumer.stop()

    async def __aenter__(self) -> TopicReader:
        return await self.start()

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.stop()

    async def poll(self) -> list[Any]:
        """The records of one fetch (aiokafka ``ConsumerRecord``s, all partitions); empty after ``poll_timeout_s``."""
        if self._consumer is None:
            raise RuntimeError("TopicReader.poll() before start()")
        batches = await self._consumer.getmany(timeout_ms=self.poll_timeout_ms, max_records=self.max_records)
        return [record for batch in batches.values() for record in batch]

    async def records(
        self, *, idle_timeout_s: float | None = None, stop: asyncio.Event | None = None
    ) -> AsyncGenerator[Any, None]:
        """Record by record until ``idle_timeout_s`` pass without one (None: never) or ``stop`` is set.

        ``stop`` is checked before every fetch; breaking out of the loop early is fine.
        """
        last_record = time.monotonic()
        while stop is None or not stop.is_set():
            records = await self.poll()
            for record in records:
                yield record
            now = time.monotonic()
            if records:
                last_record = now
            elif idle_timeout_s is not None and now - last_record >= idle_timeout_s:
                return
