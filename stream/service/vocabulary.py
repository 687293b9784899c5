"""The names every part of the project agrees on: modalities and labels, in their index order.

Models, exports, events and reports all index arrays by these tuples; this is their one definition.
"""

from __future__ import annotations

from typing import Final, Literal

__all__ = ["LABELS", "MODALITIES", "Label", "Modality"]

MODALITIES: Final = ("text", "image", "transcript")
LABELS: Final = ("negative", "neutral", "positive")

Modality = Literal["text", "image", "transcript"]
Label = Literal["negative", "neutral", "positive"]
