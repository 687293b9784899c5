"""Queue moments: the per-dimension mean and variance the DRF quality compares a feature with.

One definition for training (the queue snapshot), export (the manifest's fallback moments) and serving
(running sums kept in Redis), so the three cannot drift apart.
"""

from __future__ import annotations

from typing import Final

import numpy as np

__all__ = ["QUEUE_VAR_FLOOR", "moments_from_sums", "moments_of_rows"]

# Variance floor: a dimension that never varies in the queue would otherwise divide by zero, and running
# sums can cancel to a tiny negative variance.
QUEUE_VAR_FLOOR: Final = 1e-4


def moments_from_sums(
    count: float, total: np.ndarray, sumsq: np.ndarray, var_floor: float = QUEUE_VAR_FLOOR
) -> tuple[np.ndarray, np.ndarray]:
    """Mean and biased variance (float32) from a count, a sum and a sum of squares; variance floored."""
    mean = total / count
    var = np.maximum(sumsq / count - mean * mean, var_floor)
    return mean.astype(np.float32), var.astype(np.float32)


def moments_of_rows(rows: np.ndarray, var_floor: float = QUEUE_VAR_FLOOR) -> tuple[np.ndarray, np.ndarray]:
    """Mean and biased variance (float32) of ``rows`` [n, d]; variance floored."""
    rows = np.asarray(rows, np.float64)
    return rows.mean(0).astype(np.float32), np.maximum(rows.var(0), var_floor).astype(np.float32)
