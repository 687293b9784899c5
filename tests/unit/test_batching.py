"""The batch policies' decisions, and a simulated queue where the adaptive policy must beat the fixed one."""

from __future__ import annotations

import heapq

import numpy as np
import pytest

from stream.service.batching import (
    NO_WAIT_S,
    AdaptiveBatchPolicy,
    BatchPolicy,
    FixedBatchPolicy,
    batch_capacity,
    batch_policy,
)
from stream.service.metrics import Metrics
from stream.service.settings import Settings

SETTINGS = Settings(max_batch=32, max_wait_s=0.02, latency_slo_s=0.25)


def test_fixed_policy_is_the_settings() -> None:
    policy = FixedBatchPolicy(SETTINGS)
    assert policy.next_batch(0) == policy.next_batch(10_000)
    assert (policy.next_batch(5).max_records, policy.next_batch(5).max_wait_s) == (32, 0.02)


def test_adaptive_light_stream_small_batches_short_wait() -> None:
    policy = AdaptiveBatchPolicy(SETTINGS)
    policy.observe(4, 4 * 0.010, 0)  # 10 ms per record: half the SLO holds 12
    plan = policy.next_batch(0)
    assert plan.max_records == 12 and plan.max_wait_s == pytest.approx(0.02)


def test_adaptive_never_waits_once_records_wait_and_takes_the_throughput_size_on_a_backlog() -> None:
    policy = AdaptiveBatchPolicy(SETTINGS)
    policy.observe(8, 8 * 0.002, 0)  # 2 ms per record: SLO size 62
    busy = policy.next_batch(5)
    assert busy.max_wait_s == NO_WAIT_S and busy.max_records == 62
    backlog = policy.next_batch(500)
    assert backlog == policy.next_batch(64) and backlog.max_records == 64 and backlog.max_wait_s == NO_WAIT_S


def test_adaptive_reads_a_full_batch_as_a_backlog_when_the_agent_cannot_tell() -> None:
    policy = AdaptiveBatchPolicy(SETTINGS)
    plan = policy.next_batch(0)
    policy.observe(plan.max_records, 0.1, 0)  # came back full, backlog unknown
    assert policy.next_batch(0).max_wait_s == NO_WAIT_S
    policy.observe(3, 0.01, 0)
    assert policy.next_batch(0).max_wait_s > NO_WAIT_S


def test_slo_size_follows_the_measured_compute_and_stays_in_bounds() -> None:
    policy = AdaptiveBatchPolicy(SETTINGS)
    assert policy.slo_size == 32  # nothing measured yet: the fixed size
    policy.observe(1, 10.0, 0)
    assert policy.slo_size == 1
    for _ in range(60):
        policy.observe(64, 64 * 1e-5, 0)
    assert policy.slo_size == 64


def test_capacity_metric_and_settings_choice() -> None:
    assert batch_capacity(SETTINGS) == 64
    assert batch_capacity(SETTINGS.model_copy(update={"providers": "cuda"})) == 256
    assert batch_capacity(SETTINGS.model_copy(update={"batch_policy": "fixed"})) == 32
    metrics = Metrics(SETTINGS, process_metrics=False)
    policy = batch_policy(SETTINGS, metrics)
    assert isinstance(policy, AdaptiveBatchPolicy)
    policy.next_batch(1000)
    assert metrics.registry.get_sample_value("sentiment_batch_plan_records") == 64
    assert isinstance(batch_policy(SETTINGS.model_copy(update={"batch_policy": "fixed"}), metrics), FixedBatchPolicy)
    assert metrics.registry.get_sample_value("sentiment_batch_plan_records") == 32


# -- a simulated worker --------------------------------------------------------------------------
# One scoring thread; a batch of n costs OVERHEAD + n * PER_RECORD seconds (produce, acks, loop: the
# per-batch part measured in docs/performance.md). The agent takes what waits, up to the plan's size,
# waiting up to the plan's wait after the first record, as the worker's buffer does.
OVERHEAD, PER_RECORD = 0.012, 0.004


def simulate(policy: BatchPolicy, rate: float, seconds: float, seed: int = 0) -> tuple[float, float]:
    """(p99 latency, mean batch size) of Poisson arrivals at ``rate`` per second."""
    rng = np.random.default_rng(seed)
    arrivals = np.cumsum(rng.exponential(1 / rate, int(rate * seconds)))
    latencies, sizes = [], []
    now, i = 0.0, 0
    waiting: list[float] = []
    while i < len(arrivals) or waiting:
        while i < len(arrivals) and arrivals[i] <= now:
            heapq.heappush(waiting, float(arrivals[i]))
            i += 1
        if not waiting:
            now = float(arrivals[i])
            continue
        plan = policy.next_batch(len(waiting))
        deadline = now + plan.max_wait_s
        while len(waiting) < plan.max_records and i < len(arrivals) and arrivals[i] <= deadline:
            heapq.heappush(waiting, float(arrivals[i]))
            i += 1
        if len(waiting) < plan.max_records:
            now = max(now, deadline if i < len(arrivals) else now)
        else:
            now = max(now, waiting[plan.max_records - 1])
        batch = [heapq.heappop(waiting) for _ in range(min(plan.max_records, len(waiting)))]
        compute = OVERHEAD + len(batch) * PER_RECORD
        now += compute
        latencies += [now - t for t in batch]
        sizes.append(len(batch))
        while i < len(arrivals) and arrivals[i] <= now:
            heapq.heappush(waiting, float(arrivals[i]))
            i += 1
        policy.observe(len(batch), compute, len(waiting))
    return float(np.percentile(latencies, 99)), float(np.mean(sizes))


def test_simulated_adaptive_policy_holds_latency_where_the_fixed_one_queues() -> None:
    saturation = 32 / (OVERHEAD + 32 * PER_RECORD)  # the fixed policy's throughput (≈ 229/s)
    batch_compute = OVERHEAD + 32 * PER_RECORD
    results = {}
    for load in (0.25, 0.5, 0.8, 0.95):
        fixed = simulate(FixedBatchPolicy(SETTINGS), load * saturation, 20)
        adaptive = simulate(AdaptiveBatchPolicy(SETTINGS), load * saturation, 20)
        results[load] = (fixed, adaptive)
    # light: the adaptive batches stay small
    assert results[0.25][1][1] < 4
    # every load up to 80 %: p99 within 3x one batch's compute, and never worse than fixed by more than a batch
    for load in (0.25, 0.5, 0.8):
        fixed, adaptive = results[load]
        assert adaptive[0] <= 3 * batch_compute, (load, results)
        assert adaptive[0] <= fixed[0] + batch_compute, (load, results)
    # near saturation the fixed size queues; the adaptive one grows its batches and keeps up
    assert results[0.95][1][0] < results[0.95][0][0]
    assert results[0.95][1][1] > 32 * 0.5
