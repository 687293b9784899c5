"""Score a micro-batch of raw posts: validate, encode, run the head, build events. No broker, no Redis.

:class:`PostScorer` is the one implementation the Faust agent, the replay tool and the tests share.
Its :meth:`PostScorer.score` is synchronous and CPU-bound (ONNX Runtime releases the GIL): the worker
calls it in a dedicated executor, never on the event loop. Queue statistics come in (read from Redis by
the caller), vectors to enqueue come out (pushed by the caller), so this module does no I/O.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Final

import numpy as np

from stream.service.encode_cache import EncodeCache
from stream.service.events import (
    LABELS,
    MODALITIES,
    DeadLetter,
    Post,
    PostRejected,
    SentimentEvent,
    decode_post,
    fitted_dead_letter,
)
from stream.service.feature_queue import QueueStats
from stream.service.manifest import IMAGE_INPUT, IMAGE_OUTPUT, TEXT_OUTPUT, Manifest
from stream.service.metrics import Metrics, get_metrics
from stream.service.preprocess import TextTokenizer, images_to_batch
from stream.service.runtime import CUDA, ModelSession, create_session, pin_thread_pools
from stream.service.settings import Settings, get_settings

log = logging.getLogger(__name__)

__all__ = ["BatchOutcome", "InputRecord", "PostScorer"]

@dataclass(frozen=True, slots=True)
class InputRecord:
    """One consumed message: its bytes and where it came from (for dead letters and lag)."""

    value: bytes
    key: bytes | None = None
    timestamp: float | None = None  # broker timestamp, seconds
    topic: str | None = None
    partition: int | None = None
    offset: int | None = None


@dataclass
class BatchOutcome:
    """What one micro-batch produced: events to send, dead letters, vectors to enqueue, stage times."""

    events: list[SentimentEvent] = field(default_factory=list)
    dead_letters: list[DeadLetter] = field(default_factory=list)
    enqueue: dict[str, np.ndarray] = field(default_factory=dict)
    stages: dict[str, float] = field(default_factory=dict)


# The int8 text encoder is dynamically quantised: ONNX Runtime scales each activation tensor by its own
# min/max at run time, so in a batch a post's embedding depends on its neighbours (measured on the shipped
# model: 55 of 1,950 labels flipped between two replays of the same stream, |Δp| up to 0.18). One text per
# run makes every post's score its own (byte-identical in any batch), for about 8 % of the int8 speed-up
# (docs/performance.md). The export's int8 accuracy gate measures the encoder the same way.
INT8_TEXT_SUB_BATCH: Final = 1


class PostScorer:
    """Encoders + head from an exported manifest, with the preprocessing they were trained with."""

    def __init__(
        self,
        manifest: Manifest,
        settings: Settings | None = None,
        recovery: str | None = None,
        metrics: Metrics | None = None,
    ) -> None:
        self.settings = settings or get_settings()
        self._metrics = metrics  # only the encoder cache reports here; None: the process's metrics
        self.manifest = manifest
        self.recovery = recovery or self.settings.recovery
        self.version = manifest.version
        self.thread_env = pin_thread_pools(self.settings)  # before the tokenizer's first batch
        self.text_variant, self.text_variant_reason = manifest.serving_text_encoder(self.settings)
        self.text_session = create_session(manifest.text_encoder_path(self.text_variant), self.settings)
        self.image_session = create_session(manifest.image_encoder_path(), self.settings)
        self.head_session = create_session(manifest.head_path(self.recovery), self.settings)
        self.tokenizer = manifest.text_tokenizer("text")
        self.transcript_tokenizer = manifest.text_tokenizer("transcript")
        self.image_size = manifest.image_size
        self.dims = manifest.feature_dims  # encoder output widths
        self.queue_dim = manifest.queue_dim  # width of the projected features the queue holds
        # Moments of the training-time queue: the fallback when Redis has never answered.
        self.fallback_mean, self.fallback_var = manifest.queue_moments()
        # Sub-batches: measured on CPU (docs/performance.md); a GPU wants far bigger ones.
        gpu = self.settings.gpu_sub_batch
        if self.text_session.provider == CUDA:
            self.sub_batch = gpu
        elif self.text_variant == "int8":
            self.sub_batch = INT8_TEXT_SUB_BATCH
        else:
            self.sub_batch = max(1, self.settings.encode_sub_batch)
        self.image_sub_batch = gpu if self.image_session.provider == CUDA else max(1, self.settings.image_sub_batch)
        entries = self.settings.encode_cache_entries
        self.cache = EncodeCache(entries, f"{self.version}/{self.text_variant}") if entries > 0 else None
        self._cache_reported: dict[str, tuple[int, int]] = {}
        if self.text_variant == "fp32" and self.text_variant_reason.startswith("auto"):
            log.warning("serving the fp32 text encoder: %s", self.text_variant_reason)
        log.info("serving configuration: %s", " ".join(f"{k}={v}" for k, v in self.configuration.items()))

    @property
    def configuration(self) -> dict[str, Any]:
        """What this scorer chose (the worker logs it at start; the bench records it)."""
        return {
            "model": self.version,
            "text_encoder": self.text_variant,
            "text_encoder_why": repr(self.text_variant_reason),
            "providers": ",".join(f"{n}:{s.provider}" for n, s in self.sessions.items()),
            "io_binding": any(s.io_binding for s in self.sessions.values()),
            "text_sub_batch": self.sub_batch,
            "image_sub_batch": self.image_sub_batch,
            "intra_op_threads": self.settings.intra_op_threads,
            "tokenizer_threads": self.thread_env["RAYON_NUM_THREADS"],
            "encode_cache_entries": self.settings.encode_cache_entries,
            "recovery": self.recovery,
            "queue_moments": self.settings.queue_moments,
        }

    @property
    def sessions(self) -> dict[str, ModelSession]:
        return {"text_encoder": self.text_session, "image_encoder": self.image_session, "head": self.head_session}

    # -- stages -----------------------------------------------------------------------------------
    def decode(self, records: Sequence[InputRecord]) -> tuple[list[Post], list[DeadLetter]]:
        posts: list[Post] = []
        dead: list[DeadLetter] = []
        for rec in records:
            try:
                posts.append(decode_post(rec.value, default_ts=rec.timestamp, settings=self.settings))
            except PostRejected as exc:
                dead.append(self.dead_letter(rec, exc))
        return posts, dead

    def dead_letter(self, rec: InputRecord, exc: PostRejected) -> DeadLetter:
        """The dead letter of ``rec``, always small enough for the broker (``max_dead_letter_bytes`` encoded).

        The original bytes are kept whole when they fit; a key over ``max_dead_letter_key_bytes`` is replaced
        by its hash (a dead letter used to copy a 60 kB key twice and outgrow the producer's limit).
        """
        value = bytes(rec.value) if isinstance(rec.value, bytes | bytearray | memoryview) else b""
        return fitted_dead_letter(
            value,
            exc.reason,
            exc.detail,
            key=rec.key,
            topic=rec.topic,
            partition=rec.partition,
            offset=rec.offset,
            max_bytes=self.settings.max_dead_letter_bytes,
            max_key_bytes=self.settings.max_dead_letter_key_bytes,
        )

    def encode_texts(
        self, texts: Sequence[str], tokenizer: TextTokenizer, dim: int | None = None, modality: str = "text"
    ) -> np.ndarray:
        """[n, dim] embeddings of ``texts`` (``modality``: text or transcript), through the cache when it is on."""
        if self.cache is None or not texts:
            return self._encode_texts(texts, tokenizer, dim)
        out = self.cache.encode(
            modality, texts, lambda rows: self._encode_texts([texts[i] for i in rows], tokenizer, dim),
            dim or self.dims["text"],
        )
        self._report_cache(modality)
        return out

    def _encode_texts(self, texts: Sequence[str], tokenizer: TextTokenizer, dim: int | None = None) -> np.ndarray:
        """[n, dim] embeddings (dim: the text encoder's width by default), bucketed by token count.

        Texts are bucketed so that short tweets are not padded to long ones.

        One tokenizer call for the whole batch (the Rust tokenizer parallelises it), then each sub-batch
        is cut to its own longest row: the same ids and mask as tokenising the sub-batch alone.
        """
        out = np.zeros((len(texts), dim or self.dims["text"]), np.float32)
        if not texts:
            return out
        ids, mask = tokenizer.encode(list(texts))
        lengths = mask.sum(1)
        order = np.argsort(lengths, kind="stable")
        for start in range(0, len(order), self.sub_batch):
            idx = order[start : start + self.sub_batch]
            width = int(lengths[idx].max())
            feeds = {"input_ids": ids[idx, :width], "attention_mask": mask[idx, :width]}
            out[idx] = self.text_session.run(feeds)[TEXT_OUTPUT]
        return out

    def encode_images(self, posts: Sequence[Post]) -> np.ndarray:
        """[n, dim] embeddings of the posts' images, through the cache (keyed by the image bytes) when it is on."""
        if self.cache is None or not posts or any(p.image is None for p in posts):
            return self._encode_images(posts)
        out = self.cache.encode(
            "image", [p.image or b"" for p in posts], lambda rows: self._encode_images([posts[i] for i in rows]),
            self.dims["image"],
        )
        self._report_cache("image")
        return out

    def _report_cache(self, modality: str) -> None:
        """Add the cache's new hits and misses of ``modality`` to ``sentiment_encode_cache_lookups_total``."""
        if self.cache is None:
            return
        stats = self.cache.stats(modality)
        seen = self._cache_reported.get(modality, (0, 0))
        metrics = self._metrics or get_metrics()
        metrics.encode_cache.labels(modality, "hit").inc(stats.hits - seen[0])
        metrics.encode_cache.labels(modality, "miss").inc(stats.misses - seen[1])
        self._cache_reported[modality] = (stats.hits, stats.misses)

    def _encode_images(self, posts: Sequence[Post]) -> np.ndarray:
        if not posts:
            return np.zeros((0, self.dims["image"]), np.float32)
        pixels = images_to_batch([p.pixels for p in posts if p.pixels is not None], self.image_size)
        chunks = []
        for start in range(0, len(pixels), self.image_sub_batch):
            result = self.image_session.run({IMAGE_INPUT: pixels[start : start + self.image_sub_batch]})
            chunks.append(result[IMAGE_OUTPUT])
        return np.concatenate(chunks).astype(np.float32, copy=False)

    @property
    def live_moments(self) -> bool:
        return self.settings.queue_moments == "live"

    def moments(self, stats: QueueStats | None) -> tuple[np.ndarray, np.ndarray]:
        """Queue moments for the head: the training-time queue's; with ``queue_moments=live``, Redis's where known."""
        mean, var = self.fallback_mean.copy(), self.fallback_var.copy()
        if stats is not None and self.live_moments:
            for i, m in enumerate(MODALITIES):
                if m in stats.mean and stats.count.get(m, 0) > 1:
                    mean[i], var[i] = stats.mean[m], stats.var[m]
        return mean, var

    def encode(self, posts: Sequence[Post], stages: dict[str, float]) -> tuple[dict[str, np.ndarray], np.ndarray]:
        """Encode the present modalities: ``({modality: float32 [n, d]}, present float32 [n, 3])``.

        A missing modality's row stays zero and its presence 0; stage times go into ``stages``.
        """
        n = len(posts)
        feats = {m: np.zeros((n, self.dims[m]), np.float32) for m in MODALITIES}
        present = np.zeros((n, len(MODALITIES)), np.float32)
        rows = {
            "text": [i for i, p in enumerate(posts) if p.text is not None],
            "image": [i for i, p in enumerate(posts) if p.pixels is not None],
            "transcript": [i for i, p in enumerate(posts) if p.transcript is not None],
        }
        clock = time.perf_counter
        t0 = clock()
        feats["text"][rows["text"]] = self.encode_texts(
            [posts[i].text or "" for i in rows["text"]], self.tokenizer, self.dims["text"]
        )
        t1 = clock()
        feats["image"][rows["image"]] = self.encode_images([posts[i] for i in rows["image"]])
        t2 = clock()
        feats["transcript"][rows["transcript"]] = self.encode_texts(
            [posts[i].transcript or "" for i in rows["transcript"]],
            self.transcript_tokenizer,
            self.dims["transcript"],
            "transcript",
        )
        t3 = clock()
        for j, m in enumerate(MODALITIES):
            present[rows[m], j] = 1.0
        stages.update(encode_text=t1 - t0, encode_image=t2 - t1, encode_transcript=t3 - t2)
        return feats, present

    def run_head(
        self, feats: dict[str, np.ndarray], present: np.ndarray, stats: QueueStats | None
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The head on encoded features and the queue moments: ``(probs, quality, projected)``."""
        mean, var = self.moments(stats)
        head = self.head_session.run({**feats, "present": present, "queue_mean": mean, "queue_var": var})
        return head["probs"], head["quality"], head["projected"]

    def build_events(
        self,
        posts: Sequence[Post],
        present: np.ndarray,
        probs: np.ndarray,
        quality: np.ndarray,
        stats: QueueStats | None,
        stages: dict[str, float],
    ) -> list[SentimentEvent]:
        """One :class:`SentimentEvent` per post; with live moments, flagged when they were not live."""
        flags: tuple[str, ...] = ()
        if self.live_moments:  # frozen training moments: the queue's state cannot change a score
            flags = ("queue_unavailable",) if stats is None else ((stats.status,) if stats.degraded else ())
        emit_ts = time.time()
        labels = probs.argmax(1)
        events = []
        for i, post in enumerate(posts):
            here = tuple(m for j, m in enumerate(MODALITIES) if present[i, j])
            events.append(
                SentimentEvent(
                    id=post.id,
                    label=LABELS[int(labels[i])],
                    probs=(float(probs[i, 0]), float(probs[i, 1]), float(probs[i, 2])),
                    present=here,
                    recovered=tuple(m for m in MODALITIES if m not in here),
                    quality={m: float(quality[i, j]) for j, m in enumerate(MODALITIES) if present[i, j]},
                    recovery=self.recovery,
                    model=self.version,
                    event_ts=post.ts if post.ts is not None else emit_ts,
                    emit_ts=emit_ts,
                    stages=dict(stages),
                    flags=flags,
                )
            )
        return events

    # -- the whole batch --------------------------------------------------------------------------
    def score(self, records: Sequence[InputRecord], stats: QueueStats | None = None) -> BatchOutcome:
        """Score ``records``; every valid post yields exactly one event, every invalid one a dead letter."""
        out = BatchOutcome()
        t0 = time.perf_counter()
        posts, out.dead_letters = self.decode(records)
        out.stages["decode"] = time.perf_counter() - t0
        if not posts:
            return out
        feats, present = self.encode(posts, out.stages)
        t_head = time.perf_counter()
        probs, quality, projected = self.run_head(feats, present, stats)
        t_end = time.perf_counter()
        out.stages.update(head=t_end - t_head, batch=t_end - t0)
        out.events = self.build_events(posts, present, probs, quality, stats, out.stages)
        out.enqueue = self._to_enqueue(present, probs, quality, projected)
        return out

    def _to_enqueue(
        self, present: np.ndarray, probs: np.ndarray, quality: np.ndarray, projected: np.ndarray
    ) -> dict[str, np.ndarray]:
        """Projected features of complete, confident, good-quality posts: what keeps the queue typical."""
        keep = (
            (present.min(1) > 0)
            & (probs.max(1) >= self.manifest.enqueue_min_confidence_for(self.settings))
            & (quality.min(1) >= self.settings.enqueue_min_quality)
            & np.isfinite(projected).all((1, 2))
        )
        if not keep.any():
            return {}
        return {m: np.ascontiguousarray(projected[keep, j], np.float32) for j, m in enumerate(MODALITIES)}
