"""The consumer example (examples/consume_sentiment.py) reads real records off the local broker.

It runs isolated (``python -I``: no PYTHONPATH, not this repository) and imports only aiokafka, msgpack and
the standard library: decoding an event needs no sentiment-stream install.
"""

from __future__ import annotations

import ast
import asyncio
import dataclasses
import json
import subprocess
import sys
import uuid
from pathlib import Path

from aiokafka import AIOKafkaProducer

from stream.service.processing import output_headers
from stream.service.settings import Settings
from tests.unit.test_schemas import EVENT

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "consume_sentiment.py"


def test_the_example_needs_only_aiokafka_and_msgpack() -> None:
    tree = ast.parse(EXAMPLE.read_text())
    imported = {
        alias.name.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names
    } | {node.module.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) and node.module}
    assert imported - set(sys.stdlib_module_names) == {"aiokafka", "msgpack"}
    code_lines = [line for line in EXAMPLE.read_text().splitlines() if line.strip() and not line.startswith(('"', "#"))]
    assert len(code_lines) <= 35


async def _produce(settings: Settings, records: list[tuple[bytes, bytes, list[tuple[str, bytes]]]]) -> None:
    producer = AIOKafkaProducer(bootstrap_servers=settings.bootstrap_servers, acks="all")
    await producer.start()
    try:
        for key, value, headers in records:
            await producer.send_and_wait(settings.topic_sentiment, value, key=key, headers=headers)
    finally:
        await producer.stop()


def test_the_consumer_example_deduplicates_by_key_against_the_local_broker(fresh_topics: Settings) -> None:
    events = [dataclasses.replace(EVENT, id=f"post-{i}", probs=(0.1, 0.1 * i, 0.9 - 0.1 * i)) for i in range(3)]
    headers = output_headers("model-v1")
    records = [(ev.id.encode(), ev.encode(), headers) for ev in events]
    records.append(records[1])  # an at-least-once redelivery
    future = [(b"post-9", dataclasses.replace(EVENT, id="post-9").encode(), [*headers[:1], ("schema-version", b"2.0")])]
    asyncio.run(_produce(fresh_topics, records + future))

    result = subprocess.run(
        [sys.executable, "-I", str(EXAMPLE), fresh_topics.bootstrap_servers, fresh_topics.topic_sentiment,
         f"example-{uuid.uuid4().hex[:8]}", "3"],
        capture_output=True, text=True, timeout=120,
    )
    print(result.stdout)
    assert result.returncode == 0, result.stderr
    lines = [json.loads(line) for line in result.stdout.splitlines()]
    # keys spread over partitions, so only the order within a key holds: the duplicate and the v2 record skipped
    assert sorted(line["id"] for line in lines) == ["post-0", "post-1", "post-2"]
    assert {line["model"] for line in lines} == {"model-v1"}
    (first,) = [line for line in lines if line["id"] == "post-0"]
    assert first == {"id": "post-0", "label": "positive", "score": round(events[0].score, 3), "model": "model-v1"}
