"""Widths of the frozen encoders' features: the one definition every head, the feature cache and the export use.

MiniLM sentence embeddings (texts and transcripts) are 384-d, MobileNetV2's pooled features 1280-d.
Torch-free, so the feature cache can read it without importing torch.
"""

from __future__ import annotations

from typing import Final

__all__ = ["FEATURE_DIMS", "IMAGE_DIM", "TEXT_DIM"]

TEXT_DIM: Final = 384
IMAGE_DIM: Final = 1280
# per modality, in MODALITIES order
FEATURE_DIMS: Final = {"text": TEXT_DIM, "image": IMAGE_DIM, "transcript": TEXT_DIM}
