"""The robustness regression gate: which fault groups fell, by how much, and what is too small to judge."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest

from stream.tools.report import baseline_record, regression_gate


def _report(clean: float, text: float, n_text: int = 50) -> dict[str, Any]:
    def m(f1: float, n: int) -> dict[str, float | int]:
        return {"n": n, "accuracy": f1, "weighted_f1": f1, "macro_f1": f1}

    return {
        "metrics": {
            "served": {
                "overall": m((clean + text) / 2, 200),
                "fault": {"clean": m(clean, 150), "corrupt:text": m(text, n_text), "drop:image": m(0.7, 5)},
            }
        }
    }


def test_the_gate_passes_an_equal_or_better_run() -> None:
    base = _report(0.80, 0.60)
    assert regression_gate(base, base) == []
    assert regression_gate(_report(0.81, 0.65), base) == []


def test_the_gate_names_each_group_that_fell_by_more_than_the_tolerance() -> None:
    failures = regression_gate(_report(0.80, 0.55), _report(0.80, 0.60), tolerance=0.01)
    assert len(failures) == 2  # overall and corrupt:text
    assert any(f.startswith("fault corrupt:text:") and "-0.0500" in f for f in failures)
    assert regression_gate(_report(0.80, 0.595), _report(0.80, 0.60), tolerance=0.01) == []


def test_small_groups_are_not_judged_and_missing_groups_fail() -> None:
    base = _report(0.80, 0.60)
    worse_small = copy.deepcopy(base)
    worse_small["metrics"]["served"]["fault"]["drop:image"]["macro_f1"] = 0.1  # n = 5 < min_posts
    assert regression_gate(worse_small, base) == []
    missing = copy.deepcopy(base)
    del missing["metrics"]["served"]["fault"]["corrupt:text"]
    assert regression_gate(missing, base) == ["fault corrupt:text: in the baseline (n=50) but not in this run"]
    nan = _report(0.80, float("nan"))
    assert any("corrupt:text" in f for f in regression_gate(nan, base))


def test_a_trimmed_baseline_gates_like_the_report_and_survives_strict_json() -> None:
    base = _report(0.80, 0.60)
    base["metrics"]["served"]["fault"]["corrupt:image"] = {"n": 30, "macro_f1": float("nan")}
    record = baseline_record(base, stream="abc", model="m1")
    text = json.dumps(record, allow_nan=False)  # NaN became null: a committed baseline is strict JSON
    loaded = json.loads(text)
    assert loaded["meta"] == {"stream": "abc", "model": "m1"}
    assert set(loaded["metrics"]) == {"served"}
    assert regression_gate(base, loaded) == []  # a null baseline group holds nothing
    lower = copy.deepcopy(base)
    lower["metrics"]["served"]["overall"]["macro_f1"] = 0.65
    assert [f.split(":")[0] for f in regression_gate(lower, loaded)] == ["overall"]
    worse = copy.deepcopy(base)
    worse["metrics"]["served"]["fault"]["clean"]["macro_f1"] = None  # an emptied group read back from JSON
    assert any(f.startswith("fault clean") for f in regression_gate(worse, loaded))


def test_the_demo_gate_skips_another_stream_and_refuses_a_file_that_is_not_a_baseline(tmp_path: Path) -> None:
    from stream.tools import demo

    base = _report(0.80, 0.60)
    path = tmp_path / "baseline.json"
    path.write_text(json.dumps(baseline_record(base, stream="abc")))
    assert demo.gate(base, path, "abc") == []
    assert demo.gate(base, path, "another stream") is None
    path.write_text("{not json")
    with pytest.raises(SystemExit, match="--write-baseline"):
        demo.gate(base, path, "abc")
