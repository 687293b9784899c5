"""The Faust app: consume ``posts`` in micro-batches, emit ``sentiment`` and dead letters; ``sentiment-stream worker``.

The wiring only: each micro-batch (sized by :mod:`stream.service.batching`) becomes a list of
:class:`~stream.service.scoring.InputRecord` handed to :meth:`ScoringService.process
<stream.service.processing.ScoringService.process>`, which returns once every output is acknowledged by the
broker. The agent acks the batch only after that, itself, on a no-ack stream (docs/reliability.md): a batch
that fails is retried, then stops the worker un-acked. Delivery is at-least-once (outputs are keyed by post
id for de-duplication). No Faust tables: Redis is the only state.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import signal
import sys
import threading
import time
from collections import deque
from collections.abc import Awaitable, Sequence
from dataclasses import dataclass
from typing import Any

import faust
from aiohttp import web
from faust.transport.drivers import aiokafka as faust_aiokafka
from mode.supervisors import CrashingSupervisor

from stream.service.batching import batch_capacity, batch_policy
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
        # Only our own views (/health, /livez, /readyz): Faust's /router, /table, /graph and statistics
        # pages describe the cluster to anyone who can reach the port.
        web_router_enabled=False,
        web_tables_enabled=False,
        web_graph_enabled=False,
        web_stats_enabled=False,
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
        # Bounded: a missing topic or an unreachable leader fails the batch in seconds, not 20 minutes.
        producer_request_timeout=settings.produce_timeout_s,
        producer_max_request_size=settings.max_message_bytes,  # a post at the image limit fits (settings.py)
        consumer_max_fetch_size=settings.max_message_bytes,
        # Faust's prefetch buffer counts messages (default 4,096, up to 24 GB of 6 MB posts): one batch's worth.
        stream_buffer_maxsize=batch_capacity(settings),
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

    policy = batch_policy(settings)
    health_state = _Liveness(started=time.monotonic())

    @app.agent(posts_topic, supervisor_strategy=CrashingSupervisor)
    async def score_posts(stream: Any) -> None:
        # Acks are ours: an event is acked only after its outputs are acknowledged by the broker. Faust's
        # take_events acks in a `finally` (an exception acks the batch, faust-streaming#527) and, once it
        # restores `enable_acks`, its drainer acks whatever is still buffered; a noack stream never acks.
        manual = stream.noack()
        buffer = _EventBuffer(capacity=batch_capacity(settings))
        pump = asyncio.ensure_future(buffer.fill_from(manual))
        try:
            while True:
                plan = policy.next_batch(_backlog(len(buffer), health_state.lag))
                events = await buffer.take(plan.max_records, plan.max_wait_s, settings.max_batch_bytes, pump)
                if not events:
                    return  # the stream ended (the worker stops)
                health_state.in_flight_since = time.monotonic()
                try:
                    compute_s = await handle_batch(events)
                finally:
                    health_state.in_flight_since = None
                for event in events:
                    await manual.ack(event)
                policy.observe(len(events), compute_s, _backlog(len(buffer), health_state.lag))
        finally:
            pump.cancel()

    async def send(kind: OutputKind, key: bytes | None, value: bytes, headers: Headers | None = None) -> Awaitable[Any]:
        topic = sentiment_topic if kind == "sentiment" else dlq_topic
        return await topic.send(key=key, value=value, headers=headers)

    async def handle_batch(events: Sequence[faust.EventT]) -> float:
        """Process one batch until every output is acknowledged; retried with back-off, then raised.

        Whatever fails (produce, Redis, scoring, a bug), the events stay un-acked: a retry produces them
        again (duplicates, keyed by post id), and after ``batch_retries`` the exception stops the worker
        before anything of this batch is committed.
        """
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
        delay = settings.batch_retry_backoff_s
        for attempt in range(settings.batch_retries + 1):
            try:
                outcome = await service.process(records, send)
                break
            except Exception as exc:
                where = f"{records[0].topic}/{records[0].partition}@{records[0].offset}"
                if attempt == settings.batch_retries:
                    log.critical(
                        "batch of %d from %s failed %d times (%s: %s); stopping the worker, nothing of it is acked",
                        len(records), where, attempt + 1, type(exc).__name__, exc,
                    )
                    raise BatchFailed(f"batch from {where} failed {attempt + 1} times") from exc
                log.error(
                    "batch of %d from %s failed (%s: %s); retrying in %.1f s, un-acked",
                    len(records), where, type(exc).__name__, exc, delay,
                )
                await asyncio.sleep(delay)
                delay *= 2
        await update_lag()
        return float(outcome.stages.get("batch", 0.0))

    async def update_lag() -> None:
        # The fetch high-water mark, not ListOffsets: Tansu answers ListOffsets(LATEST) wrongly.
        total = 0
        for tp in list(app.consumer.assignment()):
            try:
                highwater = app.consumer.highwater(tp)
                position = service.positions.get((tp.topic, tp.partition))
                if position is None:  # nothing processed here yet: the committed offset is the next to process
                    position = getattr(app.consumer, "_committed_offset", {}).get(tp)
                if position is None:  # nothing committed either: where the consumer reads from
                    position = await app.consumer.position(tp)
            except Exception:  # not assigned any more, or no fetch yet
                continue
            if highwater is None or position is None:
                continue
            metrics.set_consumer_lag(tp.topic, tp.partition, highwater, position)
            total += max(0, highwater - position)
        health_state.lag = total

    @app.task
    async def watch_broker_and_lag() -> None:
        """On a timer, not only after a batch: the lag gauge of every assigned partition, and a broker probe.

        A caught-up worker whose broker stalls processes no batch, so anything refreshed only by batches
        would keep saying all is well.
        """
        while True:
            with contextlib.suppress(Exception):
                await update_lag()
            if await _broker_answers(app, settings.ready_broker_timeout_s):
                health_state.broker_ok_at = time.monotonic()
            await asyncio.sleep(settings.broker_probe_interval_s)

    def readiness() -> tuple[bool, dict[str, Any]]:
        now = time.monotonic()
        assigned = len(app.consumer.assignment()) if app.consumer is not None else 0
        in_flight = None if health_state.in_flight_since is None else now - health_state.in_flight_since
        broker_age = now - (health_state.broker_ok_at or health_state.started)
        checks = {
            "partitions_assigned": assigned > 0,
            "broker_connected": health_state.broker_ok_at is not None
            and broker_age < settings.ready_broker_timeout_s,
            "batch_in_flight_ok": in_flight is None or in_flight < settings.ready_max_batch_age_s,
        }
        detail = {
            "checks": checks,
            "assigned_partitions": assigned,
            "batch_in_flight_s": in_flight,
            "broker_last_answer_s": None if health_state.broker_ok_at is None else broker_age,
            "lag": health_state.lag,
        }
        return all(checks.values()), detail

    @app.page("/livez")  # type: ignore[arg-type]
    async def livez(web_view: Any, request: Any) -> web.Response:
        # Answering at all is the check: the event loop runs (a blocked loop times the probe out).
        return web.json_response({"status": "ok", "uptime_s": time.monotonic() - health_state.started})

    @app.page("/readyz")  # type: ignore[arg-type]
    async def readyz(web_view: Any, request: Any) -> web.Response:
        ok, detail = readiness()
        return web.json_response({"status": "ok" if ok else "not_ready", **detail}, status=200 if ok else 503)

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
            "ready": readiness()[0],
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


class BatchFailed(RuntimeError):
    """A batch failed every retry: the worker stops with the batch un-acked (redelivered after restart)."""


@dataclass
class _Liveness:
    """What /readyz reads: when the batch in flight started, when the broker last answered, the known lag."""

    started: float
    in_flight_since: float | None = None
    broker_ok_at: float | None = None
    lag: int = 0


async def _broker_answers(app: faust.App, timeout_s: float) -> bool:
    """True when the broker answers a metadata request within ``timeout_s`` (the producer's own client)."""
    producer = getattr(app.producer, "_producer", None)
    client = getattr(producer, "client", None)
    if client is None:
        return False
    try:
        await asyncio.wait_for(client.fetch_all_metadata(), timeout=timeout_s)
    except Exception:  # any failure means "not answering"
        return False
    return True


class _EventBuffer:
    """Events pulled from a no-ack stream, waiting to be batched; bounded in count (Faust buffers more before)."""

    def __init__(self, capacity: int) -> None:
        self.capacity = max(1, capacity)
        self.events: deque[faust.EventT] = deque()
        self.arrived = asyncio.Event()
        self.space = asyncio.Event()
        self.space.set()

    def __len__(self) -> int:
        return len(self.events)

    async def fill_from(self, stream: Any) -> None:
        async for event in stream.events():
            while len(self.events) >= self.capacity:
                self.space.clear()
                await self.space.wait()
            self.events.append(event)
            self.arrived.set()

    async def _wait(self, pump: asyncio.Future[Any], timeout: float | None) -> None:
        """Until an event arrives, the pump ends (its error is raised) or ``timeout`` passes."""
        self.arrived.clear()
        if self.events:
            return
        waiter = asyncio.ensure_future(self.arrived.wait())
        try:
            await asyncio.wait({waiter, pump}, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
        finally:
            waiter.cancel()
        if pump.done() and not pump.cancelled() and pump.exception() is not None:
            raise pump.exception()  # type: ignore[misc]

    async def take(
        self, max_records: int, max_wait_s: float, max_bytes: int, pump: asyncio.Future[Any]
    ) -> list[faust.EventT]:
        """Up to ``max_records`` events (and ``max_bytes`` of values, at least one event), waiting at most
        ``max_wait_s`` after the first; empty only when the stream ended."""
        while not self.events:
            if pump.done():
                await self._wait(pump, 0)
                return []
            await self._wait(pump, None)
        batch: list[faust.EventT] = []
        size = 0
        deadline = time.monotonic() + max_wait_s
        while len(batch) < max(1, max_records):
            if not self.events:
                remaining = deadline - time.monotonic()
                if remaining <= 0 or pump.done():
                    break
                await self._wait(pump, remaining)
                continue
            nbytes = len(self.events[0].message.value or b"")
            if batch and size + nbytes > max_bytes:
                break
            batch.append(self.events.popleft())
            size += nbytes
            self.space.set()
        return batch


def _backlog(buffered: int, lag: int) -> int:
    """Records known to wait. The lag (high-water mark − processed position) already counts what is buffered,
    so the two are not added: the larger is the best estimate (the lag is refreshed per batch and on a timer)."""
    return max(buffered, lag)


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
