"""A real Prometheus server for tests: scrape given targets, query through the HTTP API, stop after.

Uses the Debian ``prometheus`` binary. When it is missing, the first test that needs it runs
``scripts/install-prometheus.sh`` (apt-get, as root) and skips with the script's reason if that cannot
install it (under CI it fails instead). Tests take the ``prometheus_server`` fixture, a factory:
``prometheus_server(["127.0.0.1:9108"])`` writes a config that scrapes those ``host:port`` targets every
second, starts the server on a free loopback port with a temporary storage dir, waits until it is ready
and returns a :class:`PrometheusServer`. Every server a test started is stopped at teardown. Point it at a
running worker's metrics port as well as at an in-process ``start_metrics_server(..., port=0)``.

Import the fixture into a test module with ``from tests.support.prometheus import prometheus_server_fixture``.
"""

from __future__ import annotations

import functools
import json
import math
import os
import shutil
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import pytest
import yaml

from stream.tools.launcher import free_port

__all__ = [
    "PrometheusError",
    "PrometheusServer",
    "StartPrometheus",
    "expected_quantile",
    "free_port",
    "prometheus_server_fixture",
    "require_binary",
    "start_prometheus",
    "write_scrape_config",
]

INSTALL_SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "install-prometheus.sh"


class PrometheusError(RuntimeError):
    """The server did not start, or the API answered with an error."""


@functools.cache
def install_prometheus() -> str:
    """Run ``scripts/install-prometheus.sh`` once per session (idempotent); returns what it printed."""
    try:
        result = subprocess.run(
            ["bash", str(INSTALL_SCRIPT)], capture_output=True, text=True, timeout=900, stdin=subprocess.DEVNULL
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"{INSTALL_SCRIPT.name} did not run: {exc}"
    return (result.stdout + result.stderr).strip() + f" (exit {result.returncode})"


def require_binary(name: str) -> str:
    """The path of ``prometheus`` or ``promtool``, installed by the install script if missing.

    Skips the test when the binary cannot be installed here (not root, no apt-get), with the script's
    reason; fails under CI, where a missing binary is a broken set-up rather than a reason to skip.
    """
    path = shutil.which(name)
    if path is None:
        report = install_prometheus()
        path = shutil.which(name)
        if path is None:
            message = f"`{name}` is not on PATH and could not be installed: {report}"
            if os.environ.get("CI"):
                pytest.fail(message)
            pytest.skip(message)
    return path



def write_scrape_config(
    path: Path,
    targets: Sequence[str],
    *,
    job: str = "sentiment-worker",
    scrape_interval: str = "1s",
    rule_files: Sequence[Path] = (),
    extra_jobs: Mapping[str, Sequence[str]] | None = None,
) -> Path:
    """Write a Prometheus config scraping ``targets`` (``host:port``, path /metrics) into ``path``; ``extra_jobs``
    adds more jobs (name -> targets), e.g. a stand-in kafka_exporter."""
    config: dict[str, Any] = {
        "global": {
            "scrape_interval": scrape_interval,
            "evaluation_interval": scrape_interval,
            "scrape_timeout": scrape_interval,
        },
        "scrape_configs": [
            {"job_name": name, "metrics_path": "/metrics", "static_configs": [{"targets": list(job_targets)}]}
            for name, job_targets in {job: targets, **(extra_jobs or {})}.items()
        ],
    }
    if rule_files:
        config["rule_files"] = [str(p) for p in rule_files]
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


class PrometheusServer:
    """A running Prometheus process and a small client for its HTTP API."""

    def __init__(self, process: subprocess.Popen[bytes], port: int, workdir: Path) -> None:
        self.process = process
        self.port = port
        self.workdir = workdir
        self.url = f"http://127.0.0.1:{port}"

    def _get(self, path: str, params: dict[str, str] | None = None, timeout: float = 5.0) -> Any:
        url = f"{self.url}{path}"
        if params:
            url += "?" + urllib.parse.urlencode(params)
        try:
            with urllib.request.urlopen(url, timeout=timeout) as resp:
                body = json.load(resp)
        except urllib.error.HTTPError as exc:  # 400/422 carry the error in the JSON body
            body = json.loads(exc.read() or b"{}")
        if body.get("status") != "success":
            raise PrometheusError(f"{path} {params}: {body.get('errorType')}: {body.get('error')}")
        return body["data"]

    def query(self, expr: str) -> list[dict[str, Any]]:
        """An instant query; returns the ``result`` list (vector) or a one-element list for a scalar."""
        data = self._get("/api/v1/query", {"query": expr})
        if data["resultType"] in ("scalar", "string"):
            return [{"metric": {}, "value": data["result"]}]
        return list(data["result"])

    def query_value(self, expr: str) -> float | None:
        """The single value of ``expr`` (NaN counts as no value), or None when the result is empty."""
        result = self.query(expr)
        if not result:
            return None
        if len(result) > 1:
            raise PrometheusError(f"{expr!r} returned {len(result)} series, expected one")
        value = float(result[0]["value"][1])
        return None if math.isnan(value) else value

    def wait_for_value(self, expr: str, timeout: float = 60.0, interval: float = 0.5) -> float:
        """Poll ``expr`` until it has a finite value (rate() needs a few scrapes first)."""
        deadline = time.monotonic() + timeout
        while True:
            value = self.query_value(expr)
            if value is not None:
                return value
            if time.monotonic() > deadline:
                raise PrometheusError(f"{expr!r} had no value after {timeout:.0f} s; targets: {self.targets()}")
            self.check_running()
            time.sleep(interval)

    def label_values(self, label: str, match: str) -> list[str]:
        """Values of ``label`` on the series selected by ``match`` (Grafana's ``label_values``)."""
        return list(self._get(f"/api/v1/label/{label}/values", {"match[]": match}))

    def targets(self) -> list[dict[str, Any]]:
        """Active scrape targets with their health (``up`` | ``down`` | ``unknown``) and last error."""
        return list(self._get("/api/v1/targets")["activeTargets"])

    def rule_groups(self) -> list[dict[str, Any]]:
        """Loaded rule groups with each rule's health and last evaluation error."""
        return list(self._get("/api/v1/rules")["groups"])

    def check_running(self) -> None:
        if self.process.poll() is not None:
            raise PrometheusError(f"prometheus exited with {self.process.returncode}: {self.log_tail()}")

    def log_tail(self, lines: int = 30) -> str:
        log = self.workdir / "prometheus.log"
        return "\n".join(log.read_text(errors="replace").splitlines()[-lines:]) if log.exists() else ""

    def close(self) -> None:
        """Stop the server (SIGTERM, then SIGKILL after 10 s)."""
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=5)


def start_prometheus(
    workdir: Path,
    targets: Sequence[str],
    *,
    rule_files: Sequence[Path] = (),
    job: str = "sentiment-worker",
    ready_timeout: float = 30.0,
    extra_jobs: Mapping[str, Sequence[str]] | None = None,
) -> PrometheusServer:
    """Start ``prometheus`` on a free 127.0.0.1 port scraping ``targets`` every second; wait until ready."""
    binary = require_binary("prometheus")
    workdir.mkdir(parents=True, exist_ok=True)
    config = write_scrape_config(
        workdir / "prometheus.yml", targets, job=job, rule_files=rule_files, extra_jobs=extra_jobs
    )
    port = free_port()
    log = (workdir / "prometheus.log").open("wb")
    process = subprocess.Popen(
        [
            binary,
            f"--config.file={config}",
            f"--storage.tsdb.path={workdir / 'data'}",
            f"--web.listen-address=127.0.0.1:{port}",
            "--storage.tsdb.retention.time=1h",
            "--log.level=info",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
        cwd=workdir,
    )
    log.close()
    server = PrometheusServer(process, port, workdir)
    deadline = time.monotonic() + ready_timeout
    while True:
        try:
            server.check_running()
            with urllib.request.urlopen(f"{server.url}/-/ready", timeout=2) as resp:
                if resp.status == 200:
                    return server
        except PrometheusError:
            raise
        except OSError:
            pass
        if time.monotonic() > deadline:
            server.close()
            raise PrometheusError(f"prometheus not ready after {ready_timeout:.0f} s: {server.log_tail()}")
        time.sleep(0.2)


StartPrometheus = Callable[..., PrometheusServer]


@pytest.fixture(name="prometheus_server")
def prometheus_server_fixture(tmp_path_factory: pytest.TempPathFactory) -> Iterator[StartPrometheus]:
    """Factory: ``prometheus_server(targets, rule_files=(), job=...)`` -> a ready :class:`PrometheusServer`."""
    servers: list[PrometheusServer] = []

    def start(targets: Sequence[str], **kwargs: Any) -> PrometheusServer:
        server = start_prometheus(tmp_path_factory.mktemp("prometheus"), targets, **kwargs)
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.close()


def expected_quantile(q: float, values: tuple[float, ...], buckets: tuple[float, ...]) -> float:
    """histogram_quantile's answer for ``values`` in classic ``buckets`` (linear inside a bucket)."""
    cumulative = [sum(v <= b for v in values) for b in buckets]
    rank = q * len(values)
    for i, count in enumerate(cumulative):
        if count >= rank:
            lower, below = (buckets[i - 1], cumulative[i - 1]) if i else (0.0, 0)
            return lower + (buckets[i] - lower) * (rank - below) / (count - below)
    raise AssertionError("quantile above the last bucket")
