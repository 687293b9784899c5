"""Run real `sentiment-stream worker` processes against the local stack, and collect what they emit."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
import uuid
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer

from stream.events import DeadLetter, SentimentEvent, decode_dead_letter, decode_sentiment
from stream.settings import Settings


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def settings_env(settings: Settings, **extra: object) -> dict[str, str]:
    """The environment that makes a subprocess see ``settings`` (plus overrides)."""
    env = dict(os.environ)
    fields = {
        "bootstrap_servers": settings.bootstrap_servers,
        "topic_posts": settings.topic_posts,
        "topic_sentiment": settings.topic_sentiment,
        "topic_dlq": settings.topic_dlq,
        "partitions": settings.partitions,
        "consumer_group": settings.consumer_group,
        "redis_url": settings.redis_url,
        "model_dir": settings.model_dir,
        "session_timeout_s": settings.session_timeout_s,
        "max_image_bytes": settings.max_image_bytes,
    }
    fields.update(extra)
    for name, value in fields.items():
        env[f"SENTIMENT_{name.upper()}"] = str(value)
    return env


@dataclass
class WorkerProcess:
    """One worker subprocess with its own metrics and web ports."""

    settings: Settings
    log_path: Path
    extra_env: dict[str, object] = field(default_factory=dict)
    metrics_port: int = field(default_factory=free_port)
    web_port: int = field(default_factory=free_port)
    proc: subprocess.Popen[bytes] | None = None

    def start(self) -> WorkerProcess:
        env = settings_env(self.settings, metrics_port=self.metrics_port, web_port=self.web_port, **self.extra_env)
        log = self.log_path.open("ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "stream.cli", "worker"], env=env, stdout=log, stderr=subprocess.STDOUT
        )
        return self

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def wait_ready(self, timeout: float = 60) -> None:
        """Until /health answers (the Faust app is up; partitions may still be assigning)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not self.alive():
                raise RuntimeError(f"worker exited: {self.log_path.read_text()[-3000:]}")
            with contextlib.suppress(OSError):
                urllib.request.urlopen(f"http://127.0.0.1:{self.web_port}/health", timeout=1).read()
                return
            time.sleep(0.2)
        raise TimeoutError(f"worker not ready in {timeout} s: {self.log_path.read_text()[-3000:]}")

    def metrics_text(self) -> str:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=5) as resp:
            return resp.read().decode()

    def health(self) -> bytes:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.web_port}/health", timeout=5) as resp:
            return bytes(resp.read())

    def terminate(self, timeout: float = 40) -> int:
        """SIGTERM and wait; returns the exit code (SIGKILL after ``timeout`` so a test never hangs)."""
        if self.proc is None:
            return 0
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)
            raise

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)


async def produce(settings: Settings, messages: Sequence[tuple[bytes | None, bytes]], rate: float = 0) -> None:
    """Send (key, value) pairs to the posts topic; ``rate`` > 0 spaces them out (posts/s)."""
    producer = AIOKafkaProducer(bootstrap_servers=settings.bootstrap_servers, acks="all", linger_ms=5)
    await producer.start()
    try:
        futures = []
        for i, (key, value) in enumerate(messages):
            futures.append(await producer.send(settings.topic_posts, value, key=key))
            if rate > 0 and i % 10 == 9:
                await asyncio.sleep(10 / rate)
        await asyncio.gather(*futures)
    finally:
        await producer.stop()


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
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            batches = await consumer.getmany(timeout_ms=500)
            for tp, records in batches.items():
                for rec in records:
                    if tp.topic == settings.topic_sentiment:
                        ev = decode_sentiment(rec.value)
                        out.events[ev.id].append(ev)
                    else:
                        out.dead[rec.key].append(decode_dead_letter(rec.value))
            if want_ids <= out.events.keys() and want_dead <= out.dead.keys():
                # a short grace period to catch at-least-once duplicates still in flight
                for _ in range(2):
                    for tp, records in (await consumer.getmany(timeout_ms=300)).items():
                        for rec in records:
                            if tp.topic == settings.topic_sentiment:
                                ev = decode_sentiment(rec.value)
                                out.events[ev.id].append(ev)
                            else:
                                out.dead[rec.key].append(decode_dead_letter(rec.value))
                break
    finally:
        await consumer.stop()
    return out
