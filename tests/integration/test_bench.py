"""The bench harness at tiny sizes: it builds the stated mix, measures every part, reports it (no timings asserted)."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest

from stream.service.settings import Settings
from stream.tools import bench
from stream.tools.services import LocalStack


def test_bench_posts_follow_the_stated_mix(sample_benchmark: Path) -> None:
    posts = bench.build_posts(sample_benchmark, "test", 500, bench.MIXES["realistic"], seed=0, run_id="t")
    assert len({p["id"] for p in posts}) == 500
    assert all(p["text"] for p in posts)
    assert 0.3 < sum("image" in p for p in posts) / 500 < 0.5
    assert 0.1 < sum("transcript" in p for p in posts) / 500 < 0.3
    text_only = bench.build_posts(sample_benchmark, "test", 50, bench.MIXES["text"], seed=0, run_id="t")
    assert not any("image" in p or "transcript" in p for p in text_only)


def test_compute_limit_and_head_only_report_rates(served_model: Path, sample_benchmark: Path) -> None:
    posts = bench.build_posts(sample_benchmark, "test", 16, bench.MIXES["realistic"], seed=0, run_id="t")
    values = [bench._encode(p) for p in posts]
    limit = bench.compute_limit(served_model, values, batches=[4, 8], seconds=0.2, procs=1)
    assert limit["best_batch"] in (4, 8)
    assert limit["one_process"] > 0 and limit["per_batch"]["4"]["batch_s_median"] > 0
    head = bench.head_only(served_model, bench.MIXES["realistic"], batches=[8, 32], seconds=0.1, seed=0)
    assert head["rows_s"] > 0 and head["best_batch"] in (8, 32)


def test_pipeline_scores_every_bench_post_and_measures_latency(
    stack: LocalStack, settings: Settings, served_model: Path, sample_benchmark: Path, tmp_path: Path
) -> None:
    mix = bench.MIXES["realistic"]
    posts = bench.build_posts(sample_benchmark, "test", 12, mix, seed=0, run_id=f"sat{tmp_path.name[-6:]}")
    later = bench.build_posts(sample_benchmark, "test", 20, mix, seed=1, run_id=f"lat{tmp_path.name[-6:]}")
    result = asyncio.run(
        bench.pipeline(
            settings.model_copy(update={"model_dir": served_model}),
            ["stream.cli", "worker"],
            1,
            posts,
            later,
            [0.5],
            1.0,
            tmp_path,
            "test",
            0,
            120.0,
        )
    )
    saturation = result["saturation"]
    assert saturation["complete"] and saturation["events"] == 12 and saturation["posts_s"] > 0
    assert result["stage_seconds"]["batch"] > 0
    half = result["latency"]["0.50"]
    assert half["complete"] and half["events"] == half["posts"] >= 1
    assert 0 < half["emit_minus_publish"]["p50"] <= half["emit_minus_publish"]["p99"]
    assert result["duplicates"] == 0


def test_markdown_table_names_every_measurement() -> None:
    run: dict[str, Any] = {
        "mix": "text",
        "a_compute": {"one_process": 100.0, "best_batch": 16, "multi_process": 190.0},
        "a_compute_after": {"one_process": 100.0, "best_batch": 16, "multi_process": 190.0},
        "limit_mean": {"one_process": 100.0, "multi_process": 190.0},
        "b_pipeline_1": {"saturation": {"posts_s": 90.0}, "executor_busy": 0.97},
        "b_pipeline_2": {
            "saturation": {"posts_s": 170.0},
            "executor_busy": 0.95,
            "latency": {
                "0.50": {
                    "emit_minus_publish": {"p50": 0.01, "p95": 0.02, "p99": 0.03},
                    "receive_minus_publish": {"p50": 0.01, "p95": 0.02, "p99": 0.04},
                }
            },
        },
        "c_naive": {"saturation": {"posts_s": 10.0}},
        "d_head": {"rows_s": 1e5},
        "ratios": {"b1_over_a1": 0.9, "bN_over_aN": 170 / 190, "bN_over_c": 17.0, "bN_over_b1": 1.9, "aN_over_a1": 1.9},
        "batch_compute_s": 0.2,
        "p99_at_half_over_batch": 0.15,
        "load_start": 1.0,
        "load_end": 1.5,
    }
    config = {
        "procs": 2,
        "model_version": "v",
        "model_dir": "m",
        "text_encoder": "int8",
        "intra_op_threads": 1,
        "max_batch": 32,
        "max_wait_s": 0.02,
        "repeats": 2,
        "loads": [0.5],
    }
    table = bench.markdown({"config": config, "runs": [run, {**run, "c_naive": {"saturation": {"posts_s": 12.0}}}]})
    assert "| (b)/(a), 2 workers / 2 processes [%] | 89 |" in table
    assert "| (c) naive peer: Faust + PyTorch eager, one post at a time [posts/s] | 11.0 (10.0–12.0) |" in table
    assert "| (b) executor busy, 2 workers [% of wall time] | 95 |" in table
    assert "latency at 50% of saturation, emit − publish, p99 [ms] | 30 |" in table


@pytest.mark.parametrize("name", sorted(bench.MIXES))
def test_every_mix_says_what_it_holds(name: str) -> None:
    assert "text" in bench.MIXES[name].describe()
