"""A real `sentiment-stream worker` whose producer fails on chosen batches (tests of issue 12 only).

``FAULTY_PRODUCE_BATCHES=3`` makes the 3rd produce attempt fail after two of its outputs were handed to the
producer (so some are on the broker: a retry duplicates them); ``3+`` makes every attempt from the 3rd on
fail, so the worker exhausts its retries and stops. Nothing else differs from the real worker.
"""

from __future__ import annotations

import os
import sys
from typing import Any

from faust.exceptions import ProducerSendError

from stream.service import processing

_SPEC = os.environ.get("FAULTY_PRODUCE_BATCHES", "")
_FROM = int(_SPEC.rstrip("+")) if _SPEC else 0
_ONWARDS = _SPEC.endswith("+")
_original = processing.ScoringService.produce
_calls = 0


def _fails(call: int) -> bool:
    return bool(_FROM) and (call == _FROM or (_ONWARDS and call > _FROM))


async def _produce(self: processing.ScoringService, outcome: Any, send: Any) -> float:
    global _calls
    _calls += 1
    if not _fails(_calls):
        return await _original(self, outcome, send)
    handed = 0

    async def failing(kind: Any, key: Any, value: Any, headers: Any = None) -> Any:
        nonlocal handed
        handed += 1
        if handed > 2:
            raise ProducerSendError(f"injected produce failure (attempt {_calls})")
        return await send(kind, key, value, headers)

    return await _original(self, outcome, failing)


processing.ScoringService.produce = _produce  # type: ignore[method-assign]

if __name__ == "__main__":
    from stream.cli import main

    sys.exit(main(["worker"]))
