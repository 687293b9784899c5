"""Drift gauges: the live queue's distance from the training queue, the input mix, the mean quality."""

from __future__ import annotations

import numpy as np
import pytest

from stream.service.drift import DriftMonitor, mean_shift, missing_pattern, variance_ratio
from stream.service.events import SentimentEvent
from stream.service.metrics import Metrics
from stream.service.settings import Settings


def test_shift_and_ratio_are_zero_and_one_on_the_training_moments_and_scale_as_documented() -> None:
    rng = np.random.default_rng(0)
    mean, var = rng.normal(size=16), rng.uniform(0.5, 2.0, size=16)
    assert mean_shift(mean, mean, var) == 0.0
    assert variance_ratio(var, var) == pytest.approx(1.0)
    assert mean_shift(mean + 0.5 * np.sqrt(var), mean, var) == pytest.approx(0.5)  # half a std on every dim
    assert variance_ratio(4 * var, var) == pytest.approx(4.0)


def test_missing_pattern_names() -> None:
    assert missing_pattern(("text", "image", "transcript")) == "none"
    assert missing_pattern(("text",)) == "image+transcript"
    assert missing_pattern(("image", "transcript")) == "text"


def _event(present: tuple[str, ...], quality: float) -> SentimentEvent:
    return SentimentEvent(id="p", label="neutral", probs=(0.2, 0.6, 0.2), present=present, recovered=(),
                          quality=dict.fromkeys(present, quality), recovery="fsrf", model="m", event_ts=0.0,
                          emit_ts=0.0)


def test_monitor_sets_every_gauge() -> None:
    metrics = Metrics(Settings(), process_metrics=False)
    train_mean, train_var = np.zeros((3, 4), np.float32), np.ones((3, 4), np.float32)
    drift = DriftMonitor(metrics, train_mean, train_var, window=4)
    drift.observe([_event(("text",), 0.2)] * 3 + [_event(("text", "image", "transcript"), 0.6)] * 3)
    out = drift.update({"text": np.full(4, 1.0), "image": np.zeros(4)}, {"text": np.full(4, 0.25), "image": np.ones(4)})
    assert out == {"text": (1.0, pytest.approx(0.25)), "image": (0.0, 1.0)}
    get = metrics.registry.get_sample_value
    assert get("sentiment_queue_mean_shift_stddevs", {"modality": "text"}) == 1.0
    assert get("sentiment_queue_variance_ratio", {"modality": "text"}) == pytest.approx(0.25)
    assert get("sentiment_queue_mean_shift_stddevs", {"modality": "transcript"}) is None  # no live statistics
    # window of 4: one text-only post and three complete ones
    assert get("sentiment_missing_pattern_share_ratio", {"missing": "image+transcript"}) == 0.25
    assert get("sentiment_missing_pattern_share_ratio", {"missing": "none"}) == 0.75
    assert get("sentiment_quality_mean_ratio", {"modality": "text"}) == pytest.approx((0.2 + 3 * 0.6) / 4)
    assert get("sentiment_quality_mean_ratio", {"modality": "image"}) == pytest.approx(0.6)
