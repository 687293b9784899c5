"""Throughput of the exported graphs vs PyTorch eager, measured in one run (a script, not a test).

    python -m export.bench --manifest DIR [--seconds 1.0] [--batches 1 8 32 128] [--data-dir D]

Prints posts/s for the text encoder (ORT fp32, ORT int8, PyTorch), the image encoder (ORT, PyTorch)
and the head (ORT, PyTorch) at each batch size, then the default text batch size this suggests and
why. Texts are 512 real tweets, length-sorted in windows of 128 and then cut into batches, as
``stream/scoring.py`` sorts a micro-batch before its encoder sub-batches; images are real emoji PNGs
preprocessed at 224 (decoding is not timed); the head gets features of the right shapes (its cost does
not depend on their values). Every cell runs one warm-up call, then calls for at least ``--seconds``;
for each batch size ORT and PyTorch run back to back, so a change in machine load hits both. ORT uses
``settings.intra_op_threads`` threads and PyTorch the same number, so the ratios are fair; absolute
numbers depend on what else the machine is doing.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from collections.abc import Callable, Sequence
from functools import partial
from pathlib import Path
from typing import Any, Final

import numpy as np
import torch

from export.manifest import HEAD_INPUTS, IMAGE_INPUT, Manifest
from export.parity import HeadSamples, random_presence, real_images, real_texts
from export.runtime import create_session
from stream.preprocess import images_to_batch
from stream.settings import get_settings

__all__ = ["bench", "choose_batch", "main"]

log = logging.getLogger(__name__)

BATCHES: Final = (1, 8, 32, 128)
WINDOW: Final = 128  # texts are length-sorted in windows this big before batching
NEAR_BEST: Final = 0.9  # a batch size within 10 % of the best throughput is "as fast"


def _rate(calls: Sequence[tuple[Callable[[], Any], int]], seconds: float) -> float:
    """Items per second over ``calls`` (each a function and the items one call handles), cycled for ``seconds``.

    One warm-up call first, then at least one call.
    """
    calls[0][0]()
    items, done, start = 0, 0, time.perf_counter()
    while True:
        fn, n = calls[done % len(calls)]
        fn()
        items += n
        done += 1
        elapsed = time.perf_counter() - start
        if elapsed >= seconds:
            return items / elapsed


def _bucketed(texts: Sequence[str], batch: int, seed: int, window: int = WINDOW) -> list[list[str]]:
    """Batches of ``batch`` texts from windows of ``window`` texts sorted by length (what serving does).

    The batches come back shuffled, so the first seconds of a cell see short and long tweets alike.
    """
    batches = []
    for start in range(0, len(texts), window):
        ordered = sorted(texts[start:start + window], key=len)
        batches += [ordered[i:i + batch] for i in range(0, len(ordered), batch)]
    order = np.random.default_rng(seed).permutation(len(batches))
    return [batches[i] for i in order]


def bench(manifest: Manifest, data_dir: Path, batches: Sequence[int] = BATCHES, seconds: float = 1.0,
          seed: int = 0) -> dict[str, Any]:
    """Throughput table ``{model: {engine: {batch: posts/s}}}`` plus the settings it ran with."""
    from models.common import config_from_dict
    from models.encoders import ImageEncoder, TextEncoder
    from models.head import ServingHead, ServingHeadConfig

    settings = get_settings()
    torch.set_num_threads(max(1, settings.intra_op_threads))
    tokenizer = manifest.text_tokenizer("text")
    texts = real_texts(4 * WINDOW, seed, long_texts=0)
    images = real_images(128, data_dir, seed)
    pixels = images_to_batch(images, manifest.image_size)
    table: dict[str, dict[str, dict[int, float]]] = {"text_encoder": {}, "image_encoder": {}, "head": {}}

    sessions = {v: create_session(manifest.text_encoder_path(v), settings) for v in manifest.text_encoder_variants}
    text_torch = TextEncoder().eval()
    for batch in batches:
        encoded = [tokenizer.encode(chunk) for chunk in _bucketed(texts, batch, seed)]
        for variant, session in sessions.items():
            calls = [(partial(session.run, {"input_ids": ids, "attention_mask": mask}), len(ids))
                     for ids, mask in encoded]
            table["text_encoder"].setdefault(f"ort_{variant}", {})[batch] = _rate(calls, seconds)
        with torch.inference_mode():
            calls = [(partial(text_torch, torch.from_numpy(ids), torch.from_numpy(mask)), len(ids))
                     for ids, mask in encoded]
            table["text_encoder"].setdefault("torch", {})[batch] = _rate(calls, seconds)

    image_session = create_session(manifest.image_encoder_path(), settings)
    image_torch = ImageEncoder().eval()
    for batch in batches:
        chunks = [np.ascontiguousarray(pixels[(np.arange(batch) + s) % len(pixels)])
                  for s in range(0, len(pixels), batch)]
        table["image_encoder"].setdefault("ort", {})[batch] = _rate(
            [(partial(image_session.run, {IMAGE_INPUT: c}), batch) for c in chunks], seconds)
        with torch.inference_mode():
            table["image_encoder"].setdefault("torch", {})[batch] = _rate(
                [(partial(image_torch, torch.from_numpy(c)), batch) for c in chunks], seconds)

    recovery = manifest.default_recovery
    head_session = create_session(manifest.head_path(recovery), settings)
    # the same architecture from the manifest's config; its weights do not change its speed
    head_torch = ServingHead(config_from_dict(ServingHeadConfig, dict(manifest.head_config["config"]))).eval()
    head_torch.set_recovery(recovery)
    rng = np.random.default_rng(seed)
    n = max(batches)
    samples = HeadSamples(rng.standard_normal((n, 384), dtype=np.float32) * 0.05,
                          np.abs(rng.standard_normal((n, 1280), dtype=np.float32)),
                          rng.standard_normal((n, 384), dtype=np.float32) * 0.05, random_presence(n, rng), "bench")
    queue_mean, queue_var = manifest.queue_moments()
    for batch in batches:
        feeds = samples.feeds(slice(0, batch), queue_mean, queue_var)
        tensors = [torch.from_numpy(feeds[name]) for name in HEAD_INPUTS]
        table["head"].setdefault("ort", {})[batch] = _rate([(partial(head_session.run, feeds), batch)], seconds)
        with torch.inference_mode():
            table["head"].setdefault("torch", {})[batch] = _rate([(partial(head_torch, *tensors), batch)], seconds)

    return {"table": table, "intra_op_threads": settings.intra_op_threads, "torch_threads": torch.get_num_threads(),
            "seconds_per_cell": seconds, "head_recovery": recovery, "model_version": manifest.version}


def choose_batch(table: dict[str, dict[str, dict[int, float]]], text_variant: str = "int8") -> tuple[int, str]:
    """The smallest batch whose text-encoder throughput is within 10 % of the best, with the reason.

    The text encoder is the cost every post pays (research/onnx_encoders.md §7); images gain nothing from
    batching and the head is < 1 % of the time, so they do not move the choice. Smaller batches wait
    less to fill, so among equally fast sizes the smallest wins.
    """
    row = table["text_encoder"].get(f"ort_{text_variant}") or table["text_encoder"]["ort_fp32"]
    best_batch = max(row, key=lambda b: row[b])
    chosen = min(b for b, rate in row.items() if rate >= NEAR_BEST * row[best_batch])
    reason = (f"text encoder ORT {text_variant}: {row[chosen]:.0f} posts/s at batch {chosen}, "
              f"best {row[best_batch]:.0f} at batch {best_batch}; the smallest batch within "
              f"{100 * (1 - NEAR_BEST):.0f} % of the best fills fastest (lowest added latency)")
    return chosen, reason


def format_table(result: dict[str, Any]) -> str:
    """A Markdown table: posts/s per model and engine at each batch size, and ORT's speed-up over PyTorch."""
    table = result["table"]
    batches = sorted(next(iter(table["head"].values())))
    lines = ["| model | engine | " + " | ".join(f"B{b}" for b in batches) + " |",
             "|---|---|" + "---|" * len(batches)]
    for model, engines in table.items():
        for engine, row in engines.items():
            lines.append(f"| {model} | {engine} | " + " | ".join(f"{row[b]:,.0f}" for b in batches) + " |")
        for engine, row in engines.items():
            if engine.startswith("ort"):
                ratios = " | ".join(f"{row[b] / engines['torch'][b]:.2f}×" for b in batches)
                lines.append(f"| {model} | {engine} / torch | {ratios} |")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m export.bench", description=__doc__.splitlines()[0])
    parser.add_argument("--manifest", type=Path, required=True, help="export directory (manifest.json)")
    parser.add_argument("--data-dir", type=Path, default=None, help="for the real images (default: SENTIMENT_DATA_DIR)")
    parser.add_argument("--batches", type=int, nargs="+", default=list(BATCHES))
    parser.add_argument("--seconds", type=float, default=1.0, help="minimum seconds per cell")
    parser.add_argument("--json", type=Path, default=None, help="also write the raw numbers here")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    manifest = Manifest.load(args.manifest, check_graphs=False)
    result = bench(manifest, args.data_dir or get_settings().data_dir, args.batches, args.seconds)
    chosen, reason = choose_batch(result["table"])
    result["default_batch"], result["reason"] = chosen, reason
    print(f"model {manifest.version}; ORT intra_op_threads={result['intra_op_threads']}, "
          f"torch threads={result['torch_threads']}; posts/s, ≥ {args.seconds} s per cell\n")
    print(format_table(result))
    print(f"\ndefault batch size: {chosen} — {reason}")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
