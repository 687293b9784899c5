"""The evaluation protocol grid: which modalities are discarded or corrupted, at which rates.

The content faults themselves (masking words or pixels, blur, downscale, discard) are torch-free and
live in :mod:`stream.tools.faults`, shared with the replay tool. The protocol grid
(:func:`protocol_grid`) is data: a list of :class:`Condition` that the evaluation iterates, and
:func:`plan_condition` turns one condition into per-post presence and corruption masks.
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import combinations
from typing import Final, Literal

import numpy as np

from stream.service.vocabulary import MODALITIES

__all__ = [
    "CORRUPT_KINDS",
    "INTRA_RATES",
    "RANDOM_RATIOS",
    "Condition",
    "Plan",
    "corrupt_variant",
    "parse_corrupt_variant",
    "plan_condition",
    "protocol_grid",
    "rate_variant",
]

RANDOM_RATIOS: Final = (0.2, 0.4, 0.6, 0.8, 1.0)
INTRA_RATES: Final = tuple(round(0.1 * i, 1) for i in range(10))
# The content faults of stream.tools.faults that make sense per modality, ``mask`` (the papers' protocol)
# first. A tweet is typed, so it gets typos but no ASR confusions; a transcript is recognised speech, so
# the reverse. Every image fault applies to an emoji image.
CORRUPT_KINDS: Final[dict[str, tuple[str, ...]]] = {
    "text": ("mask", "delete", "truncate", "typos"),
    "image": ("mask", "blur", "downscale", "jpeg", "crop"),
    "transcript": ("mask", "asr", "delete", "truncate"),
}

Disruption = Literal["none", "C", "D", "C+D"]


def rate_variant(modality: str, rate: float) -> str:
    """Feature-variant name of modality corrupted at a fixed intra-modal rate, e.g. ``rate_text_0.3``."""
    if modality not in MODALITIES:
        raise ValueError(f"unknown modality {modality!r}")
    return f"rate_{modality}_{rate:.1f}"


def corrupt_variant(modality: str, kind: str = "mask") -> str:
    """Feature-variant name of ``modality`` under content fault ``kind`` (40–80 % rate per post).

    ``mask`` keeps the original name ``corrupt_<modality>`` (the papers' masking); every other kind is
    ``corrupt_<modality>_<kind>``, e.g. ``corrupt_text_typos``.
    """
    if modality not in MODALITIES:
        raise ValueError(f"unknown modality {modality!r}")
    if kind not in CORRUPT_KINDS[modality]:
        raise ValueError(f"no {kind!r} fault for {modality} (known: {', '.join(CORRUPT_KINDS[modality])})")
    return f"corrupt_{modality}" if kind == "mask" else f"corrupt_{modality}_{kind}"


def parse_corrupt_variant(name: str) -> tuple[str, str] | None:
    """``(modality, kind)`` of a :func:`corrupt_variant` name, ``None`` for any other variant name."""
    if not name.startswith("corrupt_"):
        return None
    modality, _, kind = name.removeprefix("corrupt_").partition("_")
    if modality not in MODALITIES:
        return None
    kind = kind or "mask"
    if kind == "mask" and name != f"corrupt_{modality}":
        return None  # "corrupt_text_mask" is not a name: mask is plain corrupt_text
    return (modality, kind) if kind in CORRUPT_KINDS[modality] else None


# -- the evaluation protocol -------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Condition:
    """One cell of the robustness protocol.

    ``family``: ``clean`` | ``fixed`` | ``fault`` | ``random`` | ``subset`` | ``rate``. ``fault`` is
    ``fixed`` C with another content fault than masking (``kind``, variant :func:`corrupt_variant`).
    ``modalities``: the modalities the disruption may hit (for ``subset``: the modalities kept).
    ``disruption``: C = corrupt (use the ``corrupt_<modality>`` feature variant), D = discard (presence
    mask), C+D = each disrupted (post, modality) is corrupted or discarded with probability 1/2.
    ``ratio``: fraction of posts disrupted. ``rate``: fixed intra-modal rate for ``rate`` (its feature
    variant is :func:`rate_variant`; the ``rate`` family uses the documented test subset).
    """

    name: str
    family: Literal["clean", "fixed", "fault", "random", "subset", "rate"]
    modalities: tuple[str, ...] = ()
    disruption: Disruption = "none"
    ratio: float = 0.0
    rate: float | None = None
    kind: str = "mask"

    @property
    def variants(self) -> dict[str, str]:
        """Feature variant to load per modality when that modality is corrupted (only C or rate)."""
        if self.family == "rate" and self.rate is not None:
            return {m: rate_variant(m, self.rate) for m in self.modalities}
        if "C" in self.disruption:
            return {m: corrupt_variant(m, self.kind) for m in self.modalities}
        return {}


def protocol_grid() -> list[Condition]:
    """Every condition of the protocol, in report order.

    clean; Fixed C / D / C+D on each modality (every post); Fixed C with each other content fault of
    :data:`CORRUPT_KINDS` (``fixed_C_<modality>_<kind>``, family ``fault``); Random ratios 0.2…1.0 with
    C, D and C+D (one random modality per disrupted post); every non-empty subset of modalities (the
    rest discarded); intra-modal rates 0.0…0.9 per modality.
    """
    grid = [Condition("clean", "clean")]
    kinds: tuple[Disruption, ...] = ("C", "D", "C+D")
    for modality in MODALITIES:
        for kind in kinds:
            grid.append(Condition(f"fixed_{kind}_{modality}", "fixed", (modality,), kind, 1.0))
    for modality in MODALITIES:
        for fault in CORRUPT_KINDS[modality][1:]:
            grid.append(Condition(f"fixed_C_{modality}_{fault}", "fault", (modality,), "C", 1.0, kind=fault))
    for kind in kinds:
        for ratio in RANDOM_RATIOS:
            grid.append(Condition(f"random_{kind}_{ratio:.1f}", "random", MODALITIES, kind, ratio))
    for size in range(1, len(MODALITIES) + 1):
        for subset in combinations(MODALITIES, size):
            grid.append(Condition("subset_" + "+".join(subset), "subset", subset, "D" if size < 3 else "none"))
    for modality in MODALITIES:
        for rate in INTRA_RATES:
            grid.append(Condition(rate_variant(modality, rate), "rate", (modality,), "C", 1.0, rate))
    return grid


@dataclass(frozen=True, slots=True)
class Plan:
    """Per-post masks for one condition: ``present`` and ``corrupted`` are bool ``[N, 3]`` in MODALITIES order.

    A modality that is not present is never marked corrupted. At least one modality stays present in
    every post (a post with nothing left cannot be scored and would be rejected by the service).
    """

    present: np.ndarray
    corrupted: np.ndarray


def plan_condition(condition: Condition, n: int, rng: np.random.Generator) -> Plan:
    """Draw presence and corruption masks for ``n`` posts under ``condition``."""
    present = np.ones((n, len(MODALITIES)), dtype=bool)
    corrupted = np.zeros((n, len(MODALITIES)), dtype=bool)
    index = {m: i for i, m in enumerate(MODALITIES)}
    if condition.family == "clean":
        return Plan(present, corrupted)
    if condition.family == "subset":
        keep = [index[m] for m in condition.modalities]
        present[:] = False
        present[:, keep] = True
        return Plan(present, corrupted)
    if condition.family == "rate":
        corrupted[:, index[condition.modalities[0]]] = (condition.rate or 0.0) > 0.0
        return Plan(present, corrupted)

    hit = rng.random(n) < condition.ratio if condition.ratio < 1.0 else np.ones(n, dtype=bool)
    if condition.family in ("fixed", "fault"):
        column = np.full(n, index[condition.modalities[0]])
    else:
        column = rng.integers(0, len(MODALITIES), size=n)
    if condition.disruption == "C":
        as_discard = np.zeros(n, dtype=bool)
    elif condition.disruption == "D":
        as_discard = np.ones(n, dtype=bool)
    else:
        as_discard = rng.random(n) < 0.5
    rows = np.flatnonzero(hit)
    present[rows[as_discard[rows]], column[rows[as_discard[rows]]]] = False
    corrupted[rows[~as_discard[rows]], column[rows[~as_discard[rows]]]] = True
    return Plan(present, corrupted)
