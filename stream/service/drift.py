"""Drift you can see: how far the live DRF queue has moved from the served model's training-time queue.

The queue in Redis holds the projected features of recent clean, confident posts; its moments (mean and
variance per modality) are what recovery and quality weighting use. :class:`DriftMonitor` compares them,
on a timer, with the moments of the queue the model was trained with (``Manifest.queue_moments``):

* ``sentiment_queue_mean_shift_stddevs{modality}``: the RMS over dimensions of the mean's shift in training
  standard deviations, ``sqrt(mean_j((mu_live_j - mu_train_j)^2 / var_train_j))``. 0 when the queue is the
  training queue; a 1024-vector queue drawn from the training distribution gives about 0.03 (bootstrap resamples
  of the test model's training queue: 0.029-0.033), 600 held-out-topic posts moved the text queue to 0.36.
* ``sentiment_queue_variance_ratio{modality}``: the geometric mean over dimensions of ``var_live / var_train``
  (1 = same spread; < 1 the live posts are more alike than in training, > 1 more varied).

It also keeps the last ``drift_window_posts`` scored posts' missing pattern and quality weights, and publishes
the share of each pattern and the mean quality per modality. deploy/README.md ("SentimentQueueDrift") gives
the alert's threshold and what to do.
"""

from __future__ import annotations

import collections
from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np

from stream.service.events import SentimentEvent
from stream.service.metrics import Metrics
from stream.service.vocabulary import MODALITIES

__all__ = ["DriftMonitor", "mean_shift", "missing_pattern", "variance_ratio"]


def mean_shift(live_mean: np.ndarray, train_mean: np.ndarray, train_var: np.ndarray) -> float:
    """RMS over dimensions of the standardised mean difference."""
    diff = np.asarray(live_mean, np.float64) - np.asarray(train_mean, np.float64)
    return float(np.sqrt(np.mean(diff * diff / np.asarray(train_var, np.float64))))


def variance_ratio(live_var: np.ndarray, train_var: np.ndarray) -> float:
    """Geometric mean over dimensions of live / training variance."""
    return float(np.exp(np.mean(np.log(np.asarray(live_var, np.float64) / np.asarray(train_var, np.float64)))))


def missing_pattern(present: Iterable[str]) -> str:
    """The label of a post's missing modalities: ``none``, ``image``, ``image+transcript``, ..."""
    have = set(present)
    return "+".join(m for m in MODALITIES if m not in have) or "none"


class DriftMonitor:
    """Windowed input mix and quality (fed per batch) and queue drift (refreshed on a timer)."""

    def __init__(self, metrics: Metrics, train_mean: np.ndarray, train_var: np.ndarray, window: int = 1000) -> None:
        self.metrics = metrics
        self.train = {m: (train_mean[i], train_var[i]) for i, m in enumerate(MODALITIES)}
        self.patterns: collections.deque[str] = collections.deque(maxlen=window)
        self.quality: dict[str, collections.deque[float]] = {m: collections.deque(maxlen=window) for m in MODALITIES}

    def observe(self, events: Iterable[SentimentEvent]) -> None:
        for ev in events:
            self.patterns.append(missing_pattern(ev.present))
            for modality, q in ev.quality.items():
                if modality in self.quality:
                    self.quality[modality].append(q)

    def update(self, live_mean: Mapping[str, Any], live_var: Mapping[str, Any]) -> dict[str, tuple[float, float]]:
        """Set every drift gauge; returns ``{modality: (mean shift, variance ratio)}`` for the modalities the
        live queue has statistics for (the others keep their last value)."""
        m = self.metrics
        out = {}
        for modality, (train_mean, train_var) in self.train.items():
            if modality not in live_mean or modality not in live_var:
                continue
            shift = mean_shift(live_mean[modality], train_mean, train_var)
            ratio = variance_ratio(live_var[modality], train_var)
            m.queue_mean_shift.labels(modality).set(shift)
            m.queue_variance_ratio.labels(modality).set(ratio)
            out[modality] = (shift, ratio)
        if self.patterns:
            counts = collections.Counter(self.patterns)
            m.missing_pattern_share.clear()
            for pattern, n in counts.items():
                m.missing_pattern_share.labels(pattern).set(n / len(self.patterns))
        for modality, values in self.quality.items():
            if values:
                m.quality_mean.labels(modality).set(float(np.mean(values)))
        return out
