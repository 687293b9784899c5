"""Plain baselines on the same cached features: text-only, late fusion with zero-fill, early fusion
with modality dropout. Each is trained by the same trainer, with the same training disruptions.

* :class:`TextOnly` — the text projector and a classifier; the other modalities are ignored.
* :class:`LateFusionZeroFill` — one classifier per modality on zero-filled inputs (a missing modality's
  features are zeros, and its logits still count); the fused logits are the mean of the three.
* :class:`EarlyFusionDropout` — the concatenated projected features (zeros for missing ones) go
  through one classifier; in training each present modality is additionally dropped with probability
  ``modality_dropout`` (never all of a sample's modalities).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from models.common import (
    FEATURE_DIMS,
    MODALITIES,
    N_MODALITIES,
    Classifier,
    LossOutput,
    ModalityProjector,
    TrainBatch,
    View,
    modality_projectors,
    project_all,
)

__all__ = ["BaselineConfig", "EarlyFusionDropout", "LateFusionZeroFill", "TextOnly"]


@dataclass
class BaselineConfig:
    d: int = 64
    hidden: int = 128
    dropout: float = 0.1
    modality_dropout: float = 0.3  # early fusion only


def cross_entropy_loss(model: nn.Module, view: View, present: Tensor, label: Tensor) -> LossOutput:
    """A baseline's whole loss: cross-entropy of its logits on the disrupted view's features with ``present``."""
    logits = model(*view.features, present)
    ce = F.cross_entropy(logits, label)
    return LossOutput(ce, {"ce": ce}, logits)


class TextOnly(nn.Module):
    """Text features -> projector -> classifier."""

    def __init__(self, cfg: BaselineConfig | None = None) -> None:
        super().__init__()
        self.cfg = cfg = cfg or BaselineConfig()
        self.projector = ModalityProjector(FEATURE_DIMS["text"], cfg.d, cfg.dropout)
        self.classifier = Classifier(cfg.d, cfg.hidden, cfg.dropout)

    def forward(self, text: Tensor, image: Tensor, transcript: Tensor, present: Tensor) -> Tensor:
        return self.classifier(self.projector(text * present[:, :1]))

    def compute_loss(self, batch: TrainBatch) -> LossOutput:
        return cross_entropy_loss(self, batch.view, batch.view.present, batch.label)


class LateFusionZeroFill(nn.Module):
    """Mean of per-modality logits; a missing modality is zero-filled, not masked."""

    def __init__(self, cfg: BaselineConfig | None = None) -> None:
        super().__init__()
        self.cfg = cfg = cfg or BaselineConfig()
        self.projectors = modality_projectors(cfg.d, cfg.dropout)
        self.classifiers = nn.ModuleDict({m: Classifier(cfg.d, cfg.hidden, cfg.dropout) for m in MODALITIES})

    def forward(self, text: Tensor, image: Tensor, transcript: Tensor, present: Tensor) -> Tensor:
        inputs = (text, image, transcript)
        logits = [
            self.classifiers[m](self.projectors[m](x * present[:, i : i + 1]))
            for i, (m, x) in enumerate(zip(MODALITIES, inputs, strict=True))
        ]
        return torch.stack(logits, dim=1).mean(1)

    def compute_loss(self, batch: TrainBatch) -> LossOutput:
        return cross_entropy_loss(self, batch.view, batch.view.present, batch.label)


class EarlyFusionDropout(nn.Module):
    """Concatenated projected features -> classifier, trained with modality dropout."""

    def __init__(self, cfg: BaselineConfig | None = None) -> None:
        super().__init__()
        self.cfg = cfg = cfg or BaselineConfig()
        self.projectors = modality_projectors(cfg.d, cfg.dropout)
        self.classifier = Classifier(N_MODALITIES * cfg.d, cfg.hidden, cfg.dropout)

    def forward(self, text: Tensor, image: Tensor, transcript: Tensor, present: Tensor) -> Tensor:
        h = project_all(self.projectors, View(text, image, transcript, present))
        return self.classifier(h.flatten(1))

    def drop_modalities(self, present: Tensor) -> Tensor:
        """Drop each present modality with probability ``modality_dropout``; keep at least one."""
        keep = (torch.rand_like(present) >= self.cfg.modality_dropout).float() * present
        one = F.one_hot((torch.rand_like(present) * present).argmax(-1), N_MODALITIES).float()
        empty = keep.sum(-1, keepdim=True) == 0
        return torch.where(empty, one, keep)

    def compute_loss(self, batch: TrainBatch) -> LossOutput:
        return cross_entropy_loss(self, batch.view, self.drop_modalities(batch.view.present), batch.label)
