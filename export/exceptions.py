"""Errors raised by the ONNX side of the project (export and serving sessions)."""

from __future__ import annotations

__all__ = ["ModelError", "ModelFileMissing", "ModelInputMismatch", "ModelLoadError"]


class ModelError(RuntimeError):
    """Base class: an ONNX model cannot be used as the caller expects; the message says which and why."""


class ModelFileMissing(ModelError, FileNotFoundError):
    """The ONNX file does not exist (run `sentiment-stream export`, or check `model_dir`)."""

    def __init__(self, path: str) -> None:
        super().__init__(f"ONNX model not found: {path} (export it with `sentiment-stream export`)")
        self.path = path


class ModelLoadError(ModelError):
    """ONNX Runtime could not load the file (corrupt, unsupported IR/opset, ...)."""


class ModelInputMismatch(ModelError, ValueError):
    """The model's inputs (names, ranks, static dims or dtypes) differ from what the caller gives or expects."""
