"""Logging for every command: text (default) or one JSON object per line (``SENTIMENT_LOG_FORMAT=json``), on stderr.

JSON records carry ``worker`` (host name and pid: the pod or container name in a deployment), ``model_version``
once the worker has loaded its model (:func:`set_log_context`), and ``topic``/``partition``/``offset`` (or
``partitions`` for a batch) when the call passes them as ``extra``.
"""

from __future__ import annotations

import json
import logging
import logging.config
import os
import socket
from typing import Any, Final

from stream.service.settings import Settings

__all__ = ["JsonFormatter", "configure_logging", "logging_config", "set_log_context", "worker_id"]

TEXT_FORMAT: Final = "%(asctime)s %(levelname)s %(name)s: %(message)s"
_EXTRA_FIELDS: Final = ("topic", "partition", "partitions", "offset", "post_id")
_context: dict[str, Any] = {}


def worker_id() -> str:
    return f"{socket.gethostname()}-{os.getpid()}"


def set_log_context(**values: Any) -> None:
    """Fields added to every JSON record from now on (e.g. ``model_version``)."""
    _context.update(values)


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "ts": record.created,
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
            "worker": worker_id(),
            **_context,
        }
        for name in _EXTRA_FIELDS:
            if hasattr(record, name):
                out[name] = getattr(record, name)
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out, default=str)


def logging_config(settings: Settings, level: int | str = logging.INFO) -> dict[str, Any]:
    """A ``dictConfig`` for the chosen format, one stderr handler on the root logger (the worker hands it to Faust)."""
    formatter: dict[str, Any] = (
        {"()": f"{__name__}.JsonFormatter"} if settings.log_format == "json" else {"format": TEXT_FORMAT}
    )
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "formatters": {"default": formatter},
        "handlers": {
            "default": {"class": "logging.StreamHandler", "formatter": "default", "stream": "ext://sys.stderr"}
        },
        "root": {"level": level, "handlers": ["default"]},
    }


def configure_logging(settings: Settings, level: int | str = logging.INFO) -> None:
    logging.config.dictConfig(logging_config(settings, level))
