"""Throughput of the exported graphs vs PyTorch eager, measured in one run (a script, not a test).

    python -m export.bench --manifest DIR [--seconds 1.0] [--repeats 3] [--batches 1 8 32 128] [--data-dir D]

Prints posts/s for the text encoder (ORT fp32, ORT int8, PyTorch), the image encoder (ORT, PyTorch)
and the head (ORT, PyTorch) at each batch size, then the text encoder batch size this suggests for
serving (``settings.encode_sub_batch``) and why. Texts are 512 real tweets, length-sorted in windows
of 128 and then cut into batches, as ``stream/service/scoring.py`` sorts a micro-batch before its encoder
sub-batches; images are real emoji PNGs preprocessed at 224 (decoding is not timed); the head gets
features of the right shapes (its cost does not depend on their values). Every cell is measured in
``--repeats`` rounds over all cells (one warm-up call in the first), each of at least ``--seconds``,
and the median is shown; within a round ORT and PyTorch run back to back at each batch size, so a
change in machine load hits both. ORT uses ``settings.intra_op_threads`` threads and PyTorch the
same number, so the ratios are fair; absolute numbers depend on what else the machine is doing.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from collections.abc import Callable, Sequence
from functools import partial
from pathlib import Path
from typing import Any, Final

import numpy as np
import torch

from export.parity import HeadSamples, random_presence, real_images, real_texts
from models.dims import IMAGE_DIM, TEXT_DIM
from stream.service.manifest import HEAD_INPUTS, IMAGE_INPUT, Manifest
from stream.service.preprocess import images_to_batch
from stream.service.runtime import create_session
from stream.service.settings import get_settings

__all__ = ["bench", "choose_batch", "main"]

log = logging.getLogger(__name__)

BATCHES: Final = (1, 8, 32, 128)
WINDOW: Final = 128  # texts are length-sorted in windows this big before batching
NEAR_BEST: Final = 0.9  # a batch size within 10 % of the best throughput is "as fast"


def _rate(calls: Sequence[tuple[Callable[[], Any], int]], seconds: float, warm_up: bool = True) -> float:
    """Items per second over ``calls`` (each a function and the items one call handles), cycled for ``seconds``.

    An untimed warm-up call first (``warm_up``), then at least one timed call.
    """
    if warm_up:
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


Calls = list[tuple[Callable[[], Any], int]]


def bench(manifest: Manifest, data_dir: Path, batches: Sequence[int] = BATCHES, seconds: float = 1.0,
          repeats: int = 3, seed: int = 0) -> dict[str, Any]:
    """Throughput ``{model: {engine: {batch: posts/s}}}`` (median of ``repeats`` rounds) and its min–max.

    Every cell is prepared first; then each round measures every cell once, so a burst of load from
    another process lands in one round of many cells rather than in all rounds of one.
    """
    from models.common import config_from_dict
    from models.encoders import ImageEncoder, TextEncoder
    from models.head import ServingHead, ServingHeadConfig

    settings = get_settings()
    torch.set_num_threads(max(1, settings.intra_op_threads))
    tokenizer = manifest.text_tokenizer("text")
    texts = real_texts(4 * WINDOW, seed, long_texts=0)
    pixels = images_to_batch(real_images(128, data_dir, seed), manifest.image_size)
    text_torch, image_torch = TextEncoder().eval(), ImageEncoder().eval()
    recovery = manifest.default_recovery
    # the same architecture from the manifest's config; its weights do not change its speed
    head_torch = ServingHead(config_from_dict(ServingHeadConfig, dict(manifest.head_config["config"]))).eval()
    head_torch.set_recovery(recovery)
    text_sessions = {v: create_session(manifest.text_encoder_path(v), settings)
                     for v in manifest.text_encoder_variants}
    image_session = create_session(manifest.image_encoder_path(), settings)
    head_session = create_session(manifest.head_path(recovery), settings)
    rng = np.random.default_rng(seed)
    n = max(batches)
    head_inputs = HeadSamples(rng.standard_normal((n, TEXT_DIM), dtype=np.float32) * 0.05,
                              np.abs(rng.standard_normal((n, IMAGE_DIM), dtype=np.float32)),
                              rng.standard_normal((n, TEXT_DIM), dtype=np.float32) * 0.05, random_presence(n, rng),
                              "bench")
    queue_mean, queue_var = manifest.queue_moments()

    cells: dict[tuple[str, str, int], Calls] = {}
    for batch in batches:
        encoded = [tokenizer.encode(chunk) for chunk in _bucketed(texts, batch, seed)]
        for variant, session in text_sessions.items():
            cells["text_encoder", f"ort_{variant}", batch] = [
                (partial(session.run, {"input_ids": ids, "attention_mask": mask}), len(ids)) for ids, mask in encoded]
        cells["text_encoder", "torch", batch] = [
            (partial(text_torch, torch.from_numpy(ids), torch.from_numpy(mask)), len(ids)) for ids, mask in encoded]
    for batch in batches:
        chunks = [np.ascontiguousarray(pixels[(np.arange(batch) + s) % len(pixels)])
                  for s in range(0, len(pixels), batch)]
        cells["image_encoder", "ort", batch] = [(partial(image_session.run, {IMAGE_INPUT: c}), batch) for c in chunks]
        cells["image_encoder", "torch", batch] = [(partial(image_torch, torch.from_numpy(c)), batch) for c in chunks]
    for batch in batches:
        feeds = head_inputs.feeds(slice(0, batch), queue_mean, queue_var)
        cells["head", "ort", batch] = [(partial(head_session.run, feeds), batch)]
        cells["head", "torch", batch] = [(partial(head_torch, *(torch.from_numpy(feeds[k]) for k in HEAD_INPUTS)),
                                          batch)]

    rates: dict[tuple[str, str, int], list[float]] = {key: [] for key in cells}
    with torch.inference_mode():
        for round_ in range(repeats):
            for key, calls in cells.items():
                rates[key].append(_rate(calls, seconds, warm_up=round_ == 0))
    table: dict[str, dict[str, dict[int, float]]] = {}
    spread: dict[str, dict[str, dict[int, list[float]]]] = {}
    for (model, engine, batch), values in rates.items():
        table.setdefault(model, {}).setdefault(engine, {})[batch] = float(np.median(values))
        spread.setdefault(model, {}).setdefault(engine, {})[batch] = [min(values), max(values)]
    return {"table": table, "range": spread, "repeats": repeats, "seconds_per_cell": seconds,
            "intra_op_threads": settings.intra_op_threads, "torch_threads": torch.get_num_threads(),
            "head_recovery": recovery, "model_version": manifest.version}


def choose_batch(result: dict[str, Any], text_variant: str = "int8") -> tuple[int, str]:
    """The text encoder's batch size for serving (``encode_sub_batch``), with the reason.

    The text encoder is the cost every post pays (every post has a text); images gain nothing from
    batching and the head is < 1 % of the time. Within a formed micro-batch the sub-batch size does not
    change latency, only throughput and the number of ORT calls: so the largest batch whose throughput
    is within 10 % of the best wins (as fast, fewest calls).
    """
    table = result["table"]
    engine = f"ort_{text_variant}" if f"ort_{text_variant}" in table["text_encoder"] else "ort_fp32"
    row = table["text_encoder"][engine]
    spread = result.get("range", {}).get("text_encoder", {}).get(engine, {})
    best = max(row.values())
    near = sorted(b for b, rate in row.items() if rate >= NEAR_BEST * best)
    chosen = max(near)

    def cell(batch: int) -> str:
        low, high = spread.get(batch, (row[batch], row[batch]))
        return f"B{batch} {row[batch]:.0f} ({low:.0f}–{high:.0f})"

    head = table["head"]["ort"]
    reason = (f"text encoder {engine}, posts/s median (min–max): {', '.join(cell(b) for b in sorted(row))}. "
              f"Batches {near} are within {100 * (1 - NEAR_BEST):.0f} % of the best; the largest of them needs the "
              f"fewest ORT calls per micro-batch. Keep the micro-batch (max_batch) at least this large: the "
              f"head runs {head[max(head)] / head[min(head)]:.0f}x more posts/s at B{max(head)} than at "
              f"B{min(head)}, and the Redis and Kafka round trips are per micro-batch.")
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
    parser.add_argument("--seconds", type=float, default=1.0, help="minimum seconds per cell and round")
    parser.add_argument("--repeats", type=int, default=3, help="rounds over every cell; the median is shown")
    parser.add_argument("--json", type=Path, default=None, help="also write the raw numbers here")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    manifest = Manifest.load(args.manifest, check_graphs=False)
    result = bench(manifest, args.data_dir or get_settings().data_dir, args.batches, args.seconds, args.repeats)
    chosen, reason = choose_batch(result)
    result["default_batch"], result["reason"] = chosen, reason
    print(f"model {manifest.version}; ORT intra_op_threads={result['intra_op_threads']}, "
          f"torch threads={result['torch_threads']}; posts/s, median of {args.repeats} rounds of "
          f"≥ {args.seconds} s per cell; machine load average {os.getloadavg()[0]:.1f} at the end\n")
    print(format_table(result))
    print(f"\ndefault text encoder batch (encode_sub_batch): {chosen} — {reason}")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
