"""Read a built benchmark (``sentiment-stream data build``): posts per split and the two content pools.

Torch-free, so the recording, replay and bench tools can turn a split into a stream; the builder in
``models/data.py`` writes exactly these files and imports these types.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

__all__ = [
    "CONTROL_SPLITS",
    "RANDOM_SPLITS",
    "SPLITS",
    "TOPIC_SPLITS",
    "ImageItem",
    "TranscriptItem",
    "benchmark_posts",
    "read_images",
    "read_posts",
    "read_transcripts",
]
# The splits a built benchmark holds: random (stratified by label), held-out topic, and a text-only control.
RANDOM_SPLITS: Final = ("train", "val", "test")
TOPIC_SPLITS: Final = ("topic_train", "topic_val", "topic_test")
CONTROL_SPLITS: Final = ("control_train", "control_val", "control_test")
SPLITS: Final = RANDOM_SPLITS + TOPIC_SPLITS + CONTROL_SPLITS


@dataclass(frozen=True, slots=True)
class ImageItem:
    """One emoji image of a pool. ``file`` is relative to the benchmark's ``pools/images/``."""

    id: str
    codepoints: str
    name: str
    style: str
    pool: str
    label: str
    score: float
    occurrences: int
    file: str


@dataclass(frozen=True, slots=True)
class TranscriptItem:
    """One real human-rated sentence of a transcript pool (mean rating of ~20 raters on [-4, 4])."""

    id: str
    genre: str
    source_id: str
    text: str
    mean_rating: float
    pool: str
    label: str


def read_posts(data_dir: Path, split: str) -> list[dict[str, Any]]:
    """The posts of one split as written by :func:`build_benchmark`."""
    path = Path(data_dir) / "posts" / f"{split}.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: run `sentiment-stream data build --out {data_dir}`")
    with open(path, encoding="utf-8") as fh:
        return [json.loads(line) for line in fh]


def read_images(data_dir: Path) -> list[ImageItem]:
    """The image pools of a built benchmark."""
    with open(Path(data_dir) / "pools" / "images.jsonl", encoding="utf-8") as fh:
        return [ImageItem(**json.loads(line)) for line in fh]


def read_transcripts(data_dir: Path) -> list[TranscriptItem]:
    """The transcript pools of a built benchmark."""
    with open(Path(data_dir) / "pools" / "transcripts.jsonl", encoding="utf-8") as fh:
        return [TranscriptItem(**json.loads(line)) for line in fh]


def benchmark_posts(data_dir: str | Path, split: str) -> Iterator[dict[str, Any]]:
    """The posts of a built benchmark split with image bytes and transcript text resolved.

    Rows keep their metadata (``synthetic_pairing``, ``image_id``, ``transcript_id``, ...), which
    :func:`~stream.tools.recording.write_recording` stores in a record header.
    """
    data_dir = Path(data_dir)
    image_files = {item.id: data_dir / "pools" / "images" / item.file for item in read_images(data_dir)}
    transcripts = {item.id: item.text for item in read_transcripts(data_dir)}
    for row in read_posts(data_dir, split):
        out = dict(row)
        image_id = row.get("image_id")
        out["image"] = image_files[image_id].read_bytes() if image_id is not None else None
        transcript_id = row.get("transcript_id")
        out["transcript"] = transcripts[transcript_id] if transcript_id is not None else None
        yield out
