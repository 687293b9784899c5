"""Accuracy, weighted F1 and macro F1: the one definition every report, evaluation and export check uses.

Labels are indices into :data:`~stream.service.vocabulary.LABELS` or the label strings themselves. The
definitions are scikit-learn's ``accuracy_score`` and ``f1_score(average="weighted" | "macro",
zero_division=0)``: a label with no true and no predicted instance scores F1 0, as does one never
predicted. Which labels macro F1 averages over is the caller's choice (``label_set``):

* ``"all"`` — the three labels, like ``f1_score(labels=[0, 1, 2])``: an absent label counts 0. Training,
  evaluation, the baselines and the export's int8 check use this.
* ``"observed"`` — the labels seen in ``y_true`` or ``y_pred``, like ``f1_score`` without ``labels``.
  The replay report uses this, so a small group (one missing pattern, say) is not marked down for a
  label it never contains.

Weighted F1 is the same under both (an absent label has no support). Empty input gives NaN for every
metric. :func:`macro_f1` and :func:`f1_per_label` also take ``[..., n]`` arrays and score each row, so a
bootstrap scores all its resamples in one vectorised call. numpy only: the ``stream`` package does not
depend on scikit-learn.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Final, Literal

import numpy as np

from stream.service.vocabulary import LABELS

__all__ = ["METRIC_KEYS", "LabelSet", "classification_metrics", "f1_per_label", "label_indices", "macro_f1"]

METRIC_KEYS: Final = ("accuracy", "weighted_f1", "macro_f1")
LabelSet = Literal["all", "observed"]

_INDEX: Final = {label: i for i, label in enumerate(LABELS)}


def label_indices(labels: Sequence[str] | Sequence[int] | np.ndarray) -> np.ndarray:
    """int64 indices into :data:`LABELS` of label strings or label indices (any shape).

    Raises :class:`ValueError` for a string that is not a label or an index outside ``0..len(LABELS)-1``.
    """
    array = np.asarray(labels)
    if array.size == 0:
        return np.zeros(array.shape, dtype=np.int64)
    if array.dtype.kind in "iu":
        index = array.astype(np.int64, copy=False)
        if index.min() < 0 or index.max() >= len(LABELS):
            raise ValueError(f"label indices must lie in 0..{len(LABELS) - 1}, got {index.min()}..{index.max()}")
        return index
    if array.dtype.kind in "UO":
        try:
            return np.vectorize(_INDEX.__getitem__, otypes=[np.int64])(array)
        except KeyError as exc:
            raise ValueError(f"unknown label {exc.args[0]!r} (labels: {', '.join(LABELS)})") from None
    raise ValueError(f"labels must be label strings or integer indices, got dtype {array.dtype}")


def f1_per_label(
    y_true: Sequence[str] | Sequence[int] | np.ndarray, y_pred: Sequence[str] | Sequence[int] | np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """F1, support (true count) and whether the label occurs at all, per label along the last axis.

    ``y_true`` and ``y_pred`` have the same shape ``[..., n]``; the results are ``[..., len(LABELS)]``.
    F1 is ``2 tp / (true count + predicted count)``, 0 where that count is 0 (scikit-learn's
    ``zero_division=0``).
    """
    true, pred = label_indices(y_true), label_indices(y_pred)
    if true.shape != pred.shape:
        raise ValueError(f"y_true and y_pred differ in shape: {true.shape} vs {pred.shape}")
    if true.ndim == 0:
        raise ValueError("y_true and y_pred must be arrays of labels, not single labels")
    shape = (*true.shape[:-1], len(LABELS))
    f1, support, occurs = np.zeros(shape), np.zeros(shape), np.zeros(shape, dtype=bool)
    for c in range(len(LABELS)):
        is_true, is_pred = true == c, pred == c
        tp = (is_true & is_pred).sum(-1)
        n_true = is_true.sum(-1)
        denom = n_true + is_pred.sum(-1)
        f1[..., c] = np.divide(2 * tp, denom, out=np.zeros(np.shape(denom)), where=denom > 0)
        support[..., c] = n_true
        occurs[..., c] = denom > 0
    return f1, support, occurs


def _macro(f1: np.ndarray, occurs: np.ndarray, label_set: LabelSet) -> np.ndarray:
    if label_set == "all":
        result: np.ndarray = f1.sum(-1) / f1.shape[-1]
        return result
    if label_set == "observed":
        counted = occurs.sum(-1)
        return np.divide((f1 * occurs).sum(-1), counted, out=np.full(np.shape(counted), np.nan), where=counted > 0)
    raise ValueError(f"label_set must be 'all' or 'observed', got {label_set!r}")


def macro_f1(
    y_true: Sequence[str] | Sequence[int] | np.ndarray,
    y_pred: Sequence[str] | Sequence[int] | np.ndarray,
    label_set: LabelSet = "all",
) -> np.ndarray:
    """Macro F1 of each row of ``[..., n]`` label arrays (a 0-d array for 1-d input); NaN for an empty row."""
    f1, support, occurs = f1_per_label(y_true, y_pred)
    empty = support.sum(-1) == 0
    return np.where(empty, np.nan, _macro(f1, occurs, label_set))


def classification_metrics(
    y_true: Sequence[str] | Sequence[int] | np.ndarray,
    y_pred: Sequence[str] | Sequence[int] | np.ndarray,
    label_set: LabelSet = "all",
) -> dict[str, float]:
    """``accuracy``, ``weighted_f1`` and ``macro_f1`` of predicted labels against true ones (1-d inputs)."""
    true, pred = label_indices(y_true), label_indices(y_pred)
    if true.ndim != 1 or true.shape != pred.shape:
        raise ValueError(f"y_true and y_pred must be 1-d and of one length, got {true.shape} and {pred.shape}")
    if len(true) == 0:
        return dict.fromkeys(METRIC_KEYS, float("nan"))
    f1, support, occurs = f1_per_label(true, pred)
    return {
        "accuracy": float(np.mean(true == pred)),
        "weighted_f1": float(np.sum(f1 * support) / support.sum()),
        "macro_f1": float(_macro(f1, occurs, label_set)),
    }
