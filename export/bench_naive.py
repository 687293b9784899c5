"""The naive peer of ``sentiment-stream bench``: what a user writes first, run as a Faust worker.

One Faust agent takes one post at a time and scores it with PyTorch eager on the event loop: the
``transformers`` tokenizer, the torch MiniLM, the torch MobileNetV2 and the torch serving head, then
sends a small msgpack event (``id``, ``label``, ``probs``, ``event_ts``, ``emit_ts``) to the sentiment
topic. No batching, no executor, no Redis (the queue moments are the training-time ones, which only
makes the peer faster). PyTorch keeps its default threads (one per core).

This is a benchmark peer, not part of the service: it imports torch (``train`` extra), which
``stream/service/app.py`` and ``stream/service/scoring.py`` never do. Run by the bench as
``python -m export.bench_naive`` with ``SENTIMENT_*`` settings in the environment.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from pathlib import Path
from typing import Any

import faust
import msgpack
import numpy as np
import torch
from prometheus_client import CollectorRegistry, Counter, start_http_server

from stream.service.events import LABELS, PostRejected, decode_post
from stream.service.manifest import Manifest
from stream.service.preprocess import image_to_array, minilm_dir
from stream.service.settings import Settings, get_settings

__all__ = ["NaiveScorer", "create_app", "main"]

log = logging.getLogger(__name__)


class NaiveScorer:
    """Per-post PyTorch eager scoring: tokenizer + MiniLM, MobileNetV2, serving head."""

    def __init__(self, manifest: Manifest, settings: Settings) -> None:
        from transformers import AutoTokenizer

        from models.common import config_from_dict
        from models.encoders import ImageEncoder, TextEncoder
        from models.head import ServingHead, ServingHeadConfig, load_serving_head

        self.tokenizer = AutoTokenizer.from_pretrained(str(minilm_dir()), local_files_only=True)
        self.text = TextEncoder().eval()
        self.image = ImageEncoder().eval()
        source = Path(str(manifest.exporter.get("source_model_dir", "")))
        if (source / "head.pt").is_file() and (source / "config.json").is_file():
            self.head = load_serving_head(source, settings.recovery)
        else:  # the same architecture; its weights do not change its speed
            cfg = config_from_dict(ServingHeadConfig, dict(manifest.head_config["config"]))
            self.head = ServingHead(cfg).eval()
            self.head.set_recovery(settings.recovery)
        mean, var = manifest.queue_moments()
        self.queue_mean, self.queue_var = torch.from_numpy(mean), torch.from_numpy(var)
        self.image_size = manifest.image_size

    def _embed(self, text: str | None) -> torch.Tensor:
        if text is None:
            return torch.zeros(1, 384)
        tok = self.tokenizer(text, truncation=True, max_length=256, return_tensors="pt")
        return self.text(tok["input_ids"], tok["attention_mask"])

    @torch.inference_mode()
    def score(self, raw: bytes, settings: Settings) -> dict[str, Any]:
        post = decode_post(raw, settings=settings)
        text, transcript = self._embed(post.text), self._embed(post.transcript)
        if post.pixels is not None:
            image = self.image(torch.from_numpy(image_to_array(post.pixels, self.image_size)).unsqueeze(0))
        else:
            image = torch.zeros(1, 1280)
        present = torch.tensor(
            [[post.text is not None, post.pixels is not None, post.transcript is not None]], dtype=torch.float32
        )
        probs, _, _ = self.head(text, image, transcript, present, self.queue_mean, self.queue_var)
        p = probs[0].numpy().astype(np.float64)
        now = time.time()
        return {
            "id": post.id,
            "label": LABELS[int(p.argmax())],
            "probs": p.tolist(),
            "event_ts": post.ts if post.ts is not None else now,
            "emit_ts": now,
        }


def create_app(settings: Settings, manifest: Manifest) -> faust.App:
    registry = CollectorRegistry()
    events = Counter("sentiment_events", "Posts handled by the naive peer, by outcome.", ["outcome"], registry=registry)
    start_http_server(settings.metrics_port, addr=settings.metrics_host, registry=registry)
    settings.faust_data_dir.mkdir(parents=True, exist_ok=True)
    app = faust.App(
        settings.consumer_group,
        broker=",".join(f"kafka://{s.strip()}" for s in settings.bootstrap_servers.split(",")),
        processing_guarantee="at_least_once",
        store="memory://",
        datadir=str(settings.faust_data_dir / settings.consumer_group),
        web_enabled=False,
        broker_session_timeout=settings.session_timeout_s,
        broker_heartbeat_interval=1.0,
        consumer_auto_offset_reset="earliest",
        topic_disable_leader=True,
        topic_allow_declare=False,
    )
    posts = app.topic(settings.topic_posts, key_type=bytes, value_type=bytes, value_serializer="raw")
    sentiment = app.topic(settings.topic_sentiment, key_type=bytes, value_type=bytes, value_serializer="raw")
    scorer = NaiveScorer(manifest, settings)

    @app.agent(posts)
    async def score(stream: Any) -> None:
        async for raw in stream:
            try:
                event = scorer.score(raw, settings)
            except PostRejected:
                events.labels("dead_letter").inc()
                continue
            await sentiment.send(key=event["id"].encode(), value=msgpack.packb(event, use_bin_type=True))
            events.labels("scored").inc()

    return app


def main() -> int:
    logging.basicConfig(level=logging.WARNING)
    settings = get_settings()
    manifest = Manifest.load(settings.model_dir, check_graphs=False)
    app = create_app(settings, manifest)
    log.warning("naive peer: %s", json.dumps({"torch_threads": torch.get_num_threads()}))
    worker = faust.Worker(app, loglevel="warning", quiet=True)
    try:
        worker.execute_from_commandline()
    except SystemExit as exc:
        return int(exc.code or 0)
    return 0


if __name__ == "__main__":
    sys.exit(main())
