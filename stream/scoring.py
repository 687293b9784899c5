"""Score a micro-batch of raw posts: validate, encode, run the head, build events. No broker, no Redis.

:class:`PostScorer` is the one implementation the Faust agent, the replay tool and the tests share.
Its :meth:`PostScorer.score` is synchronous and CPU-bound (ONNX Runtime releases the GIL): the worker
calls it in a dedicated executor, never on the event loop. Queue statistics come in (read from Redis by
the caller), vectors to enqueue come out (pushed by the caller), so this module does no I/O.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from export.manifest import IMAGE_INPUT, IMAGE_OUTPUT, TEXT_OUTPUT, Manifest
from export.runtime import ModelSession, create_session
from stream.events import LABELS, MODALITIES, DeadLetter, Post, PostRejected, SentimentEvent, decode_post
from stream.feature_queue import QueueStats
from stream.preprocess import TextTokenizer, images_to_batch
from stream.settings import Settings, get_settings

__all__ = ["BatchOutcome", "InputRecord", "PostScorer"]

TEXT, IMAGE, TRANSCRIPT = range(3)


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


class PostScorer:
    """Encoders + head from an exported manifest, with the preprocessing they were trained with."""

    def __init__(self, manifest: Manifest, settings: Settings | None = None, recovery: str | None = None) -> None:
        self.settings = settings or get_settings()
        self.manifest = manifest
        self.recovery = recovery or self.settings.recovery
        self.version = manifest.version
        self.text_session = create_session(manifest.text_encoder_path(self.settings.text_encoder), self.settings)
        self.image_session = create_session(manifest.image_encoder_path(), self.settings)
        self.head_session = create_session(manifest.head_path(self.recovery), self.settings)
        self.tokenizer = manifest.text_tokenizer("text")
        self.transcript_tokenizer = manifest.text_tokenizer("transcript")
        self.image_size = manifest.image_size
        self.dim = manifest.queue_dim
        # Moments of the training-time queue: the fallback when Redis has never answered.
        self.fallback_mean, self.fallback_var = manifest.queue_moments()
        self.sub_batch = max(1, self.settings.encode_sub_batch)
        self.image_sub_batch = max(1, self.settings.image_sub_batch)

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
        """The dead letter of ``rec``; the original bytes are kept whole unless they exceed the size cap."""
        value = bytes(rec.value) if isinstance(rec.value, bytes | bytearray | memoryview) else b""
        cap = self.settings.max_dead_letter_bytes
        return DeadLetter(
            value=value[:cap],
            truncated=len(value) > cap,
            reason=exc.reason,
            detail=exc.detail,
            key=rec.key,
            topic=rec.topic,
            partition=rec.partition,
            offset=rec.offset,
        )

    def encode_texts(self, texts: Sequence[str], tokenizer: TextTokenizer) -> np.ndarray:
        """[n, 384] embeddings; texts are bucketed by token count so short tweets are not padded to long ones.

        One tokenizer call for the whole batch (the Rust tokenizer parallelises it), then each sub-batch
        is cut to its own longest row: the same ids and mask as tokenising the sub-batch alone.
        """
        out = np.zeros((len(texts), 384), np.float32)
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
        if not posts:
            return np.zeros((0, 1280), np.float32)
        pixels = images_to_batch([p.pixels for p in posts if p.pixels is not None], self.image_size)
        chunks = []
        for start in range(0, len(pixels), self.image_sub_batch):
            result = self.image_session.run({IMAGE_INPUT: pixels[start : start + self.image_sub_batch]})
            chunks.append(result[IMAGE_OUTPUT])
        return np.concatenate(chunks).astype(np.float32, copy=False)

    def moments(self, stats: QueueStats | None) -> tuple[np.ndarray, np.ndarray]:
        """Queue moments for the head: Redis's where known, the training-time queue's otherwise."""
        mean, var = self.fallback_mean.copy(), self.fallback_var.copy()
        if stats is not None:
            for i, m in enumerate(MODALITIES):
                if m in stats.mean and stats.count.get(m, 0) > 1:
                    mean[i], var[i] = stats.mean[m], stats.var[m]
        return mean, var

    # -- the whole batch --------------------------------------------------------------------------
    def score(self, records: Sequence[InputRecord], stats: QueueStats | None = None) -> BatchOutcome:
        """Score ``records``; every valid post yields exactly one event, every invalid one a dead letter."""
        out = BatchOutcome()
        clock = time.perf_counter
        t0 = clock()
        posts, out.dead_letters = self.decode(records)
        t1 = clock()
        out.stages["decode"] = t1 - t0
        if not posts:
            return out

        n = len(posts)
        present = np.zeros((n, 3), np.float32)
        feats = {
            TEXT: np.zeros((n, 384), np.float32),
            IMAGE: np.zeros((n, 1280), np.float32),
            TRANSCRIPT: np.zeros((n, 384), np.float32),
        }
        with_text = [i for i, p in enumerate(posts) if p.text is not None]
        with_image = [i for i, p in enumerate(posts) if p.pixels is not None]
        with_transcript = [i for i, p in enumerate(posts) if p.transcript is not None]

        feats[TEXT][with_text] = self.encode_texts([posts[i].text or "" for i in with_text], self.tokenizer)
        t2 = clock()
        feats[IMAGE][with_image] = self.encode_images([posts[i] for i in with_image])
        t3 = clock()
        feats[TRANSCRIPT][with_transcript] = self.encode_texts(
            [posts[i].transcript or "" for i in with_transcript], self.transcript_tokenizer
        )
        t4 = clock()
        present[with_text, TEXT] = 1.0
        present[with_image, IMAGE] = 1.0
        present[with_transcript, TRANSCRIPT] = 1.0

        mean, var = self.moments(stats)
        head = self.head_session.run(
            {
                "text": feats[TEXT],
                "image": feats[IMAGE],
                "transcript": feats[TRANSCRIPT],
                "present": present,
                "queue_mean": mean,
                "queue_var": var,
            }
        )
        probs, quality, projected = head["probs"], head["quality"], head["projected"]
        t5 = clock()
        out.stages.update(
            encode_text=t2 - t1, encode_image=t3 - t2, encode_transcript=t4 - t3, head=t5 - t4, batch=t5 - t0
        )

        flags: tuple[str, ...] = () if stats is None or not stats.degraded else (stats.status,)
        if stats is None:
            flags = ("queue_unavailable",)
        emit_ts = time.time()
        labels = probs.argmax(1)
        for i, post in enumerate(posts):
            here = tuple(m for j, m in enumerate(MODALITIES) if present[i, j])
            out.events.append(
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
                    stages=dict(out.stages),
                    flags=flags,
                )
            )
        out.enqueue = self._to_enqueue(present, probs, quality, projected)
        return out

    def _to_enqueue(
        self, present: np.ndarray, probs: np.ndarray, quality: np.ndarray, projected: np.ndarray
    ) -> dict[str, np.ndarray]:
        """Projected features of complete, confident, good-quality posts: what keeps the queue typical."""
        keep = (
            (present.min(1) > 0)
            & (probs.max(1) >= self.settings.enqueue_min_confidence)
            & (quality.min(1) >= self.settings.enqueue_min_quality)
            & np.isfinite(projected).all((1, 2))
        )
        if not keep.any():
            return {}
        return {m: np.ascontiguousarray(projected[keep, j], np.float32) for j, m in enumerate(MODALITIES)}
