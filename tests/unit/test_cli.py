"""Conventions of the command: --version, errors on stderr with a non-zero exit, `settings`, .env, JSON logs."""

from __future__ import annotations

import io
import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest

from stream import __version__
from stream.service.logs import JsonFormatter, logging_config, set_log_context
from stream.service.settings import Settings
from stream.tools.show_settings import MASK, effective

ROOT = Path(__file__).resolve().parents[2]


def _cli(*args: str, cwd: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    base = {k: v for k, v in os.environ.items() if not k.startswith("SENTIMENT_")}
    base["PYTHONPATH"] = str(ROOT)
    return subprocess.run([sys.executable, "-m", "stream.cli", *args], cwd=cwd, env={**base, **(env or {})},
                          capture_output=True, text=True, timeout=60)


def test_version(tmp_path: Path) -> None:
    result = _cli("--version", cwd=tmp_path)
    assert result.returncode == 0 and result.stdout.strip() == f"sentiment-stream {__version__}"


def test_settings_reads_dotenv_under_the_environment_and_masks_secrets(tmp_path: Path) -> None:
    (tmp_path / ".env").write_text("SENTIMENT_MAX_BATCH=7\nSENTIMENT_PARTITIONS=3\nMODEL_DIR=/ignored\n")
    env = {"SENTIMENT_PARTITIONS": "5", "SENTIMENT_REDIS_URL": "redis://app:s3cret@redis.internal:6380/1"}
    result = _cli("settings", "--json", cwd=tmp_path, env=env)
    assert result.returncode == 0, result.stderr
    values = json.loads(result.stdout)
    assert values["SENTIMENT_MAX_BATCH"] == 7  # from .env
    assert values["SENTIMENT_PARTITIONS"] == 5  # the environment wins over .env
    assert values["SENTIMENT_REDIS_URL"] == f"redis://app:{MASK}@redis.internal:6380/1"
    assert "s3cret" not in result.stdout
    lines = _cli("settings", cwd=tmp_path).stdout.splitlines()
    assert "SENTIMENT_MAX_BATCH=7" in lines and len(lines) == len(Settings.model_fields)


def test_masking_leaves_urls_without_credentials_alone() -> None:
    values = effective(Settings(redis_url="redis://127.0.0.1:6379/0"))
    assert values["SENTIMENT_REDIS_URL"] == "redis://127.0.0.1:6379/0"
    assert effective(Settings(redis_url="redis://:pw@h:1/0"))["SENTIMENT_REDIS_URL"] == f"redis://:{MASK}@h:1/0"


def test_a_bad_setting_is_an_error_on_stderr_with_exit_2(tmp_path: Path) -> None:
    result = _cli("settings", cwd=tmp_path, env={"SENTIMENT_MAX_BATCH": "0"})
    assert result.returncode == 2
    assert result.stdout == "" and result.stderr.startswith("error:") and "max_batch" in result.stderr


def test_a_missing_model_is_an_error_on_stderr(tmp_path: Path) -> None:
    result = _cli("worker", "--model-dir", str(tmp_path / "nothing"), cwd=tmp_path)
    assert result.returncode == 2
    assert "error: cannot load the model" in result.stderr and "error" not in result.stdout


def test_json_logs_carry_worker_model_version_and_partition() -> None:
    set_log_context(model_version="abc123")
    handler = logging.StreamHandler(stream := io.StringIO())
    handler.setFormatter(JsonFormatter())
    log = logging.getLogger("test.json")
    log.addHandler(handler)
    try:
        log.warning("post at %s failed", "posts/2", extra={"topic": "posts", "partition": 2, "offset": 41})
    finally:
        log.removeHandler(handler)
    record = json.loads(stream.getvalue())
    assert record["message"] == "post at posts/2 failed" and record["level"] == "WARNING"
    assert record["model_version"] == "abc123" and record["worker"].endswith(f"-{os.getpid()}")
    assert (record["topic"], record["partition"], record["offset"]) == ("posts", 2, 41)


@pytest.mark.parametrize("fmt", ["text", "json"])
def test_logging_config_writes_to_stderr_in_the_chosen_format(fmt: str) -> None:
    config = logging_config(Settings(log_format=fmt))  # type: ignore[arg-type]
    assert config["handlers"]["default"]["stream"] == "ext://sys.stderr"
    assert ("()" in config["formatters"]["default"]) == (fmt == "json")
