"""The one classification-metric definition (stream.tools.classification) against scikit-learn."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from stream.service.vocabulary import LABELS
from stream.tools.classification import (
    METRIC_KEYS,
    classification_metrics,
    f1_per_label,
    label_indices,
    macro_f1,
)

sklearn_metrics = pytest.importorskip("sklearn.metrics")

ALL = list(range(len(LABELS)))


def _sklearn(y_true: np.ndarray, y_pred: np.ndarray, labels: list[int] | None) -> dict[str, float]:
    return {
        "accuracy": sklearn_metrics.accuracy_score(y_true, y_pred),
        "weighted_f1": sklearn_metrics.f1_score(y_true, y_pred, labels=labels, average="weighted", zero_division=0),
        "macro_f1": sklearn_metrics.f1_score(y_true, y_pred, labels=labels, average="macro", zero_division=0),
    }


def _assert_close(got: dict[str, float], expected: dict[str, float]) -> None:
    assert list(got) == list(METRIC_KEYS)
    for key in METRIC_KEYS:
        assert got[key] == pytest.approx(expected[key], abs=1e-12), key


@pytest.mark.parametrize("seed", range(20))
def test_random_arrays_match_scikit_learn(seed: int) -> None:
    rng = np.random.default_rng(seed)
    n = int(rng.integers(1, 400))
    y_true = rng.integers(0, 3, n)
    y_pred = np.where(rng.random(n) < 0.6, y_true, rng.integers(0, 3, n))
    _assert_close(classification_metrics(y_true, y_pred), _sklearn(y_true, y_pred, ALL))
    _assert_close(classification_metrics(y_true, y_pred, "observed"), _sklearn(y_true, y_pred, None))


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 2), st.integers(0, 2)), min_size=1, max_size=60))
def test_any_labelling_matches_scikit_learn(pairs: list[tuple[int, int]]) -> None:
    y_true = np.array([t for t, _ in pairs])
    y_pred = np.array([p for _, p in pairs])
    _assert_close(classification_metrics(y_true, y_pred), _sklearn(y_true, y_pred, ALL))
    _assert_close(classification_metrics(y_true, y_pred, "observed"), _sklearn(y_true, y_pred, None))


def test_label_strings_score_like_their_indices() -> None:
    rng = np.random.default_rng(1)
    y_true, y_pred = rng.integers(0, 3, 200), rng.integers(0, 3, 200)
    as_strings = classification_metrics([LABELS[i] for i in y_true], [LABELS[i] for i in y_pred])
    assert as_strings == classification_metrics(y_true, y_pred)
    np.testing.assert_array_equal(label_indices(["negative", "neutral", "positive"]), [0, 1, 2])


def test_a_class_never_predicted_scores_zero_f1() -> None:
    y_true = np.array([0, 1, 2, 2, 1, 0])
    y_pred = np.array([0, 1, 1, 1, 1, 0])  # positive never predicted
    f1, support, occurs = f1_per_label(y_true, y_pred)
    assert f1[2] == 0.0 and support[2] == 2 and occurs.all()
    _assert_close(classification_metrics(y_true, y_pred), _sklearn(y_true, y_pred, ALL))


def test_a_class_absent_from_y_true_but_predicted() -> None:
    y_true = np.array([0, 0, 1, 1])
    y_pred = np.array([0, 2, 1, 1])  # positive predicted, never true
    f1, support, _ = f1_per_label(y_true, y_pred)
    assert f1[2] == 0.0 and support[2] == 0
    _assert_close(classification_metrics(y_true, y_pred), _sklearn(y_true, y_pred, ALL))
    _assert_close(classification_metrics(y_true, y_pred, "observed"), _sklearn(y_true, y_pred, None))


def test_a_class_absent_from_both_counts_only_when_every_label_is_averaged() -> None:
    y_true = np.array([0, 1, 1, 0])
    y_pred = np.array([0, 1, 0, 0])  # positive nowhere
    every = classification_metrics(y_true, y_pred)
    observed = classification_metrics(y_true, y_pred, "observed")
    assert every["macro_f1"] == pytest.approx(observed["macro_f1"] * 2 / 3)
    assert every["weighted_f1"] == observed["weighted_f1"] and every["accuracy"] == observed["accuracy"]
    _assert_close(every, _sklearn(y_true, y_pred, ALL))
    _assert_close(observed, _sklearn(y_true, y_pred, None))


def test_empty_input_gives_nan_for_every_metric() -> None:
    got = classification_metrics([], [])
    assert list(got) == list(METRIC_KEYS) and all(math.isnan(v) for v in got.values())
    assert all(math.isnan(v) for v in classification_metrics([], [], "observed").values())
    assert math.isnan(float(macro_f1(np.array([], dtype=int), np.array([], dtype=int))))


@pytest.mark.parametrize("label_set", ["all", "observed"])
def test_vectorised_macro_f1_scores_each_row_like_the_single_call(label_set: str) -> None:
    rng = np.random.default_rng(2)
    y_true, y_pred = rng.integers(0, 3, (50, 40)), rng.integers(0, 3, (50, 40))
    y_pred[0] = 0  # a row with two labels never predicted
    rows = macro_f1(y_true, y_pred, label_set)  # type: ignore[arg-type]
    assert rows.shape == (50,)
    expected = [classification_metrics(t, p, label_set)["macro_f1"] for t, p in zip(y_true, y_pred, strict=True)]  # type: ignore[arg-type]
    np.testing.assert_array_equal(rows, expected)


def test_bad_input_is_rejected() -> None:
    with pytest.raises(ValueError, match="unknown label"):
        classification_metrics(["positive"], ["great"])
    with pytest.raises(ValueError, match=r"0\.\.2"):
        classification_metrics([0, 3], [0, 1])
    with pytest.raises(ValueError, match="one length"):
        classification_metrics([0, 1], [0])
    with pytest.raises(ValueError, match="label_set"):
        classification_metrics([0, 1], [0, 1], "some")  # type: ignore[arg-type]
