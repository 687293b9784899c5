"""Layers, batch types and divergences shared by the heads (DRF, FSRF, serving head, baselines).

Every head sees the same cached encoder features: ``text [B,384]``, ``image [B,1280]``,
``transcript [B,384]`` and a presence mask ``present float32 [B,3]`` in :data:`MODALITIES` order.
A missing modality's features are zeros with ``present = 0``.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from typing import Any, Final, Protocol

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from models.dims import FEATURE_DIMS
from stream.service.vocabulary import LABELS, MODALITIES

__all__ = [
    "FEATURE_DIMS",
    "LABELS",
    "MODALITIES",
    "Classifier",
    "GroupedMLP",
    "LossOutput",
    "ModalityProjector",
    "SentimentHead",
    "TrainBatch",
    "View",
    "config_from_dict",
    "diag_gaussian_kl",
    "masked_mean",
    "masked_softmax",
    "modality_projectors",
    "rbf_mmd",
]

N_MODALITIES: Final = len(MODALITIES)
N_CLASSES: Final = len(LABELS)


@dataclass
class View:
    """One (possibly disrupted) view of a batch: the three feature tensors and the presence mask."""

    text: Tensor
    image: Tensor
    transcript: Tensor
    present: Tensor  # float32 [B,3]

    @property
    def features(self) -> tuple[Tensor, Tensor, Tensor]:
        return (self.text, self.image, self.transcript)

    @staticmethod
    def stack(views: list[View]) -> View:
        """Concatenate views along the batch, so two views cost one forward pass."""
        return View(*(torch.cat(parts) for parts in zip(*((*v.features, v.present) for v in views), strict=True)))


@dataclass
class TrainBatch:
    """What a head's ``compute_loss`` receives from the trainer.

    ``view`` and ``view_b`` are two independently disrupted views of the same samples (``view_b`` is
    used only by self-distillation). ``clean`` holds the undisrupted features with ``available``, the
    modalities that really exist in the data (not discarded, not corrupted by the trainer).

    ``quality_target`` / ``quality_target_b`` (optional, ``[B,M]``): per cell of ``view`` / ``view_b``
    1 for a present, untouched modality, 0 for one the trainer replaced by a real content fault of a kind
    the learned quality is fitted on, NaN where there is no target (missing, feature noise, held-out kind).
    """

    view: View
    view_b: View
    clean: View
    label: Tensor  # int64 [B]
    quality_target: Tensor | None = None
    quality_target_b: Tensor | None = None


@dataclass
class LossOutput:
    """Total loss, every named term (already weighted) and the logits of the main view."""

    total: Tensor
    terms: dict[str, Tensor]
    logits: Tensor


class SentimentHead(Protocol):
    """The interface the trainer and the evaluator use for every head."""

    def __call__(self, text: Tensor, image: Tensor, transcript: Tensor, present: Tensor) -> Tensor: ...

    def compute_loss(self, batch: TrainBatch) -> LossOutput: ...


class ModalityProjector(nn.Module):
    """Encoder feature -> d-dimensional projected feature (LayerNorm, 2-layer MLP)."""

    def __init__(self, in_dim: int, d: int, dropout: float) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.LayerNorm(in_dim),
            nn.Linear(in_dim, d),
            nn.GELU(),
            nn.Dropout(dropout),
            nn.Linear(d, d),
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


def modality_projectors(d: int, dropout: float) -> nn.ModuleDict:
    """One :class:`ModalityProjector` per modality, from its encoder width (:data:`FEATURE_DIMS`) to ``d``."""
    return nn.ModuleDict({m: ModalityProjector(FEATURE_DIMS[m], d, dropout) for m in MODALITIES})


def project_all(projectors: nn.ModuleDict, view: View) -> Tensor:
    """Project each modality and zero the missing ones: ``[B,3,d]``."""
    h = torch.stack([projectors[m](x) for m, x in zip(MODALITIES, view.features, strict=True)], dim=1)
    return h * view.present.unsqueeze(-1)


class Classifier(nn.Module):
    """Fused representation -> class logits."""

    def __init__(self, in_dim: int, hidden: int, dropout: float, n_classes: int = N_CLASSES) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(in_dim, hidden), nn.GELU(), nn.Dropout(dropout), nn.Linear(hidden, n_classes)
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


class GroupedMLP(nn.Module):
    """``G`` independent 2-layer MLPs applied to ``x [B,G,d_in]`` in one batched matmul per layer.

    Per-modality (or per-pair) networks are grouped so that a step costs a few large matmuls instead of
    many small ones; each group is initialised like ``nn.Linear``.
    """

    def __init__(self, groups: int, d_in: int, d_out: int, hidden: int) -> None:
        super().__init__()
        self.w1 = nn.Parameter(torch.empty(groups, d_in, hidden))
        self.b1 = nn.Parameter(torch.empty(groups, hidden))
        self.w2 = nn.Parameter(torch.empty(groups, hidden, d_out))
        self.b2 = nn.Parameter(torch.empty(groups, d_out))
        for w, b, fan_in in ((self.w1, self.b1, d_in), (self.w2, self.b2, hidden)):
            bound = 1.0 / fan_in**0.5
            nn.init.uniform_(w, -bound, bound)
            nn.init.uniform_(b, -bound, bound)

    def forward(self, x: Tensor) -> Tensor:
        hidden = F.gelu(torch.einsum("bgi,gih->bgh", x, self.w1) + self.b1)
        return torch.einsum("bgh,gho->bgo", hidden, self.w2) + self.b2


def mlp(d_in: int, d_out: int, hidden: int) -> nn.Sequential:
    """A 2-layer MLP used for mappings and factor encoders."""
    return nn.Sequential(nn.Linear(d_in, hidden), nn.GELU(), nn.Linear(hidden, d_out))


def masked_mean(x: Tensor, mask: Tensor) -> Tensor:
    """Mean of ``x [B,M,d]`` over the M entries where ``mask [B,M]`` is 1 (zeros if none)."""
    weight = mask.unsqueeze(-1)
    return (x * weight).sum(1) / weight.sum(1).clamp_min(1.0)


def masked_softmax(logits: Tensor, mask: Tensor) -> Tensor:
    """Softmax over the last dim restricted to ``mask == 1``; export-safe (no boolean indexing)."""
    logits = logits + (mask - 1.0) * 1e4
    return torch.softmax(logits, dim=-1) * mask


def diag_gaussian_kl(mean_p: Tensor, var_p: Tensor, mean_q: Tensor, var_q: Tensor) -> Tensor:
    """KL(N(mean_p, var_p) || N(mean_q, var_q)) for diagonal Gaussians, averaged over dimensions."""
    var_p = var_p.clamp_min(1e-6)
    var_q = var_q.clamp_min(1e-6)
    kl = 0.5 * (torch.log(var_q / var_p) + (var_p + (mean_p - mean_q) ** 2) / var_q - 1.0)
    return kl.mean()


def batch_moments(x: Tensor, weight: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Mean and (biased) variance of rows of ``x [N,d]``, optionally weighted by ``weight [N]``."""
    if weight is None:
        weight = torch.ones(x.shape[0], device=x.device)
    w = weight.unsqueeze(-1)
    n = w.sum().clamp_min(1.0)
    mean = (x * w).sum(0) / n
    var = (((x - mean) ** 2) * w).sum(0) / n
    return mean, var


def rbf_mmd(x: Tensor, y: Tensor) -> Tensor:
    """Biased squared MMD between samples ``x [N,d]`` and ``y [M,d]`` with a multi-bandwidth RBF kernel."""
    xy = torch.cat([x, y], dim=0)
    dist = torch.cdist(xy, xy).pow(2)
    scale = dist.detach().mean().clamp_min(1e-6)
    kernel = sum(torch.exp(-dist / (scale * bw)) for bw in (0.25, 1.0, 4.0))
    assert isinstance(kernel, Tensor)
    n = x.shape[0]
    return kernel[:n, :n].mean() + kernel[n:, n:].mean() - 2 * kernel[:n, n:].mean()


def config_from_dict(cls: type[Any], data: dict[str, Any]) -> Any:
    """Rebuild a (possibly nested) config dataclass from ``dataclasses.asdict`` output."""
    kwargs: dict[str, Any] = {}
    hints = {f.name: f for f in dataclasses.fields(cls)}
    for key, value in data.items():
        if key not in hints:
            continue
        default = getattr(cls(), key)
        if dataclasses.is_dataclass(default) and isinstance(value, dict):
            kwargs[key] = config_from_dict(type(default), value)
        else:
            kwargs[key] = value
    return cls(**kwargs)


def set_config_value(config: Any, dotted_key: str, raw: str) -> None:
    """Set ``a.b=value`` on a config dataclass, parsing ``raw`` as the field's current type."""
    *parents, leaf = dotted_key.split(".")
    target = config
    for name in parents:
        target = getattr(target, name)
    if not dataclasses.is_dataclass(target) or leaf not in {f.name for f in dataclasses.fields(target)}:
        raise KeyError(f"unknown config field {dotted_key!r}")
    current = getattr(target, leaf)
    value: Any
    if isinstance(current, bool):
        if raw.lower() not in {"true", "false", "1", "0", "yes", "no", "on", "off"}:
            raise ValueError(f"{dotted_key} expects a boolean, got {raw!r}")
        value = raw.lower() in {"true", "1", "yes", "on"}
    elif isinstance(current, int):
        value = int(raw)
    elif isinstance(current, float):
        value = float(raw)
    elif isinstance(current, str):
        value = raw
    else:
        value = json.loads(raw)
    setattr(target, leaf, value)


def temperature_kl(logits_p: Tensor, logits_q: Tensor, temperature: float) -> Tensor:
    """KL(softmax(p/T) || softmax(q/T)) * T², batch-mean; gradient flows into ``logits_q`` only."""
    target = F.softmax(logits_p.detach() / temperature, dim=-1)
    log_q = F.log_softmax(logits_q / temperature, dim=-1)
    return F.kl_div(log_q, target, reduction="batchmean") * temperature**2


def seed_everything(seed: int) -> None:
    """Seed torch and numpy (the only RNGs the heads use)."""
    torch.manual_seed(seed)
    np.random.seed(seed % (2**32))
