"""The model manifest: what ``sentiment-stream export`` wrote, and the one way serving reads it.

``manifest.json`` sits next to the ONNX files it describes. It names every file with its sha256 and its
input/output signature (names, dtypes, shapes; dynamic dims by name), the preprocessing parameters the
encoders expect, the tokenizer, the DRF queue snapshot that seeds Redis, the head configuration and
the training metrics. The model version is a content hash of all of that, so two different models can
never share a version (and so never share Redis queue keys). It also records the confidence cut-off
training filled the queue with, which serving enqueues by (not hashed: a setting may override it).

:meth:`Manifest.load` checks the manifest against the files on disk (presence, sha256, and the
signature ONNX Runtime reports) and against the contracts of ``docs/architecture.md``, raising
:class:`ManifestError` with the file and the difference. A bad model directory therefore fails at
start-up, not in the middle of a stream.

``python -m stream.service.manifest check DIR`` checks every file of an export; ``python -m stream.service.manifest
replace DIR KEY FILE`` swaps in a user's own ONNX graph with the same interface (:func:`replace_graph`).

Torch-free: serving imports this module (numpy, onnxruntime and the standard library only).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import shutil
import sys
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Any, Final

import numpy as np

from stream.service.errors import ModelError
from stream.service.moments import QUEUE_VAR_FLOOR, moments_of_rows
from stream.service.runtime import ModelSession, TensorSpec, create_session
from stream.service.vocabulary import LABELS, MODALITIES

if TYPE_CHECKING:
    from stream.service.preprocess import TextTokenizer
    from stream.service.settings import Settings

__all__ = [
    "FORMAT_VERSION",
    "HEAD_INPUTS",
    "HEAD_OUTPUTS",
    "IMAGE_INPUT",
    "IMAGE_OUTPUT",
    "LABELS",
    "MANIFEST_FILE",
    "MODALITIES",
    "QUEUE_VAR_FLOOR",
    "RECOVERY_PATHS",
    "TEXT_ENCODER_VARIANTS",
    "TEXT_INPUTS",
    "TEXT_OUTPUT",
    "ImagePreprocessing",
    "Manifest",
    "ManifestError",
    "OnnxFile",
    "QueueSnapshot",
    "TextPreprocessing",
    "file_key",
    "format_spec",
    "model_version",
    "replace_graph",
    "sha256_file",
]

MANIFEST_FILE: Final = "manifest.json"
FORMAT_VERSION: Final = 1

# The graph interfaces (docs/architecture.md). A user's own encoder must keep these names.
TEXT_INPUTS: Final = ("input_ids", "attention_mask")
TEXT_OUTPUT: Final = "sentence_embedding"
IMAGE_INPUT: Final = "pixels"
IMAGE_OUTPUT: Final = "image_embedding"
HEAD_INPUTS: Final = ("text", "image", "transcript", "present", "queue_mean", "queue_var")
HEAD_OUTPUTS: Final = ("probs", "quality", "projected")
TEXT_ENCODER_VARIANTS: Final = ("fp32", "int8")
RECOVERY_PATHS: Final = ("fsrf", "drf")


class ManifestError(ModelError, ValueError):
    """The exported model directory is unusable; the message names the file and what is wrong.

    A :class:`~stream.service.errors.ModelError`, so serving can catch every model problem at start-up at once.
    """


def file_key(kind: str, variant: str | None = None) -> str:
    """The key of an ONNX file in :attr:`Manifest.files`: ``text_encoder_fp32``, ``image_encoder``, ``head_fsrf``…"""
    return kind if variant is None else f"{kind}_{variant}"


def sha256_file(path: str | Path) -> str:
    """Hex sha256 of a file, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _spec_to_json(spec: TensorSpec) -> dict[str, Any]:
    return {"name": spec.name, "dtype": None if spec.dtype is None else str(spec.dtype), "shape": list(spec.shape)}


def _spec_from_json(data: Mapping[str, Any]) -> TensorSpec:
    dtype = data["dtype"]
    return TensorSpec(str(data["name"]), tuple(data["shape"]), None if dtype is None else np.dtype(dtype))


def format_spec(spec: TensorSpec) -> str:
    """``name: dtype[dims]``, for error messages."""
    return f"{spec.name}: {spec.dtype}[{', '.join(str(d) for d in spec.shape)}]"


@dataclass(frozen=True, slots=True)
class OnnxFile:
    """One ONNX graph of the export: file name (relative to the manifest), sha256, opset, signature."""

    path: str
    sha256: str
    opset: int
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]

    @property
    def input_names(self) -> tuple[str, ...]:
        return tuple(t.name for t in self.inputs)

    @property
    def output_names(self) -> tuple[str, ...]:
        return tuple(t.name for t in self.outputs)

    def input(self, name: str) -> TensorSpec:
        """The input called ``name``; :class:`KeyError` if there is none."""
        return _by_name(self.inputs, name)

    def output(self, name: str) -> TensorSpec:
        """The output called ``name``; :class:`KeyError` if there is none."""
        return _by_name(self.outputs, name)

    def to_json(self) -> dict[str, Any]:
        return {"path": self.path, "sha256": self.sha256, "opset": self.opset,
                "inputs": [_spec_to_json(t) for t in self.inputs], "outputs": [_spec_to_json(t) for t in self.outputs]}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> OnnxFile:
        return cls(str(data["path"]), str(data["sha256"]), int(data["opset"]),
                   tuple(_spec_from_json(t) for t in data["inputs"]),
                   tuple(_spec_from_json(t) for t in data["outputs"]))


def _by_name(specs: Iterable[TensorSpec], name: str) -> TensorSpec:
    for spec in specs:
        if spec.name == name:
            return spec
    raise KeyError(name)


@dataclass(frozen=True, slots=True)
class TextPreprocessing:
    """Tokenisation of one text modality: ``TextTokenizer.from_file(tokenizer, max_tokens)``."""

    max_tokens: int

    def to_json(self) -> dict[str, Any]:
        return {"max_tokens": self.max_tokens}


@dataclass(frozen=True, slots=True)
class ImagePreprocessing:
    """``stream.service.preprocess.image_to_array(img, size)``: its parameters, recorded so a change is visible."""

    size: int
    resize_short_side: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    interpolation: str = "bilinear"
    transparency: str = "composite_on_white"

    def to_json(self) -> dict[str, Any]:
        return {"size": self.size, "resize_short_side": self.resize_short_side, "mean": list(self.mean),
                "std": list(self.std), "interpolation": self.interpolation, "transparency": self.transparency}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> ImagePreprocessing:
        mean, std = tuple(float(x) for x in data["mean"]), tuple(float(x) for x in data["std"])
        if len(mean) != 3 or len(std) != 3:
            raise ManifestError("preprocessing.image: mean and std need 3 values (RGB)")
        return cls(int(data["size"]), int(data["resize_short_side"]), (mean[0], mean[1], mean[2]),
                   (std[0], std[1], std[2]), str(data.get("interpolation", "bilinear")),
                   str(data.get("transparency", "composite_on_white")))


@dataclass(frozen=True, slots=True)
class QueueSnapshot:
    """The training-time DRF queue (``queue.npz``: one ``[rows, d]`` float32 array per modality).

    Serving seeds Redis from it when a model version is first served; ``capacity`` is the training
    queue length K.
    """

    path: str
    sha256: str
    d: int
    capacity: int
    rows: Mapping[str, int]

    def to_json(self) -> dict[str, Any]:
        return {"path": self.path, "sha256": self.sha256, "d": self.d, "capacity": self.capacity,
                "rows": dict(self.rows)}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> QueueSnapshot:
        return cls(str(data["path"]), str(data["sha256"]), int(data["d"]), int(data["capacity"]),
                   {str(k): int(v) for k, v in data["rows"].items()})


@dataclass(frozen=True, slots=True)
class Manifest:
    """A loaded (and checked) ``manifest.json``. Paths in it are relative to :attr:`root`.

    File keys: ``text_encoder_fp32``, ``text_encoder_int8`` (if exported), ``image_encoder``,
    ``head_fsrf``, ``head_drf``. Use :meth:`text_encoder_path`, :meth:`image_encoder_path`,
    :meth:`head_path`, :meth:`tokenizer_path` and :meth:`queue_path` rather than joining paths.
    """

    root: Path
    model_version: str
    files: Mapping[str, OnnxFile]
    text_encoder_variants: tuple[str, ...]
    recovery_paths: tuple[str, ...]
    default_recovery: str
    tokenizer: str
    tokenizer_sha256: str
    text: TextPreprocessing
    transcript: TextPreprocessing
    image: ImagePreprocessing
    queue: QueueSnapshot
    head_config: Mapping[str, Any]
    metrics: Mapping[str, Any] = field(default_factory=dict)
    parity_report: str | None = None
    created_utc: str = ""
    exporter: Mapping[str, Any] = field(default_factory=dict)
    modalities: tuple[str, ...] = MODALITIES
    labels: tuple[str, ...] = LABELS
    format_version: int = FORMAT_VERSION
    # The probability cut-off the training queue was filled with; None in manifests exported before it was
    # recorded. Serving enqueues by it too: see :meth:`enqueue_min_confidence_for`.
    enqueue_min_confidence: float | None = None
    # Whether the int8 text encoder passed the export's parity and accuracy gate (``passed``, the measured
    # values, ``reason``); None in manifests exported before it was recorded. See :meth:`serving_text_encoder`.
    int8_gate: Mapping[str, Any] | None = None

    # -- paths --------------------------------------------------------------------------------

    def path_of(self, key: str) -> Path:
        """Absolute path of ONNX file ``key`` (see the class docstring for the keys)."""
        if key not in self.files:
            raise ManifestError(f"{self.root / MANIFEST_FILE}: no ONNX file {key!r} (has {sorted(self.files)})")
        return self.confined(self.files[key].path)

    def confined(self, rel: str) -> Path:
        """``rel`` inside the model directory; :class:`ManifestError` for an absolute path, a ``..`` or a link
        that leads out (a manifest names files, it must not reach the rest of the file system)."""
        pure = PurePosixPath(rel)
        if not rel or pure.is_absolute() or Path(rel).is_absolute() or ".." in pure.parts or "\\" in rel:
            raise ManifestError(f"{self.root / MANIFEST_FILE}: file path {rel!r} must be relative, inside the model "
                                "directory, without '..'")
        path = self.root / rel
        root = self.root.resolve()
        if path.exists() and not path.resolve().is_relative_to(root):
            raise ManifestError(f"{self.root / MANIFEST_FILE}: file path {rel!r} leads out of the model directory")
        return path

    def text_encoder(self, variant: str = "fp32") -> OnnxFile:
        """The text (and transcript) encoder of a variant, ``"fp32"`` or ``"int8"``."""
        if variant not in self.text_encoder_variants:
            raise ManifestError(f"{self.root}: text encoder variant {variant!r} was not exported "
                                f"(available: {', '.join(self.text_encoder_variants)})")
        return self.files[file_key("text_encoder", variant)]

    def text_encoder_path(self, variant: str = "fp32") -> Path:
        return self.confined(self.text_encoder(variant).path)

    def image_encoder_path(self) -> Path:
        return self.path_of("image_encoder")

    def head(self, recovery: str) -> OnnxFile:
        """The serving head graph of a recovery path, ``"fsrf"`` or ``"drf"``."""
        if recovery not in self.recovery_paths:
            raise ManifestError(f"{self.root}: no head for recovery {recovery!r} "
                                f"(available: {', '.join(self.recovery_paths)})")
        return self.files[file_key("head", recovery)]

    def head_path(self, recovery: str) -> Path:
        return self.confined(self.head(recovery).path)

    def tokenizer_path(self) -> Path:
        return self.confined(self.tokenizer)

    def queue_path(self) -> Path:
        return self.confined(self.queue.path)

    @property
    def version(self) -> str:
        """The model version (content hash); it names the Redis queue keys of this model."""
        return self.model_version

    @property
    def max_text_tokens(self) -> int:
        return self.text.max_tokens

    @property
    def max_transcript_tokens(self) -> int:
        return self.transcript.max_tokens

    @property
    def image_size(self) -> int:
        return self.image.size

    @property
    def queue_dim(self) -> int:
        """Width ``d`` of the projected features, of the queue vectors and of the queue moments."""
        return self.queue.d

    @property
    def feature_dims(self) -> dict[str, int]:
        """Width of each modality's encoder output, ``{modality: d}``, as the head's inputs declare it.

        :meth:`validate` has checked that every head takes exactly the encoders' widths.
        """
        head = self.head(self.default_recovery)
        dims: dict[str, int] = {}
        for m in self.modalities:
            width = head.input(m).shape[1]
            if not isinstance(width, int):
                raise ManifestError(f"{self.root}: head input {m!r} must have a static feature width, not {width!r}")
            dims[m] = width
        return dims

    def text_tokenizer(self, modality: str = "text") -> TextTokenizer:
        """The :class:`~stream.service.preprocess.TextTokenizer` of ``"text"`` or ``"transcript"`` (max tokens set)."""
        from stream.service.preprocess import TextTokenizer

        if modality not in ("text", "transcript"):
            raise ValueError(f"modality must be 'text' or 'transcript', got {modality!r}")
        params = self.text if modality == "text" else self.transcript
        return TextTokenizer.from_file(self.tokenizer_path(), max_length=params.max_tokens)

    def serving_text_encoder(self, settings: Settings | None = None) -> tuple[str, str]:
        """``(variant, why)``: the text encoder a worker with ``settings`` serves, and the reason in words.

        ``settings.text_encoder`` ``fp32`` or ``int8`` is the operator's explicit choice. ``auto`` (the
        default) serves int8 only on CPU and only when the export recorded that its int8 gate passed (parity
        with the fp32 PyTorch encoder and the macro-F1 cost on the test split), fp32 otherwise.
        """
        from stream.service.settings import get_settings

        settings = settings or get_settings()
        asked = settings.text_encoder
        gate = self.int8_gate
        if asked != "auto":
            return asked, f"SENTIMENT_TEXT_ENCODER={asked}"
        if settings.providers == "cuda":
            return "fp32", "auto: on CUDA the fp32 encoder (dynamic int8 quantisation is a CPU optimisation)"
        if "int8" not in self.text_encoder_variants:
            return "fp32", "auto: no int8 text encoder in this export"
        if gate is None:
            return "fp32", "auto: this export recorded no int8 gate (exported before it existed); re-run the gate"
        if not gate.get("passed"):
            return "fp32", f"auto: the int8 gate did not pass ({gate.get('reason', 'no reason recorded')})"
        return "int8", f"auto: the int8 gate passed ({gate.get('reason', '')})"

    def enqueue_min_confidence_for(self, settings: Settings) -> float:
        """The least max-probability of a post whose features serving pushes into the queue.

        ``settings.enqueue_min_confidence`` when it was set explicitly (environment or argument); else the
        cut-off training filled the queue with, so the served queue stays the kind of queue the model was
        trained against; else (an older manifest) the setting's default.
        """
        if self.enqueue_min_confidence is None or "enqueue_min_confidence" in settings.model_fields_set:
            return settings.enqueue_min_confidence
        return self.enqueue_min_confidence

    def queue_snapshot(self) -> dict[str, np.ndarray]:
        """The training-time queue, ``{modality: float32 [rows, d]}``, oldest row first (seeds Redis)."""
        with np.load(self.queue_path(), allow_pickle=False) as npz:
            return {m: np.asarray(npz[m], dtype=np.float32) for m in self.modalities}

    def queue_moments(self) -> tuple[np.ndarray, np.ndarray]:
        """float32 ``(mean, var)`` ``[3, d]`` of the snapshot, computed as training computes them.

        Biased variance floored at 1e-4; a modality with fewer than 2 rows gets (0, 1). These are the
        moments the parity check and the int8 evaluation feed the head.
        """
        snapshot = self.queue_snapshot()
        mean = np.zeros((len(self.modalities), self.queue.d), dtype=np.float32)
        var = np.ones_like(mean)
        for i, m in enumerate(self.modalities):
            if snapshot[m].shape[0] >= 2:
                mean[i], var[i] = moments_of_rows(snapshot[m])
        return mean, var

    # -- (de)serialisation --------------------------------------------------------------------

    def to_json(self) -> dict[str, Any]:
        cut_off = self.enqueue_min_confidence
        optional: dict[str, Any] = {} if cut_off is None else {"enqueue_min_confidence": cut_off}
        if self.int8_gate is not None:
            optional["int8_gate"] = dict(self.int8_gate)
        return {
            "format_version": self.format_version,
            "model_version": self.model_version,
            "created_utc": self.created_utc,
            "exporter": dict(self.exporter),
            "modalities": list(self.modalities),
            "labels": list(self.labels),
            "files": {key: f.to_json() for key, f in sorted(self.files.items())},
            "text_encoder_variants": list(self.text_encoder_variants),
            "recovery_paths": list(self.recovery_paths),
            "default_recovery": self.default_recovery,
            "tokenizer": {"path": self.tokenizer, "sha256": self.tokenizer_sha256},
            "preprocessing": {"text": self.text.to_json(), "transcript": self.transcript.to_json(),
                              "image": self.image.to_json()},
            "queue": self.queue.to_json(),
            "head": {"config": dict(self.head_config)},
            "metrics": dict(self.metrics),
            "parity_report": self.parity_report,
            **optional,
        }

    def save(self) -> Path:
        """Write ``manifest.json`` into :attr:`root` and return its path."""
        path = self.root / MANIFEST_FILE
        path.write_text(json.dumps(self.to_json(), indent=2, sort_keys=False, allow_nan=False) + "\n")
        return path

    @classmethod
    def from_json(cls, root: Path, data: Mapping[str, Any]) -> Manifest:
        """Build from parsed JSON without touching the files; raises :class:`ManifestError` on bad fields."""
        where = root / MANIFEST_FILE
        try:
            version = int(data["format_version"])
            if version != FORMAT_VERSION:
                raise ManifestError(f"{where}: format_version {version} is not supported (expected {FORMAT_VERSION}); "
                                    "re-run `sentiment-stream export`")
            pre = data["preprocessing"]
            min_confidence = data.get("enqueue_min_confidence")
            if min_confidence is not None and not 0.0 <= float(min_confidence) <= 1.0:
                raise ManifestError(f"{where}: enqueue_min_confidence {min_confidence} is not a probability")
            return cls(
                root=root,
                model_version=str(data["model_version"]),
                files={str(k): OnnxFile.from_json(v) for k, v in data["files"].items()},
                text_encoder_variants=tuple(data["text_encoder_variants"]),
                recovery_paths=tuple(data["recovery_paths"]),
                default_recovery=str(data["default_recovery"]),
                tokenizer=str(data["tokenizer"]["path"]),
                tokenizer_sha256=str(data["tokenizer"]["sha256"]),
                text=TextPreprocessing(int(pre["text"]["max_tokens"])),
                transcript=TextPreprocessing(int(pre["transcript"]["max_tokens"])),
                image=ImagePreprocessing.from_json(pre["image"]),
                queue=QueueSnapshot.from_json(data["queue"]),
                head_config=dict(data["head"]["config"]),
                metrics=dict(data.get("metrics") or {}),
                parity_report=data.get("parity_report"),
                created_utc=str(data.get("created_utc", "")),
                exporter=dict(data.get("exporter") or {}),
                modalities=tuple(data.get("modalities", MODALITIES)),
                labels=tuple(data.get("labels", LABELS)),
                format_version=version,
                enqueue_min_confidence=None if min_confidence is None else float(min_confidence),
                int8_gate=dict(data["int8_gate"]) if isinstance(data.get("int8_gate"), dict) else None,
            )
        except ManifestError:
            raise
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise ManifestError(f"{where}: malformed manifest ({type(exc).__name__}: {exc})") from exc

    @classmethod
    def load(
        cls,
        directory: str | Path,
        *,
        settings: Settings | None = None,
        verify_hashes: bool = True,
        check_graphs: bool | Iterable[str] | None = None,
    ) -> Manifest:
        """Read ``DIR/manifest.json`` and check it against the files; :class:`ManifestError` on any mismatch.

        Checks: every named file exists; its sha256 (``verify_hashes``; ≈ 0.3 s for a full export);
        the model version is the content hash of what the manifest names; the graphs' interfaces fit
        the contracts (names, dtypes, encoder widths = head widths, queue width ``d``); and the
        signature ONNX Runtime reports for a graph equals the manifest's. ``check_graphs`` says which
        graphs: ``None`` (default) the ones ``settings`` will serve (:meth:`serving_keys`: its
        ``text_encoder`` variant, the image encoder, the head of its ``recovery``; a variant that was
        not exported is an error here), ``True`` all, ``False`` none, or an iterable of file keys.
        Sessions come from :func:`stream.service.runtime.create_session` with ``settings``, which caches them,
        so serving gets the very sessions checked here and loads no model it does not use.
        """
        root = Path(directory)
        path = root / MANIFEST_FILE
        if not path.is_file():
            raise ManifestError(f"no exported model in {root}: `sentiment-stream export --shipped --out {root}` "
                                f"exports the one that ships with the project (2-3 minutes)")
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ManifestError(f"{path}: not readable JSON ({exc})") from exc
        if not isinstance(data, dict):
            raise ManifestError(f"{path}: expected a JSON object")
        manifest = cls.from_json(root, data)
        manifest.validate(settings=settings, verify_hashes=verify_hashes, check_graphs=check_graphs)
        return manifest

    # -- checks -------------------------------------------------------------------------------

    def validate(
        self,
        *,
        settings: Settings | None = None,
        verify_hashes: bool = True,
        check_graphs: bool | Iterable[str] | None = None,
    ) -> None:
        """Every check of :meth:`load`, on an already built manifest."""
        self._check_files_exist()
        if verify_hashes:
            self._check_hashes()
        expected_version = model_version(self)
        if self.model_version != expected_version:
            raise ManifestError(f"{self.root / MANIFEST_FILE}: model_version {self.model_version} is not the content "
                                f"hash of what it names ({expected_version}); the manifest was edited by hand")
        self._check_contracts()
        if check_graphs is None:
            keys = self.serving_keys(settings)
        elif isinstance(check_graphs, bool):
            keys = sorted(self.files) if check_graphs else []
        else:
            keys = sorted(check_graphs)
        for key in keys:
            self.check_session(key, self.session(key, settings))

    def serving_keys(self, settings: Settings | None = None) -> list[str]:
        """The file keys a worker with ``settings`` serves; :class:`ManifestError` if one was not exported."""
        from stream.service.settings import get_settings

        settings = settings or get_settings()
        variant, _ = self.serving_text_encoder(settings)
        self.text_encoder(variant)
        self.head(settings.recovery)
        return [file_key("text_encoder", variant), "image_encoder", file_key("head", settings.recovery)]

    def session(self, key: str, settings: Settings | None = None) -> ModelSession:
        """The (cached) ONNX Runtime session of file ``key``, from :func:`stream.service.runtime.create_session`."""
        path = self.path_of(key)
        try:
            return create_session(path, settings)
        except ModelError as exc:
            raise ManifestError(f"{path} ({key} in {self.root / MANIFEST_FILE}): {exc}") from exc

    def _check_files_exist(self) -> None:
        required = [f.path for f in self.files.values()] + [self.tokenizer, self.queue.path]
        if self.parity_report:
            required.append(self.parity_report)
        for rel in required:
            self.confined(rel)
        missing = [p for p in required if not (self.root / p).is_file()]
        if missing:
            raise ManifestError(f"{self.root}: missing file(s) named in {MANIFEST_FILE}: {', '.join(missing)}")

    def _check_hashes(self) -> None:
        named = [(f.path, f.sha256) for f in self.files.values()]
        named += [(self.tokenizer, self.tokenizer_sha256), (self.queue.path, self.queue.sha256)]
        for rel, expected in named:
            actual = sha256_file(self.root / rel)
            if actual != expected:
                raise ManifestError(f"{self.root / rel}: sha256 {actual[:16]}… differs from the manifest's "
                                    f"{expected[:16]}…; the file was changed after export")

    def _check_contracts(self) -> None:
        where = self.root / MANIFEST_FILE
        if tuple(self.modalities) != MODALITIES or tuple(self.labels) != LABELS:
            raise ManifestError(f"{where}: modalities/labels {self.modalities}/{self.labels} differ from "
                                f"{MODALITIES}/{LABELS}")
        if "fp32" not in self.text_encoder_variants:
            raise ManifestError(f"{where}: the fp32 text encoder is required")
        expected_keys = {file_key("text_encoder", v) for v in self.text_encoder_variants}
        expected_keys |= {"image_encoder"} | {file_key("head", r) for r in self.recovery_paths}
        if set(self.files) != expected_keys:
            raise ManifestError(f"{where}: files {sorted(self.files)} do not match the variants and recovery paths "
                                f"it lists ({sorted(expected_keys)})")
        unknown = set(self.text_encoder_variants) - set(TEXT_ENCODER_VARIANTS)
        unknown |= set(self.recovery_paths) - set(RECOVERY_PATHS)
        if unknown or self.default_recovery not in self.recovery_paths:
            raise ManifestError(f"{where}: unknown variant/recovery {sorted(unknown)} or default_recovery "
                                f"{self.default_recovery!r} not exported")
        if set(self.queue.rows) != set(MODALITIES):
            raise ManifestError(f"{where}: queue rows {dict(self.queue.rows)} must name every modality")

        text_dim = None
        for variant in self.text_encoder_variants:
            enc = self.text_encoder(variant)
            self._expect(enc, "input", TEXT_INPUTS, "int64", 2)
            self._expect(enc, "output", (TEXT_OUTPUT,), "float32", 2)
            width = enc.output(TEXT_OUTPUT).shape[1]
            if text_dim is not None and width != text_dim:
                raise ManifestError(f"{self.root / enc.path}: text encoder variants disagree on the width "
                                    f"({width} vs {text_dim})")
            text_dim = width
        image = self.files["image_encoder"]
        self._expect(image, "input", (IMAGE_INPUT,), "float32", 4)
        self._expect(image, "output", (IMAGE_OUTPUT,), "float32", 2)
        pixels = image.input(IMAGE_INPUT).shape
        if pixels[1] != 3 or any(isinstance(s, int) and s != self.image.size for s in pixels[2:]):
            raise ManifestError(f"{self.root / image.path}: pixels {list(pixels)} do not fit image size "
                                f"{self.image.size} of the preprocessing")
        widths = {"text": text_dim, "image": image.output(IMAGE_OUTPUT).shape[1], "transcript": text_dim}
        for recovery in self.recovery_paths:
            head = self.head(recovery)
            where = self.root / head.path
            self._expect(head, "input", HEAD_INPUTS, "float32", None)
            self._expect(head, "output", HEAD_OUTPUTS, "float32", None)
            for name, width in widths.items():
                if head.input(name).shape[1:] != (width,):
                    raise ManifestError(f"{where}: input {format_spec(head.input(name))} does not take the "
                                        f"{name} encoder's width {width}")
            queue_shape = (len(MODALITIES), self.queue.d)
            for spec in (head.input("queue_mean"), head.input("queue_var")):
                if spec.shape != queue_shape:
                    raise ManifestError(f"{where}: input {format_spec(spec)} does not match the queue snapshot "
                                        f"(d={self.queue.d})")
            projected = head.output("projected")
            if projected.shape[1:] != queue_shape:
                raise ManifestError(f"{where}: output {format_spec(projected)} does not match the queue snapshot "
                                    f"(d={self.queue.d})")

    def _expect(self, onnx_file: OnnxFile, kind: str, names: Sequence[str], dtype: str, rank: int | None) -> None:
        specs = onnx_file.inputs if kind == "input" else onnx_file.outputs
        have = tuple(t.name for t in specs)
        if have != tuple(names):
            raise ManifestError(f"{self.root / onnx_file.path}: {kind}s {list(have)}, expected {list(names)}")
        for spec in specs:
            if spec.dtype != np.dtype(dtype) or (rank is not None and len(spec.shape) != rank):
                raise ManifestError(f"{self.root / onnx_file.path}: {kind} {format_spec(spec)} should be {dtype}"
                                    + ("" if rank is None else f" of rank {rank}"))

    def check_session(self, key: str, session: ModelSession) -> None:
        """Raise :class:`ManifestError` unless ``session``'s inputs and outputs are those of file ``key``."""
        declared = self.files[key]
        for kind, mine, theirs in (("inputs", declared.inputs, session.inputs),
                                   ("outputs", declared.outputs, session.outputs)):
            if tuple(mine) != tuple(theirs):
                raise ManifestError(
                    f"{self.root / declared.path}: the graph's {kind} [{'; '.join(map(format_spec, theirs))}] "
                    f"differ from the manifest's [{'; '.join(map(format_spec, mine))}]"
                )


def model_version(manifest: Manifest) -> str:
    """Content hash (16 hex digits) of the ONNX files, tokenizer, queue snapshot, preprocessing and head config.

    Hashes the recorded sha256 values; :meth:`Manifest.validate` checks them against the files.
    """
    content = {
        "files": {key: f.sha256 for key, f in sorted(manifest.files.items())},
        "tokenizer": manifest.tokenizer_sha256,
        "queue": manifest.queue.sha256,
        "preprocessing": {"text": manifest.text.to_json(), "transcript": manifest.transcript.to_json(),
                          "image": manifest.image.to_json()},
        "head_config": manifest.head_config,
    }
    blob = json.dumps(content, sort_keys=True, separators=(",", ":"), default=_json_default)
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()[:16]


def _json_default(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, np.generic):
        return value.item()
    raise TypeError(f"{type(value).__name__} is not JSON serialisable")



def replace_graph(directory: str | Path, key: str, source: str | Path, settings: Settings | None = None) -> Manifest:
    """Put a user's own ONNX file in place of graph ``key`` of an export, and re-describe the export.

    Any encoder can be replaced by an ONNX file with the same interface (docs/export.md). The file must
    pass the same contract checks as an exported one (input/output names and dtypes, widths that fit
    the head); if it does not, :class:`ManifestError` is raised and the directory is left as it was.
    The model version changes with the file, so the Redis queue of the new model starts apart. No
    parity is possible for a foreign graph: the manifest records the replacement under
    ``exporter["replaced"]``, and whether the head suits the new features is the user's call.
    Needs the ``onnx`` package (to read the opset).
    """
    try:
        import onnx
    except ImportError as exc:
        raise ManifestError("replacing a graph needs the onnx package (pip install onnx)") from exc
    manifest = Manifest.load(directory, settings=settings, check_graphs=False)
    source = Path(source)
    if not source.is_file():
        raise ManifestError(f"{source}: no such ONNX file")
    target = manifest.path_of(key)
    staged = target.with_name(f".{target.name}.replacing")
    shutil.copyfile(source, staged)
    try:
        proto = onnx.load(str(staged), load_external_data=False)
        opset = next((op.version for op in proto.opset_import if op.domain in ("", "ai.onnx")), 0)
        session = create_session(staged, settings)
        described = OnnxFile(target.name, sha256_file(staged), opset, session.inputs, session.outputs)
        exporter = dict(manifest.exporter)
        exporter["replaced"] = {**dict(exporter.get("replaced") or {}),
                                key: {"source": str(source.resolve()), "sha256": described.sha256}}
        updated = dataclasses.replace(manifest, files={**manifest.files, key: described}, exporter=exporter)
        if key == file_key("text_encoder", "int8") and manifest.int8_gate is not None:
            # the gate measured the exported graph, not the user's: `auto` serves fp32 until it is re-measured
            updated = dataclasses.replace(updated, int8_gate={"passed": False, "reason": "the int8 graph was replaced"})
        updated = dataclasses.replace(updated, model_version=model_version(updated))
        updated._check_contracts()
    except ManifestError as exc:
        staged.unlink(missing_ok=True)
        raise ManifestError(f"{source} cannot replace {key}: {exc}") from exc
    except Exception:
        staged.unlink(missing_ok=True)
        raise
    staged.replace(target)
    updated.save()
    return Manifest.load(directory, settings=settings, check_graphs=[key])


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m stream.service.manifest check DIR`` | ``replace DIR KEY FILE``: check or patch an export."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m stream.service.manifest", description=main.__doc__)
    sub = parser.add_subparsers(dest="action", required=True)
    check = sub.add_parser("check", help="load and check every file of an export; print its summary")
    check.add_argument("directory", type=Path)
    replace = sub.add_parser("replace", help="replace graph KEY (e.g. image_encoder) by your own ONNX file")
    replace.add_argument("directory", type=Path)
    replace.add_argument("key")
    replace.add_argument("file", type=Path)
    args = parser.parse_args(argv)
    try:
        if args.action == "check":
            manifest = Manifest.load(args.directory, check_graphs=True)
        else:
            manifest = replace_graph(args.directory, args.key, args.file)
    except ManifestError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(f"model version {manifest.version}: {', '.join(sorted(manifest.files))}; "
          f"text encoder {'/'.join(manifest.text_encoder_variants)}; recovery {'/'.join(manifest.recovery_paths)} "
          f"(default {manifest.default_recovery}); queue d={manifest.queue_dim}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
