"""The DRF feature queue in Redis (docs/architecture.md): per model version and modality, a bounded FIFO of
float32 feature vectors plus running moments (count, sum, sum of squares) for the distribution.

One Lua script (``feature_queue.lua``) pushes a whole batch for all modalities, evicts the oldest
vectors beyond ``settings.queue_length`` and adjusts the moments, atomically. The sums of the pushed
vectors are computed here in float64 (numpy) so the script only unpacks the vectors it evicts.
Moments live in one hash per version, so a batch reads every modality's mean/variance in one round trip.

Failure contract: :meth:`FeatureQueue.stats`, :meth:`~FeatureQueue.push` and :meth:`~FeatureQueue.seed`
never raise into the caller's batch for Redis trouble (the tool methods verify/clear do).
Reads return the last good statistics (``status="queue_stale"``) or none (``"queue_unavailable"``),
pushes are dropped and counted, and after a failure Redis is not asked again for ``retry_after_s``
(so a dead Redis costs each batch nothing instead of a timeout). Key names come only from
:class:`QueueKeys`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from importlib import resources
from typing import Any, Final, Literal

import numpy as np
import redis
import redis.asyncio as aioredis
from redis.backoff import NoBackoff
from redis.retry import Retry

from stream.service.events import MODALITIES
from stream.service.metrics import Metrics, get_metrics
from stream.service.moments import QUEUE_VAR_FLOOR, moments_from_sums
from stream.service.settings import Settings, get_settings

__all__ = [
    "CorruptQueue",
    "DriftReport",
    "FeatureQueue",
    "Moments",
    "QueueKeys",
    "QueueStats",
    "QueueStatus",
    "SyncFeatureQueue",
]

log = logging.getLogger(__name__)

QueueStatus = Literal["ok", "queue_stale", "queue_unavailable"]

PUSH_SCRIPT: Final = resources.files("stream.service").joinpath("feature_queue.lua").read_text(encoding="utf-8")
# Same floor and "fewer than 2 vectors = no statistics" rule as training (models/drf.py FeatureQueue).
_MIN_COUNT: Final = 2
# Seeding sends K×d floats per modality in one call: allow it more time than a per-batch call.
_SEED_TIMEOUT_S: Final = 10.0
_REDIS_ERRORS: Final = (redis.RedisError, OSError, asyncio.TimeoutError)


@dataclass(frozen=True, slots=True)
class QueueKeys:
    """The one place that names the queue's Redis keys for a model version.

    Every key carries the hash tag ``{sentiment:<version>}`` so one script's keys share a Redis
    Cluster slot, and two model versions never mix.
    """

    version: str

    def __post_init__(self) -> None:
        if not self.version or any(c in self.version for c in "{} \n"):
            raise ValueError(f"model version {self.version!r} cannot be used in a Redis key")

    @property
    def tag(self) -> str:
        return "{sentiment:" + self.version + "}"

    @property
    def moments(self) -> str:
        return f"{self.tag}:queue_moments"

    @property
    def seeded(self) -> str:
        return f"{self.tag}:queue_seeded"

    def vectors(self, modality: str) -> str:
        return f"{self.tag}:queue:{modality}"

    def all(self, modalities: Sequence[str] = MODALITIES) -> list[str]:
        return [self.moments, self.seeded, *(self.vectors(m) for m in modalities)]


@dataclass(frozen=True, slots=True)
class Moments:
    """Running moments of one modality's queue (float64)."""

    count: int
    sum: np.ndarray
    sumsq: np.ndarray

    def mean_var(self, var_floor: float = QUEUE_VAR_FLOOR) -> tuple[np.ndarray, np.ndarray]:
        """Mean and variance (float32), variance floored at ``var_floor`` (cancellation can make it ≤ 0)."""
        return moments_from_sums(self.count, self.sum, self.sumsq, var_floor)


@dataclass(frozen=True, slots=True)
class QueueStats:
    """What a batch needs from the queue: per-modality mean/variance and how fresh they are.

    ``mean``/``var`` hold only modalities with at least two vectors; ``status`` is ``ok``,
    ``queue_stale`` (Redis failed; these are the last good values) or ``queue_unavailable`` (none ever).
    """

    status: QueueStatus
    count: dict[str, int] = field(default_factory=dict)
    mean: dict[str, np.ndarray] = field(default_factory=dict)
    var: dict[str, np.ndarray] = field(default_factory=dict)
    read_at: float = 0.0  # time.monotonic() of the successful read, 0.0 if none

    @property
    def degraded(self) -> bool:
        return self.status != "ok"

    def stacked(self, dim: int, modalities: Sequence[str] = MODALITIES) -> tuple[np.ndarray, np.ndarray]:
        """``(mean [M,dim], var [M,dim])`` float32 for the head; a modality without statistics gets the
        uninformative mean 0 / variance 1."""
        mean = np.zeros((len(modalities), dim), np.float32)
        var = np.ones((len(modalities), dim), np.float32)
        for i, m in enumerate(modalities):
            if m in self.mean:
                mean[i], var[i] = self.mean[m], self.var[m]
        return mean, var


@dataclass(frozen=True, slots=True)
class DriftReport:
    """Stored moments vs moments recomputed from the stored vectors, per modality.

    ``error`` is max |stored − exact| over sum and sumsq, relative to max |exact| of each array.
    """

    error: dict[str, float]
    count_ok: dict[str, bool]
    lengths: dict[str, int]
    rtol: float

    @property
    def ok(self) -> bool:
        return all(self.count_ok.values()) and all(e <= self.rtol for e in self.error.values())


# ---------------------------------------------------------------------------- encoding (pure)


def _pack_f64(a: np.ndarray) -> bytes:
    return np.ascontiguousarray(a, dtype="<f8").tobytes()


def _unpack_f64(b: bytes) -> np.ndarray:
    return np.frombuffer(b, dtype="<f8").copy()


def _script_call(
    keys: QueueKeys, batch: Mapping[str, np.ndarray], k: int, mode: str
) -> tuple[list[str], list[Any], list[str], dict[str, int]]:
    """KEYS, ARGV, modality order and per-modality count of non-finite rows dropped.

    Non-finite rows never reach Redis: one NaN would poison a modality's running sum for good.
    """
    script_keys = [keys.moments, keys.seeded]
    args: list[Any] = [k, mode, 0]
    order: list[str] = []
    dropped: dict[str, int] = {}
    for modality, array in batch.items():
        x = np.asarray(array, dtype="<f4")
        if x.ndim != 2:
            raise ValueError(f"{modality}: expected [n, d] vectors, got shape {x.shape}")
        finite = np.isfinite(x).all(axis=1)
        if not finite.all():
            dropped[modality] = int((~finite).sum())
            x = x[finite]
        if x.shape[0] == 0:
            continue
        x64 = x.astype(np.float64)
        script_keys.append(keys.vectors(modality))
        args += [modality, x.shape[0], x.shape[1], _pack_f64(x64.sum(0)), _pack_f64((x64 * x64).sum(0))]
        args += [row.tobytes() for row in np.ascontiguousarray(x)]
        order.append(modality)
    args[2] = len(order)
    return script_keys, args, order, dropped


def _moments_fields(modalities: Sequence[str]) -> list[str]:
    return [f"{m}:{f}" for m in modalities for f in ("n", "sum", "sumsq")]


class CorruptQueue(ValueError):
    """The moments hash holds something this code did not write (wrong type, length or non-finite values)."""


def _parse_moments(modalities: Sequence[str], values: Sequence[Any], dim: int | None = None) -> dict[str, Moments]:
    """Moments per modality from one HMGET; raises :class:`CorruptQueue` for anything malformed."""
    out: dict[str, Moments] = {}
    for i, m in enumerate(modalities):
        n, s, q = values[3 * i : 3 * i + 3]
        try:
            count = 0 if n is None else int(n)
        except (TypeError, ValueError):
            raise CorruptQueue(f"{m}: count {n!r} is not an integer") from None
        if n is None or s is None or q is None or count == 0:
            continue
        if count < 0 or len(s) % 8 or len(s) != len(q) or (dim is not None and len(s) != 8 * dim):
            raise CorruptQueue(f"{m}: count {count}, sums of {len(s)} and {len(q)} bytes (want {dim} doubles)")
        moments = Moments(count, _unpack_f64(s), _unpack_f64(q))
        if not (np.isfinite(moments.sum).all() and np.isfinite(moments.sumsq).all()):
            raise CorruptQueue(f"{m}: sums are not finite")
        out[m] = moments
    return out


def _exact_moments(vectors: Sequence[Any]) -> Moments | None:
    if not vectors:
        return None
    x = np.frombuffer(b"".join(vectors), dtype="<f4").reshape(len(vectors), -1).astype(np.float64)
    return Moments(len(vectors), x.sum(0), (x * x).sum(0))


def _drift(
    modalities: Sequence[str], stored: dict[str, Moments], lists: Sequence[Sequence[Any]], rtol: float
) -> DriftReport:
    error: dict[str, float] = {}
    count_ok: dict[str, bool] = {}
    lengths: dict[str, int] = {}
    for m, vectors in zip(modalities, lists, strict=True):
        exact = _exact_moments(vectors)
        have = stored.get(m)
        lengths[m] = len(vectors)
        if exact is None or have is None:
            count_ok[m] = exact is None and have is None
            error[m] = 0.0 if count_ok[m] else math.inf
            continue
        count_ok[m] = have.count == exact.count
        if have.sum.shape != exact.sum.shape:
            error[m] = math.inf
            continue
        errs = [
            float(np.max(np.abs(a - b)) / max(float(np.max(np.abs(b))), 1e-300))
            for a, b in ((have.sum, exact.sum), (have.sumsq, exact.sumsq))
        ]
        error[m] = max(errs)
    return DriftReport(error, count_ok, lengths, rtol)


# ---------------------------------------------------------------------------- asyncio client


class FeatureQueue:
    """The DRF queue of one model version, for the asyncio worker.

    Build one per process and model version, call :meth:`seed` once at start-up, then per batch
    :meth:`stats` (cached for ``settings.queue_stats_ttl_s``) and :meth:`push`. None of these raise
    for Redis failures; see the module docstring. ``lengths`` holds the last known queue lengths.
    """

    def __init__(
        self,
        version: str,
        settings: Settings | None = None,
        *,
        metrics: Metrics | None = None,
        modalities: Sequence[str] = MODALITIES,
        var_floor: float = QUEUE_VAR_FLOOR,
        retry_after_s: float = 1.0,
        redis_url: str | None = None,
        dim: int | None = None,
    ) -> None:
        self.settings = settings or get_settings()
        self.keys = QueueKeys(version)
        self.modalities = tuple(modalities)
        self.dim = dim  # when known, moments of another width are corrupt, not statistics
        self.metrics = metrics or get_metrics()
        self.var_floor = var_floor
        self.retry_after_s = retry_after_s
        self.url = redis_url or self.settings.redis_url
        self.lengths: dict[str, int] = dict.fromkeys(self.modalities, 0)
        self._client = self._make_client(self.settings.redis_timeout_s)
        self._script = self._client.register_script(PUSH_SCRIPT)
        self._last_good: QueueStats | None = None
        self._down_until = 0.0
        self._failing = False
        self._read_lock = asyncio.Lock()
        self._pending_seed: dict[str, np.ndarray] | None = None
        self._seed_task: asyncio.Task[bool] | None = None
        # The training-time snapshot, kept to reseed a queue that was lost (FLUSHALL, restart without
        # persistence) or cut short; below min_counts a queue's statistics are not trusted.
        self._seed_snapshot: dict[str, np.ndarray] | None = None
        self._pending_mode = "seed"
        self.min_counts: dict[str, int] = {}
        self._corrupt = False

    def _make_client(self, read_timeout_s: float) -> aioredis.Redis:
        # No retries inside redis-py: each call is bounded by one timeout, and our own back-off decides
        # when to try again. redis-py drops a connection that failed and opens a new one on the next call.
        return aioredis.Redis.from_url(
            self.url,
            socket_timeout=read_timeout_s,
            socket_connect_timeout=self.settings.redis_timeout_s,
            retry=Retry(NoBackoff(), 0),
            retry_on_timeout=False,
        )

    async def aclose(self) -> None:
        """Close the connection pool (and stop a pending seed retry)."""
        if self._seed_task is not None:
            self._seed_task.cancel()
            with contextlib.suppress(asyncio.CancelledError, *_REDIS_ERRORS):
                await self._seed_task
        await self._client.aclose()

    async def __aenter__(self) -> FeatureQueue:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    # -- failure handling

    def _available(self) -> bool:
        return time.monotonic() >= self._down_until

    async def _failed(self, operation: str, exc: BaseException) -> None:
        self.metrics.redis_errors.labels(operation).inc()
        self._down_until = time.monotonic() + self.retry_after_s
        if not self._failing:
            log.warning(
                "feature queue: Redis %s failed (%s: %s); scoring continues with degraded queue statistics,"
                " retrying every %.1fs",
                operation,
                type(exc).__name__,
                exc,
                self.retry_after_s,
            )
        self._failing = True
        # A half-read reply would desynchronise a reused connection: drop them all, redis-py reconnects.
        with contextlib.suppress(Exception):  # best effort on an already broken pool
            await self._client.connection_pool.disconnect()

    def _recovered(self) -> None:
        if self._failing:
            log.info("feature queue: Redis is reachable again")
        self._failing = False

    async def _call(self, coro: Any, read_timeout_s: float) -> Any:
        # Socket timeouts bound connect and each read; wait_for also bounds DNS and pool waits.
        return await asyncio.wait_for(coro, timeout=read_timeout_s + self.settings.redis_timeout_s + 0.05)

    # -- public API

    async def stats(self, *, refresh: bool = False) -> QueueStats:
        """Mean and variance per modality: one HMGET, cached for ``queue_stats_ttl_s``.

        Never raises for Redis trouble: returns the last good statistics with ``status="queue_stale"``
        or empty ones with ``status="queue_unavailable"``.
        """
        async with self._read_lock:
            now = time.monotonic()
            last = self._last_good
            if not refresh and last is not None and now - last.read_at < self.settings.queue_stats_ttl_s:
                return last
            if not self._available():
                return self._degraded()
            self._start_pending_seed()
            try:
                async with self._client.pipeline(transaction=False) as pipe:
                    pipe.hmget(self.keys.moments, _moments_fields(self.modalities))
                    pipe.exists(self.keys.seeded)
                    values, seeded = await self._call(pipe.execute(), self.settings.redis_timeout_s)
            except _REDIS_ERRORS as exc:
                await self._failed("read", exc)
                return self._degraded()
            self._recovered()
            try:
                moments = _parse_moments(self.modalities, values, self.dim)
            except CorruptQueue as exc:
                # Redis answers, but with something we did not write: score on, flagged, and say so.
                self.metrics.redis_errors.labels("parse").inc()
                if not self._corrupt:
                    log.error(
                        "feature queue: the moments of version %s are corrupt (%s); events are flagged until"
                        " they are repaired (SyncFeatureQueue.repair) or the keys are deleted (reseeded)",
                        self.keys.version,
                        exc,
                    )
                self._corrupt = True
                return self._degraded()
            self._corrupt = False
            stats = QueueStats("ok", read_at=time.monotonic())
            for m in self.modalities:
                mo = moments.get(m)
                stats.count[m] = mo.count if mo else 0
                if mo is not None and mo.count >= _MIN_COUNT:
                    stats.mean[m], stats.var[m] = mo.mean_var(self.var_floor)
            self._set_lengths(stats.count)
            if self._seed_snapshot is not None and (not seeded or self._short(stats.count)):
                # The queue is gone (Redis lost its data) or a few vectors pushed since: its moments would
                # describe a handful of posts. Reseed in the background; until then these are not trusted.
                self._reseed()
                return self._degraded()
            self._last_good = stats
            return stats

    def _short(self, counts: Mapping[str, int]) -> bool:
        return any(counts.get(m, 0) < n for m, n in self.min_counts.items())

    def _reseed(self) -> None:
        if self._pending_seed is None and self._seed_snapshot is not None:
            log.warning("feature queue: version %s is missing or short in Redis; reseeding", self.keys.version)
            self._pending_seed = self._seed_snapshot
            self._pending_mode = "reseed"
        self._start_pending_seed()

    def _start_pending_seed(self) -> None:
        if self._pending_seed is not None and (self._seed_task is None or self._seed_task.done()):
            # In the background: a seed may take longer than a batch can wait.
            self._seed_task = asyncio.create_task(self.seed(self._pending_seed, mode=self._pending_mode))

    def _degraded(self) -> QueueStats:
        last = self._last_good
        if last is None:
            return QueueStats("queue_unavailable")
        return QueueStats("queue_stale", last.count, last.mean, last.var, last.read_at)

    def _set_lengths(self, lengths: Mapping[str, int]) -> None:
        for m, n in lengths.items():
            self.lengths[m] = n
            self.metrics.queue_length.labels(m).set(n)

    async def push(self, batch: Mapping[str, np.ndarray]) -> bool:
        """Push ``{modality: float32 [n, d]}`` in one atomic script call; True if Redis took it.

        Rows with NaN/inf are dropped (counted as ``not_finite``). When Redis is unavailable the batch
        is dropped and counted (``redis_unavailable``); nothing is raised. A vector of the wrong
        dimension for an existing queue makes the script reject the whole batch (``rejected``).
        """
        keys, args, order, dropped = _script_call(self.keys, batch, self.settings.queue_length, "push")
        for m, n in dropped.items():
            self.metrics.queue_dropped_vectors.labels("not_finite").inc(n)
            log.debug("feature queue: dropped %d non-finite %s vectors", n, m)
        if not order:
            return True
        n_vectors = sum(int(np.shape(batch[m])[0]) - dropped.get(m, 0) for m in order)
        if not self._available():
            self.metrics.queue_dropped_vectors.labels("redis_unavailable").inc(n_vectors)
            return False
        try:
            lengths = await self._call(self._script(keys=keys, args=args), self.settings.redis_timeout_s)
        except redis.ResponseError as exc:
            # The script refused the batch (e.g. a dimension change within one model version): Redis
            # itself is fine, so no back-off; nothing of the batch was written.
            self.metrics.redis_errors.labels("push").inc()
            self.metrics.queue_dropped_vectors.labels("rejected").inc(n_vectors)
            log.error("feature queue: push rejected: %s", exc)
            return False
        except _REDIS_ERRORS as exc:
            await self._failed("push", exc)
            self.metrics.queue_dropped_vectors.labels("redis_unavailable").inc(n_vectors)
            return False
        self._recovered()
        self._set_lengths(dict(zip(order, (int(n) for n in lengths), strict=True)))
        return True

    async def seed(self, snapshot: Mapping[str, np.ndarray], *, mode: str = "seed") -> bool:
        """Seed from the training-time queue (``{modality: float32 [K, d]}``) if this version was never
        seeded; True if this call seeded it.

        Atomic: the flag is set in the same script that pushes, so two workers starting together seed
        once and a crash cannot leave the flag set on an empty queue. If Redis is unavailable the
        snapshot is kept and retried in the background by a later :meth:`stats`.
        """
        self._seed_snapshot = dict(snapshot)
        k = self.settings.queue_length
        self.min_counts = {
            m: max(_MIN_COUNT, int(self.settings.queue_min_fill * min(k, len(rows))))
            for m, rows in snapshot.items()
            if len(rows)
        }
        keys, args, order, _ = _script_call(self.keys, snapshot, k, mode)
        timeout = max(self.settings.redis_timeout_s, _SEED_TIMEOUT_S)
        client = self._make_client(timeout)
        try:
            result = await self._call(client.eval(PUSH_SCRIPT, len(keys), *keys, *args), timeout)
        except _REDIS_ERRORS as exc:
            self._pending_seed = dict(snapshot)
            self._pending_mode = mode
            await self._failed("seed", exc)
            return False
        finally:
            await client.aclose()
        self._pending_seed = None
        self._pending_mode = "seed"
        self._recovered()
        if result == 0:
            return False
        self._set_lengths(dict(zip(order, (int(n) for n in result), strict=True)))
        log.info("feature queue: seeded version %s with %s", self.keys.version, self.lengths)
        return True

    async def verify(self, rtol: float = 1e-6) -> DriftReport:
        """Compare stored moments with moments recomputed from the stored vectors. Raises on Redis errors."""
        stored, lists = await self._snapshot()
        return _drift(self.modalities, stored, lists, rtol)

    async def _snapshot(self) -> tuple[dict[str, Moments], list[list[bytes]]]:
        async with self._client.pipeline(transaction=True) as pipe:
            pipe.hmget(self.keys.moments, _moments_fields(self.modalities))
            for m in self.modalities:
                pipe.lrange(self.keys.vectors(m), 0, -1)
            values, *lists = await pipe.execute()
        return _parse_moments(self.modalities, values), lists

    async def clear(self) -> None:
        """Delete this version's keys (tests, tools). Raises on Redis errors."""
        await self._client.delete(*self.keys.all(self.modalities))
        self._last_good = None


# ---------------------------------------------------------------------------- sync client


class SyncFeatureQueue:
    """Blocking access to the same queue for tools, benchmarks and tests; raises on Redis errors.

    Uses the same keys and script as :class:`FeatureQueue`; the worker should use that one.
    """

    def __init__(
        self,
        version: str,
        settings: Settings | None = None,
        *,
        modalities: Sequence[str] = MODALITIES,
        redis_url: str | None = None,
        timeout_s: float = _SEED_TIMEOUT_S,
    ) -> None:
        self.settings = settings or get_settings()
        self.keys = QueueKeys(version)
        self.modalities = tuple(modalities)
        self.client = redis.Redis.from_url(
            redis_url or self.settings.redis_url, socket_timeout=timeout_s, socket_connect_timeout=timeout_s
        )
        self._script = self.client.register_script(PUSH_SCRIPT)

    def close(self) -> None:
        self.client.close()

    def push(self, batch: Mapping[str, np.ndarray], *, mode: str = "push") -> dict[str, int] | None:
        """Push (or with ``mode="seed"``, seed) a batch; the new lengths, or None if already seeded."""
        keys, args, order, _ = _script_call(self.keys, batch, self.settings.queue_length, mode)
        if not order:
            return {}
        result = self._script(keys=keys, args=args)
        if result == 0:
            return None
        return dict(zip(order, (int(n) for n in result), strict=True))

    def moments(self) -> dict[str, Moments]:
        """Stored moments of every modality with at least one vector (one HMGET)."""
        return _parse_moments(self.modalities, self.client.hmget(self.keys.moments, _moments_fields(self.modalities)))

    def lengths(self) -> dict[str, int]:
        """LLEN of every modality's list."""
        with self.client.pipeline(transaction=False) as pipe:
            for m in self.modalities:
                pipe.llen(self.keys.vectors(m))
            return dict(zip(self.modalities, pipe.execute(), strict=True))

    def verify(self, rtol: float = 1e-6) -> DriftReport:
        """Compare stored moments with moments recomputed from the stored vectors (atomic snapshot)."""
        with self.client.pipeline(transaction=True) as pipe:
            pipe.hmget(self.keys.moments, _moments_fields(self.modalities))
            for m in self.modalities:
                pipe.lrange(self.keys.vectors(m), 0, -1)
            values, *lists = pipe.execute()
        return _drift(self.modalities, _parse_moments(self.modalities, values), lists, rtol)

    def repair(self) -> DriftReport:
        """Rewrite the moments from the stored vectors (WATCH/MULTI: retried if a push interleaves);
        returns the drift found before the rewrite."""
        list_keys = [self.keys.vectors(m) for m in self.modalities]
        with self.client.pipeline(transaction=True) as pipe:
            while True:
                try:
                    pipe.watch(self.keys.moments, *list_keys)
                    values = pipe.hmget(self.keys.moments, _moments_fields(self.modalities))
                    lists = [pipe.lrange(k, 0, -1) for k in list_keys]
                    report = _drift(self.modalities, _parse_moments(self.modalities, values), lists, 0.0)
                    pipe.multi()
                    for m, vectors in zip(self.modalities, lists, strict=True):
                        exact = _exact_moments(vectors)
                        fields = [f"{m}:{f}" for f in ("n", "sum", "sumsq")]
                        if exact is None:
                            pipe.hdel(self.keys.moments, *fields, f"{m}:dim")
                            continue
                        pipe.hset(
                            self.keys.moments,
                            mapping={
                                fields[0]: exact.count,
                                f"{m}:dim": exact.sum.shape[0],
                                fields[1]: _pack_f64(exact.sum),
                                fields[2]: _pack_f64(exact.sumsq),
                            },
                        )
                    pipe.execute()
                    return report
                except redis.WatchError:
                    continue

    def clear(self) -> None:
        """Delete this version's keys."""
        self.client.delete(*self.keys.all(self.modalities))
