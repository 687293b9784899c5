"""`sentiment-stream services` starts, reports and stops the local stack and leaves nothing behind."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from stream.tools.launcher import free_port
from stream.tools.services import pid_running, port_open, redis_answers

pytestmark = pytest.mark.integration


def _cli(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "stream.cli", "services", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )


@pytest.fixture
def isolated_env(tmp_path: Path) -> dict[str, str]:
    """A stack on free ports with its own state dir, so it cannot touch the one the tests use."""
    env = dict(os.environ)
    env["SENTIMENT_BOOTSTRAP_SERVERS"] = f"127.0.0.1:{free_port()}"
    env["SENTIMENT_REDIS_URL"] = f"redis://127.0.0.1:{free_port()}/0"
    env["SENTIMENT_STATE_DIR"] = str(tmp_path / "state")
    return env


def _pids(env: dict[str, str]) -> list[int]:
    out = json.loads(_cli(env, "status", "--json").stdout)
    return [s["pid"] for s in out if s["pid"]]


def test_start_status_stop_leaves_no_process_and_no_port(isolated_env: dict[str, str]) -> None:
    broker_port = int(isolated_env["SENTIMENT_BOOTSTRAP_SERVERS"].rsplit(":", 1)[1])
    redis_port = int(isolated_env["SENTIMENT_REDIS_URL"].rsplit(":", 1)[1].split("/")[0])

    started = _cli(isolated_env, "start")
    assert started.returncode == 0, started.stdout + started.stderr
    status = json.loads(_cli(isolated_env, "status", "--json").stdout)
    assert {s["name"]: (s["running"], s["managed"]) for s in status} == {
        "broker": (True, True),
        "redis": (True, True),  # no Redis answered on that port, so the stack started its own
    }
    assert redis_answers("127.0.0.1", redis_port)
    pids = _pids(isolated_env)
    assert len(pids) == 2

    assert _cli(isolated_env, "start").returncode == 0  # idempotent
    assert _pids(isolated_env) == pids

    stopped = _cli(isolated_env, "stop")
    assert stopped.returncode == 0
    assert not port_open("127.0.0.1", broker_port)
    assert not port_open("127.0.0.1", redis_port)
    # A zombie left for a non-reaping init counts as gone: it holds no port and runs nothing.
    assert not any(pid_running(pid) for pid in pids)
    assert _cli(isolated_env, "stop").returncode == 0  # idempotent
    stopped_status = _cli(isolated_env, "status", "--json")
    assert not any(s["running"] for s in json.loads(stopped_status.stdout))
    # a service down is a non-zero exit, with the reason on stderr
    assert stopped_status.returncode == 1 and "not running: broker, redis" in stopped_status.stderr


def test_start_refuses_a_broker_port_taken_by_something_else(isolated_env: dict[str, str]) -> None:
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", 0))
        squatter.listen()
        port = squatter.getsockname()[1]
        isolated_env["SENTIMENT_BOOTSTRAP_SERVERS"] = f"127.0.0.1:{port}"
        result = _cli(isolated_env, "start")
    assert result.returncode == 2
    assert "already in use by a process this project did not start" in result.stderr
    _cli(isolated_env, "stop")


def test_start_refuses_a_redis_port_taken_by_something_else(isolated_env: dict[str, str]) -> None:
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", 0))
        squatter.listen()
        port = squatter.getsockname()[1]
        isolated_env["SENTIMENT_REDIS_URL"] = f"redis://127.0.0.1:{port}/0"
        result = _cli(isolated_env, "start")
    try:
        assert result.returncode == 2
        assert "not Redis" in result.stderr
    finally:
        _cli(isolated_env, "stop")
