"""The Faust app: consume ``posts`` in micro-batches, emit ``sentiment`` and dead letters; ``sentiment-stream worker``.

The wiring only: each micro-batch becomes a list of :class:`~stream.service.scoring.InputRecord` handed to
:meth:`ScoringService.process <stream.service.processing.ScoringService.process>`, which returns once every
output is acknowledged by the broker. Faust acks the batch only after that, so delivery is at-least-once
(outputs are keyed by post id for de-duplication). No Faust tables: Redis is the only state.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Awaitable, Sequence
from typing import Any

import faust
from aiohttp import web
from faust.transport.drivers import aiokafka as faust_aiokafka
from mode.supervisors import CrashingSupervisor

from stream.service.kafka_sensor import KafkaClientSensor
from stream.service.logs import logging_config, set_log_context
from stream.service.manifest import Manifest
from stream.service.metrics import get_metrics, start_metrics_server
from stream.service.processing import Headers, OutputKind, ScoringService
from stream.service.scoring import InputRecord
from stream.service.settings import Settings, get_settings

__all__ = ["add_arguments", "create_app", "run"]

log = logging.getLogger(__name__)


class _ShortFetchConsumerThread(faust_aiokafka.AIOKafkaConsumerThread):
    """Faust's consumer thread with our fetch wait instead of its hard-coded 1.5 s.

    Tansu holds a fetch for the whole wait even when records arrive (publish→receive p50 240 ms at
    1.5 s, 8 ms at 25 ms; docs/performance.md), which is the latency floor of a lightly loaded worker.
    """

    fetch_max_wait_s: float = 0.025

    def _create_worker_consumer(self, transport: Any) -> Any:
        consumer = super()._create_worker_consumer(transport)
        consumer._fetch_max_wait_ms = int(self.fetch_max_wait_s * 1000)  # aiokafka reads it in start()
        return consumer


def _short_fetch_consumer(fetch_max_wait_s: float) -> type[faust_aiokafka.Consumer]:
    thread = type("ConsumerThread", (_ShortFetchConsumerThread,), {"fetch_max_wait_s": fetch_max_wait_s})

    class ShortFetchConsumer(faust_aiokafka.Consumer):
        def _new_consumer_thread(self) -> Any:
            return thread(self, loop=self.loop, beacon=self.beacon)

    return ShortFetchConsumer


def create_app(settings: Settings | None = None, manifest: Manifest | None = None) -> faust.App:
    """The Faust app with its one agent; ``manifest`` defaults to the one in ``settings.model_dir``."""
    settings = settings or get_settings()
    manifest = manifest or Manifest.load(settings.model_dir)
    metrics = get_metrics()
    settings.faust_data_dir.mkdir(parents=True, exist_ok=True)
    app = faust.App(
        settings.consumer_group,
        broker=",".join(f"kafka://{s.strip()}" for s in settings.bootstrap_servers.split(",")),
        processing_guarantee="at_least_once",  # Tansu has no transactions; outputs are keyed for dedup
        store="memory://",
        datadir=str(settings.faust_data_dir / settings.consumer_group),
        web_enabled=True,
        web_bind=settings.web_host,
        web_port=settings.web_port,
        web_host=settings.web_host,
        broker_session_timeout=settings.session_timeout_s,
        broker_heartbeat_interval=1.0,
        consumer_auto_offset_reset="earliest",
        topic_disable_leader=True,
        topic_allow_declare=False,  # `services start` (or the operator) creates topics with explicit partitions
        stream_wait_empty=True,
        producer_acks=-1,
        producer_linger=0.005,
        producer_max_request_size=settings.max_message_bytes,  # a post at the image limit fits (settings.py)
        consumer_max_fetch_size=settings.max_message_bytes,
    )
    app.sensors.add(KafkaClientSensor(metrics))  # rebalances, commit latency, produce errors/retries

    app.transport.Consumer = _short_fetch_consumer(settings.fetch_max_wait_s)  # type: ignore[misc]

    def raw_topic(name: str) -> faust.TopicT:
        return app.topic(
            name,
            partitions=settings.partitions,
            key_type=bytes,
            value_type=bytes,
            key_serializer="raw",
            value_serializer="raw",
        )

    posts_topic = raw_topic(settings.topic_posts)
    sentiment_topic = raw_topic(settings.topic_sentiment)
    dlq_topic = raw_topic(settings.topic_dlq)
    service = ScoringService(settings, manifest, metrics)
    state: dict[str, Any] = {"started": time.time()}

    @app.task
    async def seed_queue() -> None:
        await service.start()

    @app.timer(interval=settings.drift_interval_s)  # drift gauges (stream/service/drift.py)
    async def update_drift() -> None:
        await service.update_drift()

    @app.agent(posts_topic, supervisor_strategy=CrashingSupervisor)
    async def score_posts(stream: Any) -> None:
        async for events in stream.take_events(settings.max_batch, within=settings.max_wait_s):
            await handle_batch(events)

    async def send(kind: OutputKind, key: bytes | None, value: bytes, headers: Headers | None = None) -> Awaitable[Any]:
        topic = sentiment_topic if kind == "sentiment" else dlq_topic
        return await topic.send(key=key, value=value, headers=headers)

    async def handle_batch(events: Sequence[faust.EventT]) -> None:
        records = [
            InputRecord(
                value=ev.message.value or b"",
                key=ev.message.key,
                timestamp=ev.message.timestamp,
                topic=ev.message.topic,
                partition=ev.message.partition,
                offset=ev.message.offset,
            )
            for ev in events
        ]
        await service.process(records, send)
        update_lag()

    def update_lag() -> None:
        # The fetch high-water mark, not ListOffsets: Tansu answers ListOffsets(LATEST) wrongly.
        for (topic, partition), position in service.positions.items():
            try:
                highwater = app.consumer.highwater(faust.types.TP(topic, partition))
            except Exception:  # not assigned any more, or no fetch yet
                continue
            metrics.set_consumer_lag(topic, partition, highwater, position)

    @app.page("/health")  # type: ignore[arg-type]
    async def health(web_view: Any, request: Any) -> web.Response:
        last = metrics.last_processed_at
        body = {
            "status": "ok",
            "model": manifest.version,
            "recovery": service.scorer.recovery,
            "providers": {name: s.provider for name, s in service.scorer.sessions.items()},
            "last_processed_ts": last or None,
            "uptime_s": time.time() - state["started"],
            "queue": service.queue.lengths,
        }
        return web.json_response(body)

    @app.on_rebalance_complete.connect  # type: ignore[arg-type]
    async def on_rebalance(sender: Any, **kwargs: Any) -> None:
        assigned = {(tp.topic, tp.partition) for tp in app.consumer.assignment()}
        metrics.retain_partitions(assigned)
        for key in list(service.positions):
            if key not in assigned:
                del service.positions[key]

    return app


class _Worker(faust.Worker):
    """A Faust worker whose SIGTERM cannot hang: after ``shutdown_timeout_s`` the process exits."""

    shutdown_timeout_s: float = 30.0

    def _schedule_shutdown(self, signum: signal.Signals) -> None:
        if not self._signal_stop_time:
            timer = threading.Timer(self.shutdown_timeout_s, self._force_exit)
            timer.daemon = True
            timer.start()
        super()._schedule_shutdown(signum)

    def _force_exit(self) -> None:
        log.error("shutdown did not finish within %.0f s; exiting", self.shutdown_timeout_s)
        logging.shutdown()
        os._exit(1)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model-dir", help="exported model (manifest.json); default SENTIMENT_MODEL_DIR")
    parser.add_argument("--loglevel", default="info")


def run(args: argparse.Namespace) -> int:
    settings = get_settings()
    if args.model_dir:
        settings = settings.model_copy(update={"model_dir": args.model_dir})
    try:
        manifest = Manifest.load(settings.model_dir)
    except Exception as exc:  # a bad model is a start-up error with a message, never a crash mid-stream
        print(f"error: cannot load the model from {settings.model_dir}: {exc}", file=sys.stderr)
        return 2
    app = create_app(settings, manifest)
    server = start_metrics_server(settings, get_metrics())
    log.info("metrics on %s; health on http://%s:%d/health", server.url, settings.web_host, settings.web_port)
    set_log_context(model_version=manifest.version)
    # Faust configures logging itself: hand it the project's config (text or JSON, on stderr).
    config = logging_config(settings, args.loglevel.upper())
    worker = _Worker(app, loglevel=args.loglevel, quiet=True, logging_config=config)
    worker.shutdown_timeout_s = settings.shutdown_timeout_s
    try:
        worker.execute_from_commandline()
    except SystemExit as exc:
        return int(exc.code or 0)
    finally:
        server.close()
    return 0
