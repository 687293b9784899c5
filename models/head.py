"""The serving head: DRF quality weights + FSRF (or DRF) recovery + fusion, exported to ONNX.

Contract (``docs/architecture.md``)::

    forward(text [B,384], image [B,1280], transcript [B,384], present float32 [B,3],
            queue_mean float32 [3,d], queue_var float32 [3,d])
        -> probs [B,3], quality [B,3], projected [B,3,d]

* The queue moments are *inputs*: at serving time the DRF queue lives in Redis. During training the
  head keeps its own :class:`~models.drf.FeatureQueue` and feeds its moments in.
* ``quality`` is the DRF quality of each present modality (0 for a missing one).
* ``projected`` holds the projected feature of each present modality and the recovered feature of each
  missing one; serving pushes the present rows of clean, complete, confident posts into the queue.
* The recovery path (``"fsrf"`` or ``"drf"``) is a Python attribute, fixed per instance and therefore
  per exported graph. Both paths' networks are trained by their own losses, so one trained head can be
  exported either way; the classifier is trained on the configured path.
* ``forward`` has no data-dependent Python control flow: missing modalities are handled with masks.

Training loss: ``CE`` (both views) ``+ DRF sample/distribution losses + DHF constraints + DAS``.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from models.common import (
    N_MODALITIES,
    Classifier,
    LossOutput,
    TrainBatch,
    View,
    config_from_dict,
    modality_projectors,
    project_all,
)
from models.drf import (
    DRFConfig,
    FeatureQueue,
    InterModalMapping,
    QualityEstimator,
    drf_losses,
    enqueue_clean,
    quality_fusion,
)
from models.fsrf import DHF, FSRFConfig, das_losses, dhf_losses

__all__ = ["RECOVERY_PATHS", "ServingHead", "ServingHeadConfig", "load_serving_head"]

RECOVERY_PATHS = ("fsrf", "drf")


@dataclass
class ServingHeadConfig:
    """Serving-head config. ``d``/``hidden``/``dropout`` here override those of the two sub-configs."""

    recovery: str = "fsrf"  # "fsrf" | "drf"
    d: int = 64
    hidden: int = 128
    dropout: float = 0.1
    queue_len: int = 1024
    use_recovery: bool = True  # off: a missing modality gets zero fusion weight
    drf: DRFConfig = field(default_factory=DRFConfig)
    fsrf: FSRFConfig = field(default_factory=FSRFConfig)

    def __post_init__(self) -> None:
        if self.recovery not in RECOVERY_PATHS:
            raise ValueError(f"recovery must be one of {RECOVERY_PATHS}, got {self.recovery!r}")


@dataclass
class HeadOutput:
    logits: Tensor  # [B,C]
    quality: Tensor  # [B,M], 0 for missing modalities
    projected: Tensor  # [B,M,d], recovered rows for missing modalities
    fused: Tensor  # [B,M*d], the classifier input


class ServingHead(nn.Module):
    """Projectors, DRF quality and mappings, FSRF factorisation, fusion classifier."""

    def __init__(self, cfg: ServingHeadConfig | None = None) -> None:
        super().__init__()
        self.cfg = cfg = cfg or ServingHeadConfig()
        self.recovery = cfg.recovery
        self.projectors = modality_projectors(cfg.d, cfg.dropout)
        self.queue = FeatureQueue(N_MODALITIES, cfg.queue_len, cfg.d)
        self.quality = QualityEstimator(cfg.drf, d=cfg.d)
        self.mapping = InterModalMapping(cfg.d, cfg.hidden)
        self.dhf = DHF(cfg.d, cfg.hidden)
        self.classifier = Classifier(N_MODALITIES * cfg.d, cfg.hidden, cfg.dropout)

    @property
    def d(self) -> int:
        return self.cfg.d

    def set_recovery(self, path: str) -> None:
        """Choose the recovery path of this instance (and of any graph exported from it)."""
        if path not in RECOVERY_PATHS:
            raise ValueError(f"recovery must be one of {RECOVERY_PATHS}, got {path!r}")
        self.recovery = path

    def recover(self, h: Tensor, present: Tensor) -> Tensor:
        """Projected features ``[B,M,d]`` of every modality rebuilt from the present ones."""
        if self.recovery == "fsrf":
            factors = self.dhf.recover(self.dhf.factorise(h), present)
            return self.dhf.decode(factors)
        return self.mapping(h, present)

    def run(self, view: View, queue_mean: Tensor, queue_var: Tensor) -> HeadOutput:
        recover = self.recover if self.cfg.use_recovery else None
        fused, quality, h = quality_fusion(
            self.quality, project_all(self.projectors, view), view.present, recover, queue_mean, queue_var,
            view.features,
        )
        return HeadOutput(self.classifier(fused), quality, h, fused)

    def forward(
        self,
        text: Tensor,
        image: Tensor,
        transcript: Tensor,
        present: Tensor,
        queue_mean: Tensor,
        queue_var: Tensor,
    ) -> tuple[Tensor, Tensor, Tensor]:
        out = self.run(View(text, image, transcript, present), queue_mean, queue_var)
        return torch.softmax(out.logits, dim=-1), out.quality, out.projected

    def logits(self, text: Tensor, image: Tensor, transcript: Tensor, present: Tensor) -> Tensor:
        """Class logits using the head's own queue (training and offline evaluation)."""
        queue_mean, queue_var = self.queue.moments()
        return self.run(View(text, image, transcript, present), queue_mean, queue_var).logits

    def compute_loss(self, batch: TrainBatch) -> LossOutput:
        """CE on two disrupted views + DAS + DRF recovery losses + DHF constraints; enqueue clean."""
        queue_mean, queue_var = self.queue.moments()
        views = View.stack([batch.view, batch.view_b])
        out = self.run(views, queue_mean, queue_var)
        logits_a, logits_b = out.logits.chunk(2)
        fused_a, fused_b = out.fused.chunk(2)
        terms = {"ce": F.cross_entropy(out.logits, batch.label.repeat(2))}
        terms |= das_losses(logits_a, logits_b, fused_a, fused_b, self.cfg.fsrf)
        if batch.quality_target is not None and batch.quality_target_b is not None:
            target = torch.cat([batch.quality_target, batch.quality_target_b])
            terms |= self.quality.loss(out.projected, queue_mean, queue_var, target, views.features)
        h_clean = project_all(self.projectors, batch.clean)
        available = batch.clean.present
        drf_cfg = dataclasses.replace(self.cfg.drf, use_recovery=self.cfg.use_recovery)
        terms |= drf_losses(self.mapping, h_clean, available, self.queue, drf_cfg)
        fsrf_cfg = dataclasses.replace(self.cfg.fsrf, use_recovery=self.cfg.use_recovery)
        terms |= dhf_losses(self.dhf, h_clean, available, fsrf_cfg)
        if self.training:
            enqueue_clean(self.queue, h_clean, available)
        return LossOutput(torch.stack(list(terms.values())).sum(), terms, logits_a)


def load_serving_head(model_dir: str | Path, recovery: str | None = None) -> ServingHead:
    """Load a trained serving head from a model dir (``config.json`` + ``head.pt``), in eval mode."""
    model_dir = Path(model_dir)
    meta = json.loads((model_dir / "config.json").read_text())
    if meta.get("model") != "serving":
        raise ValueError(f"{model_dir} holds a {meta.get('model')!r} head, not a serving head")
    cfg = config_from_dict(ServingHeadConfig, meta["config"])
    head = ServingHead(cfg)
    head.load_state_dict(torch.load(model_dir / "head.pt", map_location="cpu", weights_only=True))
    if recovery is not None:
        head.set_recovery(recovery)
    return head.eval()
