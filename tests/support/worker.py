"""Run real `sentiment-stream worker` processes against the local stack, and collect what they emit.

The processes are :class:`stream.tools.launcher.WorkerProcess` (re-exported here with ``free_port``).
"""

from __future__ import annotations

import time
import uuid
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from aiokafka import AIOKafkaConsumer

from stream.service.events import DeadLetter, SentimentEvent, decode_dead_letter, decode_sentiment
from stream.service.settings import Settings
from stream.tools.launcher import WorkerProcess, free_port
from stream.tools.roundtrip import produce_messages

__all__ = ["Collected", "WorkerProcess", "collect", "free_port", "produce"]


async def produce(settings: Settings, messages: Sequence[tuple[bytes | None, bytes]], rate: float = 0) -> None:
    """Send (key, value) pairs to the posts topic; ``rate`` > 0 spaces them out (posts/s)."""
    await produce_messages(settings, messages, rate=rate)


@dataclass
class Collected:
    events: dict[str, list[SentimentEvent]] = field(default_factory=lambda: defaultdict(list))
    dead: dict[bytes | None, list[DeadLetter]] = field(default_factory=lambda: defaultdict(list))

    @property
    def duplicates(self) -> int:
        return sum(len(v) - 1 for v in self.events.values())


async def collect(
    settings: Settings, ids: Iterable[str], dead_keys: Iterable[bytes], timeout: float = 120
) -> Collected:
    """Read sentiment and DLQ from the start until every id has an event and every key a dead letter."""
    want_ids, want_dead = set(ids), set(dead_keys)
    consumer = AIOKafkaConsumer(
        settings.topic_sentiment,
        settings.topic_dlq,
        bootstrap_servers=settings.bootstrap_servers,
        group_id=f"collect-{uuid.uuid4().hex[:8]}",
        auto_offset_reset="earliest",
        enable_auto_commit=False,
        session_timeout_ms=int(settings.session_timeout_s * 1000),
        heartbeat_interval_ms=1000,
    )
    await consumer.start()
    out = Collected()

    async def take(timeout_ms: int) -> None:
        for tp, records in (await consumer.getmany(timeout_ms=timeout_ms)).items():
            for rec in records:
                if tp.topic == settings.topic_sentiment:
                    ev = decode_sentiment(rec.value)
                    out.events[ev.id].append(ev)
                else:
                    out.dead[rec.key].append(decode_dead_letter(rec.value))

    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            await take(500)
            if want_ids <= out.events.keys() and want_dead <= out.dead.keys():
                # a short grace period to catch at-least-once duplicates still in flight
                for _ in range(2):
                    await take(300)
                break
    finally:
        await consumer.stop()
    return out
