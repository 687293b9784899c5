"""Recordings of a topic: a msgpack stream file, and the ``sentiment-stream record`` command.

File format (version 1), a plain msgpack stream — one object after another, no framing of our own:

* the first object is the header, a map ``{"format": "sentiment-stream-recording", "version": 1,
  "topic", "created", "source", "synthetic_timing", "count", "meta"}`` (``count`` may be nil: a live
  recording does not know it up front);
* every further object is a record ``{"ts", "key", "value", "headers", "partition", "offset"}``: ``ts``
  in epoch seconds (the broker timestamp, or a synthetic arrival time), ``key``/``value`` bytes,
  ``headers`` a list of ``[str, bytes]`` pairs.

A file ending in ``.gz`` is gzip-compressed. Writing and reading are streaming: memory does not grow
with the file, so a recording can be larger than RAM. A recording cut short (Ctrl-C, crash) is still
readable up to its last complete record.

``record --since`` filters on record timestamps while reading from the earliest offset: Tansu answers
``offsets_for_times`` (and ListOffsets(LATEST)) wrongly, so the recorder never asks the broker to
translate times to offsets (:mod:`stream.tools.topic_reader`). On a big topic this reads what it skips.
"""

from __future__ import annotations

import argparse
import asyncio
import gzip
import logging
import signal
import time
from collections.abc import Iterable, Iterator, Sized
from contextlib import aclosing
from dataclasses import dataclass, field, replace
from pathlib import Path
from types import TracebackType
from typing import IO, Any, Final

import msgpack
import numpy as np

from stream.service.events import Post, encode_post
from stream.service.settings import Settings, get_settings
from stream.tools.topic_reader import TopicNotFound, TopicReader

__all__ = [
    "FORMAT",
    "FORMAT_VERSION",
    "Record",
    "RecordingError",
    "RecordingHeader",
    "RecordingReader",
    "RecordingWriter",
    "add_arguments",
    "read_header",
    "record_topic",
    "run",
    "write_recording",
]

log = logging.getLogger(__name__)

FORMAT: Final = "sentiment-stream-recording"
FORMAT_VERSION: Final = 1
# Post fields of the event contract (stream.service.events); anything else in a benchmark row is metadata.
_POST_FIELDS: Final = ("id", "ts", "text", "image", "transcript", "label")
# Above any image the contract accepts (5 MB by default) plus its envelope.
_MAX_OBJECT_BYTES: Final = 256 * 1024 * 1024


class RecordingError(ValueError):
    """The file is not a recording this version can read."""


@dataclass(frozen=True, slots=True)
class RecordingHeader:
    """The first object of a recording.

    ``synthetic_timing`` is True when ``ts`` (and the order of records) was generated rather than
    observed on a broker — say so wherever a latency or rate measured from it is reported.
    """

    topic: str
    created: float
    source: str = "broker"
    synthetic_timing: bool = False
    count: int | None = None
    meta: dict[str, Any] = field(default_factory=dict)
    version: int = FORMAT_VERSION

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "version": self.version,
            "topic": self.topic,
            "created": self.created,
            "source": self.source,
            "synthetic_timing": self.synthetic_timing,
            "count": self.count,
            "meta": self.meta,
        }

    @classmethod
    def from_dict(cls, d: Any) -> RecordingHeader:
        if not isinstance(d, dict) or d.get("format") != FORMAT:
            raise RecordingError("not a sentiment-stream recording (no header)")
        if d.get("version") != FORMAT_VERSION:
            raise RecordingError(f"recording format version {d.get('version')}, this reader knows {FORMAT_VERSION}")
        return cls(
            topic=str(d["topic"]),
            created=float(d["created"]),
            source=str(d.get("source", "broker")),
            synthetic_timing=bool(d.get("synthetic_timing", False)),
            count=d.get("count"),
            meta=dict(d.get("meta") or {}),
        )


@dataclass(frozen=True, slots=True)
class Record:
    """One recorded message. ``ts`` is epoch seconds."""

    ts: float
    value: bytes
    key: bytes | None = None
    headers: tuple[tuple[str, bytes], ...] = ()
    partition: int | None = None
    offset: int | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "ts": self.ts,
            "key": self.key,
            "value": self.value,
            "headers": [list(h) for h in self.headers],
            "partition": self.partition,
            "offset": self.offset,
        }

    @classmethod
    def from_dict(cls, d: Any) -> Record:
        if not isinstance(d, dict) or "value" not in d or "ts" not in d:
            raise RecordingError("malformed record in recording")
        return cls(
            ts=float(d["ts"]),
            value=bytes(d["value"]),
            key=None if d.get("key") is None else bytes(d["key"]),
            headers=tuple((str(k), bytes(v)) for k, v in d.get("headers") or ()),
            partition=d.get("partition"),
            offset=d.get("offset"),
        )

    def header(self, name: str) -> bytes | None:
        """The value of the first header called ``name``, if any."""
        return next((v for k, v in self.headers if k == name), None)


def _open(path: Path, mode: str) -> IO[bytes]:
    if path.suffix == ".gz":
        return gzip.open(path, mode + "b")  # type: ignore[return-value]
    return open(path, mode + "b")


class RecordingWriter:
    """Append records to a new recording file; use as a context manager.

    Each record is flushed to the OS buffer as it is written, so a recording interrupted by Ctrl-C
    stays readable up to the last record.
    """

    def __init__(self, path: str | Path, header: RecordingHeader) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.header = header
        self.count = 0
        self._packer = msgpack.Packer(use_bin_type=True)
        self._fh = _open(self.path, "w")
        self._fh.write(self._packer.pack(header.to_dict()))

    def write(self, record: Record) -> None:
        self._fh.write(self._packer.pack(record.to_dict()))
        self.count += 1

    def close(self) -> None:
        self._fh.close()

    def __enter__(self) -> RecordingWriter:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


class RecordingReader:
    """Read a recording lazily: ``header`` at once, records one at a time by iterating.

    Every iteration re-opens the file, so a reader can be iterated several times. A truncated last
    record (an interrupted recording) ends the iteration with a warning instead of an error.
    """

    def __init__(self, path: str | Path, read_size: int = 1 << 16) -> None:
        self.path = Path(path)
        self._read_size = read_size
        with _open(self.path, "r") as fh:
            unpacker = self._unpacker(fh)
            try:
                first = next(unpacker)
            except (StopIteration, msgpack.UnpackException, ValueError) as exc:
                raise RecordingError(f"{self.path}: not a sentiment-stream recording ({exc!r})") from None
        self.header = RecordingHeader.from_dict(first)

    def _unpacker(self, fh: IO[bytes]) -> msgpack.Unpacker:
        return msgpack.Unpacker(
            fh, raw=False, read_size=self._read_size, max_buffer_size=_MAX_OBJECT_BYTES, strict_map_key=False
        )

    def __iter__(self) -> Iterator[Record]:
        with _open(self.path, "r") as fh:
            unpacker = self._unpacker(fh)
            next(unpacker)  # the header, read in __init__
            while True:
                try:
                    obj = next(unpacker)
                except StopIteration:
                    return
                except (msgpack.OutOfData, ValueError, EOFError) as exc:
                    log.warning("%s: recording ends with an incomplete record (%r); stopping there", self.path, exc)
                    return
                yield Record.from_dict(obj)


def read_header(path: str | Path) -> RecordingHeader:
    """The header of the recording at ``path``."""
    return RecordingReader(path).header


def write_recording(
    path: str | Path,
    posts: Iterable[Post | dict[str, Any]],
    start_ts: float,
    rate: float,
    *,
    seed: int = 0,
    topic: str = "posts",
    meta: dict[str, Any] | None = None,
    created: float | None = None,
) -> RecordingHeader:
    """Write ``posts`` as a recording with synthetic Poisson arrivals at ``rate`` posts/s from ``start_ts``.

    Order and timing are synthetic (the header says ``synthetic_timing: true`` and ``meta`` records
    the process, rate and seed). Each value is the msgpack post of the contract fields only
    (``id, ts, text, image, transcript, label``) with ``ts`` set to the arrival time; other keys of a
    dict (e.g. ``synthetic_pairing``, ``image_id``) are kept as a msgpack map in the ``meta`` header
    of the record. A dict must already carry the image as PNG/JPEG bytes and the transcript as text
    (:func:`benchmark_posts` resolves benchmark rows). Streams: ``posts`` may be a generator.
    With a fixed ``created`` (default: now) the file is byte-identical for the same posts and seed.
    """
    if rate <= 0:
        raise ValueError(f"rate must be > 0 posts/s, got {rate}")
    count = len(posts) if isinstance(posts, Sized) else None
    header = RecordingHeader(
        topic=topic,
        created=time.time() if created is None else created,
        source="synthetic",
        synthetic_timing=True,
        count=count,
        meta={"arrivals": "poisson", "rate": rate, "start_ts": start_ts, "seed": seed, **(meta or {})},
    )
    rng = np.random.default_rng(seed)
    ts = start_ts
    with RecordingWriter(path, header) as writer:
        for post in posts:
            row = post.to_dict() if isinstance(post, Post) else dict(post)
            ts += float(rng.exponential(1.0 / rate))
            payload = {k: row[k] for k in _POST_FIELDS if row.get(k) is not None}
            payload["ts"] = ts
            extra = {k: v for k, v in row.items() if k not in _POST_FIELDS}
            headers = (("meta", msgpack.packb(extra, use_bin_type=True)),) if extra else ()
            writer.write(Record(ts=ts, key=str(row["id"]).encode(), value=encode_post(payload), headers=headers))
    if count is None:
        header = replace(header, count=writer.count)
    return header


# -- recording a live topic ----------------------------------------------------------------------


async def record_topic(
    settings: Settings,
    topic: str,
    out: str | Path,
    *,
    since: float | None = None,
    max_records: int | None = None,
    idle_timeout_s: float = 5.0,
    stop: asyncio.Event | None = None,
    progress: bool = False,
) -> RecordingHeader:
    """Consume ``topic`` from its earliest offset into a recording; returns the header with the count.

    ``since`` (epoch seconds) keeps only records with a broker timestamp at or after it; None keeps
    everything. Stops after ``max_records``, after ``idle_timeout_s`` without a new record, or when
    ``stop`` is set. Reads partitions directly (no consumer group: nothing is committed, no join wait).
    """
    header = RecordingHeader(
        topic=topic, created=time.time(), meta={"since": since, "bootstrap_servers": settings.bootstrap_servers}
    )
    reader = TopicReader(
        settings.bootstrap_servers,
        [topic],
        max_records=1000,
        fetch_max_bytes=64 * 1024 * 1024,
        max_partition_fetch_bytes=max(1 << 20, settings.max_image_bytes * 2),
    )
    try:
        await reader.start()
    except TopicNotFound as exc:
        raise RecordingError(str(exc)) from None
    bar = _progress_bar(progress, f"record {topic}", max_records)
    try:
        since_ms = None if since is None else since * 1000.0
        skipped = 0
        with RecordingWriter(out, header) as writer:
            if max_records is None or max_records > 0:
                async with aclosing(reader.records(idle_timeout_s=idle_timeout_s, stop=stop)) as records:
                    async for msg in records:
                        if since_ms is not None and msg.timestamp < since_ms:
                            skipped += 1
                            continue
                        writer.write(_record_of(msg))
                        bar.update(1)
                        if max_records is not None and writer.count >= max_records:
                            break
        log.info("recorded %d records of %r into %s (%d older than --since skipped)", writer.count, topic, out, skipped)
        return replace(header, count=writer.count)
    finally:
        bar.close()
        await reader.stop()


def _record_of(msg: Any) -> Record:
    """A recorded copy of an aiokafka ``ConsumerRecord`` (timestamp in ms → ``ts`` in s)."""
    return Record(
        ts=msg.timestamp / 1000.0,
        key=msg.key,
        value=msg.value if msg.value is not None else b"",
        headers=tuple((k, bytes(v)) for k, v in msg.headers or ()),
        partition=msg.partition,
        offset=msg.offset,
    )


class _NoBar:
    def update(self, n: int = 1) -> None:
        pass

    def close(self) -> None:
        pass

    def set_postfix_str(self, s: str) -> None:
        pass


def _progress_bar(enabled: bool, desc: str, total: int | None) -> Any:
    """A tqdm bar on stderr when wanted and tqdm is installed (it is in the train extra), else a no-op."""
    if not enabled:
        return _NoBar()
    try:
        from tqdm import tqdm
    except ImportError:
        return _NoBar()
    return tqdm(total=total, desc=desc, unit="msg", dynamic_ncols=True, leave=True)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--topic", required=True, help="topic to record (e.g. posts)")
    parser.add_argument("--out", required=True, type=Path, help="recording file to write (.gz compresses)")
    start = parser.add_mutually_exclusive_group()
    start.add_argument("--from-beginning", action="store_true", help="record everything on the topic (the default)")
    start.add_argument(
        "--since",
        type=float,
        metavar="EPOCH_S",
        help="keep records with a broker timestamp >= EPOCH_S (filtered while reading from the earliest offset)",
    )
    parser.add_argument("--max", type=int, default=None, metavar="N", help="stop after N records")
    parser.add_argument(
        "--idle-timeout", type=float, default=5.0, metavar="S", help="stop after S seconds without a record (5)"
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    settings = get_settings()

    async def main() -> RecordingHeader:
        stop = asyncio.Event()
        # Ctrl-C ends the recording cleanly: the file stays valid up to the last record.
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGINT, stop.set)
        loop.add_signal_handler(signal.SIGTERM, stop.set)
        return await record_topic(
            settings,
            args.topic,
            args.out,
            since=args.since,
            max_records=args.max,
            idle_timeout_s=args.idle_timeout,
            stop=stop,
            progress=not args.no_progress,
        )

    header = asyncio.run(main())
    print(f"recorded {header.count} records of {args.topic!r} into {args.out}")
    return 0
