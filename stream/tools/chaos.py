"""`sentiment-stream chaos`: two workers under faults and poison, and an account of every post.

The run starts a private stack (a Tansu broker and a Redis on free ports, by the project's own
:class:`~stream.tools.services.LocalStack`), so stopping them never disturbs the shared one, then:

1. two workers on fresh topics; the saturated rate is measured on the first posts (published at once);
2. the rest is published at half that rate with poison records mixed in (a dead letter over the producer's
   limit, tall and wide PNGs, RGBA bombs), while each worker is SIGKILLed once and restarted, Redis is
   SIGSTOPped for ``--redis-stop`` s and the broker for ``--broker-stop`` s;
3. every output is read back and the report says: published, scored, lost, duplicates, dead letters (and
   whether every poison record is among them with its reason), and the workers' peak RSS.

A post counts as published once the broker acknowledged it (the publisher retries through the broker
stall); lost = published valid posts with no sentiment event. docs/reliability.md shows a report.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import io
import json
import logging
import os
import random
import signal
import threading
import time
import uuid
from collections import Counter
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import msgpack
from PIL import Image

from stream.service.events import Post, decode_dead_letter, decode_sentiment, encode_post
from stream.service.settings import Settings, get_settings
from stream.tools.launcher import WorkerProcess, free_port
from stream.tools.services import LocalStack, fresh_topics
from stream.tools.topic_reader import TopicReader

__all__ = [
    "ChaosReport",
    "Poison",
    "RssSampler",
    "add_arguments",
    "peak_rss_bytes",
    "poison_records",
    "private_stack",
    "run",
    "run_chaos",
]

log = logging.getLogger(__name__)


# ---------------------------------------------------------------------------- poison


@dataclass(frozen=True)
class Poison:
    """A hostile record: what is sent, the reason its dead letter must carry and the key it goes under."""

    name: str
    key: bytes
    value: bytes
    reason: str

    @property
    def dead_key(self) -> bytes:
        """The dead letter's key: the input key, or its sha256 when it is over the dead-letter key cap."""
        if len(self.key) <= 1024:
            return self.key
        return f"sha256:{hashlib.sha256(self.key).hexdigest()}".encode()


def _png(img: Image.Image) -> bytes:
    out = io.BytesIO()
    img.save(out, format="PNG")
    return out.getvalue()


def poison_records(run_id: str, rgba_bombs: int = 4) -> list[Poison]:
    """The poison of issue 12, each keyed uniquely for ``run_id``.

    * ``oversize_dead_letter``: a 60 kB key and 900 kB of invalid bytes (its naive dead letter is 1.02 MB);
    * ``tall`` / ``wide``: a 26 kB greyscale PNG of 16 x 1,562,500 px (exactly 25 MP) and its transpose;
    * ``rgba_bomb``: one-colour 5000 x 5000 RGBA PNGs (about 100 kB each, 100 MB decoded).
    """
    rng = random.Random(run_id)
    big_key = (f"{run_id}-oversize-".encode() + b"k" * 60_000)[:60_000]
    garbage = b"\xc1" + rng.randbytes(900_000 - 1)  # 0xc1 is never valid msgpack
    tall = _png(Image.new("L", (16, 1_562_500), 128))
    wide = _png(Image.new("L", (1_562_500, 16), 128))
    bomb = _png(Image.new("RGBA", (5000, 5000), (200, 30, 30, 255)))
    out = [
        Poison("oversize_dead_letter", big_key, garbage, "not_msgpack"),
        Poison("tall", f"{run_id}-tall".encode(), _post_with_image(f"{run_id}-tall", tall), "image_too_large"),
        Poison("wide", f"{run_id}-wide".encode(), _post_with_image(f"{run_id}-wide", wide), "image_too_large"),
    ]
    for i in range(rgba_bombs):
        pid = f"{run_id}-rgba-{i}"
        out.append(Poison("rgba_bomb", pid.encode(), _post_with_image(pid, bomb), "image_too_large"))
    return out


def _post_with_image(post_id: str, png: bytes) -> bytes:
    return msgpack.packb({"id": post_id, "text": "look at this", "image": png}, use_bin_type=True)


# ---------------------------------------------------------------------------- memory


def peak_rss_bytes(pid: int) -> int | None:
    """The process's peak resident set (VmHWM), None when it is gone."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


class RssSampler:
    """Samples VmHWM of the watched processes in a thread; keeps the maximum even after a process dies."""

    def __init__(self, interval_s: float = 0.2) -> None:
        self.interval_s = interval_s
        self.pids: set[int] = set()
        self.peak: dict[int, int] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True, name="rss-sampler")

    def watch(self, pid: int) -> None:
        self.pids.add(pid)

    def sample(self) -> None:
        for pid in list(self.pids):
            value = peak_rss_bytes(pid)
            if value is not None:
                self.peak[pid] = max(self.peak.get(pid, 0), value)

    def _loop(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.sample()

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(5)
        self.sample()

    @property
    def max_bytes(self) -> int:
        return max(self.peak.values(), default=0)


# ---------------------------------------------------------------------------- the private stack


@contextmanager
def private_stack(base: Settings, state_dir: Path) -> Iterator[tuple[Settings, LocalStack]]:
    """A broker and a Redis of our own on free ports (stopped on exit): safe to SIGSTOP and kill."""
    settings = base.model_copy(
        update={
            "bootstrap_servers": f"127.0.0.1:{free_port()}",
            "redis_url": f"redis://127.0.0.1:{free_port()}/0",
            "state_dir": state_dir,
        }
    )
    stack = LocalStack(settings)
    try:
        stack.start()
        yield settings, stack
    finally:
        stack.stop()


def stack_pids(stack: LocalStack) -> dict[str, int]:
    """PIDs of the broker and Redis the stack started."""
    return {s.name: s.pid for s in stack.status() if s.pid is not None}


@contextmanager
def stopped(pid: int) -> Iterator[None]:
    """SIGSTOP ``pid`` for the duration of the block; SIGCONT whatever happens."""
    os.kill(pid, signal.SIGSTOP)
    try:
        yield
    finally:
        os.kill(pid, signal.SIGCONT)


# ---------------------------------------------------------------------------- publish and collect


async def publish(
    settings: Settings,
    messages: Sequence[tuple[bytes | None, bytes]],
    rate: float = 0,
    *,
    attempts: int = 20,
) -> set[bytes | None]:
    """Send (key, value) pairs to the posts topic at ``rate`` msg/s (0: at once), retrying failures.

    Returns the keys the broker acknowledged: a message counts as published only then.
    """
    from aiokafka import AIOKafkaProducer

    producer = AIOKafkaProducer(
        bootstrap_servers=settings.bootstrap_servers,
        acks="all",
        linger_ms=5,
        max_request_size=2_000_000,
        request_timeout_ms=15_000,
    )
    await producer.start()
    acked: set[bytes | None] = set()

    async def start(key: bytes | None, value: bytes) -> asyncio.Future[Any] | None:
        try:
            return await producer.send(settings.topic_posts, value, key=key)
        except Exception:  # the accumulator timed out (the broker stalls): sent again below
            return None

    try:
        pending: list[tuple[bytes | None, bytes, asyncio.Future[Any] | None]] = []
        started = time.monotonic()
        for i, (key, value) in enumerate(messages):
            if rate > 0:
                delay = started + i / rate - time.monotonic()
                if delay > 0:
                    await asyncio.sleep(delay)
            pending.append((key, value, await start(key, value)))
        for attempt in range(attempts):
            failed = []
            for key, value, fut in pending:
                try:
                    if fut is None:
                        raise ConnectionError("not handed to the producer")
                    await fut
                    acked.add(key)
                except Exception:  # the broker stalled or restarted: send again (duplicates are counted)
                    failed.append((key, value))
            if not failed:
                break
            log.info("publish: %d messages failed, resending (attempt %d)", len(failed), attempt + 1)
            await asyncio.sleep(1.0)
            pending = [(key, value, await start(key, value)) for key, value in failed]
    finally:
        await producer.stop()
    return acked


@dataclass
class Outputs:
    """What the sentiment and dead-letter topics hold: events per post id, dead letters per key."""

    events: Counter[str] = field(default_factory=Counter)
    dead: dict[bytes | None, list[str]] = field(default_factory=dict)


async def read_outputs(
    settings: Settings, want_ids: set[str], want_dead: set[bytes | None], timeout_s: float
) -> Outputs:
    """Read both output topics from the start until every wanted id and dead key is there (or timeout)."""
    out = Outputs()
    deadline = time.monotonic() + timeout_s
    async with TopicReader(settings.bootstrap_servers, [settings.topic_sentiment, settings.topic_dlq]) as reader:
        quiet_until: float | None = None
        while time.monotonic() < deadline:
            for rec in await reader.poll():
                if rec.topic == settings.topic_sentiment:
                    out.events[decode_sentiment(rec.value).id] += 1
                else:
                    out.dead.setdefault(rec.key, []).append(decode_dead_letter(rec.value).reason)
            if want_ids <= out.events.keys() and want_dead <= out.dead.keys():
                # a little longer, to count at-least-once duplicates still in flight
                quiet_until = quiet_until or time.monotonic() + 3.0
                if time.monotonic() >= quiet_until:
                    break
    return out


# ---------------------------------------------------------------------------- the run


@dataclass
class ChaosReport:
    published: int  # valid posts the broker acknowledged
    poison_published: int
    scored: int  # distinct valid posts with a sentiment event
    lost: int
    duplicates: int  # events beyond the first per post
    dead_letters: int  # dead letters read back (all keys)
    poison_in_dlq: dict[str, str]  # poison name -> "ok" or what happened instead
    unexpected_dead_letters: int  # valid posts that went to the DLQ
    peak_rss_bytes: int
    saturated_rate: float
    rate: float
    elapsed_s: float
    faults: list[str]
    worker_exit_codes: list[int | None]

    @property
    def ok(self) -> bool:
        return self.lost == 0 and all(v == "ok" for v in self.poison_in_dlq.values())

    def text(self) -> str:
        poison = ", ".join(f"{k}: {v}" for k, v in self.poison_in_dlq.items())
        return "\n".join(
            [
                f"published   {self.published} valid posts + {self.poison_published} poison records",
                f"rate        {self.rate:.1f} posts/s (half the saturated {self.saturated_rate:.1f} posts/s)",
                f"scored      {self.scored}",
                f"lost        {self.lost}",
                f"duplicates  {self.duplicates}",
                f"dead letters {self.dead_letters} (poison: {poison}; valid posts dead-lettered: "
                f"{self.unexpected_dead_letters})",
                f"peak RSS    {self.peak_rss_bytes / 2**20:.0f} MiB (max VmHWM over every worker process)",
                f"elapsed     {self.elapsed_s:.0f} s",
                "faults      " + "; ".join(self.faults),
                f"result      {'OK' if self.ok else 'FAILED'}",
            ]
        )


@dataclass
class _Fleet:
    settings: Settings
    log_dir: Path
    sampler: RssSampler
    overrides: dict[str, object]
    workers: list[WorkerProcess] = field(default_factory=list)
    exit_codes: list[int | None] = field(default_factory=list)
    started: int = 0

    def start(self) -> WorkerProcess:
        self.started += 1
        worker = WorkerProcess(self.settings, self.log_dir / f"worker-{self.started}.log", overrides=self.overrides)
        worker.start()
        self.sampler.watch(worker.pid)
        self.workers.append(worker)
        worker.wait_ready(timeout=120)
        return worker

    def kill(self, index: int) -> None:
        live = [w for w in self.workers if w.alive()]
        worker = live[index % len(live)]
        worker.kill()
        self.exit_codes.append(worker.returncode)

    def stop_all(self) -> None:
        for worker in self.workers:
            if worker.alive():
                self.exit_codes.append(worker.terminate())


async def _wait_scored(settings: Settings, n_ids: set[str], timeout_s: float) -> float:
    """Seconds until every id in ``n_ids`` has an event (the saturated rate's denominator)."""
    started = time.monotonic()
    await read_outputs(settings, n_ids, set(), timeout_s)
    return time.monotonic() - started


def run_chaos(
    base: Settings,
    posts: Sequence[Post],
    out_dir: Path,
    *,
    workers: int = 2,
    calibration_posts: int = 200,
    rate: float | None = None,
    kill_workers: bool = True,
    redis_stop_s: float = 10.0,
    broker_stop_s: float = 30.0,
    rgba_bombs: int = 4,
    collect_timeout_s: float = 600.0,
) -> ChaosReport:
    """The whole chaos run on a private stack; see the module docstring."""
    out_dir.mkdir(parents=True, exist_ok=True)
    run_id = uuid.uuid4().hex[:8]
    ids = [f"{run_id}-{i}" for i in range(len(posts))]
    messages = [
        (pid.encode(), encode_post({**p.to_dict(), "id": pid})) for pid, p in zip(ids, posts, strict=True)
    ]
    poison = poison_records(run_id, rgba_bombs)
    faults: list[str] = []
    t0 = time.monotonic()

    def note(what: str) -> None:
        faults.append(f"{time.monotonic() - t0:.0f}s {what}")
        log.info("chaos: %s", what)

    with private_stack(base, out_dir / "state") as (stack_settings, stack), RssSampler() as sampler:
        settings = asyncio.run(fresh_topics(stack_settings, prefix="chaos-"))
        fleet = _Fleet(settings, out_dir, sampler, {})
        try:
            for _ in range(workers):
                fleet.start()
            time.sleep(settings.session_timeout_s)  # let the group settle with every member
            calibration = messages[: min(calibration_posts, len(messages) // 4 or 1)]
            rest = messages[len(calibration) :]
            t_cal = time.monotonic()
            published = asyncio.run(publish(settings, calibration))
            asyncio.run(read_outputs(settings, {k.decode() for k, _ in calibration if k}, set(), 300))
            saturated = len(calibration) / max(1e-3, time.monotonic() - t_cal)
            target = rate or saturated / 2
            note(f"calibrated: {saturated:.1f} posts/s saturated, publishing at {target:.1f}")
            # poison spread through the rest
            stream: list[tuple[bytes | None, bytes]] = list(rest)
            for i, p in enumerate(poison):
                stream.insert((i + 1) * len(stream) // (len(poison) + 1), (p.key, p.value))
            duration = len(stream) / target
            published |= asyncio.run(_publish_with_faults(settings, stream, target, duration, fleet, stack, note,
                                                          kill_workers, redis_stop_s, broker_stop_s))
            id_set = set(ids)
            valid_published = {k.decode() for k in published if k is not None and k.decode(errors="replace") in id_set}
            poison_published = sum(1 for p in poison if p.key in published)
            got = asyncio.run(
                read_outputs(settings, valid_published, {p.dead_key for p in poison}, collect_timeout_s)
            )
            note("collected")
        finally:
            fleet.stop_all()
    valid = set(ids)
    scored = {pid for pid in got.events if pid in valid}
    poison_status = {}
    for p in poison:
        reasons = got.dead.get(p.dead_key, [])
        label = p.name if p.name != "rgba_bomb" else f"rgba_bomb_{p.key.decode().rsplit('-', 1)[-1]}"
        poison_status[label] = "ok" if p.reason in reasons else (f"reasons {reasons}" if reasons else "missing")
    report = ChaosReport(
        published=len(valid_published),
        poison_published=poison_published,
        scored=len(scored & valid_published),
        lost=len(valid_published - scored),
        duplicates=sum(n - 1 for pid, n in got.events.items() if pid in valid),
        dead_letters=sum(len(v) for v in got.dead.values()),
        poison_in_dlq=poison_status,
        unexpected_dead_letters=sum(1 for k in got.dead if k is not None and k.decode(errors="replace") in valid),
        peak_rss_bytes=sampler.max_bytes,
        saturated_rate=saturated,
        rate=target,
        elapsed_s=time.monotonic() - t0,
        faults=faults,
        worker_exit_codes=fleet.exit_codes,
    )
    (out_dir / "chaos-report.json").write_text(json.dumps({**asdict(report), "ok": report.ok}, indent=2))
    (out_dir / "chaos-report.txt").write_text(report.text() + "\n")
    return report


async def _publish_with_faults(
    settings: Settings,
    stream: Sequence[tuple[bytes | None, bytes]],
    rate: float,
    duration: float,
    fleet: _Fleet,
    stack: LocalStack,
    note: Any,
    kill_workers: bool,
    redis_stop_s: float,
    broker_stop_s: float,
) -> set[bytes | None]:
    publisher = asyncio.create_task(publish(settings, stream, rate))
    pids = stack_pids(stack)

    async def at(fraction: float) -> None:
        await asyncio.sleep(max(0.0, fraction * duration - (time.monotonic() - started)))

    async def kill_and_restart(index: int) -> None:
        fleet.kill(index)
        note(f"SIGKILL worker {index}")
        await asyncio.to_thread(fleet.start)
        note(f"worker {index} restarted")

    async def pause(name: str, seconds: float) -> None:
        with stopped(pids[name]):
            note(f"SIGSTOP {name} for {seconds:.0f} s")
            await asyncio.sleep(seconds)
        note(f"SIGCONT {name}")

    started = time.monotonic()
    if kill_workers:
        await at(0.15)
        await kill_and_restart(0)
    if redis_stop_s > 0 and "redis" in pids:
        await at(0.35)
        await pause("redis", redis_stop_s)
    if kill_workers:
        await at(0.5)
        await kill_and_restart(1)
    if broker_stop_s > 0 and "broker" in pids:
        await at(0.65)
        await pause("broker", broker_stop_s)
    return await publisher


# ---------------------------------------------------------------------------- command


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--posts", type=int, default=2000, help="valid posts to publish (default 2000)")
    parser.add_argument("--data-dir", help="built benchmark (default SENTIMENT_DATA_DIR)")
    parser.add_argument("--model-dir", help="exported model (default SENTIMENT_MODEL_DIR)")
    parser.add_argument("--rate", type=float, help="posts/s (default: half the measured saturated rate)")
    parser.add_argument("--redis-stop", type=float, default=10.0, help="seconds Redis is SIGSTOPped")
    parser.add_argument("--broker-stop", type=float, default=30.0, help="seconds the broker is SIGSTOPped")
    parser.add_argument("--no-kill", action="store_true", help="do not SIGKILL the workers")
    parser.add_argument("--out", default="chaos-out", help="folder for the report and the worker logs")


def run(args: argparse.Namespace) -> int:
    from stream.tools.dataset import benchmark_posts

    settings = get_settings()
    if args.model_dir:
        settings = settings.model_copy(update={"model_dir": Path(args.model_dir)})
    data_dir = Path(args.data_dir) if args.data_dir else settings.data_dir
    rows = [row for split in ("test", "val", "train") for row in benchmark_posts(data_dir, split)][: args.posts]
    if len(rows) < args.posts:
        print(f"error: {data_dir} has {len(rows)} posts, fewer than --posts {args.posts}")
        return 2
    posts = [
        Post(id=str(i), text=r.get("text"), image=r.get("image"), transcript=r.get("transcript"), label=r.get("label"))
        for i, r in enumerate(rows)
    ]
    report = run_chaos(
        settings,
        posts,
        Path(args.out),
        rate=args.rate,
        kill_workers=not args.no_kill,
        redis_stop_s=args.redis_stop,
        broker_stop_s=args.broker_stop,
    )
    print(report.text())
    print(f"report: {Path(args.out) / 'chaos-report.json'}")
    return 0 if report.ok else 1
