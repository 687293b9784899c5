"""The event contract: any bytes become a valid Post or one PostRejected with a reason."""

from __future__ import annotations

import base64
import io
import json
import struct
import zlib

import msgpack
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from stream.service.events import (
    LABELS,
    DeadLetter,
    Post,
    PostRejected,
    SentimentEvent,
    decode_dead_letter,
    decode_post,
    decode_sentiment,
    encode_post,
)
from stream.service.settings import Settings

LIMITS = Settings(max_text_chars=500, max_transcript_chars=800, max_image_bytes=20_000, max_image_pixels=4096)


def _image_bytes(
    fmt: str, size: tuple[int, int] = (8, 6), color: tuple[int, int, int] = (10, 200, 30)
) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, format=fmt)
    return buf.getvalue()


PNG = _image_bytes("PNG")
JPEG = _image_bytes("JPEG")


def _reason(raw: bytes) -> str:
    with pytest.raises(PostRejected) as info:
        decode_post(raw, settings=LIMITS)
    return info.value.reason


def _png_header_only(width: int, height: int) -> bytes:
    """A tiny PNG that claims huge dimensions: a decompression bomb must be refused before decoding."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", ihdr)
        + chunk(b"IDAT", zlib.compress(b"\0" * 64))
        + chunk(b"IEND", b"")
    )


# -- each rejection reason ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("payload", "reason"),
    [
        (b"", "not_msgpack"),
        (b"\xc1", "not_msgpack"),
        (b"{not json", "not_msgpack"),
        (msgpack.packb([1, 2]), "not_a_map"),
        (msgpack.packb({"text": "hello"}), "missing_id"),
        (msgpack.packb({"id": 7, "text": "hello"}), "wrong_type"),
        (msgpack.packb({"id": "", "text": "hello"}), "invalid_id"),
        (msgpack.packb({"id": "x" * 257, "text": "hello"}), "invalid_id"),
        (msgpack.packb({"id": "a"}), "no_modality"),
        (msgpack.packb({"id": "a", "text": "   ", "transcript": None}), "no_modality"),
        (msgpack.packb({"id": "a", "text": 5}), "wrong_type"),
        (msgpack.packb({"id": "a", "text": "x" * 501}), "field_too_long"),
        (msgpack.packb({"id": "a", "transcript": "x" * 801}), "field_too_long"),
        (msgpack.packb({"id": "a", "image": "not bytes"}), "wrong_type"),
        (msgpack.packb({"id": "a", "image": b"GIF89a not a png"}, use_bin_type=True), "image_undecodable"),
        (msgpack.packb({"id": "a", "image": PNG[: len(PNG) // 2]}, use_bin_type=True), "image_undecodable"),
        (msgpack.packb({"id": "a", "image": b"\0" * 20_001}, use_bin_type=True), "image_too_large"),
        (
            msgpack.packb({"id": "a", "image": _png_header_only(50_000, 50_000)}, use_bin_type=True),
            "image_too_large",
        ),
        (msgpack.packb({"id": "a", "text": "t", "ts": "yesterday"}), "wrong_type"),
        (msgpack.packb({"id": "a", "text": "t", "ts": True}), "wrong_type"),
        (msgpack.packb({"id": "a", "text": "t", "ts": -1.0}), "invalid_ts"),
        (msgpack.packb({"id": "a", "text": "t", "ts": float("nan")}), "invalid_ts"),
        (msgpack.packb({"id": "a", "text": "t", "label": "happy"}), "invalid_label"),
        (b'{"id": "a", "text": "t", "ts": 1e400}', "invalid_ts"),
        (b'{"id": "a", "text": "\\ud800"}', "wrong_type"),
        (b'{"id": "a", "image": "%%%"}', "wrong_type"),
    ],
)
def test_invalid_input_is_rejected_with_its_reason(payload: bytes, reason: str) -> None:
    assert _reason(payload) == reason


def test_json_input_is_accepted_with_a_base64_image() -> None:
    raw = json.dumps({"id": "j1", "text": "fine", "image": base64.b64encode(PNG).decode(), "ts": 12}).encode()
    post = decode_post(raw, settings=LIMITS)
    assert post == Post(id="j1", ts=12.0, text="fine", image=PNG)
    assert post.pixels is not None and post.pixels.size == (8, 6)


def test_jpeg_images_decode_and_missing_ts_takes_the_broker_time() -> None:
    post = decode_post(encode_post({"id": "p", "image": JPEG}), default_ts=99.5, settings=LIMITS)
    assert post.ts == 99.5 and post.present == ("image",)


def test_empty_image_bytes_count_as_missing() -> None:
    post = decode_post(encode_post({"id": "p", "text": "t", "image": b""}), settings=LIMITS)
    assert post.image is None and post.present == ("text",)


# -- properties -----------------------------------------------------------------------------------

texts = st.one_of(st.none(), st.text(min_size=1, max_size=200).filter(lambda s: s.strip() != ""))
valid_posts = st.builds(
    Post,
    id=st.text(min_size=1, max_size=256),
    ts=st.one_of(st.none(), st.floats(min_value=0, max_value=4e9, allow_nan=False)),
    text=texts,
    image=st.sampled_from([None, PNG, JPEG]),
    transcript=texts,
    label=st.sampled_from([None, *LABELS]),
).filter(lambda p: p.present != () and all(_utf8(s) for s in (p.id, p.text, p.transcript) if s is not None))


def _utf8(s: str) -> bool:
    try:
        s.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


@settings(max_examples=2500, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=512))
def test_arbitrary_bytes_never_raise_anything_but_rejection(raw: bytes) -> None:
    try:
        post = decode_post(raw, settings=LIMITS)
    except PostRejected as exc:
        assert exc.reason
    else:
        assert post.present


@settings(max_examples=2500, suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])
@given(valid_posts, st.data())
def test_mutated_valid_posts_never_raise_anything_but_rejection(post: Post, data: st.DataObject) -> None:
    raw = bytearray(encode_post(post))
    for _ in range(data.draw(st.integers(1, 4))):
        op = data.draw(st.sampled_from(["flip", "cut", "insert", "delete"]))
        pos = data.draw(st.integers(0, max(len(raw) - 1, 0)))
        if op == "flip" and raw:
            raw[pos] ^= data.draw(st.integers(1, 255))
        elif op == "cut":
            del raw[pos:]
        elif op == "insert":
            raw[pos:pos] = data.draw(st.binary(min_size=1, max_size=8))
        elif op == "delete" and raw:
            del raw[pos]
    try:
        decode_post(bytes(raw), settings=LIMITS)
    except PostRejected as exc:
        assert exc.reason


@settings(max_examples=2000, suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])
@given(
    st.dictionaries(
        st.sampled_from(["id", "ts", "text", "image", "transcript", "label", "other"]),
        st.one_of(
            st.none(),
            st.booleans(),
            st.integers(-(2**63), 2**64 - 1),
            st.floats(),
            st.text(max_size=30),
            st.binary(max_size=30),
            st.lists(st.integers(0, 9), max_size=3),
            st.dictionaries(st.text(max_size=3), st.integers(0, 9), max_size=2),
        ),
    )
)
def test_maps_with_wrong_field_types_are_rejected_not_crashed(payload: dict[str, object]) -> None:
    try:
        decode_post(msgpack.packb(payload, use_bin_type=True), settings=LIMITS)
    except PostRejected as exc:
        assert exc.reason


@settings(max_examples=2000, suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])
@given(valid_posts)
def test_valid_posts_round_trip_exactly(post: Post) -> None:
    decoded = decode_post(encode_post(post), settings=LIMITS)
    assert decoded == post
    assert decode_post(encode_post(decoded), settings=LIMITS) == post


def test_sentiment_event_and_dead_letter_round_trip() -> None:
    event = SentimentEvent(
        id="p1",
        label="positive",
        probs=(0.1, 0.2, 0.7),
        present=("text",),
        recovered=("image", "transcript"),
        quality={"text": 0.9},
        recovery="fsrf",
        model="abc123",
        event_ts=10.0,
        emit_ts=10.25,
        stages={"encode": 0.1},
        flags=("queue_stale",),
    )
    back = decode_sentiment(event.encode())
    assert back == event
    assert back.score == pytest.approx(0.6) and back.latency_s == pytest.approx(0.25)
    assert msgpack.unpackb(event.encode())["score"] == pytest.approx(0.6)

    letter = DeadLetter(
        value=b"\xc1",
        reason="not_msgpack",
        detail="bad",
        key=b"k",
        ts=5.0,
        topic="posts",
        partition=1,
        offset=9,
    )
    assert decode_dead_letter(letter.encode()) == letter
