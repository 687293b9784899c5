"""The published contract (docs/schemas/, docs/contract.md) matches the code: CI fails when it drifts."""

from __future__ import annotations

import base64
import dataclasses
import json
from pathlib import Path
from typing import Any

import jsonschema
import msgpack
import pytest

from stream.service.events import SCHEMA_VERSION, DeadLetter, Post, SentimentEvent, encode_post
from stream.service.processing import output_headers
from stream.tools.schemas import CONTRACT, SCHEMA_DIR, build_schemas, check

EVENT = SentimentEvent(
    id="p1",
    label="positive",
    probs=(0.1, 0.2, 0.7),
    present=("text", "image"),
    recovered=("transcript",),
    quality={"text": 0.9, "image": 0.4},
    recovery="fsrf",
    model="abc123",
    event_ts=1_700_000_000.0,
    emit_ts=1_700_000_000.05,
    stages={"batch": 0.01},
    flags=("queue_stale",),
)


def _committed(topic: str) -> dict[str, Any]:
    return json.loads((SCHEMA_DIR / f"{topic}.schema.json").read_text())


def _as_json(value: Any) -> Any:
    """A msgpack-decoded value as JSON Schema sees it (bytes -> base64 strings)."""
    if isinstance(value, bytes):
        return base64.b64encode(value).decode()
    if isinstance(value, dict):
        return {k: _as_json(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_as_json(v) for v in value]
    return value


def test_committed_schema_files_match_the_code() -> None:
    """The CI check: regenerate with `sentiment-stream schemas` whenever this fails."""
    assert check() == []
    assert sorted(p.name for p in SCHEMA_DIR.glob("*.schema.json")) == sorted(build_schemas())


def test_a_field_added_to_the_event_without_regenerating_fails_the_check(tmp_path: Path) -> None:
    for name, text in build_schemas().items():
        (tmp_path / name).write_text(text)
    grown = dataclasses.make_dataclass(
        "SentimentEvent", [("sarcasm", float, dataclasses.field(default=0.0))], bases=(SentimentEvent,), frozen=True
    )
    (sentiment,) = [c for c in CONTRACT if c.topic == "sentiment"]
    described = dataclasses.replace(
        sentiment, type=grown, descriptions={**sentiment.descriptions, "sarcasm": "probability of sarcasm"}
    )
    contracts = tuple(described if c is sentiment else c for c in CONTRACT)
    problems = check(tmp_path, contracts)
    assert problems == ["sentiment.schema.json: out of date (fields added ['sarcasm'], removed [], or changed)"]
    # ... and a field nobody described cannot even be generated
    with pytest.raises(ValueError, match=r"no description for \['sarcasm'\]"):
        check(tmp_path, tuple(dataclasses.replace(sentiment, type=grown) if c is sentiment else c for c in CONTRACT))


def test_every_encoded_event_field_is_in_the_schema_and_validates() -> None:
    schema = _committed("sentiment")
    decoded = msgpack.unpackb(EVENT.encode())  # a consumer needs msgpack only
    assert set(decoded) == set(schema["properties"]) == set(schema["required"])
    assert decoded["schema_version"] == SCHEMA_VERSION == schema["x-schema-version"]
    jsonschema.validate(decoded, schema)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate({**decoded, "label": "ecstatic"}, schema)


def test_every_encoded_dead_letter_field_is_in_the_schema_and_validates() -> None:
    schema = _committed("posts-dlq")
    letter = DeadLetter(value=b"\xc1 junk", reason="not_msgpack", detail="neither", key=b"k", topic="posts",
                        partition=0, offset=7)
    decoded = msgpack.unpackb(letter.encode())
    assert set(decoded) == set(schema["properties"]) == set(schema["required"])
    jsonschema.validate(_as_json(decoded), schema)


def test_encoded_posts_validate_and_a_post_without_modality_does_not() -> None:
    schema = _committed("posts")
    post = Post(id="p1", text="good day", image=b"\x89PNG...", label="positive")
    jsonschema.validate(_as_json(msgpack.unpackb(encode_post(post))), schema)
    jsonschema.validate({"id": "p2", "transcript": "hello", "extra": 1}, schema)  # unknown fields are allowed
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate({"id": "p3"}, schema)


def test_output_headers_name_content_type_schema_and_model_version() -> None:
    assert dict(output_headers("abc123")) == {
        "content-type": b"application/msgpack",
        "schema-version": SCHEMA_VERSION.encode(),
        "model-version": b"abc123",
    }
    assert _committed("sentiment")["x-kafka-headers"]["schema-version"] == SCHEMA_VERSION
