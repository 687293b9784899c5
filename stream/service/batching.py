"""How big the next micro-batch may be and how long the agent may wait to fill it.

The agent asks its :class:`BatchPolicy` before every batch (:meth:`BatchPolicy.next_batch`) and tells it
afterwards what happened (:meth:`BatchPolicy.observe`), so a policy can follow the backlog and the latency
SLO. :class:`FixedBatchPolicy` is today's behaviour: ``max_batch`` records, waiting at most ``max_wait_s``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from stream.service.settings import Settings

__all__ = ["BatchPlan", "BatchPolicy", "FixedBatchPolicy", "batch_policy"]


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

    def __init__(self, settings: Settings) -> None:
        self.plan = BatchPlan(settings.max_batch, settings.max_wait_s)

    def next_batch(self, backlog: int) -> BatchPlan:
        return self.plan

    def observe(self, n_records: int, compute_s: float, backlog: int) -> None:
        return None


def batch_policy(settings: Settings) -> BatchPolicy:
    """The policy the settings ask for."""
    return FixedBatchPolicy(settings)
