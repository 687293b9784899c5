"""The metrics module: own registry, every metric the dashboard and alerts use, scrapeable over HTTP on localhost."""

from __future__ import annotations

import urllib.request
from collections.abc import Iterator

import prometheus_client
import pytest
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample

from stream.service.metrics import (
    METRIC_NAMES,
    STAGES,
    Metrics,
    MetricsServer,
    latency_buckets,
    start_metrics_server,
)
from stream.service.settings import Settings


@pytest.fixture
def settings() -> Settings:
    return Settings(latency_slo_s=0.3, metrics_port=0)


@pytest.fixture
def metrics(settings: Settings) -> Metrics:
    return Metrics(settings)


@pytest.fixture
def server(settings: Settings, metrics: Metrics) -> Iterator[MetricsServer]:
    srv = start_metrics_server(settings, metrics)
    yield srv
    srv.close()


def _exposed_names(text: str) -> set[str]:
    """Family names as a dashboard queries them (the parser strips counters' `_total`)."""
    names = set()
    for family in text_string_to_metric_families(text):
        names.add(family.name + "_total" if family.type == "counter" else family.name)
    return names


def _samples(text: str, name: str) -> list[Sample]:
    return [s for f in text_string_to_metric_families(text) for s in f.samples if s.name == name]


def _record_one_batch(m: Metrics) -> None:
    m.events.labels("scored").inc(3)
    m.events.labels("dead_letter").inc()
    m.dead_letters.labels("image_undecodable").inc()
    m.e2e_latency.observe(0.12)
    m.observe_stages(dict.fromkeys(STAGES, 0.002))
    m.batch_size.observe(4)
    m.missing_pattern.labels("image").inc(2)
    m.recovered_modalities.labels("image", "fsrf").inc(2)
    m.quality.labels("text").observe(0.8)
    m.queue_length.labels("text").set(1024)
    m.redis_errors.labels("read").inc()
    m.queue_degraded_events.labels("queue_stale").inc(3)
    m.queue_dropped_vectors.labels("redis_unavailable").inc(5)
    m.set_onnx_session("head", "cpu", "CPUExecutionProvider")
    m.mark_processed(1_700_000_000.0)
    m.set_consumer_lag("posts", 0, highwater=120, position=100)
    m.set_build_info(version="0.1.0", model_version="abc", recovery="fsrf", text_encoder="fp32", provider="CPU")
    m.rebalances.inc()
    m.rebalance_duration.observe(1.5)
    m.commit_latency.observe(0.004)
    m.produced.labels("sentiment").inc(3)
    m.produce_errors.labels("sentiment")
    m.produce_retries.inc(0)
    m.queue_mean_shift.labels("text").set(0.1)
    m.queue_variance_ratio.labels("text").set(0.9)
    m.missing_pattern_share.labels("none").set(1.0)
    m.quality_mean.labels("text").set(0.8)


def test_scrape_over_http_exposes_every_listed_metric_with_its_values(server: MetricsServer, metrics: Metrics) -> None:
    assert server.host == "127.0.0.1" and server.port > 0
    _record_one_batch(metrics)
    with urllib.request.urlopen(server.url, timeout=5) as response:
        assert response.status == 200
        text = response.read().decode()
    assert set(METRIC_NAMES) <= _exposed_names(text)
    events = {s.labels["outcome"]: s.value for s in _samples(text, "sentiment_events_total")}
    assert events == {"scored": 3.0, "dead_letter": 1.0}
    lag = _samples(text, "sentiment_consumer_lag_messages")
    assert [(s.labels, s.value) for s in lag] == [({"topic": "posts", "partition": "0"}, 20.0)]
    info = _samples(text, "sentiment_onnx_session_info")
    assert info[0].labels == {"model": "head", "requested": "cpu", "provider": "CPUExecutionProvider"}
    assert _samples(text, "sentiment_last_processed_timestamp_seconds")[0].value == 1_700_000_000.0
    # The SLO bucket exists, so "% under SLO" is exact: 0.12 s is under 0.3 s.
    slo = [s for s in _samples(text, "sentiment_e2e_latency_seconds_bucket") if s.labels["le"] == "0.3"]
    assert slo and slo[0].value == 1.0
    stage_counts = _samples(text, "sentiment_stage_latency_seconds_count")
    assert {s.labels["stage"] for s in stage_counts} == set(STAGES)


def test_names_are_prefixed_in_base_units_and_low_cardinality(metrics: Metrics) -> None:
    _record_one_batch(metrics)
    ours = [n for n in _exposed_names(metrics.render().decode()) if not n.startswith("process_")]
    assert sorted(ours) == sorted(METRIC_NAMES)
    for family in metrics.registry.collect():
        if family.name.startswith("process_"):
            continue
        assert family.name.startswith("sentiment_")
        assert "_ms" not in family.name and "milliseconds" not in family.name
        for sample in family.samples:
            assert not {"id", "post_id", "key"} & set(sample.labels)


def test_latency_buckets_run_from_1ms_to_5s_with_one_at_the_slo() -> None:
    buckets = latency_buckets(0.3)
    assert buckets[0] == 0.001 and buckets[-1] == 5.0
    assert 0.3 in buckets and list(buckets) == sorted(set(buckets))
    assert latency_buckets(0.25).count(0.25) == 1


def test_metrics_live_in_their_own_registry(settings: Settings) -> None:
    a, b = Metrics(settings), Metrics(settings)  # a second instance must not clash
    a.events.labels("scored").inc()
    assert b.registry.get_sample_value("sentiment_events_total", {"outcome": "scored"}) is None
    assert prometheus_client.REGISTRY.get_sample_value("sentiment_events_total", {"outcome": "scored"}) is None


def test_onnx_provider_change_replaces_the_old_series(metrics: Metrics) -> None:
    metrics.set_onnx_session("text_encoder", "cuda", "CUDAExecutionProvider")
    metrics.set_onnx_session("text_encoder", "cuda", "CPUExecutionProvider")
    samples = _samples(metrics.render().decode(), "sentiment_onnx_session_info")
    assert [s.labels["provider"] for s in samples] == ["CPUExecutionProvider"]


def test_lag_of_revoked_partitions_is_removed_and_unknown_offsets_ignored(metrics: Metrics) -> None:
    metrics.set_consumer_lag("posts", 0, 50, 50)
    metrics.set_consumer_lag("posts", 1, 90, 10)
    metrics.set_consumer_lag("posts", 2, None, 10)
    metrics.retain_partitions([("posts", 1)])
    lag = _samples(metrics.render().decode(), "sentiment_consumer_lag_messages")
    assert [(s.labels["partition"], s.value) for s in lag] == [("1", 80.0)]


def test_server_binds_to_the_configured_host_not_all_interfaces(settings: Settings, metrics: Metrics) -> None:
    srv = start_metrics_server(settings, metrics, port=0)
    try:
        assert srv._server.server_address[0] == "127.0.0.1"
    finally:
        srv.close()


def test_unknown_stage_names_cannot_create_new_series(metrics: Metrics) -> None:
    metrics.observe_stages({"head": 0.01, "hed": 0.02, "encode_text": 0.03})
    text = metrics.render().decode()
    stages = {s.labels["stage"] for s in _samples(text, "sentiment_stage_latency_seconds_count")}
    assert stages == {"head", "other", "encode_text"}


def test_liveness_timestamp_is_readable_for_the_health_page(metrics: Metrics) -> None:
    assert metrics.last_processed_at is None
    metrics.mark_processed(1_700_000_123.5)
    assert metrics.last_processed_at == 1_700_000_123.5


def test_build_info_is_one_series_and_the_slo_is_a_gauge(metrics: Metrics, settings: Settings) -> None:
    metrics.set_build_info(version="0.1.0", model_version="m1", recovery="fsrf", text_encoder="fp32", provider="CPU")
    metrics.set_build_info(version="0.1.0", model_version="m2", recovery="drf", text_encoder="int8", provider="CPU")
    text = metrics.render().decode()
    (info,) = _samples(text, "sentiment_build_info")
    assert info.value == 1.0
    assert info.labels == {"version": "0.1.0", "model_version": "m2", "recovery": "drf", "text_encoder": "int8",
                           "provider": "CPU"}
    assert _samples(text, "sentiment_latency_slo_seconds")[0].value == settings.latency_slo_s == 0.3


def test_kafka_sensor_counts_rebalances_commits_and_produce_outcomes(metrics: Metrics) -> None:
    from stream.service.kafka_sensor import KafkaClientSensor

    sensor = KafkaClientSensor(metrics)
    sensor.on_rebalance_end(None, sensor.on_rebalance_start(None))
    sensor.on_commit_completed(None, sensor.on_commit_initiated(None))
    state = sensor.on_send_initiated(None, "sentiment", None, 3, 40)
    sensor.on_send_completed(None, state, None)
    sensor.on_send_error(None, RuntimeError("broker gone"), sensor.on_send_initiated(None, "posts-dlq", None, 1, 1))
    get = metrics.registry.get_sample_value
    assert get("sentiment_rebalances_total") == 1
    assert get("sentiment_rebalance_duration_seconds_count") == 1
    assert get("sentiment_commit_latency_seconds_count") == 1
    assert get("sentiment_produced_messages_total", {"topic": "sentiment"}) == 1
    assert get("sentiment_produce_errors_total", {"topic": "posts-dlq"}) == 1


async def test_produce_retries_are_counted_from_aiokafkas_retry_warnings(metrics: Metrics) -> None:
    import logging

    from stream.service.kafka_sensor import AIOKAFKA_SENDER_LOGGER, KafkaClientSensor

    sensor = KafkaClientSensor(metrics)
    await sensor.on_start()
    log = logging.getLogger(AIOKAFKA_SENDER_LOGGER)
    try:
        # the two messages aiokafka's sender logs when it re-enqueues a batch
        log.warning("Got error produce response on topic-partition %s, retrying. Error: %s", "posts-0", "NotLeader")
        log.warning("Got error produce response: %s", "KafkaConnectionError")
        log.warning("something else")
    finally:
        await sensor.on_stop()
    log.warning("Got error produce response: %s", "after stop")
    assert metrics.registry.get_sample_value("sentiment_produce_retries_total") == 2
