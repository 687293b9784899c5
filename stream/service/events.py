"""The event contract (README, docs/architecture.md): posts in, sentiment events and dead letters out.

:func:`decode_post` turns *any* bytes into a valid :class:`Post` or raises :class:`PostRejected` with a
machine-readable reason; it never raises anything else. Encoding is msgpack; JSON is accepted on input
(detected by a leading ``{``; images in JSON are base64 strings).
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import hashlib
import io
import json
import math
import time
from dataclasses import dataclass, field
from typing import Any, Final

import msgpack
from PIL import Image

from stream.service.errors import PostRejected, RejectReason
from stream.service.preprocess import ENCODER_DECODE_SIDE, decoded_bytes_per_pixel, shrink_for_encoder
from stream.service.settings import Settings, get_settings
from stream.service.vocabulary import LABELS, MODALITIES, Modality

__all__ = [
    "LABELS",
    "MODALITIES",
    "DeadLetter",
    "Post",
    "PostRejected",
    "RejectReason",
    "SentimentEvent",
    "decode_dead_letter",
    "decode_post",
    "decode_sentiment",
    "encode_post",
    "fitted_dead_letter",
    "minimal_dead_letter",
]

IMAGE_FORMATS: Final = ("PNG", "JPEG")
# A dead letter's detail is a human-readable sentence; more than this is noise that could push it over the limit.
MAX_DETAIL_CHARS: Final = 2000


@dataclass(frozen=True, slots=True)
class Post:
    """A validated post. ``pixels`` holds the decoded image so it is decoded only once."""

    id: str
    ts: float | None = None
    text: str | None = None
    image: bytes | None = None
    transcript: str | None = None
    label: str | None = None
    pixels: Image.Image | None = field(default=None, compare=False, repr=False)

    @property
    def present(self) -> tuple[Modality, ...]:
        """The modalities this post carries, in :data:`MODALITIES` order."""
        out: list[Modality] = []
        if self.text is not None:
            out.append("text")
        if self.image is not None:
            out.append("image")
        if self.transcript is not None:
            out.append("transcript")
        return tuple(out)

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"id": self.id}
        for name in ("ts", "text", "image", "transcript", "label"):
            value = getattr(self, name)
            if value is not None:
                out[name] = value
        return out


def encode_post(post: Post | dict[str, Any]) -> bytes:
    """msgpack bytes of a post (a :class:`Post` or a plain dict of its fields)."""
    payload = post.to_dict() if isinstance(post, Post) else post
    return msgpack.packb(payload, use_bin_type=True)


def _load_payload(raw: bytes) -> tuple[Any, bool]:
    """The decoded payload and whether it was JSON."""
    if not isinstance(raw, bytes | bytearray | memoryview):
        raise PostRejected("not_msgpack", f"payload is {type(raw).__name__}, not bytes")
    data = bytes(raw)
    if not data:
        raise PostRejected("not_msgpack", "empty payload")
    if data.lstrip()[:1] == b"{":
        try:
            return json.loads(data), True
        except (ValueError, RecursionError) as exc:
            raise PostRejected("not_msgpack", f"starts like JSON but is not: {exc}") from None
    try:
        return msgpack.unpackb(data, raw=False, strict_map_key=False), False
    except (ValueError, msgpack.UnpackException, RecursionError, TypeError) as exc:
        raise PostRejected("not_msgpack", f"neither msgpack nor JSON: {type(exc).__name__}") from None


def _optional_str(payload: dict[Any, Any], name: str, limit: int) -> str | None:
    value = payload.get(name)
    if value is None:
        return None
    if not isinstance(value, str):
        raise PostRejected("wrong_type", f"{name} must be a string or nil, got {type(value).__name__}")
    if len(value) > limit:
        raise PostRejected("field_too_long", f"{name} has {len(value)} chars, limit {limit}")
    _require_utf8(name, value)
    # A blank text carries no sentiment: treat it as missing rather than scoring an empty string.
    return value if value.strip() else None


def _require_utf8(name: str, value: str) -> None:
    # JSON can carry lone surrogates; they would break every encoder downstream.
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise PostRejected("wrong_type", f"{name} is not valid unicode text") from None


def _image(payload: dict[Any, Any], settings: Settings, from_json: bool) -> tuple[bytes, Image.Image] | None:
    value = payload.get("image")
    if value is None:
        return None
    if from_json and isinstance(value, str):
        try:
            value = base64.b64decode(value, validate=True)
        except (binascii.Error, ValueError):
            raise PostRejected("wrong_type", "image in JSON must be base64") from None
    if not isinstance(value, bytes):
        raise PostRejected("wrong_type", f"image must be bytes or nil, got {type(value).__name__}")
    if not value:
        return None
    if len(value) > settings.max_image_bytes:
        raise PostRejected(
            "image_too_large", f"image has {len(value)} bytes, limit {settings.max_image_bytes}"
        )
    image = decode_image(
        value,
        settings.max_image_pixels,
        max_aspect=settings.max_image_aspect,
        max_decoded_bytes=settings.max_image_decoded_bytes,
    )
    return value, image


def decode_image(
    data: bytes,
    max_pixels: int,
    *,
    max_aspect: float = math.inf,
    max_decoded_bytes: int | None = None,
) -> Image.Image:
    """Decode PNG/JPEG bytes, refusing images over ``max_pixels`` before decompressing them.

    Every limit is checked from the header, before any pixel is allocated: the pixel count, the aspect
    ratio (a 16 x 1,562,500 image is within 25 MP but its resize would need gigabytes) and the decoded size
    (width x height x bytes per pixel). The decoded image is shrunk at once (:func:`shrink_for_encoder`),
    so a post holds a few hundred kB of pixels whatever arrived. The image keeps its mode (e.g. RGBA):
    :func:`stream.service.preprocess.image_to_array` composites transparency the same way for training and serving.
    """
    try:
        img = Image.open(io.BytesIO(data), formats=IMAGE_FORMATS)
    except Image.DecompressionBombError:
        raise PostRejected(
            "image_too_large", "image dimensions exceed Pillow's decompression-bomb limit"
        ) from None
    except Exception as exc:  # Pillow raises many kinds on hostile input; all mean "not an image"
        raise PostRejected("image_undecodable", f"not a PNG/JPEG image: {type(exc).__name__}") from None
    width, height = img.size
    if width * height > max_pixels:
        raise PostRejected("image_too_large", f"image is {width}x{height} px, limit {max_pixels} px")
    if width == 0 or height == 0:
        raise PostRejected("image_undecodable", "image has no pixels")
    if max(width, height) / min(width, height) > max_aspect:
        raise PostRejected("image_too_large", f"image is {width}x{height} px, aspect ratio limit {max_aspect:g}")
    if img.format == "JPEG":  # decode at the smallest scale that still serves the encoder
        img.draft(img.mode, (ENCODER_DECODE_SIDE, ENCODER_DECODE_SIDE))
        width, height = img.size
    decoded = width * height * decoded_bytes_per_pixel(img.mode)
    if max_decoded_bytes is not None and decoded > max_decoded_bytes:
        raise PostRejected(
            "image_too_large",
            f"image decodes to {decoded} bytes ({width}x{height} {img.mode}), limit {max_decoded_bytes}",
        )
    try:
        return shrink_for_encoder(img)
    except MemoryError:
        raise PostRejected("image_too_large", f"image {width}x{height} {img.mode} does not fit in memory") from None
    except Exception as exc:  # truncated data, bad CRC, decompression bombs inside chunks, ...
        raise PostRejected("image_undecodable", f"image data is corrupt: {type(exc).__name__}") from None


def decode_post(raw: bytes, *, default_ts: float | None = None, settings: Settings | None = None) -> Post:
    """Validate ``raw`` and return a :class:`Post`; raises only :class:`PostRejected`.

    ``default_ts`` (normally the broker timestamp) is used when the post carries no ``ts``.
    """
    settings = settings or get_settings()
    payload, from_json = _load_payload(raw)
    if not isinstance(payload, dict):
        raise PostRejected("not_a_map", f"payload is a {type(payload).__name__}, not a map")

    post_id = payload.get("id")
    if post_id is None:
        raise PostRejected("missing_id", "no id field")
    if not isinstance(post_id, str):
        raise PostRejected("wrong_type", f"id must be a string, got {type(post_id).__name__}")
    if not post_id or len(post_id) > settings.max_id_chars:
        raise PostRejected("invalid_id", f"id must have 1-{settings.max_id_chars} chars, has {len(post_id)}")
    _require_utf8("id", post_id)

    ts = payload.get("ts")
    if ts is None:
        ts = default_ts
    elif isinstance(ts, bool) or not isinstance(ts, int | float):
        raise PostRejected("wrong_type", f"ts must be epoch seconds, got {type(ts).__name__}")
    else:
        try:
            ts = float(ts)
        except OverflowError:
            raise PostRejected("invalid_ts", "ts is out of range") from None
        if not math.isfinite(ts) or ts < 0:
            raise PostRejected("invalid_ts", f"ts must be finite and >= 0, got {ts}")

    label = payload.get("label")
    if label is not None and label not in LABELS:
        raise PostRejected("invalid_label", f"label must be one of {', '.join(LABELS)} or nil")

    text = _optional_str(payload, "text", settings.max_text_chars)
    transcript = _optional_str(payload, "transcript", settings.max_transcript_chars)
    image = _image(payload, settings, from_json)
    if text is None and transcript is None and image is None:
        raise PostRejected("no_modality", "no usable text, image or transcript")
    return Post(
        id=post_id,
        ts=float(ts) if ts is not None else None,
        text=text,
        image=image[0] if image else None,
        transcript=transcript,
        label=label,
        pixels=image[1] if image else None,
    )


@dataclass(frozen=True, slots=True)
class SentimentEvent:
    """One scored post, as sent to the ``sentiment`` topic (keyed by post id)."""

    id: str
    label: str
    probs: tuple[float, float, float]
    present: tuple[str, ...]
    recovered: tuple[str, ...]
    quality: dict[str, float]
    recovery: str
    model: str
    event_ts: float
    emit_ts: float
    stages: dict[str, float] = field(default_factory=dict)
    flags: tuple[str, ...] = ()

    @property
    def score(self) -> float:
        return self.probs[2] - self.probs[0]

    @property
    def latency_s(self) -> float:
        return self.emit_ts - self.event_ts

    def to_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "label": self.label,
            "probs": list(self.probs),
            "score": self.score,
            "present": list(self.present),
            "recovered": list(self.recovered),
            "quality": dict(self.quality),
            "recovery": self.recovery,
            "model": self.model,
            "event_ts": self.event_ts,
            "emit_ts": self.emit_ts,
            "latency_s": self.latency_s,
            "stages": dict(self.stages),
            "flags": list(self.flags),
        }

    def encode(self) -> bytes:
        return msgpack.packb(self.to_dict(), use_bin_type=True)


def decode_sentiment(raw: bytes) -> SentimentEvent:
    """Read a sentiment event back (consumers and tests)."""
    d = msgpack.unpackb(raw, raw=False)
    return SentimentEvent(
        id=d["id"],
        label=d["label"],
        probs=(float(d["probs"][0]), float(d["probs"][1]), float(d["probs"][2])),
        present=tuple(d["present"]),
        recovered=tuple(d["recovered"]),
        quality={k: float(v) for k, v in d["quality"].items()},
        recovery=d["recovery"],
        model=d["model"],
        event_ts=float(d["event_ts"]),
        emit_ts=float(d["emit_ts"]),
        stages={k: float(v) for k, v in d.get("stages", {}).items()},
        flags=tuple(d.get("flags", ())),
    )


@dataclass(frozen=True, slots=True)
class DeadLetter:
    """A rejected input: the original bytes, why, and when. Sent to ``posts-dlq`` under the input key."""

    value: bytes
    reason: RejectReason
    detail: str
    key: bytes | None = None
    ts: float = field(default_factory=time.time)
    topic: str | None = None
    partition: int | None = None
    offset: int | None = None
    truncated: bool = False  # value cut to fit the broker's message size limit

    def encode(self) -> bytes:
        return msgpack.packb(
            {
                "value": self.value,
                "reason": self.reason,
                "detail": self.detail,
                "key": self.key,
                "ts": self.ts,
                "topic": self.topic,
                "partition": self.partition,
                "offset": self.offset,
                "truncated": self.truncated,
            },
            use_bin_type=True,
        )


def decode_dead_letter(raw: bytes) -> DeadLetter:
    d = msgpack.unpackb(raw, raw=False)
    return DeadLetter(
        value=d["value"],
        reason=d["reason"],
        detail=d["detail"],
        key=d.get("key"),
        ts=d["ts"],
        topic=d.get("topic"),
        partition=d.get("partition"),
        offset=d.get("offset"),
        truncated=bool(d.get("truncated", False)),
    )


def _short_key(key: bytes | None, max_key_bytes: int) -> tuple[bytes | None, str]:
    """The key as is when it fits, else ``sha256:<hex>`` (and a note for the detail)."""
    if key is None or len(key) <= max_key_bytes:
        return key, ""
    digest = hashlib.sha256(key).hexdigest()
    return f"sha256:{digest}".encode(), f" [key of {len(key)} bytes replaced by its sha256]"


def fitted_dead_letter(
    value: bytes,
    reason: RejectReason,
    detail: str,
    *,
    key: bytes | None,
    topic: str | None,
    partition: int | None,
    offset: int | None,
    max_bytes: int,
    max_key_bytes: int,
) -> DeadLetter:
    """A dead letter whose encoding is at most ``max_bytes``: long keys hashed, the detail and the value cut.

    The size is measured on the real encoding (so a field added to :class:`DeadLetter` is counted too); the
    original value is kept whole whenever it fits, and ``truncated`` says when it was cut.
    """
    short_key, note = _short_key(key, max_key_bytes)
    base = DeadLetter(
        value=b"",
        reason=reason,
        detail=(detail[:MAX_DETAIL_CHARS] + note),
        key=short_key,
        topic=topic[:256] if topic else topic,
        partition=partition,
        offset=offset,
        truncated=True,
    )
    # msgpack's bin header for the value is at most 5 bytes; the bool cannot grow.
    room = max(0, max_bytes - len(base.encode()) - 5)
    if len(value) <= room:
        return dataclasses.replace(base, value=value, truncated=False)
    return dataclasses.replace(base, value=value[:room])


def minimal_dead_letter(dl: DeadLetter) -> DeadLetter:
    """The smallest dead letter that still says what happened: no payload, the key as a hash.

    Produced when the full one could not be (e.g. the broker refused its size): a dead letter must never be
    the reason a post is lost.
    """
    key_hash = hashlib.sha256(dl.key).hexdigest() if dl.key is not None else "none"
    return DeadLetter(
        value=b"",
        reason=dl.reason,
        detail=f"{dl.detail[:200]} [dead letter reduced: payload dropped; key sha256={key_hash}]",
        key=dl.key if dl.key is None or len(dl.key) <= 256 else f"sha256:{key_hash}".encode(),
        ts=dl.ts,
        topic=dl.topic[:256] if dl.topic else dl.topic,
        partition=dl.partition,
        offset=dl.offset,
        truncated=True,
    )
