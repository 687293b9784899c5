"""``sentiment-stream bench``: the compute limit, the real pipeline and a naive peer, in one run on the same posts.

What one run measures, for each post mix (``--mixes``), ``--repeats`` times:

* **(a) compute limit** — :class:`~stream.service.scoring.PostScorer` alone, in a child process, on the raw msgpack
  bytes (decode + validate, tokenise, ONNX encoders, head; no broker, no Redis) at each ``--batches``
  size; the best one is the limit of one process. Then the same at that batch size in
  ``--procs`` processes × 1 thread at once (the machine limit: one process per core).
* **(d) head only** — the ONNX head on pre-encoded features (rows/s), at its best batch size.
* **(b) pipeline** — real ``sentiment-stream worker`` processes (1 and ``--procs``) on fresh topics,
  with the broker and Redis. The workers are started and warmed (every partition has served a post and
  every worker has scored one), then ``--seconds`` worth of posts (sized from (a)) is produced as fast
  as possible. Rate = posts / (last event's emit time − first publish time).
* **latency** — with the ``--procs`` workers still up: open-loop Poisson arrivals at ``--loads``
  fractions of the saturated rate for ``--latency-seconds`` each. Each post's ``ts`` is set when it
  is handed to the producer, so an event's ``latency_s`` (emit − ts) is emit − publish; receive −
  publish (at our consumer) is reported too.
* **(c) naive peer** — :mod:`export.bench_naive`: a Faust agent scoring one post at a time with
  PyTorch eager, same posts, same broker, same saturation protocol, for ``--naive-seconds`` (it never
  drains the backlog; its rate counts the events so far). ``--naive-threads`` torch threads (default
  1: with torch's default of one per core it collapsed on the shared machine, see docs/performance.md).
* **(a) again** after the pipelines: the ratios use the mean of both, and each pipeline also reports
  how busy its scoring executors were (Σ batch seconds / wall seconds / workers) — a measure of
  pipeline overhead that does not depend on the machine's load.

The machine is shared, so ratios are taken within one repeat (same load), and the spread over repeats
and the load average (``os.getloadavg``) at each step are reported. Output: JSON (``--json``) and a
Markdown table (stdout, and ``--markdown``). Settings (``SENTIMENT_*``) apply to the in-process scorer
and the workers alike, e.g. ``SENTIMENT_TEXT_ENCODER=int8``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import math
import multiprocessing as mp
import os
import statistics
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import msgpack
import numpy as np
from prometheus_client.parser import text_string_to_metric_families

from stream.service.manifest import Manifest
from stream.service.settings import Settings, get_settings
from stream.tools.cpu_profile import CpuSampler
from stream.tools.launcher import WORKER_MODULE, WorkerProcess
from stream.tools.services import fresh_topics
from stream.tools.topic_reader import TopicReader

__all__ = ["MIXES", "Mix", "add_arguments", "build_posts", "run"]

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Mix:
    """Which modalities the bench posts carry: every post has text; images and transcripts at these shares."""

    name: str
    image: float
    transcript: float

    def describe(self) -> str:
        return f"all text, {self.image:.0%} images, {self.transcript:.0%} transcripts (independent)"


# Realistic: every post has text; about 2 in 5 carry a picture and 1 in 5 a clip with speech.
MIXES: Final = {"realistic": Mix("realistic", 0.4, 0.2), "text": Mix("text", 0.0, 0.0)}
_WARMUP_PER_PARTITION: Final = 2


def _load_avg() -> float:
    return round(os.getloadavg()[0], 2)


def _percentiles(values: Sequence[float]) -> dict[str, float]:
    if not values:
        return {"p50": math.nan, "p95": math.nan, "p99": math.nan, "max": math.nan}
    arr = np.asarray(values)
    return {
        "p50": float(np.percentile(arr, 50)),
        "p95": float(np.percentile(arr, 95)),
        "p99": float(np.percentile(arr, 99)),
        "max": float(arr.max()),
    }


def _spread(values: Sequence[float]) -> dict[str, float]:
    finite = [v for v in values if v is not None and math.isfinite(v)]
    if not finite:
        return {"median": math.nan, "min": math.nan, "max": math.nan}
    return {"median": float(statistics.median(finite)), "min": float(min(finite)), "max": float(max(finite))}


# -- posts ---------------------------------------------------------------------------------------


def build_posts(data_dir: Path, split: str, n: int, mix: Mix, seed: int, run_id: str) -> list[dict[str, Any]]:
    """``n`` post dicts (event contract fields) from a built benchmark, cycling its rows, modalities per ``mix``."""
    from stream.tools.dataset import benchmark_posts

    rows = list(benchmark_posts(data_dir, split))
    if not rows:
        raise ValueError(f"{data_dir} has no posts in split {split!r}")
    rng = np.random.default_rng(seed)
    image_rows = [r for r in rows if r.get("image")]
    transcript_rows = [r for r in rows if r.get("transcript")]
    posts = []
    for i in range(n):
        row = rows[i % len(rows)]
        post: dict[str, Any] = {"id": f"{run_id}-{i}", "text": row["text"], "label": row.get("label")}
        if image_rows and rng.random() < mix.image:
            post["image"] = (row if row.get("image") else image_rows[i % len(image_rows)])["image"]
        if transcript_rows and rng.random() < mix.transcript:
            post["transcript"] = (row if row.get("transcript") else transcript_rows[i % len(transcript_rows)])[
                "transcript"
            ]
        posts.append(post)
    return posts


def _encode(post: dict[str, Any], **extra: Any) -> bytes:
    return msgpack.packb({**post, **extra}, use_bin_type=True)


_CONTENT: Final = ("text", "image", "transcript")


def repetition(posts: Sequence[dict[str, Any]]) -> dict[str, float]:
    """Per modality, the share of the stream's items whose exact content (bytes or text) appeared earlier in it:
    the hit rate an unbounded encoder cache would reach on this stream (the stated repetition model)."""
    out: dict[str, float] = {}
    for m in _CONTENT:
        items = [p[m] for p in posts if p.get(m) is not None]
        out[m] = 1 - len(set(items)) / len(items) if items else math.nan
    return out


def no_repeat(posts: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """The same posts with every content unique: texts and transcripts get a ``#n`` suffix, images a few bytes
    after their end marker (PNG IEND / JPEG EOI; decoders ignore them, so the pixels are the same)."""
    out = []
    for i, post in enumerate(posts):
        p = dict(post)
        for m in ("text", "transcript"):
            if p.get(m) is not None:
                p[m] = f"{p[m]} #{i}"
        if p.get("image") is not None:
            p["image"] = bytes(p["image"]) + b"\x00nr" + i.to_bytes(4, "big")
        out.append(p)
    return out


# -- (a) compute limit and (d) head only ---------------------------------------------------------


def _scorer_rate(
    manifest_dir: str, values: Sequence[bytes], batch: int, seconds: float, start_at: float | None = None
) -> dict[str, float]:
    """posts/s of ``PostScorer.score`` over ``values`` in batches of ``batch`` for ``seconds``; one warm-up batch.

    ``start_at`` (epoch seconds) lets several processes measure the same window.
    """
    from stream.service.scoring import InputRecord, PostScorer

    scorer = PostScorer(Manifest.load(manifest_dir, check_graphs=False), get_settings())
    records = [InputRecord(value=v) for v in values]
    batches = [records[i : i + batch] for i in range(0, len(records) - batch + 1, batch)] or [records]
    scorer.score(batches[0])
    if start_at is not None:
        time.sleep(max(0.0, start_at - time.time()))
    done, start = 0, time.perf_counter()
    times: list[float] = []
    while True:
        t0 = time.perf_counter()
        out = scorer.score(batches[len(times) % len(batches)])
        times.append(time.perf_counter() - t0)
        done += len(out.events) + len(out.dead_letters)
        elapsed = time.perf_counter() - start
        if elapsed >= seconds:
            return {"posts_s": done / elapsed, "batch_s_median": float(statistics.median(times)), "batches": len(times)}


def _scorer_rate_child(args: tuple[str, list[bytes], int, float, float | None]) -> dict[str, float]:
    logging.basicConfig(level=logging.WARNING)
    if os.getsid(0) != os.getpid():
        os.setsid()  # its own scheduler autogroup, like every process under test (see WorkerProcess.new_session)
    return _scorer_rate(*args)


def compute_limit(
    manifest_dir: Path, values: Sequence[bytes], batches: Sequence[int], seconds: float, procs: int
) -> dict[str, Any]:
    """(a): posts/s of one process per batch size, the best one, and ``procs`` processes × 1 thread at that size.

    Every measurement runs in a spawned child with a session of its own (see :class:`WorkerProcess`).
    """
    # spawn: a fork of this process would inherit its ONNX thread pools and Python state
    ctx = mp.get_context("spawn")
    with ctx.Pool(1) as pool:
        per_batch = {
            b: pool.apply(_scorer_rate_child, ((str(manifest_dir), list(values), b, seconds, None),)) for b in batches
        }
    best = max(per_batch, key=lambda b: per_batch[b]["posts_s"])
    result: dict[str, Any] = {
        "per_batch": {str(b): r for b, r in per_batch.items()},
        "best_batch": best,
        "one_process": per_batch[best]["posts_s"],
        "load_before_multi": _load_avg(),
    }
    if procs > 1:
        start_at = time.time() + 20.0  # children load the model first, then measure the same window
        with ctx.Pool(procs) as pool:
            rates = pool.map(_scorer_rate_child, [(str(manifest_dir), list(values), best, seconds, start_at)] * procs)
        result["multi_process"] = sum(r["posts_s"] for r in rates)
        result["multi_process_each"] = [r["posts_s"] for r in rates]
    return result


def head_only(manifest_dir: Path, mix: Mix, batches: Sequence[int], seconds: float, seed: int) -> dict[str, Any]:
    """(d): rows/s of the ONNX head on pre-encoded (random, right-shaped) features with ``mix``'s presence."""
    from stream.service.runtime import create_session

    settings = get_settings()
    manifest = Manifest.load(manifest_dir, check_graphs=False)
    session = create_session(manifest.head_path(settings.recovery), settings)
    mean, var = manifest.queue_moments()
    rng = np.random.default_rng(seed)
    rates: dict[str, float] = {}
    for b in batches:
        present = np.ones((b, 3), np.float32)
        present[:, 1] = rng.random(b) < mix.image
        present[:, 2] = rng.random(b) < mix.transcript
        feeds = {
            "text": rng.standard_normal((b, 384), dtype=np.float32) * 0.05,
            "image": np.abs(rng.standard_normal((b, 1280), dtype=np.float32)) * present[:, 1:2],
            "transcript": rng.standard_normal((b, 384), dtype=np.float32) * 0.05 * present[:, 2:3],
            "present": present,
            "queue_mean": mean,
            "queue_var": var,
        }
        session.run(feeds)
        n, start = 0, time.perf_counter()
        while (elapsed := time.perf_counter() - start) < seconds:
            session.run(feeds)
            n += b
        rates[str(b)] = n / elapsed
    best = max(rates, key=lambda k: rates[k])
    return {"per_batch": rates, "best_batch": int(best), "rows_s": rates[best]}


# -- processes under test ------------------------------------------------------------------------


def _metrics_text(service: WorkerProcess) -> str:
    """The process's /metrics ("" while it is not up yet)."""
    try:
        return service.metrics_text(timeout=2)
    except OSError:
        return ""


def _samples(metrics_text: str) -> list[Any]:
    """Every sample of a Prometheus text exposition (``prometheus_client.parser``; [] if unparsable)."""
    try:
        return [s for family in text_string_to_metric_families(metrics_text) for s in family.samples]
    except ValueError:
        return []


def _scored(service: WorkerProcess) -> float:
    """``sentiment_events_total{outcome="scored"}`` from the worker's metrics (0 if not up yet)."""
    return sum(
        s.value
        for s in _samples(_metrics_text(service))
        if s.name == "sentiment_events_total" and s.labels.get("outcome") == "scored"
    )


def _stage_seconds(metrics_text: str) -> dict[str, float]:
    """Sum of seconds per stage (``sentiment_stage_latency_seconds_sum``), ``posts`` and ``batches``, and the
    encoder cache's lookups (``cache_<modality>_<hit|miss>``)."""
    out: dict[str, float] = {}
    for sample in _samples(metrics_text):
        if sample.name == "sentiment_stage_latency_seconds_sum":
            stage = sample.labels["stage"]
            out[stage] = out.get(stage, 0.0) + sample.value
        elif sample.name == "sentiment_batch_size_posts_sum":
            out["posts"] = sample.value
        elif sample.name == "sentiment_batch_size_posts_count":
            out["batches"] = sample.value
        elif sample.name == "sentiment_encode_cache_lookups_total":
            out[f"cache_{sample.labels['modality']}_{sample.labels['result']}"] = sample.value
    return out


class Progress:
    """One status line: rewritten in place on a terminal, logged every ``every_s`` seconds otherwise."""

    def __init__(self, every_s: float = 5.0) -> None:
        self.tty = sys.stderr.isatty()
        self.every_s = every_s
        self._last = 0.0
        self.step = ""
        self.started = time.monotonic()

    def begin(self, step: str) -> None:
        self.step = step
        self._last = 0.0
        self._show(f"{step} …", force=True)

    def update(self, done: int, total: int, rate: float | None = None) -> None:
        pct = 100 * done / total if total else 100.0
        extra = f", {rate:,.0f} posts/s" if rate else ""
        self._show(f"{self.step}: {done:,}/{total:,} events ({pct:.0f} %{extra})")

    def _show(self, text: str, force: bool = False) -> None:
        now = time.monotonic()
        line = f"[{(now - self.started) / 60:5.1f} min] {text}"
        if self.tty:
            sys.stderr.write("\r\x1b[K" + line)
            sys.stderr.flush()
        elif force or now - self._last >= self.every_s:
            log.info("%s", line)
            self._last = now

    def done(self) -> None:
        if self.tty:
            sys.stderr.write("\n")


PROGRESS = Progress()


def _stack_pids(settings: Settings) -> dict[str, int]:
    """PIDs of the broker and Redis (when this machine runs them) and of the bench itself, for the CPU profile."""
    from stream.tools.services import LocalStack

    pids = {"bench": os.getpid()}
    for status in LocalStack(settings).status():
        if status.pid is not None:
            pids[status.name] = status.pid
    # a broker or Redis found already running (started by another checkout, or the machine's): find it by name
    wanted = {name: comm for name, comm in (("broker", "tansu"), ("redis", "redis-server")) if name not in pids}
    for entry in Path("/proc").iterdir():
        if wanted and entry.name.isdigit():
            with contextlib.suppress(OSError):
                comm = (entry / "comm").read_text().strip()
                for name, expected in list(wanted.items()):
                    if comm == expected:
                        pids[name] = int(entry.name)
                        del wanted[name]
    return pids


# -- broker side: produce and collect ------------------------------------------------------------


@dataclass
class Seen:
    emit_ts: float
    event_ts: float
    received: float


class Collector:
    """Reads ``sentiment`` from the earliest offset of every partition in the background (no group, no join wait)."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.seen: dict[str, Seen] = {}
        self.duplicates = 0
        self._task: asyncio.Task[None] | None = None
        self._reader = TopicReader(settings.bootstrap_servers, [settings.topic_sentiment], fetch_max_wait_ms=20)

    async def start(self) -> None:
        await self._reader.start()
        self._task = asyncio.create_task(self._loop())

    async def _loop(self) -> None:
        while True:
            records = await self._reader.poll()
            now = time.time()
            for rec in records:
                d = msgpack.unpackb(rec.value, raw=False)
                if d["id"] in self.seen:
                    self.duplicates += 1
                    continue
                self.seen[d["id"]] = Seen(float(d["emit_ts"]), float(d["event_ts"]), now)

    async def wait_for(self, ids: Sequence[str], timeout: float, progress: bool = False) -> bool:
        deadline = time.monotonic() + timeout
        started, at_start = time.monotonic(), sum(i in self.seen for i in ids)
        while time.monotonic() < deadline:
            done = sum(i in self.seen for i in ids)
            if progress:  # the rate of events arriving while we wait (after a second of it)
                waited = time.monotonic() - started
                PROGRESS.update(done, len(ids), (done - at_start) / waited if waited >= 1 else None)
            if done == len(ids):
                return True
            if self._task is not None and self._task.done():
                self._task.result()
            await asyncio.sleep(0.05)
        return False

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        await self._reader.stop()


async def _producer(settings: Settings, linger_ms: int) -> Any:
    from aiokafka import AIOKafkaProducer

    producer = AIOKafkaProducer(
        bootstrap_servers=settings.bootstrap_servers, acks="all", linger_ms=linger_ms, max_request_size=4_000_000
    )
    await producer.start()
    return producer


async def _warm_up(
    settings: Settings,
    services: Sequence[WorkerProcess],
    collector: Collector,
    post: dict[str, Any],
    run_id: str,
    timeout: float = 120,
) -> None:
    """Until every partition has served a post and every process has scored one (the group is stable)."""
    producer = await _producer(settings, 0)
    deadline = time.monotonic() + timeout
    try:
        round_ = 0
        while True:
            ids = []
            for p in range(settings.partitions):
                for k in range(_WARMUP_PER_PARTITION):
                    pid = f"{run_id}-warm{round_}-{p}-{k}"
                    ids.append(pid)
                    await producer.send_and_wait(
                        settings.topic_posts, _encode(post, id=pid, ts=time.time()), key=pid.encode(), partition=p
                    )
            if not await collector.wait_for(ids, max(1.0, deadline - time.monotonic())):
                raise TimeoutError("warm-up posts were not scored in time; see the worker logs")
            scored = [_scored(s) for s in services]
            if all(n > 0 for n in scored) or time.monotonic() > deadline:
                return
            round_ += 1
            await asyncio.sleep(1.0)
    finally:
        await producer.stop()


async def _saturate(
    settings: Settings, collector: Collector, posts: Sequence[dict[str, Any]], timeout: float
) -> dict[str, Any]:
    """Produce ``posts`` as fast as possible; posts/s = events / (last emit − first publish).

    If not every event arrives within ``timeout`` (the naive peer), the rate counts the events so far:
    the backlog never ran dry, so it is still the saturated rate.
    """
    producer = await _producer(settings, 5)
    load = _load_avg()
    try:
        t0 = time.time()
        futures = [
            await producer.send(settings.topic_posts, _encode(p, ts=time.time()), key=p["id"].encode()) for p in posts
        ]
        await asyncio.gather(*futures)
        produced_s = time.time() - t0
    finally:
        await producer.stop()
    ids = [p["id"] for p in posts]
    complete = await collector.wait_for(ids, timeout, progress=True)
    got = [collector.seen[i] for i in ids if i in collector.seen]
    last = max((s.emit_ts for s in got), default=math.nan)
    return {
        "posts": len(posts),
        "events": len(got),
        "complete": complete,
        "produce_s": produced_s,
        "elapsed_s": last - t0,
        "posts_s": len(got) / (last - t0) if got else math.nan,
        "load_avg": load,
    }


async def _open_loop(
    settings: Settings,
    collector: Collector,
    posts: Sequence[dict[str, Any]],
    rate: float,
    seconds: float,
    seed: int,
    linger_ms: int = 0,
) -> dict[str, Any]:
    """Poisson arrivals at ``rate`` for ``seconds``; latency = emit − publish and receive − publish.

    ``linger_ms``: the producer's linger (0: every post is its own produce request, aiokafka's default;
    Kafka's own clients linger 5 ms since Kafka 4.0). The publish timestamp is taken before the linger.
    """
    rng = np.random.default_rng(seed)
    n = max(1, min(len(posts), round(rate * seconds)))
    gaps = rng.exponential(1.0 / rate, n)
    producer = await _producer(settings, linger_ms)
    load = _load_avg()
    futures = []
    try:
        start = time.monotonic()
        due = start
        for post, gap in zip(posts[:n], gaps, strict=True):
            due += float(gap)
            delay = due - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            futures.append(
                await producer.send(settings.topic_posts, _encode(post, ts=time.time()), key=post["id"].encode())
            )
        await asyncio.gather(*futures)
        sent_s = time.monotonic() - start
    finally:
        await producer.stop()
    ids = [p["id"] for p in posts[:n]]
    complete = await collector.wait_for(ids, timeout=60 + seconds, progress=True)
    got = [collector.seen[i] for i in ids if i in collector.seen]
    return {
        "target_posts_s": rate,
        "offered_posts_s": n / sent_s if sent_s > 0 else math.nan,
        "posts": n,
        "events": len(got),
        "complete": complete,
        "emit_minus_publish": _percentiles([s.emit_ts - s.event_ts for s in got]),
        "receive_minus_publish": _percentiles([s.received - s.event_ts for s in got]),
        "load_avg": load,
    }


async def pipeline(
    base: Settings,
    module: list[str],
    n_procs: int,
    posts: Sequence[dict[str, Any]],
    latency_posts: Sequence[dict[str, Any]],
    loads: Sequence[float],
    latency_seconds: float,
    log_dir: Path,
    tag: str,
    seed: int,
    timeout: float,
    extra_env: dict[str, str] | None = None,
    rate: float | None = None,
    linger_ms: int = 0,
) -> dict[str, Any]:
    """(b) or (c): start ``n_procs`` processes of ``module``, warm up, saturate, then the open-loop loads.

    ``loads`` are fractions of ``rate`` when given (then the saturation run is skipped: ``posts`` only warms
    up), else of the saturated rate just measured."""
    settings = await fresh_topics(base, prefix=f"bench-{tag}-")
    services = [
        WorkerProcess(
            settings,
            log_dir / f"{settings.consumer_group}-{i}.log",
            env=dict(extra_env or {}),
            module=module,
            # A session of its own (sched_autogroup): every process under test gets the same CPU share.
            new_session=True,
        )
        for i in range(n_procs)
    ]
    collector = Collector(settings)
    await collector.start()
    result: dict[str, Any] = {"processes": n_procs, "module": " ".join(module), "logs": str(log_dir)}
    try:
        for s in services:
            s.start()
        await _warm_up(settings, services, collector, posts[0], f"{tag}-{uuid.uuid4().hex[:4]}")
        pids = {**{f"worker-{i}": s.pid for i, s in enumerate(services)}, **_stack_pids(base)}
        if rate is None:
            before = [_stage_seconds(_metrics_text(s)) for s in services]
            sampler = CpuSampler(pids).start()
            result["saturation"] = await _saturate(settings, collector, posts, timeout)
            result["cpu"] = sampler.stop()
            after = [_stage_seconds(_metrics_text(s)) for s in services]
            stages: dict[str, float] = {}
            for b, a in zip(before, after, strict=True):
                for k, v in a.items():
                    stages[k] = stages.get(k, 0.0) + v - b.get(k, 0.0)
            result["stage_seconds"] = stages
        sat = rate if rate is not None else result["saturation"]["posts_s"]
        result["latency"] = {}
        offset = 0
        for f in loads:
            chunk = latency_posts[offset:]
            sampler = CpuSampler(pids).start()
            res = await _open_loop(settings, collector, chunk, f * sat, latency_seconds, seed, linger_ms)
            res["cpu"] = sampler.stop()
            offset += res["posts"]
            result["latency"][f"{f:.2f}"] = res
        result["duplicates"] = collector.duplicates
    finally:
        await collector.stop()
        for s in services:
            s.terminate()
    return result


# -- one repeat ----------------------------------------------------------------------------------


def _ratio(a: float | None, b: float | None) -> float:
    return a / b if a and b and math.isfinite(a) and math.isfinite(b) else math.nan


def run_mix(args: argparse.Namespace, mix: Mix, manifest_dir: Path, data_dir: Path, repeat: int) -> dict[str, Any]:
    """Every measurement of one repeat for one mix, plus the ratios between them."""
    settings = get_settings().model_copy(update={"model_dir": manifest_dir})
    seed = args.seed + repeat
    run_id = f"b{uuid.uuid4().hex[:6]}"
    sample = build_posts(data_dir, args.split, args.sample_posts, mix, seed, run_id + "s")
    values = [_encode(p) for p in sample]
    out: dict[str, Any] = {"mix": mix.name, "repeat": repeat, "load_start": _load_avg()}

    log.info("[%s #%d] (a) compute limit", mix.name, repeat)
    out["a_compute"] = compute_limit(manifest_dir, values, args.batches, args.cell_seconds, args.procs)
    log.info("[%s #%d] (a) %s", mix.name, repeat, {k: v for k, v in out["a_compute"].items() if k != "per_batch"})
    out["d_head"] = head_only(manifest_dir, mix, args.head_batches, args.cell_seconds, seed)

    limit_1 = out["a_compute"]["one_process"]
    n_pipe = max(args.min_posts, round(args.seconds * out["a_compute"].get("multi_process", limit_1)))
    posts = build_posts(data_dir, args.split, n_pipe, mix, seed, run_id + "p")
    n_lat = round(sum(args.loads) * args.latency_seconds * out["a_compute"].get("multi_process", limit_1) * 1.2) + 10
    latency_posts = build_posts(data_dir, args.split, n_lat, mix, seed + 1, run_id + "l")
    unique = no_repeat(posts) if mix.name in args.cache_mixes else []
    log_dir = Path(args.log_dir)
    log_dir.mkdir(parents=True, exist_ok=True)
    worker_cmd = list(WORKER_MODULE)

    async def pipelines() -> dict[str, Any]:
        res: dict[str, Any] = {}
        first = args.policies[0]

        async def arm(
            key: str,
            what: str,
            n: int,
            stream: Sequence[dict[str, Any]],
            env: dict[str, str],
            module: Sequence[str] = worker_cmd,
            timeout: float = args.timeout,
        ) -> None:
            PROGRESS.begin(f"[{mix.name} #{repeat}] {what}")
            tag = f"{mix.name}{key.replace('_', '')}"
            res[key] = await pipeline(settings, list(module), n, stream, [], [], 0, log_dir, tag, seed, timeout, env)
            res[key]["env"] = env
            log.info("[%s #%d] %s: %s", mix.name, repeat, what, res[key]["saturation"])

        await arm("b_pipeline_1", f"(b) 1 worker, {first} batches", 1, posts, {"SENTIMENT_BATCH_POLICY": first})
        keys = {p: f"b_pipeline_{args.procs}" + ("" if p == first else f"_{p}") for p in args.policies}
        for policy, key in keys.items():
            env = {"SENTIMENT_BATCH_POLICY": policy}
            await arm(key, f"(b) {args.procs} workers, {policy} batches", args.procs, posts, env)
        if mix.name in args.latency_mixes and args.loads:
            # Every policy gets the same offered rates: fractions of the lowest saturated rate of them all.
            reference = min(res[k]["saturation"]["posts_s"] for k in keys.values())
            for policy, key in keys.items():
                PROGRESS.begin(f"[{mix.name} #{repeat}] latency, {args.procs} workers, {policy} batches")
                lat = await pipeline(
                    settings,
                    list(worker_cmd),
                    args.procs,
                    posts[:1],
                    latency_posts,
                    args.loads,
                    args.latency_seconds,
                    log_dir,
                    f"{mix.name}lat{policy}",
                    seed,
                    args.timeout,
                    {"SENTIMENT_BATCH_POLICY": policy},
                    rate=reference,
                    linger_ms=args.open_loop_linger_ms,
                )
                res[key]["latency"] = lat["latency"]
                res[key]["latency_reference_posts_s"] = reference
        if mix.name in args.cache_mixes:
            cache_env = {"SENTIMENT_BATCH_POLICY": first, "SENTIMENT_ENCODE_CACHE_ENTRIES": str(args.cache_entries)}
            res["cache_repetition"] = {"bench_stream": repetition(posts), "no_repeat": repetition(unique)}
            await arm("b_cache_stream", "(b) + encoder cache, the bench stream", args.procs, posts, cache_env)
            await arm("b_cache_unique", "(b) + encoder cache, a no-repeat stream", args.procs, unique, cache_env)
        if not args.skip_naive:
            threads = {"OMP_NUM_THREADS": str(args.naive_threads)} if args.naive_threads else {}
            what = f"(c) naive peer for {args.naive_seconds:.0f} s"
            await arm("c_naive", what, 1, posts, threads, ["export.bench_naive"], args.naive_seconds)
        PROGRESS.done()
        return res

    out.update(asyncio.run(pipelines()))
    # The machine is shared: measure the limit again after the pipelines and compare with the mean.
    log.info("[%s #%d] (a) compute limit again", mix.name, repeat)
    best = out["a_compute"]["best_batch"]
    out["a_compute_after"] = compute_limit(manifest_dir, values, [best], args.cell_seconds, args.procs)
    a1 = (limit_1 + out["a_compute_after"]["one_process"]) / 2
    a2 = (out["a_compute"].get("multi_process", limit_1) + out["a_compute_after"].get("multi_process", a1)) / 2
    out["limit_mean"] = {"one_process": a1, "multi_process": a2}
    for key in [k for k in out if k.startswith(("b_pipeline_", "b_cache_"))]:
        sat, n = out[key]["saturation"], out[key]["processes"]
        # share of the wall time the scoring executors were busy: 1.0 = the pipeline never starves them
        out[key]["executor_busy"] = out[key]["stage_seconds"].get("batch", math.nan) / (sat["elapsed_s"] * n)
    b1 = out["b_pipeline_1"]["saturation"]["posts_s"]
    b2 = out[f"b_pipeline_{args.procs}"]["saturation"]["posts_s"]
    c = out["c_naive"]["saturation"]["posts_s"] if "c_naive" in out else math.nan
    batch_s = out["a_compute"]["per_batch"].get(str(settings.max_batch), {}).get("batch_s_median", math.nan)
    out["batch_compute_s"] = batch_s
    out["ratios"] = {
        "b1_over_a1": _ratio(b1, a1),
        "bN_over_aN": _ratio(b2, a2),
        "bN_over_c": _ratio(b2, c),
        "bN_over_b1": _ratio(b2, b1),
        "aN_over_a1": _ratio(a2, a1),
    }
    for policy in args.policies[1:]:
        other = out[f"b_pipeline_{args.procs}_{policy}"]["saturation"]["posts_s"]
        out["ratios"][f"bN_{policy}_over_aN"] = _ratio(other, a2)
        out["ratios"][f"bN_over_bN_{policy}"] = _ratio(b2, other)
    for key in ("b_cache_stream", "b_cache_unique"):
        if key in out:
            rate = out[key]["saturation"]["posts_s"]
            out["ratios"][f"{key}_over_c"] = _ratio(rate, c)
            out["ratios"][f"{key}_over_bN"] = _ratio(rate, b2)
            stages = out[key]["stage_seconds"]
            looked = {m: stages.get(f"cache_{m}_hit", 0.0) + stages.get(f"cache_{m}_miss", 0.0) for m in _CONTENT}
            out[key]["hit_rate"] = {
                m: stages.get(f"cache_{m}_hit", 0.0) / looked[m] if looked[m] else math.nan for m in _CONTENT
            }
    # p99 emit − publish over one batch's compute, at every load, for every policy
    out["p99_over_batch"] = {}
    for policy in args.policies:
        key = f"b_pipeline_{args.procs}" + ("" if policy == args.policies[0] else f"_{policy}")
        for load, res in out[key].get("latency", {}).items():
            out["p99_over_batch"][f"{policy}@{load}"] = _ratio(res["emit_minus_publish"]["p99"], batch_s)
    half = out["p99_over_batch"].get(f"{args.policies[0]}@0.50")
    if half is not None:
        out["p99_at_half_over_batch"] = half
    out["load_end"] = _load_avg()
    return out


# -- report --------------------------------------------------------------------------------------


def _fmt(x: float | None, digits: int = 0) -> str:
    if x is None or not math.isfinite(x):
        return "–"
    return f"{x:,.{digits}f}"


def _cell(values: Sequence[float], digits: int = 0, scale: float = 1.0) -> str:
    s = _spread([v * scale for v in values if v is not None])
    if not math.isfinite(s["median"]):
        return "–"
    if s["min"] == s["max"]:
        return _fmt(s["median"], digits)
    return f"{_fmt(s['median'], digits)} ({_fmt(s['min'], digits)}–{_fmt(s['max'], digits)})"


def _path(*keys: str) -> Callable[[dict[str, Any]], float]:
    """A getter of ``r[k1][k2]…`` (a missing key leaves the cell empty)."""

    def get(r: dict[str, Any]) -> float:
        value: Any = r
        for k in keys:
            value = value[k]
        return float(value)

    return get


def _mean_batch(key: str) -> Callable[[dict[str, Any]], float]:
    def get(r: dict[str, Any]) -> float:
        return float(r[key]["stage_seconds"]["posts"] / r[key]["stage_seconds"]["batches"])

    return get


def _latency_cpu(key: str, load: str, cpus: int) -> Callable[[dict[str, Any]], float]:
    """Share of the machine the workers, the stack and the bench used during one open-loop run."""

    def get(r: dict[str, Any]) -> float:
        return float(r[key]["latency"][load]["cpu"]["total_core_share"]) / cpus

    return get


def _cpu(procs: int, label: str, thread: bool = False) -> Callable[[dict[str, Any]], float]:
    """Share of a core a process (``worker`` = the mean worker; ``thread``: its busiest thread) used at saturation."""

    def get(r: dict[str, Any]) -> float:
        processes = r[f"b_pipeline_{procs}"]["cpu"]["processes"]
        chosen = [p for name, p in processes.items() if name == label or name.startswith(f"{label}-")]
        if not chosen:
            return math.nan
        values = [
            (p["threads"][0]["core_share"] if p["threads"] else 0.0) if thread else p["cpu_core_share"] for p in chosen
        ]
        return float(np.mean(values))

    return get


def markdown(report: dict[str, Any]) -> str:
    """The bench table: median (min–max over repeats) per mix."""
    cfg = report["config"]
    procs = cfg["procs"]
    policies = cfg.get("policies", ["adaptive"])
    first = policies[0]
    lines = [
        f"model `{cfg['model_version']}` ({cfg['model_dir']}); text encoder {cfg['text_encoder']}, intra-op threads "
        f"{cfg['intra_op_threads']}; batches: {' vs '.join(policies)} (adaptive: up to "
        f"{cfg.get('adaptive_max_batch', '–')} records, SLO {cfg.get('latency_slo_s', '–')} s; fixed: max_batch "
        f"{cfg['max_batch']}, max_wait {cfg['max_wait_s']} s); {cfg['repeats']} repeat(s); "
        "cells: median (min–max over repeats).",
        "",
    ]
    by_mix: dict[str, list[dict[str, Any]]] = {}
    for r in report["runs"]:
        by_mix.setdefault(r["mix"], []).append(r)
    head = "| measurement | " + " | ".join(f"{m} ({MIXES[m].describe()})" for m in by_mix) + " |"
    lines += [head, "|---|" + "---|" * len(by_mix)]

    def row(label: str, get: Callable[[dict[str, Any]], float | None], digits: int = 0, scale: float = 1.0) -> None:
        cells = []
        for runs in by_mix.values():
            vals = []
            for r in runs:
                with contextlib.suppress(KeyError, TypeError, IndexError):
                    v = get(r)
                    if v is not None:
                        vals.append(v)
            cells.append(_cell(vals, digits, scale))
        lines.append(f"| {label} | " + " | ".join(cells) + " |")

    def key(policy: str) -> str:
        return f"b_pipeline_{procs}" + ("" if policy == first else f"_{policy}")

    row("(a) compute limit, 1 process × 1 thread, best batch [posts/s]", lambda r: r["limit_mean"]["one_process"])
    row("    measured before the pipelines", lambda r: r["a_compute"]["one_process"])
    row("    measured after the pipelines", lambda r: r["a_compute_after"]["one_process"])
    row("    best batch size", lambda r: r["a_compute"]["best_batch"])
    row(f"(a) compute limit, {procs} processes × 1 thread [posts/s]", lambda r: r["limit_mean"]["multi_process"])
    row(f"(b) pipeline, 1 worker, {first} batches [posts/s]", lambda r: r["b_pipeline_1"]["saturation"]["posts_s"])
    for policy in policies:
        row(f"(b) pipeline, {procs} workers, {policy} batches [posts/s]", _path(key(policy), "saturation", "posts_s"))
    row("(b) executor busy, 1 worker [% of wall time]", lambda r: r["b_pipeline_1"]["executor_busy"], 0, 100)
    for policy in policies:
        row(
            f"(b) executor busy, {procs} workers, {policy} [% of wall time]",
            _path(key(policy), "executor_busy"),
            0,
            100,
        )
        row(f"(b) mean batch, {procs} workers, {policy} [posts]", _mean_batch(key(policy)), 1)
    row(
        "(c) naive peer: Faust + PyTorch eager, one post at a time [posts/s]",
        lambda r: r["c_naive"]["saturation"]["posts_s"],
        1,
    )
    row("(d) head only, pre-encoded features [rows/s]", lambda r: r["d_head"]["rows_s"])
    row("(b)/(a), 1 worker / 1 process [%]", lambda r: r["ratios"]["b1_over_a1"], 0, 100)
    row(f"(b)/(a), {procs} workers / {procs} processes, {first} [%]", lambda r: r["ratios"]["bN_over_aN"], 0, 100)
    for policy in policies[1:]:
        row(
            f"(b)/(a), {procs} workers / {procs} processes, {policy} [%]",
            _path("ratios", f"bN_{policy}_over_aN"),
            0,
            100,
        )
        row(f"saturated {first} / {policy}, {procs} workers [×]", _path("ratios", f"bN_over_bN_{policy}"), 2)
    row(f"(b)/(c), {procs} workers / naive [×]", lambda r: r["ratios"]["bN_over_c"], 1)
    row(f"scaling: {procs} workers / 1 worker [×]", lambda r: r["ratios"]["bN_over_b1"], 2)
    row(f"scaling: {procs} processes / 1 process, compute only [×]", lambda r: r["ratios"]["aN_over_a1"], 2)
    row("one batch of max_batch computed in-process [ms]", lambda r: r["batch_compute_s"], 0, 1000)
    row(
        "100 % load below = the lowest saturated rate of the policies [posts/s]",
        _path(key(first), "latency_reference_posts_s"),
    )
    for f in cfg["loads"]:
        load = f"{f:.2f}"
        for policy in policies:
            for p in ("p50", "p99"):
                row(
                    f"latency at {f:.0%} of saturation, {policy}, emit − publish, {p} [ms]",
                    _path(key(policy), "latency", load, "emit_minus_publish", p),
                    0,
                    1000,
                )
        for policy in policies:
            row(f"p99 at {f:.0%} / one batch's compute, {policy} [×]", _path("p99_over_batch", f"{policy}@{load}"), 2)
        row(
            f"latency at {f:.0%}, {first}, receive − publish, p99 [ms]",
            _path(key(first), "latency", load, "receive_minus_publish", "p99"),
            0,
            1000,
        )
        row(
            f"CPU during the {f:.0%} run, {first}, all processes [% of the machine]",
            _latency_cpu(key(first), load, max(1, report["config"].get("cpus") or procs)),
            0,
            100,
        )
    # the encoder cache, apart from the headline
    for m in _CONTENT:
        row(
            f"cache: repetition of the bench stream, {m} [% of items seen before]",
            _path("cache_repetition", "bench_stream", m),
            0,
            100,
        )
    row(
        f"(b) {procs} workers + encoder cache, bench stream [posts/s]",
        lambda r: r["b_cache_stream"]["saturation"]["posts_s"],
    )
    for m in _CONTENT:
        row(f"    cache hit rate, {m} [%]", _path("b_cache_stream", "hit_rate", m), 0, 100)
    row(
        f"(b) {procs} workers + encoder cache, no-repeat stream [posts/s]",
        lambda r: r["b_cache_unique"]["saturation"]["posts_s"],
    )
    row("(b) + cache / naive, bench stream [×]", lambda r: r["ratios"]["b_cache_stream_over_c"], 1)
    row("(b) + cache / (b), no-repeat stream [×]", lambda r: r["ratios"]["b_cache_unique_over_bN"], 2)
    # where each core's time went during the headline saturation run (/proc/*/task/*/stat)
    row(f"CPU at saturation, {procs} workers: each worker [% of a core]", _cpu(procs, "worker"), 0, 100)
    row("    its scoring thread [% of a core]", _cpu(procs, "worker", thread=True), 0, 100)
    for label in ("broker", "redis", "bench"):
        row(f"    {label} [% of a core]", _cpu(procs, label), 0, 100)
    row(
        "    all of these [% of the machine]",
        lambda r: r[key(first)]["cpu"]["total_core_share"] / max(1, report["config"].get("cpus") or procs),
        0,
        100,
    )
    loads = [
        f"{_cell([r['load_start'] for r in runs], 1)} → {_cell([r['load_end'] for r in runs], 1)}"
        for runs in by_mix.values()
    ]
    lines.append("| load average (1 min) at start → end | " + " | ".join(loads) + " |")
    return "\n".join(lines)


# What the test suite builds (tests/conftest.py): a fallback model and benchmark in a checkout.
_TEST_ARTIFACTS: Final = Path(__file__).resolve().parents[2] / ".cache" / "test-artifacts"


def default_model_dir() -> Path | None:
    """The first with a manifest of: ``settings.model_dir`` if ``SENTIMENT_MODEL_DIR`` sets it, the newest
    test-artifact export, ``settings.model_dir`` at its default (where the demo puts its small model).
    """
    candidates = sorted(_TEST_ARTIFACTS.glob("export-*"), key=lambda p: p.stat().st_mtime, reverse=True)
    settings_dir = get_settings().model_dir
    for c in [settings_dir, *candidates] if "SENTIMENT_MODEL_DIR" in os.environ else [*candidates, settings_dir]:
        if (c / "manifest.json").is_file():
            return c
    return None


def default_data_dir() -> Path | None:
    """``settings.data_dir`` if it holds a built benchmark, else a test-artifact one."""
    for c in [get_settings().data_dir, *sorted(_TEST_ARTIFACTS.glob("bench-*"))]:
        if (c / "posts").is_dir():
            return c
    return None


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model-dir", type=Path, help="exported model (default: settings.model_dir or a test export)")
    parser.add_argument("--data-dir", type=Path, help="built benchmark (default: settings.data_dir)")
    parser.add_argument("--split", default="test")
    parser.add_argument("--mixes", nargs="+", default=list(MIXES), choices=list(MIXES))
    parser.add_argument("--latency-mixes", nargs="*", default=list(MIXES), choices=list(MIXES))
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--procs", type=int, default=os.cpu_count() or 2, help="processes / workers (one per core)")
    parser.add_argument("--batches", type=int, nargs="+", default=[8, 16, 32, 64])
    parser.add_argument("--head-batches", type=int, nargs="+", default=[32, 256, 1024])
    parser.add_argument("--cell-seconds", type=float, default=3.0, help="seconds per (a)/(d) cell")
    parser.add_argument("--sample-posts", type=int, default=512, help="posts cycled in the (a) loop")
    parser.add_argument("--seconds", type=float, default=15.0, help="saturation run length at the compute limit")
    parser.add_argument("--min-posts", type=int, default=200)
    parser.add_argument("--naive-seconds", type=float, default=30.0, help="how long the naive peer runs saturated")
    parser.add_argument(
        "--naive-threads", type=int, default=1, help="torch threads of the naive peer (0: torch default)"
    )
    parser.add_argument("--skip-naive", action="store_true")
    parser.add_argument(
        "--loads",
        type=float,
        nargs="*",
        default=[0.25, 0.5, 0.8, 0.95],
        help="open-loop loads, as fractions of the lowest saturated rate of the policies (same rates for all)",
    )
    parser.add_argument(
        "--policies",
        nargs="+",
        default=["adaptive", "fixed"],
        choices=["adaptive", "fixed"],
        help="batch policies of the N-worker pipeline; the first is the headline and the 1-worker run",
    )
    parser.add_argument(
        "--cache-mixes",
        nargs="*",
        default=["realistic"],
        choices=list(MIXES),
        help="mixes also run with the encoder cache on (bench stream and a no-repeat stream)",
    )
    parser.add_argument("--cache-entries", type=int, default=4096, help="encoder-cache entries per modality")
    parser.add_argument("--latency-seconds", type=float, default=20.0)
    parser.add_argument(
        "--open-loop-linger-ms",
        type=int,
        default=0,
        help="linger of the open-loop producer (0: one produce request per post; Kafka's clients default to 5)",
    )
    parser.add_argument("--timeout", type=float, default=300.0, help="max seconds to wait for a run's events")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--log-dir", default=str(Path(os.environ.get("TMPDIR", "/tmp")) / "sentiment-bench"))
    parser.add_argument("--json", type=Path, help="write the full results here")
    parser.add_argument("--markdown", type=Path, help="write the table here")


def run(args: argparse.Namespace) -> int:
    from stream.tools.services import LocalStack

    model_dir = args.model_dir or default_model_dir()
    data_dir = args.data_dir or default_data_dir()
    if model_dir is None or data_dir is None:
        print("error: need --model-dir (an export with manifest.json) and --data-dir (a built benchmark)")
        return 2
    settings = get_settings()
    manifest = Manifest.load(model_dir, check_graphs=False)
    stack = LocalStack(settings)
    already = {s.name for s in stack.status() if s.running}
    stack.start()
    try:
        return _run(args, settings, manifest, model_dir, data_dir)
    finally:
        started = [s.name for s in stack.status() if s.managed and s.name not in already]
        if started:  # the bench stops what it started, and only that
            log.info("stopping what the bench started: %s", ", ".join(started))
            stack.stop(started)


def _run(args: argparse.Namespace, settings: Settings, manifest: Manifest, model_dir: Path, data_dir: Path) -> int:
    from stream.service.batching import batch_capacity

    variant, why = manifest.serving_text_encoder(settings)
    report: dict[str, Any] = {
        "config": {
            "model_dir": str(model_dir),
            "model_version": manifest.version,
            "data_dir": str(data_dir),
            "split": args.split,
            "mixes": {m: MIXES[m].describe() for m in args.mixes},
            "procs": args.procs,
            "cpus": os.cpu_count(),
            "repeats": args.repeats,
            "loads": args.loads,
            "open_loop_linger_ms": args.open_loop_linger_ms,
            "text_encoder": variant,
            "text_encoder_why": why,
            "policies": args.policies,
            "adaptive_max_batch": batch_capacity(settings.model_copy(update={"batch_policy": "adaptive"})),
            "latency_slo_s": settings.latency_slo_s,
            "cache_entries": args.cache_entries,
            "image_sub_batch": settings.image_sub_batch,
            "tokenizer_threads": settings.tokenizer_threads,
            "intra_op_threads": settings.intra_op_threads,
            "max_batch": settings.max_batch,
            "max_wait_s": settings.max_wait_s,
            "encode_sub_batch": settings.encode_sub_batch,
            "partitions": settings.partitions,
            "started_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "uptime_start": _uptime(),
        },
        "runs": [],
    }
    for repeat in range(args.repeats):
        for name in args.mixes:
            report["runs"].append(run_mix(args, MIXES[name], model_dir, data_dir, repeat))
            if args.json:
                args.json.write_text(json.dumps(report, indent=2, default=str) + "\n")
    report["config"]["uptime_end"] = _uptime()
    table = markdown(report)
    print(table)
    if args.json:
        args.json.write_text(json.dumps(report, indent=2, default=str) + "\n")
    if args.markdown:
        args.markdown.write_text(table + "\n")
    return 0


def _uptime() -> str:
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        return subprocess.run(["uptime"], capture_output=True, text=True, timeout=5).stdout.strip()
    return f"load average {os.getloadavg()}"
