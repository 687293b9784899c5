"""Errors of the service, each with a machine-readable reason or a message that says what to do."""

from __future__ import annotations

from typing import Literal

__all__ = [
    "ModelError",
    "ModelFileMissing",
    "ModelInputMismatch",
    "ModelLoadError",
    "PostRejected",
    "RejectReason",
    "ServiceError",
]

RejectReason = Literal[
    "not_msgpack",
    "not_a_map",
    "missing_id",
    "invalid_id",
    "wrong_type",
    "invalid_ts",
    "invalid_label",
    "field_too_long",
    "no_modality",
    "image_too_large",
    "image_undecodable",
    "internal_error",
]


class PostRejected(ValueError):
    """An input that is not a valid post; ``reason`` is one of :data:`RejectReason`."""

    def __init__(self, reason: RejectReason, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason: RejectReason = reason
        self.detail = detail


class ServiceError(RuntimeError):
    """The local stack could not be started or stopped; the message says what to do."""


class ModelError(RuntimeError):
    """An ONNX model cannot be used as the caller expects; the message says which and why."""


class ModelFileMissing(ModelError, FileNotFoundError):
    """The ONNX file does not exist (run `sentiment-stream export`, or check `model_dir`)."""

    def __init__(self, path: str) -> None:
        super().__init__(f"ONNX model not found: {path} (export it with `sentiment-stream export`)")
        self.path = path


class ModelLoadError(ModelError):
    """ONNX Runtime could not load the file (corrupt, unsupported IR/opset, ...)."""


class ModelInputMismatch(ModelError, ValueError):
    """The model's inputs (names, ranks, static dims or dtypes) differ from what the caller gives or expects."""
