"""The statistics and AUROC helpers of models/experiments/quality_auroc.py, on small synthetic arrays."""

from __future__ import annotations

import numpy as np
import pytest

from models.experiments.quality_auroc import (
    KINDS,
    Encoded,
    _stack,
    auroc,
    bootstrap_auroc,
    cell_rng,
    knn_distance,
    markdown_table,
    meets_targets,
    paired_auroc,
    queue_stats,
    stat_names,
    target_of,
    today_quality,
)
from stream.tools.faults import IMAGE_CORRUPTIONS, TEXT_CORRUPTIONS


def test_auroc_perfect_inverse_and_ties() -> None:
    assert auroc(np.array([3.0, 4.0]), np.array([1.0, 2.0])) == 1.0
    assert auroc(np.array([1.0, 2.0]), np.array([3.0, 4.0])) == 0.0
    assert auroc(np.array([1.0, 1.0]), np.array([1.0])) == 0.5
    # one of four pairs wrong, one tied: (2 + 0.5) / 4
    assert auroc(np.array([2.0, 3.0]), np.array([1.0, 2.0])) == pytest.approx(3.5 / 4)
    with pytest.raises(ValueError):
        auroc(np.array([]), np.array([1.0]))


def test_auroc_matches_brute_force() -> None:
    rng = np.random.default_rng(0)
    a, b = rng.integers(0, 5, 40).astype(float), rng.integers(0, 5, 30).astype(float)
    brute = np.mean([(x > y) + 0.5 * (x == y) for x in a for y in b])
    assert auroc(a, b) == pytest.approx(brute)


def test_paired_auroc_weights_are_multiplicities() -> None:
    rng = np.random.default_rng(1)
    clean, corrupted = rng.normal(1.0, 1.0, 25), rng.normal(0.0, 1.0, 25)
    clean[3] = corrupted[7]  # a tie across the two sides
    assert paired_auroc(clean, corrupted) == pytest.approx(auroc(clean, corrupted))
    w = rng.integers(0, 4, 25)
    w[0] = 1
    expanded = np.repeat(np.arange(25), w)
    assert paired_auroc(clean, corrupted, w) == pytest.approx(auroc(clean[expanded], corrupted[expanded]))
    with pytest.raises(ValueError):
        paired_auroc(clean, corrupted[:-1])


def test_bootstrap_interval_brackets_the_point_and_groups_widen_it() -> None:
    rng = np.random.default_rng(2)
    clean, corrupted = rng.normal(0.5, 1.0, 200), rng.normal(0.0, 1.0, 200)
    point, low, high = bootstrap_auroc(clean, corrupted, [str(i) for i in range(200)], 300, np.random.default_rng(0))
    assert low < point < high
    assert point == pytest.approx(auroc(clean, corrupted))
    # the same 20 items repeated 10 times: the rows are not independent, the interval must be wider
    items = rng.normal(0.5, 1.0, 20)
    clean_rep = np.repeat(items, 10) + rng.normal(0, 0.01, 200)
    groups = np.repeat([f"g{i}" for i in range(20)], 10)
    _, lo_g, hi_g = bootstrap_auroc(clean_rep, corrupted, groups, 300, np.random.default_rng(0))
    _, lo_i, hi_i = bootstrap_auroc(clean_rep, corrupted, [str(i) for i in range(200)], 300, np.random.default_rng(0))
    assert hi_g - lo_g > 1.5 * (hi_i - lo_i)


def test_today_quality_is_the_served_formula() -> None:
    mean, var = np.zeros(4), np.ones(4)
    h = np.array([[0.0, 0.0, 0.0, 0.0], [2.0, 2.0, 2.0, 2.0], [1.0, 1.0, 1.0, 1.0]])
    q = today_quality(h, mean, var, tau=1.0)
    # D = 0 and D = 1 are "typical" (q = 1); D = 4 -> exp(-3)
    assert q[0] == pytest.approx(1.0)
    assert q[2] == pytest.approx(1.0, abs=1e-5)
    assert q[1] == pytest.approx(np.exp(-3.0), rel=1e-5)
    assert today_quality(h, mean, var, tau=2.0)[1] == pytest.approx(np.exp(-1.5), rel=1e-5)


def test_queue_stats_columns() -> None:
    rng = np.random.default_rng(3)
    mean, var = rng.normal(0, 1, 8), rng.uniform(0.5, 2.0, 8)
    h = rng.normal(0, 1, (5, 8))
    stats = queue_stats(h, mean, var)
    names = stat_names()
    assert stats.shape == (5, len(names))
    z = (h - mean) / np.sqrt(var + 1e-6)
    col = dict(zip(names, stats.T, strict=True))
    np.testing.assert_allclose(col["D"], (z * z).mean(1))
    np.testing.assert_allclose(col["abs_log_D"], np.abs(np.log((z * z).mean(1))), rtol=1e-9)
    np.testing.assert_allclose(col["max_abs_z"], np.abs(z).max(1))
    # a row at the queue mean is maximally "too typical"
    at_mean = queue_stats(mean[None, :], mean, var)
    assert dict(zip(names, at_mean[0], strict=True))["D"] == pytest.approx(0.0)


def test_knn_distance_finds_the_nearest_rows() -> None:
    rows = np.array([[0.0, 0.0], [1.0, 0.0], [10.0, 0.0]])
    var = np.array([1.0, 4.0])
    h = np.array([[0.0, 0.0], [0.0, 2.0]])
    d = knn_distance(h, rows, var, ks=(1, 2))
    assert d.shape == (2, 2)
    assert d[0, 0] == pytest.approx(0.0, abs=1e-6)
    assert d[0, 1] == pytest.approx(0.5 * (0.0 + 1.0) / np.sqrt(2), rel=1e-5)
    # second row: z-distance to (0,0) is 2/2 = 1 (the variance of dim 1 is 4)
    assert d[1, 0] == pytest.approx(1.0 / np.sqrt(2), rel=1e-5)


def test_stack_balances_clean_and_corrupted() -> None:
    feats = {"clean": np.zeros((3, 2)), "a": np.ones((3, 2)), "b": 2 * np.ones((3, 2))}
    x, y = _stack(feats, ["a", "b"])
    assert x.shape == (12, 2)
    assert y.sum() == 6
    assert (x[y == 0] == 0).all()


def test_targets_and_summary() -> None:
    assert KINDS["text"] == tuple(TEXT_CORRUPTIONS)
    assert KINDS["image"] == tuple(IMAGE_CORRUPTIONS)
    assert target_of("mask") == 0.90
    assert target_of("jpeg") == 0.75
    results = [
        {"modality": "text", "kind": "mask", "option": "today", "fit": "none", "auroc": 0.95, "ci_low": 0.9,
         "ci_high": 0.99},
        {"modality": "text", "kind": "typos", "option": "today", "fit": "none", "auroc": 0.70, "ci_low": 0.6,
         "ci_high": 0.8},
    ]
    summary = meets_targets(results, "today", "none")
    assert summary["met"] == 1
    assert summary["misses"] == ["text/typos 0.700"]
    table = markdown_table(results, "pooled")
    assert "**0.950**" in table
    assert "| text | typos | 0.75 |" in table


def test_encoded_rows_line_up() -> None:
    enc = Encoded(ids=["a"], groups=["g"], raw={"clean": np.zeros((1, 2))}, projected={"clean": np.zeros((1, 2))},
                  quality={"clean": np.ones(1)}, rates={})
    assert enc.raw["clean"].shape[0] == len(enc.ids) == len(enc.groups)


def test_cell_rng_depends_on_the_cell_only() -> None:
    a = cell_rng(0, "text", "mask", "today", "none").integers(1 << 30, size=4)
    assert (a == cell_rng(0, "text", "mask", "today", "none").integers(1 << 30, size=4)).all()
    assert (a != cell_rng(0, "text", "mask", "learned_z", "pooled").integers(1 << 30, size=4)).any()
    assert (a != cell_rng(1, "text", "mask", "today", "none").integers(1 << 30, size=4)).any()
