"""``sentiment-stream demo``: the whole product in one command, on a fresh machine.

Starts the local stack, makes sure a served model exists (exports the serving head that ships with the
project when none does: 2-3 minutes on 2 cores), starts a worker, replays the full benchmark's test split
(posts that head never saw in training) with faults injected, prints the robustness report and where the
metrics are, holds the report to the committed baseline (exit 3 on a regression), then stops what it
started. Data build and export run as ``sentiment-stream`` subprocesses, so this module never imports torch.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any

from stream.service.settings import Settings, get_settings
from stream.tools.dataset import benchmark_posts
from stream.tools.launcher import WorkerNotReady, WorkerProcess
from stream.tools.recording import write_recording
from stream.tools.replay import Faults, ReplayOptions, replay
from stream.tools.report import baseline_record, build_report, regression_gate
from stream.tools.services import LocalStack

__all__ = [
    "DEFAULT_BASELINE",
    "add_arguments",
    "benchmark_build_args",
    "demo_faults",
    "ensure_recording",
    "gate",
    "run",
    "shipped_export_args",
    "stream_fingerprint",
]

# The demo's stream: the full benchmark's test split (posts the shipped head never saw in training), with
# these faults (seeded), replayed as fast as possible.
DEMO_DROP = "image=0.3,transcript=0.3"
DEMO_CORRUPT = "text=0.1,image=0.1"
DEMO_MALFORMED = 0.02
DEMO_POSTS = 2000
# Its first report on the shipped head, committed: every later demo, and CI, is held to it.
DEFAULT_BASELINE = Path(__file__).resolve().parents[2] / "docs" / "robustness" / "demo-baseline.json"
GATE_TOLERANCE = 0.01
GATE_MIN_POSTS = 20


# -- the recipe: the same benchmark posts and export for `make demo` and for CI's robustness gate ----------


def benchmark_build_args(out: Path) -> list[str]:
    """The full benchmark's posts and pools, no feature cache (seconds): the stream the demo replays."""
    return ["data", "build", "--out", str(out), "--seed", "0", "--no-features"]


def shipped_export_args(out: Path, data_dir: Path) -> list[str]:
    """The shipped head, exported; its int8 cost comes from its card when ``data_dir`` has no feature cache."""
    return ["export", "--shipped", "--out", str(out), "--data-dir", str(data_dir), "--head-samples", "1000"]


def demo_faults() -> Faults:
    from stream.tools.replay import parse_rates

    return Faults(drop=parse_rates(DEMO_DROP), corrupt=parse_rates(DEMO_CORRUPT), malformed=DEMO_MALFORMED, seed=0)


def stream_fingerprint(recording: Path, faults: Faults, max_posts: int | None) -> str:
    """Identifies the posts and faults a report scored: a baseline only holds for the same stream."""
    digest = hashlib.sha256(recording.read_bytes())
    digest.update(json.dumps({"faults": faults.to_dict(), "max_posts": max_posts}, sort_keys=True).encode())
    return digest.hexdigest()[:16]


def gate(report: dict[str, Any], baseline_path: Path, fingerprint: str, tolerance: float = GATE_TOLERANCE,
         min_posts: int = GATE_MIN_POSTS) -> list[str] | None:
    """Regression failures against the baseline ([] = passed); ``None`` when it holds for another stream."""
    try:
        baseline = json.loads(baseline_path.read_text())
        held = baseline["meta"]["stream"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise SystemExit(f"[demo] {baseline_path} is not a robustness baseline ({exc!r}); "
                         "write one with `sentiment-stream demo --write-baseline PATH`") from None
    if held != fingerprint:
        return None
    return regression_gate(report, baseline, tolerance, min_posts=min_posts)


def _say(message: str) -> None:
    print(f"[demo] {message}", flush=True)


def _cli(*args: str, env: dict[str, str] | None = None) -> None:
    started = time.monotonic()
    _say("$ sentiment-stream " + " ".join(args))
    result = subprocess.run([sys.executable, "-m", "stream.cli", *args], env=env)
    if result.returncode != 0:
        raise SystemExit(f"[demo] `sentiment-stream {' '.join(args)}` failed with exit code {result.returncode}")
    _say(f"  done in {time.monotonic() - started:.0f} s")


def _has_posts(data_dir: Path) -> bool:
    return (data_dir / "manifest.json").is_file() and (data_dir / "posts").is_dir()


def ensure_data(settings: Settings) -> Path:
    """The benchmark's posts: the configured benchmark, else the full one's posts built now (no features)."""
    if _has_posts(settings.data_dir):
        return settings.data_dir
    built = settings.data_dir.parent / "demo-benchmark"
    if _has_posts(built):
        return built
    _say(f"no benchmark at {settings.data_dir}; building the benchmark's posts (no feature cache, under a minute)")
    _cli("data", "fetch")
    _cli(*benchmark_build_args(built))
    return built


def ensure_model(settings: Settings, data_dir: Path) -> Path:
    """An exported model: the configured one, else the head that ships with the project, exported now."""
    if (settings.model_dir / "manifest.json").is_file():
        _say(f"serving the model in {settings.model_dir}")
        return settings.model_dir
    _say("no exported model; exporting the shipped serving head (models/shipped/serving-fsrf/MODEL_CARD.md) "
         "with its parity check (2-3 minutes)")
    _cli(*shipped_export_args(settings.model_dir, data_dir))
    return settings.model_dir


def ensure_recording(data_dir: Path) -> Path:
    """The benchmark's test split as a recording (written by `data build`, or now)."""
    path = data_dir / "recordings" / "test.srec"
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        write_recording(path, benchmark_posts(data_dir, "test"), start_ts=1_700_000_000.0, rate=50.0,
                        meta={"split": "test", "synthetic_pairing": True})
    return path


@contextmanager
def running_worker(settings: Settings, log_path: Path) -> Iterator[WorkerProcess]:
    """A worker on the configured metrics and web ports, healthy, stopped (SIGTERM) on exit."""
    with WorkerProcess(settings, log_path, metrics_port=settings.metrics_port, web_port=settings.web_port) as worker:
        try:
            worker.wait_ready(timeout=90)
        except WorkerNotReady as exc:
            raise SystemExit(f"[demo] {exc}") from None
        _say(f"worker up (pid {worker.pid}); health {worker.health_url}; log {log_path}")
        yield worker


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--posts", type=int, default=DEMO_POSTS, help=f"posts to replay (default {DEMO_POSTS})")
    parser.add_argument("--rate", type=float, default=None, help="cap the replay at N posts/s")
    parser.add_argument("--drop", default=DEMO_DROP, help=f"modalities to drop (replay --drop; {DEMO_DROP})")
    parser.add_argument("--corrupt", default=DEMO_CORRUPT,
                        help=f"modalities to corrupt (replay --corrupt; {DEMO_CORRUPT})")
    parser.add_argument("--malformed", type=float, default=DEMO_MALFORMED, help="fraction of malformed payloads")
    parser.add_argument("--baseline", type=Path, default=DEFAULT_BASELINE,
                        help="robustness baseline: exit 3 when macro F1 of a fault group falls by more than "
                             f"{GATE_TOLERANCE} (default: the committed first demo report)")
    parser.add_argument("--write-baseline", type=Path, default=None, metavar="PATH",
                        help="write this run's report as a new baseline (after reviewing it)")
    parser.add_argument("--report", type=Path, default=None, help="report dir (default <state>/demo-report)")
    parser.add_argument("--keep-running", action="store_true", help="leave the stack running afterwards")


def run(args: argparse.Namespace) -> int:
    from stream.tools.replay import parse_rates

    settings = get_settings()
    gate_result: list[str] | None = None
    report_dir = args.report or settings.state_dir / "demo-report"
    stack = LocalStack(settings)
    already = {s.name for s in stack.status() if s.running}
    _say("starting the local broker and Redis")
    stack.start()
    started = time.monotonic()
    try:
        data_dir = ensure_data(settings)
        ensure_model(settings, data_dir)
        recording = ensure_recording(data_dir)
        settings.state_dir.mkdir(parents=True, exist_ok=True)
        with running_worker(settings, settings.state_dir / "demo-worker.log") as worker:
            faults = Faults(drop=parse_rates(args.drop), corrupt=parse_rates(args.corrupt),
                            malformed=args.malformed, seed=0)
            fingerprint = stream_fingerprint(recording, faults, args.posts)
            _say(f"replaying {args.posts} posts of {recording} with faults {faults.to_dict()}")
            options = ReplayOptions(faults=faults, speed=None, rate=args.rate, max_posts=args.posts,
                                    timeout_s=180, progress=True)
            result = asyncio.run(replay(settings, recording, options))
            report = build_report(result, report_dir)
            metrics_url = worker.metrics_url
            with suppress(OSError):
                (report_dir / "metrics.txt").write_text(worker.metrics_text())
        print()
        print((report_dir / "report.md").read_text())
        print(json.dumps({k: report[k] for k in ("delivery", "latency_s", "throughput") if k in report}, indent=1))
        _say(f"report: {report_dir}/report.md (+ report.json, PNG plots); metrics were at {metrics_url} "
             f"(a copy in {report_dir}/metrics.txt)")
        if args.write_baseline is not None:
            manifest = json.loads((settings.model_dir / "manifest.json").read_text())
            record = baseline_record(report, stream=fingerprint, model=manifest.get("model_version"),
                                     recording=recording.name, faults=faults.to_dict(), posts=args.posts,
                                     tolerance=GATE_TOLERANCE, min_posts=GATE_MIN_POSTS)
            args.write_baseline.parent.mkdir(parents=True, exist_ok=True)
            args.write_baseline.write_text(json.dumps(record, indent=1) + "\n")
            _say(f"baseline written to {args.write_baseline}")
        elif args.baseline is not None and args.baseline.is_file():
            gate_result = gate(report, args.baseline, fingerprint)
            if gate_result is None:
                _say(f"robustness gate skipped: {args.baseline} was measured on another stream (sample or faults)")
            elif gate_result:
                for failure in gate_result:
                    _say(f"robustness regression: {failure}")
                _say(f"robustness gate FAILED against {args.baseline} (tolerance {GATE_TOLERANCE} macro F1)")
            else:
                _say(f"robustness gate passed against {args.baseline} (tolerance {GATE_TOLERANCE} macro F1)")
        _say(f"finished in {time.monotonic() - started:.0f} s")
        return 3 if gate_result else 0
    finally:
        if args.keep_running or "broker" in already:
            _say("leaving the local stack running")
        else:
            _say("stopping the local stack (a Redis that was already running is left alone)")
            stack.stop()
