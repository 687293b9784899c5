"""The feature cache: every split of the benchmark encoded once by the frozen encoders.

:func:`build_features` encodes a built benchmark (``models/data.py``) and :func:`load_features` reads it
back as a :class:`FeatureSet`. Layout under ``<data_dir>/features/<key>/`` (``key`` names the encoder
weights; ``<data_dir>/features/CURRENT`` holds the key of the last complete build):

* ``texts.npy`` + ``text_ids.json`` — one 384-d row per post id (all splits draw from the same tweets);
* ``pool_image.npy`` / ``pool_transcript.npy`` + ``*_ids.json`` — one row per pool item: clean posts
  gather their image and transcript rows, so each pool item is encoded once;
* ``variants/<split>/<variant>.npz`` — corrupted inputs encoded for real: ``ids``, ``features``
  (the corrupted modality only), ``rate`` per post, ``modality`` and ``kind``; the other modalities come
  from the clean cache. ``corrupt_<m>`` is the papers' masking; ``corrupt_<m>_<kind>`` another content
  fault of :data:`models.disruptions.CORRUPT_KINDS` (opt-in, and opt-in for train and val splits too).

Markers: ``<data_dir>/READY_CLEAN`` once the clean features of every split load, ``READY_ALL`` once the
corrupted variants are done too. Variant and split names are listed in ``docs/data.md``.
"""

from __future__ import annotations

import io
import json
import logging
import os
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

import numpy as np
from PIL import Image

from models.dims import IMAGE_DIM, TEXT_DIM
from models.disruptions import CORRUPT_KINDS, INTRA_RATES, corrupt_variant, parse_corrupt_variant, rate_variant
from stream.service.vocabulary import LABELS, MODALITIES
from stream.tools.dataset import SPLITS, read_images, read_posts, read_transcripts
from stream.tools.faults import corrupt_image, corrupt_text, post_rng, sample_rate

__all__ = [
    "CORRUPT_SPLITS",
    "FEATURE_VERSION",
    "MASK_ONLY",
    "RATE_SPLITS",
    "RATE_SUBSET",
    "FeatureSet",
    "build_features",
    "built_corrupt_variants",
    "feature_dir",
    "load_features",
    "parse_corrupt_kinds",
    "variant_names",
]

log = logging.getLogger(__name__)

FEATURE_VERSION: Final = "1"
# Test splits that get the corrupt_* variants, in build order (the random test split first, the
# large held-out topic last), and those that also get the rate_* variants, on a seeded subset of
# RATE_SUBSET posts: 27 variants x 1,000 posts is what encodes in about 20 min on 2 shared cores.
CORRUPT_SPLITS: Final = ("test", "control_test", "topic_test")
RATE_SPLITS: Final = ("test",)
RATE_SUBSET: Final = 1000
# The default fault kinds: the papers' masking only (one corrupt_<m> variant per modality).
MASK_ONLY: Final[dict[str, tuple[str, ...]]] = {m: ("mask",) for m in MODALITIES}


def parse_corrupt_kinds(value: str) -> dict[str, tuple[str, ...]]:
    """``--corrupt-kinds``: ``mask`` (default), ``all``, or a comma list of ``kind`` / ``modality:kind``.

    A bare kind applies to every modality that has it (``delete`` → text and transcript). ``mask`` is
    always included, so the papers' ``corrupt_<m>`` variants stay comparable across builds. Kinds per
    modality are those of :data:`models.disruptions.CORRUPT_KINDS`, returned in that order.
    """
    chosen: dict[str, set[str]] = {m: {"mask"} for m in MODALITIES}
    for item in (part.strip() for part in value.split(",")):
        if not item or item == "mask":
            continue
        if item == "all":
            for m in MODALITIES:
                chosen[m].update(CORRUPT_KINDS[m])
            continue
        modality, sep, kind = item.partition(":")
        if not sep:
            modality, kind = "", item
        targets = [modality] if modality else [m for m in MODALITIES if kind in CORRUPT_KINDS[m]]
        if not targets or any(m not in CORRUPT_KINDS or kind not in CORRUPT_KINDS[m] for m in targets):
            known = "; ".join(f"{m}: {', '.join(k)}" for m, k in CORRUPT_KINDS.items())
            raise ValueError(f"unknown corruption kind {item!r} (known: {known})")
        for m in targets:
            chosen[m].add(kind)
    return {m: tuple(k for k in CORRUPT_KINDS[m] if k in chosen[m]) for m in MODALITIES}


def variant_names(
    split: str,
    corrupt_splits: Sequence[str] = CORRUPT_SPLITS,
    kinds: dict[str, tuple[str, ...]] | None = None,
    rate_splits: Sequence[str] = RATE_SPLITS,
) -> list[str]:
    """Feature variants a build with these options makes for ``split`` (defaults: the default build).

    ``clean``; for each split in ``corrupt_splits`` one ``corrupt_*`` variant per (modality, kind) of
    ``kinds`` (default: masking only); for rate splits the ``rate_*`` variants.
    """
    kinds = kinds or MASK_ONLY
    names = ["clean"]
    if split in corrupt_splits:
        names += [corrupt_variant(m, k) for m in MODALITIES for k in kinds.get(m, ())]
    if split in rate_splits:
        names += [rate_variant(m, r) for m in MODALITIES for r in INTRA_RATES]
    return names


def built_corrupt_variants(data_dir: str | Path, split: str, key: str | None = None) -> dict[str, list[str]]:
    """The ``corrupt_*`` variants of ``split`` present in the cache, per modality, in CORRUPT_KINDS order."""
    folder = feature_dir(Path(data_dir), key) / "variants" / split
    names = {p.stem for p in folder.glob("corrupt_*.npz")} if folder.is_dir() else set()
    return {m: [corrupt_variant(m, k) for k in CORRUPT_KINDS[m] if corrupt_variant(m, k) in names] for m in MODALITIES}


@dataclass(frozen=True, slots=True)
class FeatureSet:
    """Encoded posts of one split and variant. Arrays are row-aligned with ``ids``.

    ``label`` is int64 in :data:`stream.service.events.LABELS` order (negative 0, neutral 1, positive 2).
    ``has_image`` / ``has_transcript`` are True for every benchmark post: discard is applied later as
    a presence mask. ``meta`` holds the split, variant, seed, pairing probabilities and per-post
    extras (``topic``, ``image_congruent``, ``transcript_congruent``, ``corruption_rate``).
    """

    ids: np.ndarray
    text: np.ndarray
    image: np.ndarray
    transcript: np.ndarray
    label: np.ndarray
    has_image: np.ndarray
    has_transcript: np.ndarray
    meta: dict[str, Any] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.ids)

    def modality(self, name: str) -> np.ndarray:
        """The feature array of a modality by name (``text`` | ``image`` | ``transcript``)."""
        if name not in MODALITIES:
            raise ValueError(f"unknown modality {name!r}")
        array: np.ndarray = getattr(self, name)
        return array


def _features_root(data_dir: Path) -> Path:
    return Path(data_dir) / "features"


def feature_dir(data_dir: Path, key: str | None = None) -> Path:
    """The cache folder of ``key`` (default: the one named in ``features/CURRENT``)."""
    root = _features_root(data_dir)
    if key is None:
        current = root / "CURRENT"
        if not current.is_file():
            raise FileNotFoundError(
                f"no feature cache in {data_dir}: run `sentiment-stream data features {data_dir}`"
            )
        key = current.read_text().strip()
    return root / key


# -- loading -------------------------------------------------------------------------------------


def _read_json(path: Path) -> Any:
    with open(path, encoding="utf-8") as fh:
        return json.load(fh)


def _rows(ids: Sequence[str], index: dict[str, int], what: str) -> np.ndarray:
    try:
        return np.fromiter((index[i] for i in ids), dtype=np.int64, count=len(ids))
    except KeyError as exc:
        raise KeyError(f"{what} {exc.args[0]!r} is not in the feature cache; rebuild it") from None


def load_features(data_dir: str | Path, split: str, variant: str = "clean", key: str | None = None) -> FeatureSet:
    """Load one split and variant from the cache (see :func:`variant_names` for the variants).

    ``rate_<modality>_<r>`` variants cover the documented test subset only (``rate_<m>_0.0`` is that
    subset, clean). Raises :class:`FileNotFoundError` if the split or variant has not been built.
    """
    data_dir = Path(data_dir)
    folder = feature_dir(data_dir, key)
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; one of {', '.join(SPLITS)}")
    posts = read_posts(data_dir, split)
    manifest = _read_json(data_dir / "manifest.json")
    post_index = {p["id"]: i for i, p in enumerate(posts)}

    corrupted_modality: str | None = None
    corrupted: np.ndarray | None = None
    rates: np.ndarray | None = None
    kind: str | None = None
    if variant == "clean":
        chosen = posts
    elif variant.startswith("rate_") and variant.endswith("_0.0"):
        subset = _read_json(folder / "variants" / split / "rate_subset.json")
        chosen = [posts[post_index[i]] for i in subset]
        rates = np.zeros(len(chosen), dtype=np.float32)
    else:
        path = folder / "variants" / split / f"{variant}.npz"
        if not path.is_file():
            raise FileNotFoundError(f"{path} not built (variants of {split}: {variant_names(split)})")
        with np.load(path, allow_pickle=False) as npz:
            ids = [str(i) for i in npz["ids"]]
            corrupted = npz["features"].astype(np.float32, copy=False)
            rates = npz["rate"].astype(np.float32, copy=False)
            corrupted_modality = str(npz["modality"])
            kind = str(npz["kind"]) if "kind" in npz.files else None
        chosen = [posts[post_index[i]] for i in ids]

    ids_list = [p["id"] for p in chosen]
    text_index = {i: n for n, i in enumerate(_read_json(folder / "text_ids.json"))}
    image_index = {i: n for n, i in enumerate(_read_json(folder / "pool_image_ids.json"))}
    transcript_index = {i: n for n, i in enumerate(_read_json(folder / "pool_transcript_ids.json"))}
    texts = np.load(folder / "texts.npy", mmap_mode="r")
    pool_image = np.load(folder / "pool_image.npy", mmap_mode="r")
    pool_transcript = np.load(folder / "pool_transcript.npy", mmap_mode="r")
    arrays = {
        "text": np.asarray(texts[_rows(ids_list, text_index, "post")], dtype=np.float32),
        "image": np.asarray(pool_image[_rows([p["image_id"] for p in chosen], image_index, "image")],
                            dtype=np.float32),
        "transcript": np.asarray(
            pool_transcript[_rows([p["transcript_id"] for p in chosen], transcript_index, "transcript")],
            dtype=np.float32,
        ),
    }
    if corrupted_modality is not None and corrupted is not None:
        arrays[corrupted_modality] = corrupted
    label_index = {name: i for i, name in enumerate(LABELS)}
    n = len(chosen)
    pairing = manifest["pairing"]
    control = split.startswith("control_")
    meta: dict[str, Any] = {
        "split": split,
        "variant": variant,
        "feature_key": folder.name,
        "seed": manifest["seed"],
        "synthetic_pairing": True,
        "p_image": pairing["control"]["p_image"] if control else pairing["p_image"],
        "p_transcript": pairing["control"]["p_transcript"] if control else pairing["p_transcript"],
        "generator_version": manifest["generator_version"],
        "corrupted_modality": corrupted_modality or (variant.split("_")[1] if variant.startswith("rate_") else None),
        "corruption_kind": kind or (parse_corrupt_variant(variant) or (None, None))[1],
        "corruption_rate": rates,
        "topic": np.array([p["topic"] for p in chosen]),
        "image_congruent": np.array([p["image_label"] == p["label"] for p in chosen], dtype=bool),
        "transcript_congruent": np.array([p["transcript_label"] == p["label"] for p in chosen], dtype=bool),
    }
    return FeatureSet(
        ids=np.array(ids_list),
        text=arrays["text"],
        image=arrays["image"],
        transcript=arrays["transcript"],
        label=np.array([label_index[p["label"]] for p in chosen], dtype=np.int64),
        has_image=np.ones(n, dtype=bool),
        has_transcript=np.ones(n, dtype=bool),
        meta=meta,
    )


# -- building ------------------------------------------------------------------------------------


class _Encoders:
    """The two frozen encoders plus the shared preprocessing; built lazily (torch import is slow).

    Images run through an ONNX Runtime copy of :class:`models.encoders.ImageEncoder`, exported at start:
    on this 2-core box torch eager MobileNetV2 is 4-5x slower than ORT, and the fp32 export matches
    torch within 1e-5 (max abs), far below anything the head can see.
    """

    def __init__(self, threads: int, text_batch: int = 64, image_batch: int = 16) -> None:
        import tempfile

        import onnxruntime as ort
        import torch

        from models.encoders import ImageEncoder, TextEncoder, encoder_weights_hash
        from stream.service.preprocess import TextTokenizer, minilm_tokenizer_path

        torch.set_num_threads(threads)
        self.torch = torch
        self.tokenizer = TextTokenizer.from_file(minilm_tokenizer_path())
        self.text_encoder = TextEncoder()
        with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings():
            # the TorchScript exporter is deprecated but 0-10 % faster to run and simpler for a CNN
            warnings.simplefilter("ignore", DeprecationWarning)
            onnx_path = Path(tmp) / "image_encoder.onnx"
            torch.onnx.export(
                ImageEncoder(), (torch.zeros(2, 3, 224, 224),), str(onnx_path), input_names=["pixels"],
                output_names=["features"], dynamic_axes={"pixels": {0: "batch"}, "features": {0: "batch"}},
                dynamo=False, opset_version=17,
            )
            options = ort.SessionOptions()
            options.intra_op_num_threads = threads
            options.inter_op_num_threads = 1
            self.image_session = ort.InferenceSession(str(onnx_path), options, providers=["CPUExecutionProvider"])
        self.text_batch = text_batch
        self.image_batch = image_batch
        text_hash, image_hash = encoder_weights_hash("text")[:12], encoder_weights_hash("image")[:12]
        self.key = f"minilm-{text_hash}_mnv2-{image_hash}_v{FEATURE_VERSION}"

    def texts(self, texts: Sequence[str], desc: str) -> np.ndarray:
        """``[N, 384]`` float32; texts are batched by length so padding stays short."""
        from tqdm import tqdm

        out = np.zeros((len(texts), TEXT_DIM), dtype=np.float32)
        order = np.argsort([len(t) for t in texts], kind="stable")
        with self.torch.inference_mode():
            for start in tqdm(range(0, len(texts), self.text_batch), desc=desc, unit="batch", mininterval=5):
                rows = order[start : start + self.text_batch]
                ids, mask = self.tokenizer.encode([texts[i] for i in rows])
                emb = self.text_encoder(self.torch.from_numpy(ids), self.torch.from_numpy(mask))
                out[rows] = emb.numpy()
        return out

    def images(self, count: int, image_at: Callable[[int], Image.Image], desc: str) -> np.ndarray:
        """``[N, 1280]`` float32 of ``image_at(i)`` for i < count (images made on demand to bound memory)."""
        from tqdm import tqdm

        from stream.service.preprocess import images_to_batch

        out = np.zeros((count, IMAGE_DIM), dtype=np.float32)
        for start in tqdm(range(0, count, self.image_batch), desc=desc, unit="batch", mininterval=5):
            stop = min(count, start + self.image_batch)
            batch = images_to_batch([image_at(i) for i in range(start, stop)])
            out[start:stop] = self.image_session.run(None, {"pixels": batch})[0]
        return out


def _save_npy(path: Path, array: np.ndarray) -> None:
    tmp = path.with_suffix(".tmp.npy")
    np.save(tmp, array.astype(np.float32, copy=False))
    os.replace(tmp, path)


def _save_json(path: Path, value: Any) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(value))
    os.replace(tmp, path)


def _load_png(folder: Path, file: str) -> Image.Image:
    with open(folder / file, "rb") as fh:
        img = Image.open(io.BytesIO(fh.read()))
        img.load()
    return img


def build_features(
    data_dir: str | Path,
    *,
    clean_only: bool = False,
    rate_subset: int = RATE_SUBSET,
    threads: int = 2,
    splits_to_corrupt: Sequence[str] = CORRUPT_SPLITS,
    rate_splits: Sequence[str] = RATE_SPLITS,
    corrupt_kinds: dict[str, tuple[str, ...]] | None = None,
) -> Path:
    """Encode the benchmark in ``data_dir`` into the feature cache; returns the cache folder.

    Order: pools, every post text, then ``READY_CLEAN``; then the corrupted variants of each split in
    ``splits_to_corrupt`` (any split, train and val included), then ``READY_ALL``. Finished files are
    skipped on a re-run, so an interrupted build resumes. ``corrupt_kinds`` (see
    :func:`parse_corrupt_kinds`; default: masking only) names the content faults per modality, one
    ``corrupt_*`` variant each. ``rate_subset`` posts of each split in ``rate_splits`` (a seeded
    sample, listed in ``variants/<split>/rate_subset.json``) get the ``rate_*`` variants.
    """
    kinds = corrupt_kinds or MASK_ONLY
    data_dir = Path(data_dir)
    started = time.monotonic()
    (data_dir / "READY_ALL").unlink(missing_ok=True)
    manifest = _read_json(data_dir / "manifest.json")
    seed = int(manifest["seed"])
    enc = _Encoders(threads)
    folder = _features_root(data_dir) / enc.key
    folder.mkdir(parents=True, exist_ok=True)
    clean_files = ("pool_image.npy", "pool_transcript.npy", "texts.npy")
    if not all((folder / name).is_file() for name in clean_files):
        # keep READY_CLEAN on a resumed build whose clean part is done: trainers may be reading it
        (data_dir / "READY_CLEAN").unlink(missing_ok=True)
    timings: dict[str, float] = {}

    images = read_images(data_dir)
    image_folder = data_dir / "pools" / "images"
    if not (folder / "pool_image.npy").is_file():
        t0 = time.monotonic()
        _save_npy(folder / "pool_image.npy",
                  enc.images(len(images), lambda i: _load_png(image_folder, images[i].file), "image pool"))
        _save_json(folder / "pool_image_ids.json", [i.id for i in images])
        timings["pool_image_s"] = time.monotonic() - t0

    transcripts = read_transcripts(data_dir)
    if not (folder / "pool_transcript.npy").is_file():
        t0 = time.monotonic()
        _save_npy(folder / "pool_transcript.npy", enc.texts([t.text for t in transcripts], "transcript pool"))
        _save_json(folder / "pool_transcript_ids.json", [t.id for t in transcripts])
        timings["pool_transcript_s"] = time.monotonic() - t0

    posts = {split: read_posts(data_dir, split) for split in SPLITS}
    if not (folder / "texts.npy").is_file():
        t0 = time.monotonic()
        text_of: dict[str, str] = {}
        for rows in posts.values():
            for p in rows:
                text_of.setdefault(p["id"], p["text"])
        ids = sorted(text_of)
        _save_npy(folder / "texts.npy", enc.texts([text_of[i] for i in ids], "post texts"))
        _save_json(folder / "text_ids.json", ids)
        timings["texts_s"] = time.monotonic() - t0

    (_features_root(data_dir) / "CURRENT.tmp").write_text(enc.key + "\n")
    os.replace(_features_root(data_dir) / "CURRENT.tmp", _features_root(data_dir) / "CURRENT")
    for split in SPLITS:
        load_features(data_dir, split)  # proves every clean split loads before announcing it
    (data_dir / "READY_CLEAN").write_text(f"{enc.key}\n")
    timings["clean_total_s"] = time.monotonic() - started
    log.info("clean features ready in %.0f s (%s)", timings["clean_total_s"], folder)

    if not clean_only:
        image_by_id = {i.id: i for i in images}
        transcript_by_id = {t.id: t for t in transcripts}
        text_memo = _cached_text_variants(folder, {corrupt_variant("text", k) for k in kinds.get("text", ())})
        for split in splits_to_corrupt:
            t0 = time.monotonic()
            _build_variants(enc, folder, split, posts[split], seed, rate_subset if split in rate_splits else 0,
                            image_folder, image_by_id, transcript_by_id, text_memo, kinds)
            timings[f"variants_{split}_s"] = time.monotonic() - t0
        (data_dir / "READY_ALL").write_text(f"{enc.key}\n")
    timings["total_s"] = time.monotonic() - started
    size = sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())
    info = {"key": enc.key, "feature_version": FEATURE_VERSION, "seed": seed, "rate_subset": rate_subset,
            "corrupted_splits": [] if clean_only else list(splits_to_corrupt),
            "corrupt_kinds": {} if clean_only else {m: list(k) for m, k in kinds.items()},
            "rate_splits": [] if clean_only else list(rate_splits), "image_runtime": "onnxruntime fp32 export",
            "timings": timings,
            "bytes": size}
    _save_json(folder / "info.json", info)
    log.info("feature cache %s: %.1f MB, %.0f s", folder, size / 1e6, timings["total_s"])
    return folder


def _cached_text_variants(folder: Path, variants: set[str]) -> dict[tuple[str, str], np.ndarray]:
    """``(variant, post id) -> row`` of the text variants already in the cache, in any split.

    A tweet keeps its id in every split family and its corruption is keyed by (variant, id), so a later
    build of another split family (e.g. the ``control_*`` splits) reuses these rows instead of
    re-encoding the same corrupted tweets.
    """
    memo: dict[tuple[str, str], np.ndarray] = {}
    for path in sorted((folder / "variants").glob("*/corrupt_text*.npz")):
        if path.stem not in variants:
            continue
        with np.load(path, allow_pickle=False) as npz:
            features = npz["features"].astype(np.float32)
            for n, post_id in enumerate(npz["ids"]):
                memo[(path.stem, str(post_id))] = features[n]
    return memo


def _build_variants(
    enc: _Encoders,
    folder: Path,
    split: str,
    posts: list[dict[str, Any]],
    seed: int,
    rate_subset: int,
    image_folder: Path,
    image_by_id: dict[str, Any],
    transcript_by_id: dict[str, Any],
    text_memo: dict[tuple[str, str], np.ndarray],
    kinds: dict[str, tuple[str, ...]] = MASK_ONLY,
) -> None:
    """Encode the corrupted variants of one split; ``text_memo`` reuses corrupted tweets across splits."""
    out = folder / "variants" / split
    out.mkdir(parents=True, exist_ok=True)
    subset_path = out / "rate_subset.json"
    if rate_subset > 0 and not subset_path.is_file():
        rng = np.random.default_rng([seed, 101])
        picked = sorted(int(i) for i in rng.choice(len(posts), size=min(rate_subset, len(posts)), replace=False))
        _save_json(subset_path, [posts[i]["id"] for i in picked])
    subset_ids = set(_read_json(subset_path)) if rate_subset > 0 else set()
    subset = [p for p in posts if p["id"] in subset_ids]

    def raw_text(p: dict[str, Any], modality: str) -> str:
        return str(p["text"]) if modality == "text" else transcript_by_id[p["transcript_id"]].text

    jobs: list[tuple[str, str, str, list[dict[str, Any]], float | None]] = [
        (corrupt_variant(m, k), m, k, posts, None) for m in MODALITIES for k in kinds.get(m, ())
    ]
    if subset:
        jobs += [(rate_variant(m, r), m, "mask", subset, r) for m in MODALITIES for r in INTRA_RATES if r > 0.0]
    for variant, modality, kind, rows, fixed_rate in jobs:
        path = out / f"{variant}.npz"
        if path.is_file():
            continue
        rates = np.zeros(len(rows), dtype=np.float32)
        rngs = []
        for n, p in enumerate(rows):
            # keyed by (seed, variant, post id): the replay tool reproduces a post's corruption exactly
            rng = post_rng(seed, f"{variant}:{p['id']}")
            rates[n] = sample_rate(rng) if fixed_rate is None else fixed_rate
            rngs.append(rng)
        desc = f"{split}/{variant}"
        if modality == "image":

            def image_at(n: int, rows: list[dict[str, Any]] = rows, rngs: list[Any] = rngs,
                         rates: np.ndarray = rates, kind: str = kind) -> Image.Image:
                img = _load_png(image_folder, image_by_id[rows[n]["image_id"]].file)
                return corrupt_image(img, float(rates[n]), rngs[n], kind)  # type: ignore[arg-type]

            features = enc.images(len(rows), image_at, desc)
        else:
            texts = [corrupt_text(raw_text(p, modality), float(rates[n]), rngs[n], kind)  # type: ignore[arg-type]
                     for n, p in enumerate(rows)]
            features = np.zeros((len(rows), TEXT_DIM), dtype=np.float32)
            # the same tweet under the same variant is corrupted identically in every split
            memo_keys = [(variant, p["id"]) if modality == "text" else None for p in rows]
            todo = [n for n, k in enumerate(memo_keys) if k is None or k not in text_memo]
            done = [n for n, k in enumerate(memo_keys) if k is not None and k in text_memo]
            if todo:
                features[todo] = enc.texts([texts[n] for n in todo], desc)
            for n in done:
                features[n] = text_memo[memo_keys[n]]  # type: ignore[index]
            for n in todo:
                if memo_keys[n] is not None:
                    text_memo[memo_keys[n]] = features[n]  # type: ignore[index]
        tmp = path.with_suffix(".tmp.npz")
        np.savez(tmp, ids=np.array([p["id"] for p in rows]), features=features, rate=rates,
                 modality=np.array(modality), kind=np.array(kind))
        os.replace(tmp, path)
