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
    latency = {
        "0.50": {
            "emit_minus_publish": {"p50": 0.01, "p95": 0.02, "p99": 0.03},
            "receive_minus_publish": {"p50": 0.01, "p95": 0.02, "p99": 0.04},
        }
    }
    cpu = {
        "total_core_share": 1.8,
        "processes": {
            "worker-0": {"cpu_core_share": 0.9, "threads": [{"core_share": 0.85}]},
            "worker-1": {"cpu_core_share": 0.8, "threads": [{"core_share": 0.75}]},
            "broker": {"cpu_core_share": 0.1, "threads": []},
        },
    }
    stages = {"posts": 640.0, "batches": 10.0}
    run: dict[str, Any] = {
        "mix": "text",
        "a_compute": {"one_process": 100.0, "best_batch": 16, "multi_process": 190.0},
        "a_compute_after": {"one_process": 100.0, "best_batch": 16, "multi_process": 190.0},
        "limit_mean": {"one_process": 100.0, "multi_process": 190.0},
        "b_pipeline_1": {"saturation": {"posts_s": 90.0}, "executor_busy": 0.97},
        "b_pipeline_2": {
            "saturation": {"posts_s": 172.0},
            "executor_busy": 0.95,
            "latency": latency,
            "cpu": cpu,
            "stage_seconds": stages,
        },
        "b_pipeline_2_fixed": {
            "saturation": {"posts_s": 160.0},
            "executor_busy": 0.9,
            "latency": latency,
            "stage_seconds": stages,
        },
        "b_cache_stream": {"saturation": {"posts_s": 300.0}, "hit_rate": {"text": 0.5, "image": 0.9}},
        "b_cache_unique": {"saturation": {"posts_s": 170.0}},
        "cache_repetition": {"bench_stream": {"text": 0.5, "image": 0.95, "transcript": 0.2}},
        "c_naive": {"saturation": {"posts_s": 10.0}},
        "d_head": {"rows_s": 1e5},
        "ratios": {
            "b1_over_a1": 0.9,
            "bN_over_aN": 172 / 190,
            "bN_over_c": 17.2,
            "bN_over_b1": 1.9,
            "aN_over_a1": 1.9,
            "bN_fixed_over_aN": 160 / 190,
            "bN_over_bN_fixed": 172 / 160,
            "b_cache_stream_over_c": 30.0,
            "b_cache_unique_over_bN": 170 / 172,
        },
        "p99_over_batch": {"adaptive@0.50": 0.15, "fixed@0.50": 0.15},
        "batch_compute_s": 0.2,
        "load_start": 1.0,
        "load_end": 1.5,
    }
    config = {
        "procs": 2,
        "cpus": 2,
        "model_version": "v",
        "model_dir": "m",
        "text_encoder": "int8",
        "intra_op_threads": 1,
        "max_batch": 32,
        "max_wait_s": 0.02,
        "repeats": 2,
        "loads": [0.5],
        "policies": ["adaptive", "fixed"],
        "adaptive_max_batch": 64,
        "latency_slo_s": 0.25,
    }
    table = bench.markdown({"config": config, "runs": [run, {**run, "c_naive": {"saturation": {"posts_s": 12.0}}}]})
    assert "| (b)/(a), 2 workers / 2 processes, adaptive [%] | 91 |" in table
    assert "| (b)/(a), 2 workers / 2 processes, fixed [%] | 84 |" in table
    assert "| saturated adaptive / fixed, 2 workers [×] | 1.07 |" in table
    assert "| (c) naive peer: Faust + PyTorch eager, one post at a time [posts/s] | 11.0 (10.0–12.0) |" in table
    assert "| (b) executor busy, 2 workers, fixed [% of wall time] | 90 |" in table
    assert "| (b) mean batch, 2 workers, adaptive [posts] | 64.0 |" in table
    assert "| latency at 50% of saturation, fixed, emit − publish, p99 [ms] | 30 |" in table
    assert "| p99 at 50% / one batch's compute, adaptive [×] | 0.15 |" in table
    assert "| cache: repetition of the bench stream, image [% of items seen before] | 95 |" in table
    assert "|     cache hit rate, transcript [%] | – |" in table  # not measured: an empty cell, not an error
    assert "| (b) + cache / (b), no-repeat stream [×] | 0.99 |" in table
    assert "|     its scoring thread [% of a core] | 80 |" in table
    assert "|     all of these [% of the machine] | 90 |" in table


def test_repetition_model_and_no_repeat_stream() -> None:
    png = b"\x89PNG...IEND\xaeB`\x82"
    posts = [{"id": str(i), "text": "same" if i % 2 else f"t{i}", "image": png} for i in range(10)]
    rep = bench.repetition(posts)
    assert rep["image"] == 0.9 and rep["text"] == pytest.approx(0.4) and rep["transcript"] != rep["transcript"]
    unique = bench.no_repeat(posts)
    assert bench.repetition(unique)["text"] == 0.0 and bench.repetition(unique)["image"] == 0.0
    assert all(p["image"].startswith(png) for p in unique) and unique[1]["text"].startswith("same")


def test_no_repeat_images_decode_to_the_same_pixels(sample_benchmark: Path) -> None:
    from stream.service.events import decode_image

    posts = bench.build_posts(sample_benchmark, "test", 20, bench.MIXES["realistic"], seed=0, run_id="u")
    original = next(p for p in posts if "image" in p)
    changed = next(p for p in bench.no_repeat([original]))
    assert changed["image"] != original["image"]
    a, b = decode_image(original["image"], 10**8), decode_image(changed["image"], 10**8)
    assert a.size == b.size and a.tobytes() == b.tobytes()


@pytest.mark.parametrize("name", sorted(bench.MIXES))
def test_every_mix_says_what_it_holds(name: str) -> None:
    assert "text" in bench.MIXES[name].describe()
