"""Errors raised by the service, each with a machine-readable reason."""

from __future__ import annotations

from typing import Literal

__all__ = ["PostRejected", "RejectReason", "ServiceError"]

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
