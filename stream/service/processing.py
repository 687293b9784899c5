"""The scoring service: one micro-batch from consumed records to produced outputs, broker-agnostic.

:meth:`ScoringService.process` reads the DRF queue statistics from Redis (one round-trip), runs
:class:`~stream.service.scoring.PostScorer` in a dedicated executor thread, hands every event and dead letter
to a ``send`` callable and waits until the broker has acknowledged all of them, pushes the clean features
back into the queue (one Lua call) and updates the metrics. The Faust app (:mod:`stream.service.app`) only
turns Faust events into :class:`~stream.service.scoring.InputRecord` and Faust topics into ``send``.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from collections.abc import Awaitable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Literal, Protocol

import numpy as np

from stream.service.errors import PostRejected
from stream.service.events import DeadLetter, minimal_dead_letter
from stream.service.feature_queue import FeatureQueue, QueueStats
from stream.service.manifest import Manifest
from stream.service.metrics import Metrics
from stream.service.scoring import BatchOutcome, InputRecord, PostScorer
from stream.service.settings import Settings
from stream.service.vocabulary import MODALITIES

__all__ = ["OutputKind", "ScoringService", "Sender"]

log = logging.getLogger(__name__)

OutputKind = Literal["sentiment", "dead_letter"]


class Sender(Protocol):
    """Produce one output; returns once it is queued, with an awaitable that resolves when the broker acks."""

    def __call__(self, kind: OutputKind, key: bytes | None, value: bytes) -> Awaitable[Awaitable[Any]]: ...


class ScoringService:
    """Everything one batch needs besides the broker: scorer, Redis queue, metrics, executor."""

    def __init__(self, settings: Settings, manifest: Manifest, metrics: Metrics) -> None:
        self.settings = settings
        self.metrics = metrics
        self.scorer = PostScorer(manifest, settings)
        self.queue = FeatureQueue(manifest.version, settings, metrics=metrics, dim=manifest.queue_dim)
        self.snapshot = manifest.queue_snapshot()
        # One thread: batches are sequential per agent, and ORT already uses intra-op threads.
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="onnx")
        self.positions: dict[tuple[str, int], int] = {}
        for name, session in self.scorer.sessions.items():
            metrics.set_onnx_session(name, settings.providers, session.provider)

    async def start(self) -> None:
        await self.queue.seed(self.snapshot)

    async def stop(self) -> None:
        self.executor.shutdown(wait=True)
        await self.queue.aclose()

    async def process(self, records: Sequence[InputRecord], send: Sender) -> BatchOutcome:
        """Score ``records``, produce every output and wait for the broker's acks, then update the queue.

        Returns only once every event and dead letter is acknowledged: the caller acks the input after that.
        """
        outcome = await self.score(records)
        outcome.stages["produce"] = await self.produce(outcome, send)
        outcome.stages["queue_push"] = await self.push(outcome)
        self.observe(outcome, len(records))
        for rec in records:
            if rec.topic is not None and rec.partition is not None and rec.offset is not None:
                self.positions[(rec.topic, rec.partition)] = rec.offset + 1
        return outcome

    async def score(self, records: Sequence[InputRecord]) -> BatchOutcome:
        """Score a batch in the executor. Never raises on bad input: a post that breaks the model is a dead letter."""
        t0 = time.perf_counter()
        stats: QueueStats = await self.queue.stats()
        read_s = time.perf_counter() - t0
        loop = asyncio.get_running_loop()
        try:
            outcome = await loop.run_in_executor(self.executor, self.scorer.score, records, stats)
        except Exception:
            # Something in the batch broke the model path: score posts one by one so only the culprit
            # goes to the dead-letter topic and its neighbours are still scored.
            log.exception("batch of %d failed; retrying post by post", len(records))
            outcome = BatchOutcome()
            for rec in records:
                try:
                    one = await loop.run_in_executor(self.executor, self.scorer.score, [rec], stats)
                except Exception as exc:
                    log.exception("post at %s/%s offset %s failed", rec.topic, rec.partition, rec.offset)
                    one = BatchOutcome(
                        dead_letters=[self.scorer.dead_letter(rec, PostRejected("internal_error", type(exc).__name__))]
                    )
                outcome.events += one.events
                outcome.dead_letters += one.dead_letters
                for m, vectors in one.enqueue.items():
                    outcome.enqueue[m] = (
                        vectors if m not in outcome.enqueue else np.concatenate([outcome.enqueue[m], vectors])
                    )
        outcome.stages["queue_read"] = read_s
        return outcome

    async def produce(self, outcome: BatchOutcome, send: Sender) -> float:
        """Send every event and dead letter and wait for the broker's acks; returns the seconds it took.

        Raises when an event cannot be produced or acknowledged within ``produce_timeout_s``: the caller then
        must not ack the batch. A dead letter the broker refuses is replaced by a minimal one (no payload),
        so a dead letter is never the reason a post is lost.
        """
        t0 = time.perf_counter()
        # the emit time is when the event leaves, and the latency metric observes that same value
        emit_ts = time.time()
        outcome.events = [dataclasses.replace(ev, emit_ts=emit_ts) for ev in outcome.events]
        pending = [await self._bounded(send("sentiment", ev.id.encode(), ev.encode())) for ev in outcome.events]
        letters = [(dl, await self._start_dead_letter(dl, send)) for dl in outcome.dead_letters]
        # Wait for the broker before the batch is acked: a crash now means redelivery, not loss.
        await self._bounded(asyncio.gather(*pending))
        for dl, ack in letters:
            try:
                if ack is None:
                    raise RuntimeError("the producer refused the dead letter")
                await self._bounded(ack)
            except Exception as exc:  # whatever the reason, fall back to the minimal letter
                minimal = minimal_dead_letter(dl)
                log.warning(
                    "dead letter of %s/%s offset %s (%d bytes) failed (%s: %s); producing a minimal one",
                    dl.topic, dl.partition, dl.offset, len(dl.encode()), type(exc).__name__, exc,
                )
                # If even this fails the batch fails, un-acked, and is retried.
                await self._bounded(await self._bounded(send("dead_letter", minimal.key, minimal.encode())))
        return time.perf_counter() - t0

    async def _start_dead_letter(self, dl: DeadLetter, send: Sender) -> Awaitable[Any] | None:
        """Hand ``dl`` to the producer; None when it refuses at once (e.g. over its request size)."""
        try:
            return await self._bounded(send("dead_letter", dl.key, dl.encode()))
        except TimeoutError:
            raise
        except Exception:  # a refused dead letter is replaced, see produce()
            return None

    async def _bounded(self, awaitable: Awaitable[Any]) -> Any:
        """Await with the produce timeout: a stalled broker fails the batch instead of blocking it for ever."""
        return await asyncio.wait_for(awaitable, timeout=self.settings.produce_timeout_s)

    async def push(self, outcome: BatchOutcome) -> float:
        t0 = time.perf_counter()
        if outcome.enqueue:
            await self.queue.push(outcome.enqueue)
        return time.perf_counter() - t0

    def observe(self, outcome: BatchOutcome, n_records: int) -> None:
        m = self.metrics
        m.batch_size.observe(n_records)
        m.observe_stages(outcome.stages)
        for ev in outcome.events:
            m.events.labels("scored").inc()
            m.e2e_latency.observe(max(0.0, ev.latency_s))
            for modality in ev.recovered:
                m.missing_modalities.labels(modality).inc()
                m.recovered_modalities.labels(modality, ev.recovery).inc()
            for modality, q in ev.quality.items():
                m.quality.labels(modality).observe(q)
            for flag in ev.flags:
                m.queue_degraded_events.labels(flag).inc()
        for dl in outcome.dead_letters:
            m.events.labels("dead_letter").inc()
            m.dead_letters.labels(dl.reason).inc()
        for modality in MODALITIES:
            m.queue_length.labels(modality).set(self.queue.lengths.get(modality, 0))
        m.mark_processed()
