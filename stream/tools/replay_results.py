"""What a replay run published and what came back: the result types the report reads.

Kept apart from :mod:`stream.tools.replay` (which produces them) so that the report depends only on the
data, never on the replay machinery.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Final

__all__ = ["EVENT", "PublishedPost", "ReceivedDeadLetter", "ReceivedEvent", "ReplayResult"]

EVENT: Final = "event"  # the expected outcome of a valid post; otherwise the expected reject reason


@dataclass(frozen=True, slots=True)
class PublishedPost:
    """What replay did to one recorded post and what it expects back. Stored in the result.

    ``present`` is what the worker sees after faults (empty for a malformed payload);
    ``expected`` is ``"event"`` or the reject reason :func:`decode_post` gives the published bytes.
    ``publish_ts`` is the wall-clock time of the send (0 until published).
    """

    id: str
    original_id: str
    label: str | None
    present: tuple[str, ...]
    dropped: tuple[str, ...] = ()
    corrupted: tuple[str, ...] = ()
    corruption_kinds: tuple[str, ...] = ()  # "modality:kind" of each corrupted modality, e.g. "text:delete"
    malformed: str | None = None
    drop_suppressed: tuple[str, ...] = ()
    expected: str = EVENT
    publish_ts: float = 0.0

    @property
    def faults(self) -> tuple[str, ...]:
        """Fault labels: ``drop:image``, ``corrupt:text`` (and per kind ``corrupt:text:delete``), ``malformed:…``."""
        out = [f"drop:{m}" for m in self.dropped] + [f"corrupt:{m}" for m in self.corrupted]
        out += [f"corrupt:{k}" for k in self.corruption_kinds]
        if self.malformed:
            out.append(f"malformed:{self.malformed}")
        return tuple(out)

    @property
    def pattern(self) -> str:
        """The missing pattern: the present modalities joined by ``+`` (``none`` if nothing usable)."""
        return "+".join(self.present) or "none"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> PublishedPost:
        tuples = ("present", "dropped", "corrupted", "corruption_kinds", "drop_suppressed")
        fields: dict[str, Any] = {k: tuple(v) if k in tuples else v for k, v in d.items()}
        return cls(**fields)


@dataclass(frozen=True, slots=True)
class ReceivedEvent:
    """The parts of a sentiment event the report needs, plus when the collector saw it."""

    id: str
    label: str
    probs: tuple[float, float, float]
    present: tuple[str, ...]
    recovered: tuple[str, ...]
    recovery: str
    model: str
    latency_s: float
    receive_ts: float
    flags: tuple[str, ...] = ()

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> ReceivedEvent:
        fields: dict[str, Any] = {
            k: tuple(v) if k in ("probs", "present", "recovered", "flags") else v for k, v in d.items()
        }
        return cls(**fields)


@dataclass(frozen=True, slots=True)
class ReceivedDeadLetter:
    """A dead letter of this run: the post id (its key), the reason, when the collector saw it."""

    id: str
    reason: str
    detail: str
    receive_ts: float


@dataclass
class ReplayResult:
    """Everything a robustness report needs from one replay run; JSON-serialisable (:meth:`save`)."""

    run_id: str
    recording: str
    header: dict[str, Any]
    options: dict[str, Any]
    topics: dict[str, str]
    posts: list[PublishedPost]
    events: list[ReceivedEvent] = field(default_factory=list)
    dead_letters: list[ReceivedDeadLetter] = field(default_factory=list)
    publish_started: float = 0.0
    publish_finished: float = 0.0
    collect_finished: float = 0.0
    timed_out: bool = False
    publish_errors: dict[str, str] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> ReplayResult:
        return cls(
            **{
                **d,
                "posts": [PublishedPost.from_dict(p) for p in d["posts"]],
                "events": [ReceivedEvent.from_dict(e) for e in d.get("events", [])],
                "dead_letters": [ReceivedDeadLetter(**x) for x in d.get("dead_letters", [])],
            }
        )

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict()) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> ReplayResult:
        return cls.from_dict(json.loads(Path(path).read_text()))
