"""Shared fixtures: the real local stack (broker + Redis), started by the project's own code."""

from __future__ import annotations

import asyncio
import fcntl
import hashlib
import os
import shutil
import subprocess
import sys
import uuid
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import pytest

from stream.service.events import Post
from stream.service.settings import Settings, get_settings
from stream.tools import demo
from stream.tools.services import LocalStack
from stream.tools.services import fresh_topics as new_topics


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Everything under tests/integration/ talks to the real broker and Redis: mark it so."""
    for item in items:
        if "integration" in item.path.parts:
            item.add_marker(pytest.mark.integration)


@pytest.fixture(scope="session")
def settings() -> Settings:
    return get_settings()


@pytest.fixture(scope="session")
def stack(settings: Settings) -> Iterator[LocalStack]:
    """The broker and Redis at the configured addresses; started here if the test command did not."""
    local = LocalStack(settings)
    before = {s.name: s.running for s in local.status()}
    local.start()
    yield local
    if not any(before.values()):
        local.stop()


@pytest.fixture(scope="session")
def redis_url(stack: LocalStack, settings: Settings) -> str:
    return settings.redis_url


@pytest.fixture
def fresh_topics(stack: LocalStack, settings: Settings) -> Settings:
    """Settings whose three topics are new and empty (unique names), created with explicit partitions."""
    return asyncio.run(new_topics(settings))


# -- a real model, built the way a user builds one: data sample -> train -> export -----------------

_DATA_CODE = (
    "models/data.py",
    "models/features.py",
    "models/encoders.py",
    "models/dims.py",
    "stream/service/preprocess.py",
    "stream/tools/dataset.py",
    "stream/tools/faults.py",
)
_MODEL_CODE = (
    *_DATA_CODE,
    "models/common.py",
    "models/drf.py",
    "models/fsrf.py",
    "models/head.py",
    "models/train.py",
    "export/onnx_export.py",
    "stream/service/manifest.py",
)
_ROOT = Path(__file__).resolve().parent.parent
SAMPLE_TWEETS = 2500


def _code_hash(files: Sequence[str], *extra: object) -> str:
    digest = hashlib.sha256(repr(extra).encode())
    for name in files:
        digest.update((_ROOT / name).read_bytes())
    return digest.hexdigest()[:16]


def _artifact_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Where built test artifacts live; keyed by code hash so a second `make test` reuses them safely."""
    configured = os.environ.get("SENTIMENT_TEST_ARTIFACTS")
    root = Path(configured) if configured else _ROOT / ".cache" / "test-artifacts"
    root.mkdir(parents=True, exist_ok=True)
    return root


@contextmanager
def _exclusive(path: Path) -> Iterator[None]:
    """One builder at a time for an artifact (parallel pytest runs share the cache)."""
    with open(path.with_suffix(".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _cli(*args: str) -> None:
    result = subprocess.run([sys.executable, "-m", "stream.cli", *args], capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(
            f"sentiment-stream {' '.join(args)} failed:\n{result.stdout[-4000:]}\n{result.stderr[-4000:]}"
        )


@pytest.fixture(scope="session")
def sample_benchmark(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small real benchmark (2,500 tweets, clean features) built by `sentiment-stream data build`."""
    if os.environ.get("SENTIMENT_TEST_BENCH"):  # a developer's already-built sample
        return Path(os.environ["SENTIMENT_TEST_BENCH"])
    out = _artifact_root(tmp_path_factory) / f"bench-{_code_hash(_DATA_CODE, SAMPLE_TWEETS)}"
    with _exclusive(out):
        if not (out / "READY").exists():
            shutil.rmtree(out, ignore_errors=True)
            _cli("data", "build", "--out", str(out), "--sample", str(SAMPLE_TWEETS), "--clean-only", "--seed", "0")
            (out / "READY").touch()
    return out


@pytest.fixture(scope="session")
def served_model(sample_benchmark: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An exported model dir (manifest.json + ONNX files) trained on the sample benchmark."""
    if os.environ.get("SENTIMENT_TEST_MODEL"):  # a developer's already-exported model
        return Path(os.environ["SENTIMENT_TEST_MODEL"])
    key = _code_hash(_MODEL_CODE, SAMPLE_TWEETS, str(sample_benchmark))
    root = _artifact_root(tmp_path_factory)
    model, exported = root / f"model-{key}", root / f"export-{key}"
    with _exclusive(exported):
        if not (exported / "manifest.json").exists():
            shutil.rmtree(model, ignore_errors=True)
            _cli("train", "--model", "serving", "--epochs", "8", "--out", str(model),
                 "--data-dir", str(sample_benchmark), "--no-progress")
            _cli("export", "--model-dir", str(model), "--out", str(exported), "--data-dir", str(sample_benchmark),
                 "--head-samples", "400", "--int8-eval-posts", "0")
    return exported


@pytest.fixture(scope="session")
def full_benchmark_posts(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The full benchmark's posts and pools, no feature cache: the demo's stream (seconds to build)."""
    out = _artifact_root(tmp_path_factory) / f"posts-{_code_hash(_DATA_CODE, 'full')}"
    with _exclusive(out):
        if not (out / "READY").exists():
            shutil.rmtree(out, ignore_errors=True)
            _cli(*demo.benchmark_build_args(out))
            (out / "READY").touch()
    return out


@pytest.fixture(scope="session")
def shipped_model(full_benchmark_posts: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The head that ships with the project, exported the way `make demo` exports it."""
    shipped = sorted((_ROOT / "models" / "shipped" / "serving-fsrf").iterdir())
    key = _code_hash([*_MODEL_CODE, *(str(p.relative_to(_ROOT)) for p in shipped)], "shipped")
    exported = _artifact_root(tmp_path_factory) / f"shipped-{key}"
    with _exclusive(exported):
        if not (exported / "manifest.json").exists():
            _cli(*demo.shipped_export_args(exported, full_benchmark_posts))
    return exported


_PATTERNS = (
    ("text",),
    ("text", "image"),
    ("text", "transcript"),
    ("text", "image", "transcript"),
    ("image",),
    ("transcript",),
    ("image", "transcript"),
)


@pytest.fixture(scope="session")
def benchmark_posts(sample_benchmark: Path) -> list[Post]:
    """Real benchmark posts (all splits) with every pattern of missing modalities, ids unique per session."""
    from stream.tools.dataset import benchmark_posts as read

    run = uuid.uuid4().hex[:6]
    posts = []
    rows = [row for split in ("test", "val", "train") for row in read(sample_benchmark, split)]
    for i, row in enumerate(rows):
        keep = _PATTERNS[i % len(_PATTERNS)]
        posts.append(
            Post(
                id=f"{run}-{row['id']}-{i}",
                text=row["text"] if "text" in keep else None,
                image=row["image"] if "image" in keep else None,
                transcript=row["transcript"] if "transcript" in keep else None,
                label=row["label"],
            )
        )
    return posts


@pytest.fixture
def worker_settings(fresh_topics: Settings, served_model: Path) -> Settings:
    """Fresh topics, a unique consumer group and the served model."""
    return fresh_topics.model_copy(update={"model_dir": served_model, "max_image_bytes": 500_000})
