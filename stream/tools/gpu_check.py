"""The GPU path's parity and encoder throughput: every served graph on CUDA (I/O binding) against CPU.

Run by ``scripts/gpu-check.sh`` before the bench. For each graph a worker on CUDA serves (the fp32 text
encoder, the image encoder, the head), real benchmark posts go through a CPU session and a session of
``--provider`` (``cuda`` on a GPU node; ``cpu`` checks this tool itself on a machine without one) and the
outputs are compared: cosine and max |Δ| of the embeddings, max |Δprob| and argmax agreement of the
head. Tolerances allow TF32 (on by default in ONNX Runtime's CUDA provider on Ampere and newer). Then
each encoder's throughput at the GPU sub-batch sizes, so the batch sizes are chosen by measurement.
Writes JSON (``--json``) and prints a summary; exit 1 when a tolerance or the provider check fails.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from collections.abc import Callable, Sequence
from functools import partial
from pathlib import Path
from typing import Any, Final

import numpy as np

from stream.service.events import decode_image
from stream.service.manifest import IMAGE_INPUT, IMAGE_OUTPUT, TEXT_OUTPUT, Manifest
from stream.service.preprocess import images_to_batch
from stream.service.runtime import CUDA, ModelSession, clear_session_cache, create_session
from stream.service.settings import Settings, get_settings

__all__ = ["add_arguments", "check", "run"]

MIN_COSINE: Final = 0.999  # fp32 CPU vs CUDA (TF32 matmuls); measured 1.0 − 1e-7 CPU vs CPU
MAX_DPROB: Final = 2e-3
MIN_ARGMAX_AGREEMENT: Final = 0.99


def _cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    na, nb = np.linalg.norm(a, axis=1), np.linalg.norm(b, axis=1)
    return np.asarray((a * b).sum(1) / np.maximum(na * nb, 1e-12))


def _rate(fn: Callable[[], Any], items: int, seconds: float) -> float:
    fn()  # warm-up (CUDA kernels, allocator)
    n, start = 0, time.perf_counter()
    while (elapsed := time.perf_counter() - start) < seconds:
        fn()
        n += items
    return n / elapsed


def _sessions(manifest: Manifest, settings: Settings, provider: str) -> dict[str, ModelSession]:
    chosen = settings.model_copy(update={"providers": provider})
    return {
        "text_encoder": create_session(manifest.text_encoder_path("fp32"), chosen),
        "image_encoder": create_session(manifest.image_encoder_path(), chosen),
        "head": create_session(manifest.head_path(settings.recovery), chosen),
    }


def check(
    manifest: Manifest,
    data_dir: Path,
    settings: Settings,
    provider: str = "cuda",
    n: int = 256,
    batches: Sequence[int] = (64, 128, 256),
    seconds: float = 2.0,
) -> dict[str, Any]:
    """Parity of ``provider`` against CPU on ``n`` real posts, and encoder throughput at ``batches``."""
    from stream.tools.dataset import benchmark_posts

    rows = list(benchmark_posts(data_dir, "test"))
    texts = [r["text"] for r in rows[:n] if r.get("text")]
    images = [decode_image(r["image"], settings.max_image_pixels) for r in rows if r.get("image")][: max(8, n // 4)]
    clear_session_cache()
    cpu = _sessions(manifest, settings, "cpu")
    clear_session_cache()  # separate sessions even when --provider cpu
    dev = _sessions(manifest, settings, provider)
    if provider == "cpu":  # the dry run exercises the CUDA code path's I/O binding on CPU
        for session in dev.values():
            session.io_binding = True
    obtained = {name: s.provider for name, s in dev.items()}
    report: dict[str, Any] = {
        "provider_asked": provider,
        "providers_obtained": obtained,
        "io_binding": {name: s.io_binding for name, s in dev.items()},
        "posts": {"texts": len(texts), "images": len(images)},
        "tolerances": {"min_cosine": MIN_COSINE, "max_dprob": MAX_DPROB, "min_argmax_agreement": MIN_ARGMAX_AGREEMENT},
    }
    failures = [f"{k} runs on {v}" for k, v in obtained.items() if provider == "cuda" and v != CUDA]

    tokenizer = manifest.text_tokenizer("text")
    ids, mask = tokenizer.encode(texts)
    feeds = {"input_ids": ids, "attention_mask": mask}
    text_cpu = cpu["text_encoder"].run(feeds)[TEXT_OUTPUT]
    text_dev = dev["text_encoder"].run(feeds)[TEXT_OUTPUT]
    pixels = images_to_batch(images, manifest.image_size)
    image_cpu = cpu["image_encoder"].run({IMAGE_INPUT: pixels})[IMAGE_OUTPUT]
    image_dev = dev["image_encoder"].run({IMAGE_INPUT: pixels})[IMAGE_OUTPUT]
    for name, a, b in (("text_encoder", text_cpu, text_dev), ("image_encoder", image_cpu, image_dev)):
        cos = _cosine(a, b)
        report[name] = {"cosine_min": float(cos.min()), "max_abs_diff": float(np.abs(a - b).max())}
        if cos.min() < MIN_COSINE:
            failures.append(f"{name}: cosine {cos.min():.5f} < {MIN_COSINE}")

    k = len(texts)
    rng = np.random.default_rng(0)
    present = np.ones((k, 3), np.float32)
    present[:, 1] = rng.random(k) < 0.4
    present[:, 2] = rng.random(k) < 0.2
    mean, var = manifest.queue_moments()
    head_feeds = {
        "text": text_cpu,
        "image": image_cpu[np.arange(k) % len(image_cpu)] * present[:, 1:2],
        "transcript": text_cpu[::-1].copy() * present[:, 2:3],
        "present": present,
        "queue_mean": mean,
        "queue_var": var,
    }
    probs_cpu = cpu["head"].run(head_feeds)["probs"]
    probs_dev = dev["head"].run(head_feeds)["probs"]
    agreement = float((probs_cpu.argmax(1) == probs_dev.argmax(1)).mean())
    dprob = float(np.abs(probs_cpu - probs_dev).max())
    report["head"] = {"max_abs_dprob": dprob, "argmax_agreement": agreement}
    if dprob > MAX_DPROB or agreement < MIN_ARGMAX_AGREEMENT:
        failures.append(f"head: max |Δprob| {dprob:.2e}, argmax agreement {agreement:.3f}")

    throughput: dict[str, dict[str, float]] = {"text_encoder": {}, "image_encoder": {}}
    for size in batches:
        t_ids, t_mask = tokenizer.encode([texts[i % len(texts)] for i in range(size)])
        t_feeds = {"input_ids": t_ids, "attention_mask": t_mask}
        throughput["text_encoder"][str(size)] = _rate(partial(dev["text_encoder"].run, t_feeds), size, seconds)
        i_feeds = {IMAGE_INPUT: pixels[np.arange(size) % len(pixels)]}
        throughput["image_encoder"][str(size)] = _rate(partial(dev["image_encoder"].run, i_feeds), size, seconds)
    report["throughput_per_s"] = throughput
    report["best_batch"] = {name: max(r, key=lambda k: r[k]) for name, r in throughput.items()}
    report["failures"] = failures
    report["passed"] = not failures
    return report


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model-dir", type=Path, required=True, help="exported model (manifest.json)")
    parser.add_argument("--data-dir", type=Path, required=True, help="built benchmark (real posts for the parity)")
    parser.add_argument("--provider", choices=["cuda", "cpu"], default="cuda", help="cpu: check this tool itself")
    parser.add_argument("--posts", type=int, default=256)
    parser.add_argument("--batches", type=int, nargs="+", default=[64, 128, 256])
    parser.add_argument("--seconds", type=float, default=2.0, help="per throughput cell")
    parser.add_argument("--json", type=Path)


def run(args: argparse.Namespace) -> int:
    settings = get_settings()
    manifest = Manifest.load(args.model_dir, settings=settings.model_copy(update={"providers": "cpu"}))
    report = check(manifest, args.data_dir, settings, args.provider, args.posts, args.batches, args.seconds)
    if args.json:
        args.json.write_text(json.dumps(report, indent=2, allow_nan=True) + "\n")
    summary = {k: report[k] for k in ("providers_obtained", "text_encoder", "image_encoder", "head", "best_batch")}
    print(json.dumps(summary, indent=2))
    for name, rates in report["throughput_per_s"].items():
        cells = ", ".join(f"batch {b}: {r:,.0f}/s" for b, r in rates.items() if math.isfinite(r))
        print(f"{name} on {report['providers_obtained'][name]}: {cells}")
    for failure in report["failures"]:
        print(f"FAILED: {failure}", file=sys.stderr)
    return 0 if report["passed"] else 1


if __name__ == "__main__":
    parser = argparse.ArgumentParser(prog="python -m stream.tools.gpu_check", description=__doc__)
    add_arguments(parser)
    sys.exit(run(parser.parse_args()))
