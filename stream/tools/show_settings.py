"""``sentiment-stream settings``: the effective settings, as the worker would read them, with secrets masked.

Sources, highest first: ``SENTIMENT_*`` environment variables, a ``.env`` file in the working directory, the
defaults of :class:`~stream.service.settings.Settings`. Printed as ``SENTIMENT_<FIELD>=value`` lines (an env
file) or ``--json``.
"""

from __future__ import annotations

import argparse
import json
import re
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from stream.service.settings import Settings, get_settings

__all__ = ["MASK", "add_arguments", "effective", "run"]

MASK = "***"
_SECRET_NAME = re.compile(r"password|secret|token|credential|api_key", re.I)


def _mask_url(value: str) -> str:
    parts = urlsplit(value)
    if parts.password is None and parts.username is None:
        return value
    host = parts.hostname or ""
    if parts.port is not None:
        host = f"{host}:{parts.port}"
    user = parts.username or ""
    userinfo = f"{user}:{MASK}" if parts.password is not None else MASK
    return urlunsplit((parts.scheme, f"{userinfo}@{host}", parts.path, parts.query, parts.fragment))


def effective(settings: Settings) -> dict[str, Any]:
    """Every field as ``SENTIMENT_<FIELD>`` -> value; passwords in URLs and secret-named fields masked."""
    out: dict[str, Any] = {}
    for name, value in settings.model_dump(mode="json").items():
        if _SECRET_NAME.search(name) and value:
            value = MASK
        elif isinstance(value, str) and "://" in value:
            value = _mask_url(value)
        out[f"SENTIMENT_{name.upper()}"] = value
    return out


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="print a JSON object instead of NAME=value lines")


def run(args: argparse.Namespace) -> int:
    values = effective(get_settings())
    if args.json:
        print(json.dumps(values, indent=2))
    else:
        for name, value in values.items():
            print(f"{name}={value}")
    return 0
