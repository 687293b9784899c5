"""Replay a recording into ``posts`` with seeded faults, collect what the worker made of it.

``sentiment-stream replay FILE`` publishes every recorded post, time-scaled by the recorded timestamps
(``--speed``) or as fast as possible (optionally capped by ``--rate``), after injecting faults:

* **drop** a modality (inter-modal missingness) from a fraction of the posts that carry it;
* **corrupt** a modality at content level with :mod:`stream.tools.faults` (40–80 % of the words of a
  text or transcript masked; 40–80 % of an image's pixels masked or a blur, re-encoded as PNG);
* **malformed** payloads, one of every reject reason of the contract (:data:`MALFORMED_KINDS`).

Every decision for a post is drawn from ``post_rng(seed, original id)``: the same seed injects the
same faults into the same post whatever the order, speed or run, and the draws are coupled across
rates (the posts dropped at rate 0.3 are among those dropped at 0.6), so runs at several rates
compare like with like. A drop that would leave a post with no modality is not applied (the post
would be a ``no_modality`` reject, which is what ``--malformed`` injects on purpose); it is counted.

Each run has a run id; post ids and keys become ``{run_id}:{original_id}``, so runs never collide
on a shared topic. The expected outcome of every published post (an event, or a dead letter with a
reason) is what :func:`stream.service.events.decode_post` says about the exact bytes published. Outcomes are
read back from ``sentiment`` and ``posts-dlq`` from the earliest offset, filtered by the run's prefix,
until every post has one or the timeout; :mod:`stream.tools.report` turns a :class:`ReplayResult` into the
robustness report.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import logging
import math
import signal
import struct
import sys
import time
import uuid
import zlib
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field, replace
from functools import cache
from pathlib import Path
from typing import Any, Final, get_args

import msgpack
import numpy as np
from PIL import Image

from stream.service.events import (
    MODALITIES,
    PostRejected,
    RejectReason,
    decode_dead_letter,
    decode_post,
    decode_sentiment,
    encode_post,
)
from stream.service.settings import Settings, get_settings
from stream.tools.faults import (
    IMAGE_CORRUPTIONS,
    TEXT_CORRUPTIONS,
    corrupt_image,
    corrupt_text,
    post_rng,
    sample_rate,
)
from stream.tools.recording import Record, RecordingHeader, RecordingReader, _NoBar, _progress_bar
from stream.tools.replay_results import EVENT, PublishedPost, ReceivedDeadLetter, ReceivedEvent, ReplayResult
from stream.tools.topic_reader import TopicReader

__all__ = [
    "IMAGE_CORRUPTIONS",
    "MALFORMED_KINDS",
    "Faults",
    "PlannedPost",
    "PublishedPost",
    "ReceivedDeadLetter",
    "ReceivedEvent",
    "ReplayOptions",
    "ReplayResult",
    "add_arguments",
    "malformed_payload",
    "parse_rates",
    "plan_post",
    "plan_recording",
    "replay",
    "run",
]

log = logging.getLogger(__name__)

# Every reject reason of the contract a client can cause (``internal_error`` is the worker's own).
MALFORMED_KINDS: Final[tuple[RejectReason, ...]] = tuple(r for r in get_args(RejectReason) if r != "internal_error")
_POST_FIELDS: Final = ("id", "ts", "text", "image", "transcript", "label")
# u[0]: malformed?, u[1]: which kind, u[2:5]: drop per modality, u[5:8]: corrupt per modality.
_N_DECISIONS: Final = 8


# -- fault injection (no broker) -------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Faults:
    """What to inject. Rates are fractions in [0, 1]; modality names are those of :data:`MODALITIES`.

    ``drop[m]``: fraction of the posts carrying ``m`` that lose it. ``corrupt[m]``: fraction of the
    posts still carrying ``m`` whose ``m`` is corrupted at 40–80 %. ``malformed``: fraction of posts
    replaced by a malformed payload of a kind drawn uniformly from ``malformed_kinds``.
    ``image_corruption`` / ``text_corruption``: the corruption kinds to draw from (uniformly) for a corrupted
    image / text or transcript (:data:`~stream.tools.faults.IMAGE_CORRUPTIONS`,
    :data:`~stream.tools.faults.TEXT_CORRUPTIONS`).
    """

    drop: Mapping[str, float] = field(default_factory=dict)
    corrupt: Mapping[str, float] = field(default_factory=dict)
    malformed: float = 0.0
    malformed_kinds: tuple[str, ...] = MALFORMED_KINDS
    image_corruption: tuple[str, ...] = ("mask", "blur")
    text_corruption: tuple[str, ...] = ("mask",)
    seed: int = 0

    def __post_init__(self) -> None:
        for name, rates in (("drop", self.drop), ("corrupt", self.corrupt)):
            for modality, rate in rates.items():
                if modality not in MODALITIES:
                    raise ValueError(f"{name}: unknown modality {modality!r} (one of {', '.join(MODALITIES)})")
                if not 0.0 <= rate <= 1.0:
                    raise ValueError(f"{name}: rate for {modality} must be in [0, 1], got {rate}")
        if not 0.0 <= self.malformed <= 1.0:
            raise ValueError(f"malformed rate must be in [0, 1], got {self.malformed}")
        unknown = set(self.malformed_kinds) - set(MALFORMED_KINDS)
        if unknown or not self.malformed_kinds:
            raise ValueError(f"malformed kinds must be a non-empty subset of {MALFORMED_KINDS}, got {unknown}")
        bad = set(self.image_corruption) - set(IMAGE_CORRUPTIONS)
        if bad or not self.image_corruption:
            raise ValueError(f"image corruptions must be a non-empty subset of {IMAGE_CORRUPTIONS}")
        bad = set(self.text_corruption) - set(TEXT_CORRUPTIONS)
        if bad or not self.text_corruption:
            raise ValueError(f"text corruptions must be a non-empty subset of {TEXT_CORRUPTIONS}")

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Faults:
        """The faults of a stored run (``ReplayResult.options["faults"]``), e.g. to plan a baseline's inputs."""
        return cls(
            drop=dict(d.get("drop", {})),
            corrupt=dict(d.get("corrupt", {})),
            malformed=float(d.get("malformed", 0.0)),
            malformed_kinds=tuple(d.get("malformed_kinds", MALFORMED_KINDS)),
            image_corruption=tuple(d.get("image_corruption", ("mask", "blur"))),
            text_corruption=tuple(d.get("text_corruption", ("mask",))),
            seed=int(d.get("seed", 0)),
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "drop": dict(self.drop),
            "corrupt": dict(self.corrupt),
            "malformed": self.malformed,
            "malformed_kinds": list(self.malformed_kinds),
            "image_corruption": list(self.image_corruption),
            "text_corruption": list(self.text_corruption),
            "seed": self.seed,
        }


@dataclass(frozen=True, slots=True)
class PlannedPost:
    """A post ready to publish: the bookkeeping plus a way to produce its bytes at publish time.

    ``fields`` is the (faulted) post map of a valid post, published with ``ts`` set at send time;
    ``raw`` is the exact payload of a malformed or unreadable one, published as is.
    """

    info: PublishedPost
    key: bytes
    fields: dict[str, Any] | None = None
    raw: bytes | None = None

    def payload(self, ts: float | None) -> bytes:
        """The bytes to publish; ``ts`` (epoch s) replaces the event time of a valid post unless None."""
        if self.raw is not None:
            return self.raw
        assert self.fields is not None
        fields = self.fields if ts is None else {**self.fields, "ts": ts}
        return encode_post(fields)


def parse_rates(spec: str | None) -> dict[str, float]:
    """``"image=0.5,transcript=0.3"`` → ``{"image": 0.5, "transcript": 0.3}`` (validated by :class:`Faults`)."""
    if not spec:
        return {}
    rates: dict[str, float] = {}
    for part in spec.split(","):
        name, sep, value = part.strip().partition("=")
        if not sep:
            raise ValueError(f"expected modality=rate, got {part!r}")
        try:
            rates[name.strip()] = float(value)
        except ValueError:
            raise ValueError(f"rate of {name!r} is not a number: {value!r}") from None
    return rates


@cache
def _oversize_png(max_pixels: int) -> bytes:
    """A valid, tiny (a few KB) bilevel PNG with more than ``max_pixels`` pixels.

    Built by hand: Pillow would need the full pixel buffer to write it.
    """
    side = math.isqrt(max_pixels) + 1
    row = b"\x00" + b"\x00" * ((side + 7) // 8)  # filter byte + packed 1-bit pixels

    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF)

    compressor = zlib.compressobj(9)
    idat = b"".join(compressor.compress(row) for _ in range(side)) + compressor.flush()
    ihdr = struct.pack(">IIBBBBB", side, side, 1, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def malformed_payload(kind: str, post_id: str, fields: Mapping[str, Any], settings: Settings) -> bytes:
    """A payload that :func:`decode_post` rejects with reason ``kind`` (one of :data:`MALFORMED_KINDS`).

    Built from the post's own fields where it can (so it looks like real traffic) and sized against
    ``settings`` limits (an oversize field is one char/pixel over the limit the worker applies).
    """
    base = {k: fields[k] for k in _POST_FIELDS if fields.get(k) is not None}
    base["id"] = post_id
    if not any(base.get(m) is not None for m in MODALITIES):
        base["text"] = "a post"  # faults other than no_modality need a modality to be the only problem
    if kind == "not_msgpack":
        # 0xc1 is the one byte msgpack never uses; it cannot start JSON either
        return b"\xc1\xc1 not msgpack: " + post_id.encode("utf-8", "replace")
    if kind == "not_a_map":
        return msgpack.packb([post_id, base.get("text")], use_bin_type=True)
    if kind == "missing_id":
        del base["id"]
    elif kind == "invalid_id":
        base["id"] = ""
    elif kind == "wrong_type":
        base["text"] = 12345
    elif kind == "invalid_ts":
        base["ts"] = -1.0
    elif kind == "invalid_label":
        base["label"] = "ambivalent"
    elif kind == "field_too_long":
        base["text"] = "x" * (settings.max_text_chars + 1)
    elif kind == "no_modality":
        for m in MODALITIES:
            base.pop(m, None)
    elif kind == "image_too_large":
        base["image"] = _oversize_png(settings.max_image_pixels)
    elif kind == "image_undecodable":
        base["image"] = b"\x89PNG\r\n\x1a\n this is not image data"
    else:
        raise ValueError(f"unknown malformed kind {kind!r}")
    return msgpack.packb(base, use_bin_type=True)


def _corrupt_image_bytes(data: bytes, rate: float, rng: np.random.Generator, kind: str) -> bytes | None:
    """The image corrupted with stream.tools.faults and re-encoded as PNG; None if it does not decode."""
    try:
        with Image.open(io.BytesIO(data)) as img:
            img.load()
            damaged = corrupt_image(img, rate, rng, kind)  # type: ignore[arg-type]
    except Exception:  # an undecodable recorded image: leave it to the worker's validation
        return None
    out = io.BytesIO()
    damaged.save(out, format="PNG")
    return out.getvalue()


def plan_post(record: Record, run_id: str, faults: Faults, settings: Settings, index: int = 0) -> PlannedPost:
    """Apply the seeded faults to one recorded post; deterministic for (seed, original id).

    A recorded value that is not a valid post is published unchanged (id rewritten if it can be
    found), and its expected outcome is the reject reason. ``index`` names posts without an id.
    """
    try:
        post = decode_post(record.value, default_ts=record.ts, settings=settings)
    except PostRejected:
        return _plan_unreadable(record, run_id, settings, index)
    original_id = post.id
    new_id = f"{run_id}:{original_id}"
    fields = {k: v for k, v in post.to_dict().items() if k in _POST_FIELDS}
    fields["id"] = new_id
    rng = post_rng(faults.seed, original_id)
    u = rng.random(_N_DECISIONS)  # fixed number of draws: decisions stay coupled across rates

    if u[0] < faults.malformed:
        kind = faults.malformed_kinds[min(int(u[1] * len(faults.malformed_kinds)), len(faults.malformed_kinds) - 1)]
        raw = malformed_payload(kind, new_id, fields, settings)
        info = PublishedPost(
            id=new_id,
            original_id=original_id,
            label=post.label,
            present=(),
            malformed=kind,
            expected=_expected(raw, settings),
        )
        return PlannedPost(info=info, key=new_id.encode(), raw=raw)

    present = [m for m in MODALITIES if fields.get(m) is not None]
    dropped: list[str] = []
    suppressed: list[str] = []
    for i, m in enumerate(MODALITIES):
        if m in present and u[2 + i] < faults.drop.get(m, 0.0):
            if len(present) == 1:
                suppressed.append(m)  # dropping the last modality would make it a no_modality reject
                continue
            present.remove(m)
            dropped.append(m)
            del fields[m]
    corrupted: list[str] = []
    kinds: list[str] = []
    for i, m in enumerate(MODALITIES):
        if m not in present or u[5 + i] >= faults.corrupt.get(m, 0.0):
            continue
        rate = sample_rate(rng)
        if m == "image":
            kind = faults.image_corruption[int(rng.integers(len(faults.image_corruption)))]
            damaged = _corrupt_image_bytes(fields["image"], rate, rng, kind)
            if damaged is None:
                continue
            fields["image"] = damaged
        else:
            # One kind draws nothing, so a run with the default kind corrupts exactly as before kinds existed.
            choices = faults.text_corruption
            kind = choices[0] if len(choices) == 1 else choices[int(rng.integers(len(choices)))]
            fields[m] = corrupt_text(fields[m], rate, rng, kind)  # type: ignore[arg-type]
        corrupted.append(m)
        kinds.append(f"{m}:{kind}")
    # Uncorrupted content of a post that decoded stays valid after a drop (skip a second decode),
    # unless the run prefix pushed the id over the limit.
    recheck = corrupted or len(new_id) > settings.max_id_chars
    expected = _expected(encode_post(fields), settings) if recheck else EVENT
    info = PublishedPost(
        id=new_id,
        original_id=original_id,
        label=post.label,
        present=tuple(present),
        dropped=tuple(dropped),
        corrupted=tuple(corrupted),
        corruption_kinds=tuple(kinds),
        drop_suppressed=tuple(suppressed),
        expected=expected,
    )
    return PlannedPost(info=info, key=new_id.encode(), fields=fields)


def _plan_unreadable(record: Record, run_id: str, settings: Settings, index: int) -> PlannedPost:
    original_id = record.key.decode("utf-8", "replace") if record.key else f"#{index}"
    new_id = f"{run_id}:{original_id}"
    raw = record.value
    try:
        payload = msgpack.unpackb(raw, raw=False, strict_map_key=False)
    except Exception:  # not msgpack at all: publish the bytes as they were recorded
        payload = None
    if isinstance(payload, dict) and isinstance(payload.get("id"), str) and payload["id"]:
        payload["id"] = new_id
        raw = msgpack.packb(payload, use_bin_type=True)
    info = PublishedPost(
        id=new_id,
        original_id=original_id,
        label=payload.get("label") if isinstance(payload, dict) and isinstance(payload.get("label"), str) else None,
        present=(),
        expected=_expected(raw, settings),
    )
    return PlannedPost(info=info, key=new_id.encode(), raw=raw)


def _expected(raw: bytes, settings: Settings) -> str:
    try:
        decode_post(raw, settings=settings)
    except PostRejected as exc:
        return exc.reason
    return EVENT


def plan_recording(
    path: str | Path, faults: Faults, *, run_id: str = "offline", settings: Settings | None = None
) -> Iterator[PlannedPost]:
    """The faulted posts of a recording, lazily, exactly as :func:`replay` publishes them.

    For scoring a baseline offline on the same inputs as the served model: decode
    ``planned.payload(None)`` with :func:`decode_post` when ``planned.info.expected == "event"``.
    """
    settings = settings or get_settings()
    for index, record in enumerate(RecordingReader(path)):
        yield plan_post(record, run_id, faults, settings, index)


# -- the run ---------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ReplayOptions:
    """How to replay. ``speed`` None = as fast as possible; otherwise the recorded inter-arrival times
    are divided by ``speed``. ``rate`` caps posts/s in either mode. ``timeout_s`` counts from the end
    of publishing; ``settle_s`` keeps reading after the last outcome to catch late duplicates.
    ``keep_ts`` publishes the recorded event time instead of the publish time (then the events'
    ``latency_s`` is not an end-to-end latency). ``collect`` False publishes only.
    """

    faults: Faults = field(default_factory=Faults)
    speed: float | None = 1.0
    rate: float | None = None
    keep_ts: bool = False
    timeout_s: float = 60.0
    settle_s: float = 1.0
    collect: bool = True
    max_posts: int | None = None
    run_id: str | None = None
    progress: bool = False

    def __post_init__(self) -> None:
        if self.speed is not None and self.speed <= 0:
            raise ValueError(f"speed must be > 0, got {self.speed}")
        if self.rate is not None and self.rate <= 0:
            raise ValueError(f"rate must be > 0 posts/s, got {self.rate}")

    def to_dict(self) -> dict[str, Any]:
        out = {name: getattr(self, name) for name in self.__slots__ if name != "faults"}
        out["faults"] = self.faults.to_dict()
        return out


class _Collector:
    """Reads ``sentiment`` and ``posts-dlq`` from the earliest offset and keeps this run's outcomes."""

    def __init__(self, settings: Settings, prefix: str, progress: bool) -> None:
        self.settings = settings
        self.prefix = prefix.encode()
        self.events: list[ReceivedEvent] = []
        self.dead_letters: list[ReceivedDeadLetter] = []
        self.answered: set[str] = set()
        self.undecodable = 0
        self.progress = progress
        self.bar: Any = _NoBar()
        self._deadline: float | None = None
        self._complete_since: float | None = None

    async def run(
        self,
        expected: Mapping[str, PublishedPost],
        published: asyncio.Event,
        timeout_s: float,
        settle_s: float,
        stop: asyncio.Event | None,
    ) -> bool:
        """Collect until every expected post has an outcome (then ``settle_s`` more) or the timeout.

        Returns True when it timed out. ``expected`` grows while publishing; the timeout counts from
        ``published`` being set.
        """
        reader = TopicReader(
            self.settings.bootstrap_servers,
            [self.settings.topic_sentiment, self.settings.topic_dlq],
            max_records=2000,
            # Short fetch waits: publish→receive latency is measured here, and Tansu may hold a fetch
            # for the full wait even when records arrive.
            fetch_max_wait_ms=25,
        )
        async with reader:
            try:
                while True:
                    records = await reader.poll()
                    now = time.time()
                    for msg in records:
                        if msg.key is not None and msg.key.startswith(self.prefix):
                            self._take(msg.topic, msg.key, msg.value, now)
                    timed_out = self._finished(expected, published, timeout_s, settle_s)
                    if timed_out is not None:
                        return timed_out
                    if stop is not None and stop.is_set():
                        return True
            finally:
                self.bar.close()

    def _finished(
        self, expected: Mapping[str, PublishedPost], published: asyncio.Event, timeout_s: float, settle_s: float
    ) -> bool | None:
        """None while collecting; False once complete and settled; True at the timeout after publishing."""
        if not published.is_set():
            return None
        mono = time.monotonic()
        if self._deadline is None:
            self._deadline = mono + timeout_s
            if self.progress:
                self.bar = _progress_bar(True, "collect outcomes", len(expected))
                self.bar.update(len(self.answered & expected.keys()))
        if expected.keys() <= self.answered:
            self._complete_since = self._complete_since or mono
            return False if mono - self._complete_since >= settle_s else None
        return True if mono >= self._deadline else None

    def _take(self, topic: str, key: bytes, value: bytes | None, now: float) -> None:
        post_id = key.decode("utf-8", "replace")
        try:
            if topic == self.settings.topic_sentiment:
                ev = decode_sentiment(value or b"")
                self.events.append(
                    ReceivedEvent(
                        id=ev.id,
                        label=ev.label,
                        probs=ev.probs,
                        present=ev.present,
                        recovered=ev.recovered,
                        recovery=ev.recovery,
                        model=ev.model,
                        latency_s=ev.latency_s,
                        receive_ts=now,
                        flags=ev.flags,
                    )
                )
            else:
                dl = decode_dead_letter(value or b"")
                self.dead_letters.append(
                    ReceivedDeadLetter(id=post_id, reason=dl.reason, detail=dl.detail, receive_ts=now)
                )
        except Exception:  # another producer's garbage under our prefix: count it, never crash the run
            self.undecodable += 1
            return
        if post_id not in self.answered:
            self.answered.add(post_id)
            self.bar.update(1)


async def replay(
    settings: Settings, recording_path: str | Path, options: ReplayOptions, *, stop: asyncio.Event | None = None
) -> ReplayResult:
    """Publish a recording to ``settings.topic_posts`` with faults, then collect this run's outcomes.

    The worker must be consuming ``topic_posts`` (or nothing comes back and the run times out —
    the result says ``timed_out`` and the report counts every post as lost). ``stop`` (e.g. set by
    Ctrl-C) ends publishing and collection early with what was gathered.
    """
    reader = RecordingReader(recording_path)
    run_id = options.run_id or f"r{uuid.uuid4().hex[:8]}"
    expected: dict[str, PublishedPost] = {}  # grows while publishing: what the collector waits for
    published = asyncio.Event()
    collector = _Collector(settings, f"{run_id}:", options.progress)
    collect_task = _start_collecting(collector, expected, published, options, stop)
    try:
        publishing = await _publish(settings, reader, options, run_id, expected, stop)
    except BaseException:
        if collect_task is not None:
            collect_task.cancel()
        raise
    published.set()
    timed_out = await _wait_for_outcomes(collector, collect_task)
    return _build_result(settings, recording_path, reader.header, options, run_id, publishing, collector, timed_out)


@dataclass(slots=True)
class _Publishing:
    """What publishing did: the posts in send order, the broker's refusals by post id, and when."""

    started: float
    finished: float = 0.0
    posts: list[PublishedPost] = field(default_factory=list)
    errors: dict[str, str] = field(default_factory=dict)


class _Pacer:
    """When each post is due: the recorded gaps divided by ``speed`` (None: at once), never above ``rate``."""

    def __init__(self, speed: float | None, rate: float | None) -> None:
        self.speed = speed
        self.rate = rate
        self.t0 = time.monotonic()
        self.first_ts: float | None = None
        self.last_due = -math.inf

    async def wait(self, record_ts: float) -> None:
        due = self.t0
        if self.speed is not None:
            self.first_ts = record_ts if self.first_ts is None else self.first_ts
            due = self.t0 + max(0.0, record_ts - self.first_ts) / self.speed
        if self.rate is not None:
            due = max(due, self.last_due + 1.0 / self.rate)
        self.last_due = due
        delay = due - time.monotonic()
        if delay > 0.0005:
            await asyncio.sleep(delay)


def _start_collecting(
    collector: _Collector,
    expected: Mapping[str, PublishedPost],
    published: asyncio.Event,
    options: ReplayOptions,
    stop: asyncio.Event | None,
) -> asyncio.Task[bool] | None:
    """Step 1: read the outcome topics in the background from before the first post is sent (None: no collect)."""
    if not options.collect:
        return None
    return asyncio.create_task(collector.run(expected, published, options.timeout_s, options.settle_s, stop))


async def _publish(
    settings: Settings,
    reader: RecordingReader,
    options: ReplayOptions,
    run_id: str,
    expected: dict[str, PublishedPost],
    stop: asyncio.Event | None,
) -> _Publishing:
    """Step 2: plan each recorded post, send it when due, and wait for the broker's acks.

    Each post joins ``expected`` as it is sent and leaves it again if the broker refuses it.
    """
    from aiokafka import AIOKafkaProducer

    producer = AIOKafkaProducer(
        bootstrap_servers=settings.bootstrap_servers,
        acks="all",
        linger_ms=5,
        max_request_size=settings.max_message_bytes,  # a post at every payload limit fits (settings.py)
    )
    await producer.start()
    pending: list[tuple[int, asyncio.Future[Any]]] = []
    bar = _progress_bar(options.progress, f"replay {run_id}", _total(reader.header, options.max_posts))
    out = _Publishing(started=time.time())
    try:
        pacer = _Pacer(options.speed, options.rate)
        for index, record in enumerate(reader):
            if options.max_posts is not None and index >= options.max_posts:
                break
            if stop is not None and stop.is_set():
                break
            planned = plan_post(record, run_id, options.faults, settings, index)
            await pacer.wait(record.ts)
            publish_ts = time.time()
            payload = planned.payload(None if options.keep_ts else publish_ts)
            info = replace(planned.info, publish_ts=publish_ts)
            out.posts.append(info)
            expected[info.id] = info
            pending.append((len(out.posts) - 1, await producer.send(settings.topic_posts, payload, key=planned.key)))
            bar.update(1)
            if len(pending) >= 500:
                await _settle(pending, out.posts, out.errors, expected)
        await _settle(pending, out.posts, out.errors, expected)
        await producer.flush()
    finally:
        bar.close()
        await producer.stop()
    out.finished = time.time()
    return out


async def _wait_for_outcomes(collector: _Collector, collect_task: asyncio.Task[bool] | None) -> bool:
    """Step 3: until the collector has every outcome (or timed out, the result); False when not collecting."""
    timed_out = False
    if collect_task is not None:
        timed_out = await collect_task
    if collector.undecodable:
        log.warning("%d outcomes under this run's prefix could not be decoded", collector.undecodable)
    return timed_out


def _build_result(
    settings: Settings,
    recording_path: str | Path,
    header: RecordingHeader,
    options: ReplayOptions,
    run_id: str,
    publishing: _Publishing,
    collector: _Collector,
    timed_out: bool,
) -> ReplayResult:
    """Step 4: the stored result of the run."""
    return ReplayResult(
        run_id=run_id,
        recording=str(recording_path),
        header=header.to_dict(),
        options=options.to_dict(),
        topics={"posts": settings.topic_posts, "sentiment": settings.topic_sentiment, "dlq": settings.topic_dlq},
        posts=publishing.posts,
        events=collector.events,
        dead_letters=collector.dead_letters,
        publish_started=publishing.started,
        publish_finished=publishing.finished,
        collect_finished=time.time(),
        timed_out=timed_out,
        publish_errors=publishing.errors,
    )


def _total(header: RecordingHeader, max_posts: int | None) -> int | None:
    if header.count is None:
        return max_posts
    return header.count if max_posts is None else min(header.count, max_posts)


async def _settle(
    pending: list[tuple[int, asyncio.Future[Any]]],
    posts: list[PublishedPost],
    errors: dict[str, str],
    expected: dict[str, PublishedPost],
) -> None:
    """Wait for the broker's acks; a post the broker refused expects nothing back."""
    results = await asyncio.gather(*(fut for _, fut in pending), return_exceptions=True)
    for (i, _), res in zip(pending, results, strict=True):
        if isinstance(res, BaseException):
            errors[posts[i].id] = repr(res)
            expected.pop(posts[i].id, None)
    pending.clear()


# -- command line ----------------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("recording", type=Path, metavar="FILE", help="a recording (sentiment-stream record)")
    pace = parser.add_mutually_exclusive_group()
    pace.add_argument("--speed", type=float, default=1.0, help="time-scale factor on recorded timestamps (1.0)")
    pace.add_argument("--as-fast-as-possible", action="store_true", help="ignore recorded timing")
    parser.add_argument("--rate", type=float, default=None, metavar="N", help="cap at N posts/s")
    parser.add_argument("--seed", type=int, default=0, help="fault-injection seed (0)")
    parser.add_argument("--drop", default="", metavar="M=R,...", help="drop modalities, e.g. image=0.5,transcript=0.3")
    parser.add_argument("--corrupt", default="", metavar="M=R,...", help="corrupt modalities, e.g. text=0.2,image=0.1")
    parser.add_argument(
        "--image-corruption", default="mask,blur", help=f"image corruptions to draw from: {','.join(IMAGE_CORRUPTIONS)}"
    )
    parser.add_argument(
        "--text-corruption", default="mask", help=f"text corruptions to draw from: {','.join(TEXT_CORRUPTIONS)}"
    )
    parser.add_argument("--malformed", type=float, default=0.0, metavar="R", help="fraction of malformed payloads")
    parser.add_argument(
        "--malformed-kinds", default=",".join(MALFORMED_KINDS), help="malformed kinds to draw from (all)"
    )
    parser.add_argument("--keep-ts", action="store_true", help="publish the recorded event times, not now")
    parser.add_argument("--max", type=int, default=None, metavar="N", help="replay only the first N records")
    parser.add_argument("--report", type=Path, default=None, metavar="DIR", help="write the robustness report here")
    parser.add_argument("--timeout", type=float, default=60.0, metavar="S", help="wait for outcomes S s (60)")
    parser.add_argument("--no-collect", action="store_true", help="publish only; do not wait for outcomes")
    parser.add_argument("--run-id", default=None, help="run id (default: random)")
    parser.add_argument(
        "--baseline",
        type=Path,
        default=None,
        metavar="REPORT",
        help="an earlier report.json: exit 3 if macro F1 of any fault group fell by more than --tolerance",
    )
    parser.add_argument("--tolerance", type=float, default=0.01, help="allowed macro-F1 fall per group (0.01)")
    parser.add_argument(
        "--gate-min-posts", type=int, default=20, metavar="N", help="gate only groups of at least N posts (20)"
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")


def run(args: argparse.Namespace) -> int:
    settings = get_settings()
    try:
        faults = Faults(
            drop=parse_rates(args.drop),
            corrupt=parse_rates(args.corrupt),
            malformed=args.malformed,
            malformed_kinds=tuple(k.strip() for k in args.malformed_kinds.split(",") if k.strip()),
            image_corruption=tuple(k.strip() for k in args.image_corruption.split(",") if k.strip()),
            text_corruption=tuple(k.strip() for k in args.text_corruption.split(",") if k.strip()),
            seed=args.seed,
        )
        options = ReplayOptions(
            faults=faults,
            speed=None if args.as_fast_as_possible else args.speed,
            rate=args.rate,
            keep_ts=args.keep_ts,
            timeout_s=args.timeout,
            collect=not args.no_collect,
            max_posts=args.max,
            run_id=args.run_id,
            progress=not args.no_progress,
        )
    except ValueError as exc:
        log.error("%s", exc)
        return 2

    async def main() -> ReplayResult:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGINT, stop.set)
        return await replay(settings, args.recording, options, stop=stop)

    baseline = None
    if args.baseline is not None:
        try:
            baseline = json.loads(args.baseline.read_text())
        except (OSError, ValueError) as exc:
            log.error("cannot read the baseline report %s: %s", args.baseline, exc)
            return 2
    result = asyncio.run(main())
    from stream.tools.report import build_report, regression_gate, summarize

    report = summarize(result)
    if args.report is not None:
        build_report(result, args.report)
        print(f"report written to {args.report}")
    print(json.dumps(report["headline"], indent=1))
    if result.timed_out:
        return 1
    if baseline is not None:
        failures = regression_gate(report, baseline, args.tolerance, min_posts=args.gate_min_posts)
        for failure in failures:
            print(f"regression: {failure}", file=sys.stderr)
        if failures:
            return 3
        print(f"regression gate passed against {args.baseline} (tolerance {args.tolerance})")
    return 0
