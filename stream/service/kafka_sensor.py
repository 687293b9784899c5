"""Kafka-client metrics: a Faust sensor for rebalances, commits and produce outcomes, and aiokafka's retries.

:class:`KafkaClientSensor` is added to the app's sensors (``app.sensors.add``) and writes to the project's
registry (:class:`~stream.service.metrics.Metrics`), unlike Faust's own Prometheus sensor, which uses the global
one and its own names. Produce retries happen inside aiokafka's sender, which has no hook: it logs a warning
on every retried produce request, and :class:`ProduceRetryCounter` (a logging handler the sensor installs
while it runs) counts those records.
"""

from __future__ import annotations

import logging
from time import monotonic
from typing import Any

import faust

from stream.service.metrics import Metrics

__all__ = ["AIOKAFKA_SENDER_LOGGER", "KafkaClientSensor", "ProduceRetryCounter"]

AIOKAFKA_SENDER_LOGGER = "aiokafka.producer.sender"
# aiokafka's sender: "Got error produce response: %s" (request failed; retriable batches are re-enqueued)
# and "Got error produce response on topic-partition %s, retrying. Error: %s".
_RETRY_PREFIX = "Got error produce response"


class ProduceRetryCounter(logging.Handler):
    """Counts aiokafka's produce-retry warnings into ``sentiment_produce_retries_total``."""

    def __init__(self, metrics: Metrics) -> None:
        super().__init__(level=logging.WARNING)
        self.metrics = metrics

    def emit(self, record: logging.LogRecord) -> None:
        if isinstance(record.msg, str) and record.msg.startswith(_RETRY_PREFIX):
            self.metrics.produce_retries.inc()


class KafkaClientSensor(faust.Sensor):
    """Rebalances (count, duration), commit latency, produced records and produce errors by topic."""

    def __init__(self, metrics: Metrics, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.metrics = metrics
        self.retries = ProduceRetryCounter(metrics)

    async def on_start(self) -> None:
        logger = logging.getLogger(AIOKAFKA_SENDER_LOGGER)
        logger.addHandler(self.retries)
        if logger.getEffectiveLevel() > logging.WARNING:
            logger.setLevel(logging.WARNING)

    async def on_stop(self) -> None:
        logging.getLogger(AIOKAFKA_SENDER_LOGGER).removeHandler(self.retries)

    def on_rebalance_start(self, app: Any) -> dict[str, float]:
        self.metrics.rebalances.inc()
        return {"time_start": monotonic()}

    def on_rebalance_end(self, app: Any, state: dict[str, float]) -> None:
        self.metrics.rebalance_duration.observe(monotonic() - state["time_start"])

    def on_commit_initiated(self, consumer: Any) -> float:
        return monotonic()

    def on_commit_completed(self, consumer: Any, state: Any) -> None:
        self.metrics.commit_latency.observe(monotonic() - state)

    def on_send_initiated(self, producer: Any, topic: str, message: Any, keysize: int, valsize: int) -> str:
        return topic

    def on_send_completed(self, producer: Any, state: Any, metadata: Any) -> None:
        self.metrics.produced.labels(state).inc()

    def on_send_error(self, producer: Any, exc: BaseException, state: Any) -> None:
        self.metrics.produce_errors.labels(state).inc()
