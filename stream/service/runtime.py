"""The one ONNX Runtime session factory of the project (torch-free; serving and parity checks use it).

:func:`create_session` returns a cached :class:`ModelSession` per model file and configuration, so each
model is loaded once per process. Providers come from ``settings.providers``: ``cuda`` asks for
CUDAExecutionProvider then CPU, ``cpu`` for CPU only. What was *obtained* is checked after creation
(``onnxruntime-gpu`` lists CUDA as available even without a GPU, then falls back to CPU with only an
ERROR line from its C++ logger): ``ModelSession.provider`` says which, and one warning is logged when
CUDA was asked for but CPU was obtained. Threads are set for small shared hosts: ``intra_op_threads``
from settings, one inter-op thread, sequential execution, no spinning; :func:`pin_thread_pools` pins the
other native pool a worker would start (the Rust tokenizer's). On CUDA, :meth:`ModelSession.run` uses
I/O binding: inputs are copied to the device once, outputs are allocated there and copied back once.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import numpy as np
import onnxruntime as ort

from stream.service.errors import ModelError, ModelFileMissing, ModelInputMismatch, ModelLoadError
from stream.service.settings import Settings, get_settings

__all__ = [
    "CPU",
    "CUDA",
    "ModelError",
    "ModelFileMissing",
    "ModelInputMismatch",
    "ModelLoadError",
    "ModelSession",
    "TensorSpec",
    "clear_session_cache",
    "create_session",
    "pin_thread_pools",
    "requested_providers",
    "session_options",
]

log = logging.getLogger(__name__)

CPU: Final = "CPUExecutionProvider"
CUDA: Final = "CUDAExecutionProvider"

# ONNX tensor type strings -> numpy dtypes (the types our models use, plus the common rest).
_ONNX_DTYPES: Final[dict[str, np.dtype[Any]]] = {
    "tensor(float)": np.dtype(np.float32),
    "tensor(float16)": np.dtype(np.float16),
    "tensor(double)": np.dtype(np.float64),
    "tensor(int64)": np.dtype(np.int64),
    "tensor(int32)": np.dtype(np.int32),
    "tensor(int8)": np.dtype(np.int8),
    "tensor(uint8)": np.dtype(np.uint8),
    "tensor(bool)": np.dtype(np.bool_),
}

Dim = int | str | None
"""A tensor dimension: an int is static; a str (symbolic name) or None is dynamic."""


@dataclass(frozen=True, slots=True)
class TensorSpec:
    """Name, shape (ints static, str/None dynamic) and numpy dtype of a model input or output."""

    name: str
    shape: tuple[Dim, ...]
    dtype: np.dtype[Any] | None

    @classmethod
    def from_node(cls, node: Any) -> TensorSpec:
        shape = tuple(d if isinstance(d, int | str) else None for d in (node.shape or ()))
        return cls(node.name, shape, _ONNX_DTYPES.get(node.type))

    def accepts(self, shape: Sequence[Dim]) -> bool:
        """True if a tensor of ``shape`` fits: same rank and equal wherever both dims are static ints."""
        if len(shape) != len(self.shape):
            return False
        return all(
            not (isinstance(a, int) and isinstance(b, int)) or a == b for a, b in zip(shape, self.shape, strict=True)
        )


def requested_providers(requested: str) -> list[Any]:
    """The provider list for ``settings.providers`` (``cpu`` | ``cuda``).

    CUDA is only asked for when this onnxruntime build has it: asking the CPU package for CUDA would
    add a Python UserWarning for what our own check reports anyway.
    """
    if requested == "cuda" and CUDA in ort.get_available_providers():
        return [(CUDA, {"device_id": 0}), CPU]
    if requested not in ("cpu", "cuda"):
        raise ValueError(f"providers must be 'cpu' or 'cuda', got {requested!r}")
    return [CPU]


def pin_thread_pools(settings: Settings) -> dict[str, str]:
    """Pin the native thread pools a worker would otherwise size to the machine; returns what was set.

    The Rust tokenizer (``tokenizers``) parallelises ``encode_batch`` over a rayon pool of one thread per
    core, created at its first use: with one worker per core that is cores² threads fighting for the
    cores the ONNX sessions use. ``tokenizer_threads`` = 1 (default) turns it off, so a batch is tokenised
    on the scoring thread itself. Must run before the first ``encode_batch`` of the process (the pool
    reads ``RAYON_NUM_THREADS`` once); ``TOKENIZERS_PARALLELISM`` is read on every call.
    """
    threads = max(1, settings.tokenizer_threads)
    pinned = {"RAYON_NUM_THREADS": str(threads), "TOKENIZERS_PARALLELISM": "false" if threads == 1 else "true"}
    os.environ.update(pinned)
    return pinned


def session_options(settings: Settings) -> ort.SessionOptions:
    """Session options for a shared, small CPU host: few threads, sequential, no spinning.

    On two cores, one process per core with one intra-op thread beats one process with two threads, and
    spinning pools of several sessions fight each other and the Python work (docs/performance.md).
    """
    so = ort.SessionOptions()
    so.intra_op_num_threads = settings.intra_op_threads
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    # Spinning threads fight the Python work and other sessions on 2 cores for no gain at 1 thread.
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    so.add_session_config_entry("session.inter_op.allow_spinning", "0")
    so.log_severity_level = 3  # errors only: ORT's own CUDA-failure message stays visible
    return so


class ModelSession:
    """One loaded ONNX model: introspection plus a batched, thread-safe :meth:`run`.

    ``provider`` is the execution provider actually obtained (``CPUExecutionProvider`` or
    ``CUDAExecutionProvider``); ``requested`` is the setting (``cpu`` | ``cuda``). ``run`` may be called
    concurrently from executor threads (ONNX Runtime's ``run`` is thread-safe and releases the GIL).
    """

    def __init__(
        self, path: Path, session: ort.InferenceSession, requested: str, io_binding: bool | None = None
    ) -> None:
        self.path = path
        self.name = path.stem
        self.requested = requested
        self._session = session
        self.providers: tuple[str, ...] = tuple(session.get_providers())
        self.provider = self.providers[0]
        self.inputs = tuple(TensorSpec.from_node(n) for n in session.get_inputs())
        self.outputs = tuple(TensorSpec.from_node(n) for n in session.get_outputs())
        self._input_by_name = {s.name: s for s in self.inputs}
        # I/O binding on CUDA (None: exactly when the session runs on CUDA); on CPU it only adds a copy.
        self.io_binding = self.provider == CUDA if io_binding is None else io_binding
        self._device = "cuda" if self.provider == CUDA else "cpu"

    def __repr__(self) -> str:
        return f"ModelSession({self.path.name!r}, provider={self.provider!r})"

    @property
    def input_names(self) -> tuple[str, ...]:
        return tuple(s.name for s in self.inputs)

    @property
    def output_names(self) -> tuple[str, ...]:
        return tuple(s.name for s in self.outputs)

    @property
    def fell_back_to_cpu(self) -> bool:
        """CUDA was requested but the session runs on CPU (the alert "CPU fallback on a GPU node")."""
        return self.requested == "cuda" and self.provider != CUDA

    def check_inputs(self, expected: Mapping[str, Sequence[Dim]] | Iterable[str]) -> None:
        """Raise :class:`ModelInputMismatch` unless the model's inputs are exactly ``expected``.

        ``expected`` is either input names, or names mapped to shapes (ints static; str/None any size),
        e.g. ``{"text": (None, 384), "present": (None, 3)}``.
        """
        shapes = dict(expected) if isinstance(expected, Mapping) else dict.fromkeys(expected)
        if set(shapes) != set(self._input_by_name):
            raise ModelInputMismatch(
                f"{self.path.name}: inputs are {sorted(self._input_by_name)}, expected {sorted(shapes)}"
            )
        for name, shape in shapes.items():
            spec = self._input_by_name[name]
            if shape is not None and not spec.accepts(tuple(shape)):
                raise ModelInputMismatch(
                    f"{self.path.name}: input {name!r} has shape {spec.shape}, expected {tuple(shape)}"
                )

    def run(self, feeds: Mapping[str, np.ndarray], outputs: Sequence[str] | None = None) -> dict[str, np.ndarray]:
        """Run one batch; returns ``{output name: array}`` (all outputs unless ``outputs`` names some).

        Feeds must name every input exactly, with the model's dtype and a compatible shape; otherwise
        :class:`ModelInputMismatch` (no silent casts: a float64 feed is a caller bug).
        """
        if set(feeds) != set(self._input_by_name):
            raise ModelInputMismatch(
                f"{self.path.name}: feeds {sorted(feeds)} do not match inputs {sorted(self._input_by_name)}"
            )
        for name, value in feeds.items():
            spec = self._input_by_name[name]
            if spec.dtype is not None and value.dtype != spec.dtype:
                raise ModelInputMismatch(f"{self.path.name}: input {name!r} must be {spec.dtype}, got {value.dtype}")
            if not spec.accepts(value.shape):
                raise ModelInputMismatch(f"{self.path.name}: input {name!r} has shape {spec.shape}, got {value.shape}")
        names = list(outputs) if outputs is not None else list(self.output_names)
        if self.io_binding:
            return self._run_bound(feeds, names)
        results = self._session.run(names, dict(feeds))
        return dict(zip(names, results, strict=True))

    def _run_bound(self, feeds: Mapping[str, np.ndarray], names: Sequence[str]) -> dict[str, np.ndarray]:
        """One run with I/O binding: each input copied to the session's device once, outputs allocated there
        and copied back once (no per-output staging). A binding is cheap and not shared between threads."""
        binding = self._session.io_binding()
        for name, value in feeds.items():
            binding.bind_cpu_input(name, np.ascontiguousarray(value))
        for name in names:
            binding.bind_output(name, self._device, 0)
        self._session.run_with_iobinding(binding)
        return dict(zip(names, binding.copy_outputs_to_cpu(), strict=True))


_cache: dict[tuple[Any, ...], ModelSession] = {}
_cache_lock = threading.Lock()


def create_session(
    path: str | Path,
    settings: Settings | None = None,
    *,
    expected_inputs: Mapping[str, Sequence[Dim]] | Iterable[str] | None = None,
) -> ModelSession:
    """The session for the ONNX file at ``path``, created once per process and configuration.

    Raises :class:`ModelFileMissing` if the file does not exist, :class:`ModelLoadError` if ONNX
    Runtime cannot load it, :class:`ModelInputMismatch` if ``expected_inputs`` is given and differs.
    A file replaced on disk (new mtime/size) gets a new session.
    """
    settings = settings or get_settings()
    file = Path(path).expanduser().resolve()
    if not file.is_file():
        raise ModelFileMissing(str(file))
    stat = file.stat()
    key = (str(file), stat.st_mtime_ns, stat.st_size, settings.providers, settings.intra_op_threads)
    with _cache_lock:
        model = _cache.get(key)
        if model is None:
            model = _load(file, settings)
            _cache[key] = model
    if expected_inputs is not None:
        model.check_inputs(expected_inputs)
    return model


def _load(file: Path, settings: Settings) -> ModelSession:
    try:
        session = ort.InferenceSession(
            str(file), sess_options=session_options(settings), providers=requested_providers(settings.providers)
        )
    except ModelError:
        raise
    except Exception as exc:  # ORT raises its own pybind exception types (InvalidProtobuf, Fail, ...)
        raise ModelLoadError(f"ONNX Runtime cannot load {file}: {exc}") from exc
    model = ModelSession(file, session, settings.providers)
    if model.fell_back_to_cpu:
        log.warning(
            "ONNX model %s: CUDA was requested (providers=cuda) but the session runs on %s; "
            "check the GPU, CUDA/cuDNN libraries and that onnxruntime-gpu (not onnxruntime) is installed",
            file.name,
            model.provider,
        )
    else:
        log.info("ONNX model %s loaded on %s", file.name, model.provider)
    return model


def clear_session_cache() -> None:
    """Forget every cached session (tests; a worker reloading a new model version)."""
    with _cache_lock:
        _cache.clear()
