"""The robustness regression gate, as CI runs it: the demo's stream against the demo's committed baseline.

The model is the shipped head exported as `make demo` exports it, and the stream is the demo's (the full
benchmark's test split, the demo's seeded faults), so the report the demo committed as
``docs/robustness/demo-baseline.json`` holds for this run: a change to the model, the export or the service
that costs more than 0.01 macro F1 in any fault group (clean, each drop, each corruption, overall) fails here.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

from stream.service.settings import Settings
from stream.tools import demo
from stream.tools.launcher import WorkerProcess
from stream.tools.replay import ReplayOptions, replay
from stream.tools.report import build_report, regression_gate


def test_the_demo_stream_holds_the_committed_robustness_baseline(
    fresh_topics: Settings, shipped_model: Path, full_benchmark_posts: Path, tmp_path: Path
) -> None:
    settings = fresh_topics.model_copy(update={"model_dir": shipped_model})
    recording = demo.ensure_recording(full_benchmark_posts)
    faults = demo.demo_faults()
    baseline = json.loads(demo.DEFAULT_BASELINE.read_text())
    assert baseline["meta"]["stream"] == demo.stream_fingerprint(recording, faults, demo.DEMO_POSTS), (
        "the committed baseline was measured on another stream: regenerate it (docs/robustness.md, 'gate')"
    )
    with WorkerProcess(settings, tmp_path / "worker.log") as worker:
        worker.wait_ready(timeout=90)
        options = ReplayOptions(faults=faults, speed=None, max_posts=demo.DEMO_POSTS, timeout_s=180, progress=False)
        result = asyncio.run(replay(settings, recording, options))
    assert not result.timed_out
    report = build_report(result, tmp_path / "report")
    assert report["delivery"]["lost_events"] == 0 and report["delivery"]["missing_dead_letters"] == 0
    failures = demo.gate(report, demo.DEFAULT_BASELINE, baseline["meta"]["stream"])
    assert failures == [], "robustness regression against the demo's baseline:\n" + "\n".join(failures or [])
    # the gate is not vacuous: the groups it holds are there, and a fall beyond the tolerance is caught
    held = [k for k, v in baseline["metrics"]["served"]["fault"].items() if v["n"] >= demo.GATE_MIN_POSTS]
    assert {"clean", "drop:image", "drop:transcript"} <= set(held), held
    worse = json.loads(json.dumps(baseline))
    worse["metrics"]["served"]["fault"]["clean"]["macro_f1"] = report["metrics"]["served"]["fault"]["clean"][
        "macro_f1"
    ] + 2 * demo.GATE_TOLERANCE
    assert any(f.startswith("fault clean") for f in regression_gate(report, worse, demo.GATE_TOLERANCE))
