"""The published contract as JSON Schema, generated from the code's own types; ``sentiment-stream schemas``.

One schema per topic (``posts``, ``sentiment``, ``posts-dlq``), built from the dataclasses of
:mod:`stream.service.events` through pydantic (``create_model(...).model_json_schema()``), so a field added
to :class:`~stream.service.events.SentimentEvent` changes the generated schema. The files live in
``docs/schemas/``; ``sentiment-stream schemas --check`` (and ``tests/unit/test_schemas.py`` in CI) fails
when they differ from what the code generates. Every field needs a description here: a new field without
one fails generation, so the contract never grows an undocumented field. The compatibility rule is in
``docs/contract.md``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Final

from pydantic import Field, create_model

from stream.service.events import LABELS, MODALITIES, SCHEMA_VERSION, DeadLetter, Post, SentimentEvent
from stream.service.settings import Settings

__all__ = ["CONTRACT", "SCHEMA_DIR", "TopicContract", "build_schemas", "check", "write"]

SCHEMA_DIR: Final = Path(__file__).resolve().parents[2] / "docs" / "schemas"
CONTENT_TYPE: Final = "application/msgpack"


@dataclasses.dataclass(frozen=True)
class TopicContract:
    """One topic's record: the type it is generated from and what the wire adds or leaves out."""

    topic: str
    title: str
    type: type
    descriptions: Mapping[str, str]
    exclude: frozenset[str] = frozenset()  # in-process fields never on the wire
    computed: Mapping[str, Any] = dataclasses.field(default_factory=dict)  # wire-only fields: name -> type
    enums: Mapping[str, tuple[str, ...]] = dataclasses.field(default_factory=dict)  # str fields with a closed set
    item_enums: Mapping[str, tuple[str, ...]] = dataclasses.field(default_factory=dict)  # lists of such
    key: str = ""
    headers: bool = True  # produced by the worker with content-type / schema-version / model-version


_LIMITS = Settings.model_construct()

CONTRACT: Final = (
    TopicContract(
        topic="posts",
        title="Post",
        type=Post,
        key="the post id (UTF-8); keys spread posts over partitions",
        headers=False,
        exclude=frozenset({"pixels"}),
        descriptions={
            "id": f"post id, 1-{_LIMITS.max_id_chars} chars (SENTIMENT_MAX_ID_CHARS); the output key",
            "ts": "event time, Unix seconds; the broker timestamp when absent",
            "text": f"post body, up to {_LIMITS.max_text_chars} chars (SENTIMENT_MAX_TEXT_CHARS); blank = missing",
            "image": (
                f"PNG or JPEG bytes (msgpack bin; base64 string in JSON), up to {_LIMITS.max_image_bytes} bytes "
                f"(SENTIMENT_MAX_IMAGE_BYTES) and {_LIMITS.max_image_pixels} pixels"
            ),
            "transcript": (
                f"speech-to-text of an attached clip, up to {_LIMITS.max_transcript_chars} chars "
                "(SENTIMENT_MAX_TRANSCRIPT_CHARS)"
            ),
            "label": "gold label when known (evaluation streams); never used for scoring",
        },
        enums={"label": LABELS},
    ),
    TopicContract(
        topic="sentiment",
        title="SentimentEvent",
        type=SentimentEvent,
        key="the post id (UTF-8): at-least-once delivery, de-duplicate by key",
        descriptions={
            "id": "the post id (also the record key)",
            "label": "the most probable label",
            "probs": "probabilities of negative, neutral, positive (sum to 1)",
            "present": "modalities the post carried, in text, image, transcript order",
            "recovered": "modalities that were missing and recovered by the head",
            "quality": "DRF quality (0..1) of each present modality: how clean it looks against the model's "
                       "queue (the shipped head: a learned detector of content loss)",
            "recovery": "the recovery path of the served head (fsrf | drf)",
            "model": "model version (content hash of the export); same as the model-version header",
            "event_ts": "event time of the post, Unix seconds",
            "emit_ts": "time the event was produced, Unix seconds",
            "stages": "seconds per pipeline stage for the post's micro-batch (diagnostics; names may grow)",
            "flags": "degradations: queue_stale | queue_unavailable (scored without fresh DRF queue statistics; "
            "only with SENTIMENT_QUEUE_MOMENTS=live)",
            "schema_version": "version of this contract, MAJOR.MINOR; same as the schema-version header",
            "score": "probs[positive] - probs[negative], in -1..1",
            "latency_s": "emit_ts - event_ts, seconds",
        },
        computed={"score": float, "latency_s": float},
        enums={"label": LABELS, "recovery": ("fsrf", "drf")},
        item_enums={"present": MODALITIES, "recovered": MODALITIES},
    ),
    TopicContract(
        topic="posts-dlq",
        title="DeadLetter",
        type=DeadLetter,
        key="the key of the rejected input record",
        descriptions={
            "value": "the original record value (msgpack bin), cut when it exceeds the dead-letter size limit",
            "reason": "machine-readable reject reason",
            "detail": "human-readable detail",
            "key": "the original record key (msgpack bin), or nil",
            "ts": "time the post was rejected, Unix seconds",
            "topic": "topic of the rejected record",
            "partition": "partition of the rejected record",
            "offset": "offset of the rejected record",
            "truncated": "true when value was cut to fit the broker's message size limit",
            "schema_version": "version of this contract, MAJOR.MINOR; same as the schema-version header",
        },
    ),
)


def _model_fields(contract: TopicContract) -> dict[str, Any]:
    hints = typing.get_type_hints(contract.type)
    fields: dict[str, Any] = {}
    names = [f.name for f in dataclasses.fields(contract.type) if f.name not in contract.exclude]
    undocumented = [n for n in [*names, *contract.computed] if n not in contract.descriptions]
    if undocumented:
        raise ValueError(
            f"{contract.type.__name__}: no description for {undocumented} in stream/tools/schemas.py; "
            "every field of the published contract is documented (docs/contract.md)"
        )
    stale = sorted(set(contract.descriptions) - set(names) - set(contract.computed))
    if stale:
        raise ValueError(f"{contract.type.__name__}: descriptions of fields that no longer exist: {stale}")
    for name in names:
        # The encoders write every field of an output, so all are required there; a post needs only its id
        # (and one modality, below): the rest may be absent.
        default = None if contract.topic == "posts" and name != "id" else ...
        fields[name] = (hints[name], Field(default, description=contract.descriptions[name]))
    for name, annotation in contract.computed.items():
        fields[name] = (annotation, Field(description=contract.descriptions[name]))
    return fields


def build_schema(contract: TopicContract) -> dict[str, Any]:
    fields = _model_fields(contract)
    model = create_model(contract.title, **fields)
    schema = model.model_json_schema(mode="serialization")
    props = schema["properties"]
    for name, values in contract.enums.items():
        props[name].pop("anyOf", None)
        if contract.topic == "posts" and name == "label":
            props[name]["anyOf"] = [{"enum": list(values), "type": "string"}, {"type": "null"}]
        else:
            props[name].update({"enum": list(values), "type": "string"})
    for name, values in contract.item_enums.items():
        props[name]["items"] = {"enum": list(values), "type": "string"}
    if contract.topic == "posts":
        schema["anyOf"] = [{"required": ["text"]}, {"required": ["image"]}, {"required": ["transcript"]}]
    out: dict[str, Any] = {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "$id": f"https://sentiment-stream.invalid/schemas/{contract.topic}.schema.json",
        "title": contract.title,
        "description": (
            f"Record value on the `{contract.topic}` topic: a msgpack map (decode with msgpack alone; "
            "bytes are msgpack bin). Unknown fields must be ignored; see docs/contract.md."
        ),
        "x-schema-version": SCHEMA_VERSION,
        "x-kafka-key": contract.key,
    }
    if contract.headers:
        out["x-kafka-headers"] = {
            "content-type": CONTENT_TYPE,
            "schema-version": SCHEMA_VERSION,
            "model-version": "model version of the worker that produced the record",
        }
    else:
        out["x-encoding"] = "msgpack map (preferred) or a JSON object (a leading '{'; images base64)"
    out.update(schema)  # open content model: a reader ignores fields it does not know (additive changes)
    return out


def build_schemas(contracts: tuple[TopicContract, ...] = CONTRACT) -> dict[str, str]:
    """File name -> JSON text of every topic's schema (stable formatting, trailing newline)."""
    return {
        f"{c.topic}.schema.json": json.dumps(build_schema(c), indent=2, sort_keys=False) + "\n" for c in contracts
    }


def check(directory: Path = SCHEMA_DIR, contracts: tuple[TopicContract, ...] = CONTRACT) -> list[str]:
    """What differs between the committed schema files and what the code generates (empty = in sync)."""
    problems = []
    wanted = build_schemas(contracts)
    for name, text in wanted.items():
        path = directory / name
        if not path.is_file():
            problems.append(f"{name}: missing")
        elif path.read_text() != text:
            old, new = json.loads(path.read_text()), json.loads(text)
            added = sorted(set(new.get("properties", {})) - set(old.get("properties", {})))
            removed = sorted(set(old.get("properties", {})) - set(new.get("properties", {})))
            problems.append(f"{name}: out of date (fields added {added}, removed {removed}, or changed)")
    for path in sorted(directory.glob("*.schema.json")):
        if path.name not in wanted:
            problems.append(f"{path.name}: no such topic in the contract")
    return problems


def write(directory: Path = SCHEMA_DIR) -> list[Path]:
    directory.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, text in build_schemas().items():
        path = directory / name
        path.write_text(text)
        paths.append(path)
    return paths


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--check", action="store_true", help="fail (exit 1) if docs/schemas/ is out of date")
    parser.add_argument("--out", type=Path, default=SCHEMA_DIR, help="directory of the schema files")


def run(args: argparse.Namespace) -> int:
    try:
        if args.check:
            problems = check(args.out)
            for problem in problems:
                print(f"error: {problem}; run `sentiment-stream schemas` and commit the result", file=sys.stderr)
            return 1 if problems else 0
        for path in write(args.out):
            print(path)
    except ValueError as exc:  # a field without a description
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0
