"""The ``sentiment-stream`` command.

Each subcommand lives in the module that owns the capability; this file only names them. A module
named here provides ``add_arguments(parser)`` and ``run(args) -> int``. Modules are imported only when
their command runs, so the service commands never import torch.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from collections.abc import Sequence

__all__ = ["COMMANDS", "main"]

# name -> (module, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "demo": ("stream.tools.demo", "start the stack, serve a model, replay the test stream, print the report"),
    "services": ("stream.tools.services", "start, stop or inspect the local broker and Redis"),
    "roundtrip": ("stream.tools.roundtrip", "produce posts to the broker and read them back (smoke test)"),
    "data": ("models.data", "build the benchmark data set and its feature cache"),
    "train": ("models.train", "train a head (DRF, FSRF, serving head or a baseline) on cached features"),
    "evaluate": ("models.evaluate", "run the robustness protocol and write results"),
    "export": ("export.onnx_export", "export encoders and head to ONNX with a manifest and parity report"),
    "ship": ("export.ship", "make a trained serving head the shipped default (weights + model card)"),
    "worker": ("stream.service.app", "run the Faust streaming worker"),
    "record": ("stream.tools.recording", "record a topic into a replayable file"),
    "replay": ("stream.tools.replay", "replay a recording with injected faults and write a robustness report"),
    "settings": ("stream.tools.show_settings", "print the effective settings (environment, .env, defaults), masked"),
    "schemas": ("stream.tools.schemas", "write the JSON Schema of every topic to docs/schemas/ (--check: CI)"),
    "chaos": ("stream.tools.chaos", "kill, stall and poison two workers on a private stack; account for every post"),
    "bench": ("stream.tools.bench", "measure the compute limit, the real pipeline, a naive PyTorch peer and latency"),
}


def _requested(argv: Sequence[str]) -> set[str]:
    return {arg for arg in argv if arg in COMMANDS}


def main(argv: Sequence[str] | None = None) -> int:
    """Run a command. Errors go to stderr with a non-zero exit: 2 for a configuration or service error (bad
    settings, a port in use), 1 for anything unexpected (with its traceback)."""
    from pydantic import ValidationError

    from stream import __version__
    from stream.service.errors import ServiceError

    try:
        return _main(argv, __version__)
    except (ServiceError, ValidationError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


def _main(argv: Sequence[str] | None, version: str) -> int:
    args_list = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(prog="sentiment-stream", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"sentiment-stream {version}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    wanted = _requested(args_list)
    for name, (module_name, help_text) in COMMANDS.items():
        command = sub.add_parser(name, help=help_text)
        command.set_defaults(_module=module_name)
        if name in wanted:
            importlib.import_module(module_name).add_arguments(command)
    args = parser.parse_args(args_list)
    from stream.service.logs import configure_logging
    from stream.service.settings import get_settings

    configure_logging(get_settings(), logging.DEBUG if args.verbose else logging.INFO)
    module = importlib.import_module(args._module)
    return int(module.run(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
