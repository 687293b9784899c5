"""Every Prometheus metric of the service (docs/architecture.md, Observability), in one module with its own registry.

Names are prefixed ``sentiment_``, values are in base units (seconds, vectors, messages) and labels are
low-cardinality: never a post id, only modality, stage, outcome, reason, operation, model, topic/partition.
:func:`get_metrics` returns the process-wide :class:`Metrics`; tests build their own ``Metrics(settings)``
so they never share state. :data:`METRIC_NAMES` lists every family name as exposed (the dashboard and
alert rules are checked against it).
"""

from __future__ import annotations

import functools
import time
from collections.abc import Iterable, Mapping
from typing import Final

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    ProcessCollector,
    disable_created_metrics,
    generate_latest,
    start_http_server,
)
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from stream.service.settings import Settings, get_settings

__all__ = [
    "CONTENT_TYPE_LATEST",
    "LATENCY_BUCKETS_S",
    "METRIC_NAMES",
    "STAGES",
    "Metrics",
    "MetricsServer",
    "get_metrics",
    "latency_buckets",
    "start_metrics_server",
]

# Stage names the scorer reports in `sentiment_stage_latency_seconds{stage}`; a closed list keeps the
# label low-cardinality and lets the dashboard enumerate it.
STAGES: Final = (
    "decode",
    "encode_text",
    "encode_image",
    "encode_transcript",
    "queue_read",
    "head",
    "queue_push",
    "produce",
    "batch",
    "other",
)

# 1 ms … 5 s; the SLO bucket is merged in by `latency_buckets` so "% under SLO" is exact.
LATENCY_BUCKETS_S: Final = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
_BATCH_BUCKETS: Final = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)
_QUALITY_BUCKETS: Final = (0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 1.0)
_REBALANCE_BUCKETS_S: Final = (0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)

# Family names as they appear in the exposition (counters carry `_total`; histograms add
# `_bucket/_sum/_count` series under the same family name).
METRIC_NAMES: Final = (
    "sentiment_build_info",
    "sentiment_latency_slo_seconds",
    "sentiment_events_total",
    "sentiment_dead_letters_total",
    "sentiment_e2e_latency_seconds",
    "sentiment_stage_latency_seconds",
    "sentiment_batch_size_posts",
    "sentiment_missing_pattern_posts_total",
    "sentiment_recovered_modalities_total",
    "sentiment_modality_quality_ratio",
    "sentiment_feature_queue_length",
    "sentiment_redis_errors_total",
    "sentiment_queue_degraded_events_total",
    "sentiment_queue_dropped_vectors_total",
    "sentiment_onnx_session_info",
    "sentiment_last_processed_timestamp_seconds",
    "sentiment_consumer_lag_messages",
    # Kafka client (stream/service/kafka_sensor.py: a Faust sensor and aiokafka's retry log)
    "sentiment_rebalances_total",
    "sentiment_rebalance_duration_seconds",
    "sentiment_commit_latency_seconds",
    "sentiment_produced_messages_total",
    "sentiment_produce_errors_total",
    "sentiment_produce_retries_total",
    # Drift of the live DRF queue and the input mix (stream/service/drift.py)
    "sentiment_queue_mean_shift_stddevs",
    "sentiment_queue_variance_ratio",
    "sentiment_missing_pattern_share_ratio",
    "sentiment_quality_mean_ratio",
    "sentiment_batch_plan_records",
    "sentiment_encode_cache_lookups_total",
)


def latency_buckets(slo_s: float) -> tuple[float, ...]:
    """The latency buckets (1 ms … 5 s) with one boundary exactly at ``slo_s``."""
    return tuple(sorted({*LATENCY_BUCKETS_S, float(slo_s)}))


class Metrics:
    """The service's metrics on a private :class:`CollectorRegistry`.

    Attributes are the prometheus_client objects (use ``.labels(...)``); the helper methods cover the
    cases where setting a value correctly needs more than one call (provider info, consumer lag).
    """

    def __init__(self, settings: Settings | None = None, *, process_metrics: bool = True) -> None:
        settings = settings or get_settings()
        # In the classic text format `_created` samples surface as extra gauge families
        # (`sentiment_events_created`, ...) that double the series count and confuse dashboards.
        disable_created_metrics()
        self.registry = CollectorRegistry(auto_describe=True)
        if process_metrics:
            # process_* (RSS, CPU, fds) for the dashboard's process row; not ours, so not in METRIC_NAMES.
            ProcessCollector(registry=self.registry)
        r = self.registry
        buckets = latency_buckets(settings.latency_slo_s)
        self.build_info = Gauge(
            "sentiment_build_info",
            "1, labelled with the package version and the served model (version, recovery, text encoder, provider).",
            ["version", "model_version", "recovery", "text_encoder", "provider"],
            registry=r,
        )
        self.latency_slo = Gauge(
            "sentiment_latency_slo_seconds",
            "The end-to-end latency objective (SENTIMENT_LATENCY_SLO_S); alerts and dashboard compare against it.",
            registry=r,
        )
        self.latency_slo.set(settings.latency_slo_s)
        self.events = Counter(
            "sentiment_events", "Posts handled, by outcome (scored | dead_letter).", ["outcome"], registry=r
        )
        self.dead_letters = Counter(
            "sentiment_dead_letters",
            "Posts sent to the dead-letter topic, by reason.",
            ["reason"],
            registry=r,
        )
        self.e2e_latency = Histogram(
            "sentiment_e2e_latency_seconds",
            "Event time to emit time of each scored post.",
            buckets=buckets,
            registry=r,
        )
        self.stage_latency = Histogram(
            "sentiment_stage_latency_seconds",
            "Wall time of one pipeline stage for one micro-batch.",
            ["stage"],
            buckets=buckets,
            registry=r,
        )
        self.batch_size = Histogram(
            "sentiment_batch_size_posts", "Posts per micro-batch.", buckets=_BATCH_BUCKETS, registry=r
        )
        self.missing_pattern = Counter(
            "sentiment_missing_pattern_posts",
            "Scored posts by which modalities were missing (none | image | transcript | image+transcript | ...).",
            ["missing"],
            registry=r,
        )
        self.recovered_modalities = Counter(
            "sentiment_recovered_modalities",
            "Missing modalities recovered by the head, by modality and recovery path (fsrf | drf).",
            ["modality", "path"],
            registry=r,
        )
        self.quality = Histogram(
            "sentiment_modality_quality_ratio",
            "DRF quality weight (0..1) of each present modality.",
            ["modality"],
            buckets=_QUALITY_BUCKETS,
            registry=r,
        )
        self.queue_length = Gauge(
            "sentiment_feature_queue_length",
            "Vectors in the DRF feature queue in Redis, by modality (last value read).",
            ["modality"],
            registry=r,
        )
        self.redis_errors = Counter(
            "sentiment_redis_errors",
            "Failed or timed-out Redis calls, by operation (read | push | seed | ...).",
            ["operation"],
            registry=r,
        )
        self.queue_degraded_events = Counter(
            "sentiment_queue_degraded_events",
            "Posts scored without fresh queue statistics, by status (queue_stale | queue_unavailable).",
            ["status"],
            registry=r,
        )
        self.queue_dropped_vectors = Counter(
            "sentiment_queue_dropped_vectors",
            "Feature vectors not pushed to the queue, by reason (redis_unavailable | not_finite | rejected).",
            ["reason"],
            registry=r,
        )
        self.onnx_session = Gauge(
            "sentiment_onnx_session_info",
            "1 for each loaded ONNX model: the execution provider requested and the one obtained.",
            ["model", "requested", "provider"],
            registry=r,
        )
        self.last_processed = Gauge(
            "sentiment_last_processed_timestamp_seconds",
            "Unix time at which the last batch finished (liveness).",
            registry=r,
        )
        self.consumer_lag = Gauge(
            "sentiment_consumer_lag_messages",
            "Messages between the partition's high-water mark and the consumer's position.",
            ["topic", "partition"],
            registry=r,
        )
        # Kafka client: a Faust sensor (stream/service/kafka_sensor.py) writes these.
        self.rebalances = Counter(
            "sentiment_rebalances", "Consumer-group rebalances this worker took part in.", registry=r
        )
        self.rebalance_duration = Histogram(
            "sentiment_rebalance_duration_seconds",
            "Time from a rebalance starting to this worker consuming again.",
            buckets=_REBALANCE_BUCKETS_S,
            registry=r,
        )
        self.commit_latency = Histogram(
            "sentiment_commit_latency_seconds", "Time an offset commit takes.", buckets=buckets, registry=r
        )
        self.produced = Counter(
            "sentiment_produced_messages", "Records acknowledged by the broker, by topic.", ["topic"], registry=r
        )
        self.produce_errors = Counter(
            "sentiment_produce_errors",
            "Records the producer failed to deliver (after its retries), by topic.",
            ["topic"],
            registry=r,
        )
        self.produce_retries = Counter(
            "sentiment_produce_retries",
            "Produce requests the Kafka client retried after a retriable broker or network error.",
            registry=r,
        )
        # Drift (stream/service/drift.py), refreshed on a timer.
        self.queue_mean_shift = Gauge(
            "sentiment_queue_mean_shift_stddevs",
            "RMS over dimensions of (live queue mean - training queue mean) / training std, by modality.",
            ["modality"],
            registry=r,
        )
        self.queue_variance_ratio = Gauge(
            "sentiment_queue_variance_ratio",
            "Geometric mean over dimensions of live queue variance / training queue variance, by modality.",
            ["modality"],
            registry=r,
        )
        self.missing_pattern_share = Gauge(
            "sentiment_missing_pattern_share_ratio",
            "Share of the last scored posts (SENTIMENT_DRIFT_WINDOW_POSTS) by missing pattern.",
            ["missing"],
            registry=r,
        )
        self.quality_mean = Gauge(
            "sentiment_quality_mean_ratio",
            "Mean DRF quality weight of the last scored posts that carried the modality, by modality.",
            ["modality"],
            registry=r,
        )
        # Performance: the batch policy's chosen size (batching.py) and the encoder cache (encode_cache.py).
        self.batch_plan = Gauge(
            "sentiment_batch_plan_records",
            "Most records the batch policy allows in the next micro-batch (adaptive: follows backlog and SLO).",
            registry=r,
        )
        self.encode_cache = Counter(
            "sentiment_encode_cache_lookups",
            "Encoder-cache lookups by modality and result (hit | miss); hit rate = hit / all.",
            ["modality", "result"],
            registry=r,
        )
        self._onnx_labels: dict[str, tuple[str, str, str]] = {}
        self._lag_labels: set[tuple[str, str]] = set()

    def set_build_info(
        self, *, version: str, model_version: str, recovery: str, text_encoder: str, provider: str
    ) -> None:
        """Set ``sentiment_build_info`` = 1 for this build and served model (the only series of the family)."""
        self.build_info.clear()
        self.build_info.labels(version, model_version, recovery, text_encoder, provider).set(1)

    def set_onnx_session(self, model: str, requested: str, provider: str) -> None:
        """Record which provider a model's session obtained, replacing any earlier record for ``model``."""
        old = self._onnx_labels.get(model)
        if old is not None and old != (model, requested, provider):
            self.onnx_session.remove(*old)
        self._onnx_labels[model] = (model, requested, provider)
        self.onnx_session.labels(model, requested, provider).set(1)

    def set_consumer_lag(self, topic: str, partition: int, highwater: int | None, position: int | None) -> None:
        """Set lag = high-water mark − position; unknown offsets (None) leave the gauge unchanged."""
        if highwater is None or position is None:
            return
        key = (topic, str(partition))
        self._lag_labels.add(key)
        self.consumer_lag.labels(*key).set(max(0, highwater - position))

    def retain_partitions(self, assigned: Iterable[tuple[str, int]]) -> None:
        """Drop lag series of partitions no longer assigned (call on rebalance), so none go stale."""
        keep = {(t, str(p)) for t, p in assigned}
        for key in self._lag_labels - keep:
            self.consumer_lag.remove(*key)
        self._lag_labels &= keep

    def observe_stages(self, stages: Mapping[str, float]) -> None:
        """Observe one batch's per-stage seconds; a name outside :data:`STAGES` is recorded as ``other``
        so a typo cannot create new series."""
        for stage, seconds in stages.items():
            self.stage_latency.labels(stage if stage in STAGES else "other").observe(seconds)

    def mark_processed(self, when: float | None = None) -> None:
        """Set the liveness timestamp (defaults to now)."""
        self.last_processed.set(time.time() if when is None else when)

    @property
    def last_processed_at(self) -> float | None:
        """The liveness timestamp last set by :meth:`mark_processed`, None before the first batch."""
        value = self.registry.get_sample_value("sentiment_last_processed_timestamp_seconds")
        return value or None

    def render(self) -> bytes:
        """The registry in the Prometheus text exposition format (``CONTENT_TYPE_LATEST``)."""
        return generate_latest(self.registry)


class MetricsServer:
    """A running /metrics HTTP server; ``port`` is the bound port (useful when asked for port 0)."""

    def __init__(self, host: str, port: int, metrics: Metrics) -> None:
        self._server, self._thread = start_http_server(port, addr=host, registry=metrics.registry)
        self.host = host
        self.port = int(self._server.server_port)

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}/metrics"

    def close(self) -> None:
        """Stop serving and release the port."""
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)


def start_metrics_server(
    settings: Settings | None = None, metrics: Metrics | None = None, *, port: int | None = None
) -> MetricsServer:
    """Serve ``metrics`` on ``settings.metrics_host:metrics_port`` (127.0.0.1 by default, never 0.0.0.0
    unless configured). ``port`` overrides the setting (0 = any free port)."""
    settings = settings or get_settings()
    metrics = metrics or get_metrics()
    return MetricsServer(settings.metrics_host, settings.metrics_port if port is None else port, metrics)


@functools.cache
def get_metrics() -> Metrics:
    """The process-wide metrics, built from :func:`get_settings` on first use."""
    return Metrics(get_settings())
