"""How big the next micro-batch may be and how long the agent may wait to fill it.

The agent asks its :class:`BatchPolicy` before every batch (:meth:`BatchPolicy.next_batch`) and tells it
afterwards what happened (:meth:`BatchPolicy.observe`), so a policy can follow the backlog and the latency
SLO. :func:`batch_policy` builds the one ``settings.batch_policy`` names:

* :class:`FixedBatchPolicy` (``fixed``): ``max_batch`` records, waiting at most ``max_wait_s`` — the
  behaviour before the adaptive policy.
* :class:`AdaptiveBatchPolicy` (``adaptive``, the default): three regimes, from the backlog (records known
  to wait) and an estimate of the compute seconds per record learnt from :meth:`observe`:

  - **light** (nothing waits): batches of at most the *SLO size* — the most records whose compute fits
    half of ``latency_slo_s`` — waiting at most ``max_wait_s`` (capped at a tenth of the SLO) for them;
  - **busy** (fewer than an SLO size wait): the SLO size, **never waiting**: take what is there;
  - **backlog** (an SLO size or more waits): the throughput size (``adaptive_max_batch``; 64 on CPU, the
    compute limit's best batch in docs/performance.md; 256 on CUDA), never waiting, until it is drained.

  When the agent cannot tell the backlog (it passes 0), a batch that came back full counts as evidence
  of one. The size it chooses is the gauge ``sentiment_batch_plan_records``.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Final, Protocol

from stream.service.metrics import Metrics, get_metrics
from stream.service.settings import Settings

__all__ = [
    "NO_WAIT_S",
    "AdaptiveBatchPolicy",
    "BatchPlan",
    "BatchPolicy",
    "FixedBatchPolicy",
    "batch_capacity",
    "batch_policy",
]

# "Do not wait": the smallest wait a plan asks for (a stream's timer needs a positive one).
NO_WAIT_S: Final = 0.001
log = logging.getLogger(__name__)

_CPU_THROUGHPUT_BATCH: Final = 64  # best batch of the 2-process compute limit on CPU (docs/performance.md)
_GPU_THROUGHPUT_BATCH: Final = 256


@dataclass(frozen=True, slots=True)
class BatchPlan:
    """The next batch: at most ``max_records``, waiting at most ``max_wait_s`` for it to fill."""

    max_records: int
    max_wait_s: float


class BatchPolicy(Protocol):
    def next_batch(self, backlog: int) -> BatchPlan:
        """The plan for the next batch; ``backlog`` is the records known to wait (buffered + lag), 0 if unknown."""
        ...

    def observe(self, n_records: int, compute_s: float, backlog: int) -> None:
        """What the last batch was: its size, the seconds it took to score, the backlog after it."""
        ...


class FixedBatchPolicy:
    """Always ``settings.max_batch`` records within ``settings.max_wait_s``."""

    def __init__(self, settings: Settings, metrics: Metrics | None = None) -> None:
        self.plan = BatchPlan(settings.max_batch, settings.max_wait_s)
        if metrics is not None:
            metrics.batch_plan.set(self.plan.max_records)

    def next_batch(self, backlog: int) -> BatchPlan:
        return self.plan

    def observe(self, n_records: int, compute_s: float, backlog: int) -> None:
        return None


class AdaptiveBatchPolicy:
    """Batch size and wait from the backlog and the latency SLO (see the module docstring)."""

    #: share of the SLO one batch's compute may take (the rest: waiting for it, the queue before it, produce)
    slo_share: Final = 0.5
    #: weight of the newest batch in the per-record compute estimate
    smoothing: Final = 0.2

    def __init__(self, settings: Settings, metrics: Metrics | None = None) -> None:
        self.max_records = batch_capacity(settings)
        self.slo_s = settings.latency_slo_s
        self.light_wait_s = max(NO_WAIT_S, min(settings.max_wait_s, self.slo_s / 10))
        # Until the first batch is observed: the fixed policy's size (a measured, safe size).
        self.first_size = max(1, min(settings.max_batch, self.max_records))
        self.per_record_s: float | None = None
        self.metrics = metrics
        self._pressure = 0  # backlog evidence from the last observed batch
        self._last_plan = BatchPlan(self.first_size, self.light_wait_s)

    @property
    def slo_size(self) -> int:
        """The most records whose compute fits ``slo_share`` of the SLO (1 … ``max_records``)."""
        if self.per_record_s is None or self.per_record_s <= 0:
            return self.first_size
        return max(1, min(self.max_records, math.floor(self.slo_share * self.slo_s / self.per_record_s)))

    def next_batch(self, backlog: int) -> BatchPlan:
        pressure = max(backlog, self._pressure)
        size = self.slo_size
        if pressure <= 0:
            plan = BatchPlan(size, self.light_wait_s)  # light: small batches, a short wait
        elif pressure < size:
            plan = BatchPlan(size, NO_WAIT_S)  # busy: take what is there
        else:
            plan = BatchPlan(self.max_records, NO_WAIT_S)  # backlog: the throughput size until drained
        self._last_plan = plan
        if self.metrics is not None:
            self.metrics.batch_plan.set(plan.max_records)
        return plan

    def observe(self, n_records: int, compute_s: float, backlog: int) -> None:
        if n_records > 0 and compute_s > 0 and math.isfinite(compute_s):
            per_record = compute_s / n_records
            if self.per_record_s is None:
                self.per_record_s = per_record
            else:
                self.per_record_s += self.smoothing * (per_record - self.per_record_s)
        if backlog > 0:
            self._pressure = backlog
        else:  # unknown or none: a batch that came back full says more were probably waiting
            self._pressure = n_records if n_records >= self._last_plan.max_records else 0


def batch_capacity(settings: Settings) -> int:
    """The most records any plan of the configured policy asks for: what the agent's buffer must hold."""
    if settings.batch_policy == "fixed":
        return settings.max_batch
    default = _GPU_THROUGHPUT_BATCH if settings.providers == "cuda" else _CPU_THROUGHPUT_BATCH
    return max(settings.max_batch, settings.adaptive_max_batch or default)


def batch_policy(settings: Settings, metrics: Metrics | None = None) -> BatchPolicy:
    """The policy ``settings.batch_policy`` names, reporting its chosen size to ``metrics`` (default: the process's)."""
    metrics = metrics or get_metrics()
    if settings.batch_policy == "fixed":
        log.info("batch policy: fixed, %d records within %.3f s", settings.max_batch, settings.max_wait_s)
        return FixedBatchPolicy(settings, metrics)
    policy = AdaptiveBatchPolicy(settings, metrics)
    log.info(
        "batch policy: adaptive, up to %d records; SLO %.3f s (a batch's compute ≤ %.0f %% of it); "
        "light-stream wait %.3f s",
        policy.max_records,
        policy.slo_s,
        100 * policy.slo_share,
        policy.light_wait_s,
    )
    return policy
