"""The one settings object of the project (environment prefix ``SENTIMENT_``).

Every module reads configuration from :func:`get_settings`; nothing else reads the environment.
"""

from __future__ import annotations

import functools
import os
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Literal
from urllib.parse import urlparse

from pydantic import Field, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

__all__ = ["Settings", "get_settings"]


def _default_state_dir() -> Path:
    return Path(os.environ.get("XDG_STATE_HOME", Path.home() / ".local" / "state")) / "sentiment-stream"


def _default_cache_dir() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "sentiment-stream"


class Settings(BaseSettings):
    """Typed configuration; every field can be set as ``SENTIMENT_<FIELD>`` in the environment."""

    # A .env file in the working directory is read too (environment variables win over it).
    model_config = SettingsConfigDict(
        env_prefix="SENTIMENT_", env_file=".env", env_file_encoding="utf-8", frozen=True, extra="ignore"
    )

    # Broker
    bootstrap_servers: str = "127.0.0.1:9092"
    topic_posts: str = "posts"
    topic_sentiment: str = "sentiment"
    topic_dlq: str = "posts-dlq"
    partitions: int = Field(default=4, ge=1, le=1024)
    consumer_group: str = "sentiment-stream"
    session_timeout_s: float = Field(default=6.0, gt=0)
    # Faust asks for 1.5 s fetch waits and Tansu holds a fetch that long even when records arrive.
    fetch_max_wait_s: float = Field(default=0.025, gt=0)

    # Redis (the DRF feature queue)
    redis_url: str = "redis://127.0.0.1:6379/0"
    redis_timeout_s: float = Field(default=0.5, gt=0)
    queue_length: int = Field(default=1024, ge=8)
    queue_stats_ttl_s: float = Field(default=1.0, ge=0)
    # Which queue moments the head scores with. training: the exported model's own (frozen per model version:
    # served = offline, and a Redis outage cannot move a score); the live queue is still kept and watched for
    # drift. live: the Redis queue's moments, as the DRF design has it (they drift with the stream; see
    # docs/robustness.md for what that cost).
    queue_moments: Literal["training", "live"] = "training"

    # Micro-batching
    max_batch: int = Field(default=32, ge=1)
    max_wait_s: float = Field(default=0.02, gt=0)

    # Payload limits of the event contract (README, docs/architecture.md)
    max_id_chars: int = Field(default=256, ge=1)
    max_text_chars: int = Field(default=4000, ge=1)
    max_transcript_chars: int = Field(default=20000, ge=1)
    max_image_bytes: int = Field(default=5_000_000, ge=1)
    max_image_pixels: int = Field(default=25_000_000, ge=1)
    # The whole encoded dead letter stays under this size (below max_message_bytes): the original bytes are cut.
    max_dead_letter_bytes: int = Field(default=900_000, ge=1024)
    # The largest record: a post at every payload limit fits (max_post_bytes). Broker message.max.bytes, topic
    # max.message.bytes, producer max_request_size and consumer fetch sizes are all set from it (compose, k8s,
    # the worker; deploy/README.md, "Message size").
    max_message_bytes: int = Field(default=6_291_456, ge=1_048_576)

    # Models and inference
    model_dir: Path = Field(default_factory=lambda: _default_cache_dir() / "model")
    data_dir: Path = Field(default_factory=lambda: _default_cache_dir() / "data")
    recovery: Literal["fsrf", "drf"] = "fsrf"
    providers: Literal["cpu", "cuda"] = "cpu"
    intra_op_threads: int = Field(default=1, ge=0)
    # auto: int8 when the export's int8 gate passed (manifest `int8_gate`), else fp32 with a warning
    text_encoder: Literal["auto", "fp32", "int8"] = "auto"
    encode_sub_batch: int = Field(default=8, ge=1)  # CPU: text is length-bucketed into sub-batches this big
    image_sub_batch: int = Field(default=8, ge=1)  # the CNN gains nothing from bigger batches (docs/performance.md)
    enqueue_min_confidence: float = Field(default=0.8, ge=0, le=1)
    enqueue_min_quality: float = Field(default=0.2, ge=0, le=1)

    # Service
    metrics_host: str = "127.0.0.1"
    metrics_port: int = Field(default=9108, ge=0, le=65535)
    web_host: str = "127.0.0.1"
    web_port: int = Field(default=6066, ge=0, le=65535)
    state_dir: Path = Field(default_factory=_default_state_dir)
    latency_slo_s: float = Field(default=0.25, gt=0)
    shutdown_timeout_s: float = Field(default=30.0, gt=0)  # SIGTERM: finish the batch, then exit by this
    drift_interval_s: float = Field(default=15.0, gt=0)  # how often the drift gauges are refreshed (drift.py)
    drift_window_posts: int = Field(default=1000, ge=1)  # posts behind the pattern-share and mean-quality gauges
    log_format: Literal["text", "json"] = "text"  # json: one object per line with worker, partition, model

    # Reliability (docs/reliability.md): delivery, bounded memory, stalls
    # max_message_bytes (above) is also the producer's request limit: every output is built to fit under it.
    max_dead_letter_key_bytes: int = Field(default=1024, ge=16)
    max_image_aspect: float = Field(default=20.0, ge=1.0)  # long side / short side
    # Decoded bytes of one image (width x height x bytes per pixel, after a JPEG's reduced-scale decode),
    # checked from the header before decoding: a 5000 x 5000 RGBA PNG (100 MB) is refused, 4000 x 4000 fits.
    max_image_decoded_bytes: int = Field(default=64_000_000, ge=1)
    max_batch_bytes: int = Field(default=16_000_000, ge=1)  # message bytes per micro-batch (at least one message)
    produce_timeout_s: float = Field(default=30.0, gt=0)  # producer_request_timeout and the wait for acks
    batch_retries: int = Field(default=3, ge=0)  # a failed batch is retried this often, then the worker stops
    batch_retry_backoff_s: float = Field(default=0.5, ge=0)  # doubled after each retry
    ready_max_batch_age_s: float = Field(default=20.0, gt=0)  # /readyz: 503 when a batch is in flight longer
    broker_probe_interval_s: float = Field(default=5.0, gt=0)  # lag refresh and broker metadata probe
    ready_broker_timeout_s: float = Field(default=15.0, gt=0)  # /readyz: 503 when the broker has not answered
    queue_min_fill: float = Field(default=0.5, ge=0, le=1)  # of the seed size; below it the queue is reseeded

    # Performance (docs/performance.md): GPU batch sizes, batch policy, encoder cache, thread pools.
    gpu_sub_batch: int = Field(default=64, ge=1)  # text and image sub-batches on a CUDA session
    # fixed: always max_batch within max_wait_s; adaptive: follows the backlog and latency_slo_s (batching.py)
    batch_policy: Literal["fixed", "adaptive"] = "adaptive"
    adaptive_max_batch: int = Field(default=0, ge=0)  # the throughput size; 0: 64 on CPU, 256 on CUDA
    # A bounded LRU of encoder outputs keyed by a hash of the exact content, per model version; 0 = off.
    encode_cache_entries: int = Field(default=0, ge=0)  # per modality
    # The Rust tokenizer's thread pool (RAYON_NUM_THREADS); 1 = tokenise on the scoring thread itself.
    tokenizer_threads: int = Field(default=1, ge=1)

    @field_validator("bootstrap_servers")
    @classmethod
    def _one_or_more_host_ports(cls, value: str) -> str:
        for server in value.split(","):
            host, _, port = server.strip().rpartition(":")
            if not host or not port.isdigit():
                raise ValueError(f"bootstrap server {server!r} is not host:port")
        return value

    @property
    def max_post_bytes(self) -> int:
        """The largest valid post on the wire: every payload at its limit (4 UTF-8 bytes per char) + framing."""
        chars = self.max_id_chars + self.max_text_chars + self.max_transcript_chars
        return self.max_image_bytes + 4 * chars + 1024

    @model_validator(mode="after")
    def _a_post_at_the_limits_fits_a_message(self) -> Settings:
        if self.max_message_bytes < self.max_post_bytes:
            raise ValueError(
                f"max_message_bytes ({self.max_message_bytes}) is below the largest valid post ({self.max_post_bytes} "
                "bytes at the payload limits): raise it, with the broker's message.max.bytes, or lower max_image_bytes"
            )
        return self

    @model_validator(mode="after")
    def _dead_letters_fit(self) -> Settings:
        # The record carries the key twice (as its key and inside the letter) plus ~1 kB of framing.
        if self.max_dead_letter_bytes + self.max_dead_letter_key_bytes + 1024 > self.max_message_bytes:
            raise ValueError(
                f"max_dead_letter_bytes ({self.max_dead_letter_bytes}) + max_dead_letter_key_bytes"
                f" ({self.max_dead_letter_key_bytes}) + 1 kB must fit max_message_bytes ({self.max_message_bytes}),"
                " the producer's request limit"
            )
        return self

    def to_env(self, base: Mapping[str, str] | None = None, **overrides: object) -> dict[str, str]:
        """The environment that makes a child process read these settings (plus ``overrides``).

        ``base`` defaults to this process's environment; every field is written as ``SENTIMENT_<FIELD>``.
        """
        env = dict(os.environ if base is None else base)
        values = {**self.model_dump(), **overrides}
        for name, value in values.items():
            env[f"SENTIMENT_{name.upper()}"] = str(value)
        return env

    @property
    def broker_host_port(self) -> tuple[str, int]:
        """The first bootstrap server as (host, port)."""
        host, _, port = self.bootstrap_servers.split(",")[0].strip().rpartition(":")
        return host, int(port)

    @property
    def redis_host_port(self) -> tuple[str, int]:
        parsed = urlparse(self.redis_url)
        return parsed.hostname or "127.0.0.1", parsed.port or 6379

    @property
    def topics(self) -> tuple[str, str, str]:
        return self.topic_posts, self.topic_sentiment, self.topic_dlq

    @property
    def run_dir(self) -> Path:
        """Where the local stack keeps PID files and logs."""
        return self.state_dir / "run"

    @property
    def faust_data_dir(self) -> Path:
        return Path(tempfile.gettempdir()) / f"sentiment-stream-faust-{os.getuid()}"


@functools.cache
def get_settings() -> Settings:
    """The process-wide settings, read once from the environment."""
    return Settings()
