"""FSRF: factorization-guided semantic recovery (Liu et al., ICME 2025, arXiv 2510.16086).

The paper's full text was unreachable: the design below is inferred from its summary, not taken from it,
and works on pooled feature vectors instead of sequences.

**DHF — de-redundant homo-heterogeneous factorisation.** Each projected modality ``h_m`` is split into
a homogeneous part ``c_m = E_c(h_m)`` (one encoder *shared* by all modalities), a heterogeneous part
``s_m = E_s^m(h_m)`` and a noise part ``n_m = E_n^m(h_m)``; a decoder ``D_m(c_m, s_m, n_m)``
reconstructs ``h_m``. Constraints, each weighted and switchable:

* ``recon``  — ``MSE(D_m(c_m, s_m, n_m), sg(h_m))``;
* ``orth``   — soft orthogonality between ``c_m``, ``s_m`` and ``n_m`` (squared cross-correlation of
  centred, L2-normalised batches, as in MISA);
* ``align``  — cross-modal alignment of the homogeneous parts of the same sample (1 − cosine);
* ``dered``  — de-redundancy: the heterogeneous parts of different modalities are decorrelated
  (squared cross-correlation of batch-standardised features);
* ``recovery`` — the missing-semantics recovery below, supervised leave-one-modality-out on clean data.

**Recovery.** A missing modality ``t`` gets ``c_t = mean of c over the present modalities`` and
``s_t = R_t(c_t)``; its projected feature is ``D_t(c_t, s_t, 0)``. Prediction reads
``concat_m [c_m, s_m]`` — the noise parts never reach the classifier.

**DAS — distribution-aligned self-distillation.** Two independently disrupted views of each sample go
through the same network; ``das_kl`` is the bidirectional temperature-softened KL between their
predictions (each direction with the other side stopped), ``das_dist`` aligns the distributions of
their fused representations (symmetric diagonal-Gaussian KL, or RBF-MMD).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from models.common import (
    N_MODALITIES,
    Classifier,
    GroupedMLP,
    LossOutput,
    TrainBatch,
    View,
    batch_moments,
    diag_gaussian_kl,
    masked_mean,
    mlp,
    modality_projectors,
    project_all,
    rbf_mmd,
    temperature_kl,
)

__all__ = ["DHF", "FSRF", "FSRFConfig", "Factors", "das_losses", "dhf_losses"]


@dataclass
class FSRFConfig:
    """FSRF hyper-parameters; every loss has a weight and a ``use_*`` switch."""

    d: int = 64
    hidden: int = 128
    dropout: float = 0.1
    use_recovery: bool = True  # off: a missing modality contributes zeros
    use_recon: bool = True
    recon_weight: float = 1.0
    use_orth: bool = True
    orth_weight: float = 0.1
    use_align: bool = True
    align_weight: float = 0.5
    use_dered: bool = True
    dered_weight: float = 0.1
    use_recovery_loss: bool = True
    recovery_loss_weight: float = 1.0
    use_das_kl: bool = True
    das_kl_weight: float = 1.0
    das_temperature: float = 2.0
    use_das_dist: bool = True
    das_dist: str = "kl"  # "kl" | "mmd"
    das_dist_weight: float = 0.1


@dataclass
class Factors:
    """Homogeneous, heterogeneous and noise parts, each ``[B,M,d]``."""

    homogeneous: Tensor
    heterogeneous: Tensor
    noise: Tensor


class DHF(nn.Module):
    """The factorisation, its decoders and the recovery of missing semantics.

    Per-modality networks are grouped (one weight slice per modality, :class:`GroupedMLP`); the
    homogeneous encoder is a single network applied to every modality.
    """

    def __init__(self, d: int, hidden: int) -> None:
        super().__init__()
        self.homogeneous = mlp(d, d, hidden)  # shared by every modality
        self.heterogeneous = GroupedMLP(N_MODALITIES, d, d, hidden)
        self.noise = GroupedMLP(N_MODALITIES, d, d, hidden)
        self.decoder = GroupedMLP(N_MODALITIES, 3 * d, d, hidden)
        self.recover_heterogeneous = GroupedMLP(N_MODALITIES, d, d, hidden)

    def factorise(self, h: Tensor) -> Factors:
        """``h [B,M,d]`` -> homogeneous, heterogeneous and noise parts."""
        return Factors(self.homogeneous(h), self.heterogeneous(h), self.noise(h))

    def decode(self, factors: Factors) -> Tensor:
        parts = torch.cat([factors.homogeneous, factors.heterogeneous, factors.noise], dim=-1)
        return self.decoder(parts)

    def recover_from(self, shared: Tensor) -> Factors:
        """Factors rebuilt from a homogeneous estimate ``shared [B,M,d]`` (noise 0)."""
        heterogeneous = self.recover_heterogeneous(shared)
        return Factors(shared, heterogeneous, torch.zeros_like(heterogeneous))

    def recover(self, factors: Factors, present: Tensor) -> Factors:
        """Factors of every modality rebuilt from the homogeneous parts of the present ones."""
        shared = masked_mean(factors.homogeneous, present)
        return self.recover_from(shared.unsqueeze(1).expand_as(factors.homogeneous))

    def fill(self, factors: Factors, present: Tensor) -> Factors:
        """Present modalities keep their factors; missing ones get the recovered factors."""
        recovered = self.recover(factors, present)
        keep = present.unsqueeze(-1)
        return Factors(
            keep * factors.homogeneous + (1 - keep) * recovered.homogeneous,
            keep * factors.heterogeneous + (1 - keep) * recovered.heterogeneous,
            keep * factors.noise,
        )


def _masked_mse(pred: Tensor, target: Tensor, mask: Tensor) -> Tensor:
    per_row = ((pred - target) ** 2).mean(-1)
    return (per_row * mask).sum() / mask.sum().clamp_min(1.0)


def _normalised_rows(x: Tensor, mask: Tensor) -> Tensor:
    mean, _ = batch_moments(x, mask)
    x = (x - mean) * mask.unsqueeze(-1)
    return F.normalize(x, dim=-1)


def _standardised(x: Tensor, mask: Tensor) -> Tensor:
    mean, var = batch_moments(x, mask)
    return (x - mean) / var.clamp_min(1e-6).sqrt() * mask.unsqueeze(-1)


def dhf_losses(dhf: DHF, h_clean: Tensor, available: Tensor, cfg: FSRFConfig) -> dict[str, Tensor]:
    """DHF constraints and the recovery supervision on clean projected features (weighted terms)."""
    factors = dhf.factorise(h_clean)
    c, s, n = factors.homogeneous, factors.heterogeneous, factors.noise
    target = h_clean.detach()
    terms: dict[str, Tensor] = {}
    if cfg.use_recon:
        recon = dhf.decode(factors)
        terms["fsrf_recon"] = (
            cfg.recon_weight
            * torch.stack([_masked_mse(recon[:, m], target[:, m], available[:, m]) for m in range(N_MODALITIES)]).mean()
        )
    if cfg.use_orth:
        orth = []
        for m in range(N_MODALITIES):
            mask = available[:, m]
            cn, sn, nn_ = (_normalised_rows(part[:, m], mask) for part in (c, s, n))
            n_rows = mask.sum().clamp_min(1.0)
            for x, y in ((cn, sn), (cn, nn_), (sn, nn_)):
                orth.append(((x.T @ y) / n_rows).pow(2).sum())
        terms["fsrf_orth"] = cfg.orth_weight * torch.stack(orth).mean()
    pairs = [(a, b) for a in range(N_MODALITIES) for b in range(a + 1, N_MODALITIES)]
    if cfg.use_align:
        align = []
        for a, b in pairs:
            both = available[:, a] * available[:, b]
            distance = 1.0 - F.cosine_similarity(c[:, a], c[:, b], dim=-1)
            align.append((distance * both).sum() / both.sum().clamp_min(1.0))
        terms["fsrf_align"] = cfg.align_weight * torch.stack(align).mean()
    if cfg.use_dered:
        dered = []
        for a, b in pairs:
            both = available[:, a] * available[:, b]
            za, zb = _standardised(s[:, a], both), _standardised(s[:, b], both)
            dered.append(((za.T @ zb) / both.sum().clamp_min(1.0)).pow(2).mean())
        terms["fsrf_dered"] = cfg.dered_weight * torch.stack(dered).mean()
    if cfg.use_recovery and cfg.use_recovery_loss:
        # leave-one-out: each available modality is rebuilt from the other available ones
        weight = available.unsqueeze(-1)
        others = (available.sum(1, keepdim=True) - available).unsqueeze(-1)
        shared = ((c * weight).sum(1, keepdim=True) - c * weight) / others.clamp_min(1.0)
        usable = available * (others.squeeze(-1) > 0).float()
        recovered = dhf.recover_from(shared)
        h_hat = dhf.decode(recovered)
        terms["fsrf_recovery"] = (
            cfg.recovery_loss_weight
            * 0.5
            * (_masked_mse(recovered.heterogeneous, s.detach(), usable) + _masked_mse(h_hat, target, usable))
        )
    return terms


def das_losses(logits_a: Tensor, logits_b: Tensor, rep_a: Tensor, rep_b: Tensor, cfg: FSRFConfig) -> dict[str, Tensor]:
    """Distribution-aligned self-distillation between two views (weighted terms)."""
    terms: dict[str, Tensor] = {}
    if cfg.use_das_kl:
        t = cfg.das_temperature
        kl = 0.5 * (temperature_kl(logits_a, logits_b, t) + temperature_kl(logits_b, logits_a, t))
        terms["das_kl"] = cfg.das_kl_weight * kl
    if cfg.use_das_dist:
        if cfg.das_dist == "kl":
            mean_a, var_a = batch_moments(rep_a)
            mean_b, var_b = batch_moments(rep_b)
            dist = 0.5 * (
                diag_gaussian_kl(mean_a, var_a, mean_b, var_b) + diag_gaussian_kl(mean_b, var_b, mean_a, var_a)
            )
        else:
            dist = rbf_mmd(rep_a, rep_b)
        terms["das_dist"] = cfg.das_dist_weight * dist
    return terms


class FSRF(nn.Module):
    """Projectors, DHF factorisation with recovery, and a classifier on the homo/heterogeneous parts."""

    def __init__(self, cfg: FSRFConfig | None = None) -> None:
        super().__init__()
        self.cfg = cfg = cfg or FSRFConfig()
        self.projectors = modality_projectors(cfg.d, cfg.dropout)
        self.dhf = DHF(cfg.d, cfg.hidden)
        self.classifier = Classifier(N_MODALITIES * 2 * cfg.d, cfg.hidden, cfg.dropout)

    def represent(self, view: View) -> tuple[Tensor, Tensor]:
        """-> (logits ``[B,C]``, fused representation ``[B, M*2d]``)."""
        present = view.present
        factors = self.dhf.factorise(project_all(self.projectors, view))
        if self.cfg.use_recovery:
            factors = self.dhf.fill(factors, present)
            keep = torch.ones_like(present).unsqueeze(-1)
        else:
            keep = present.unsqueeze(-1)
        rep = (torch.cat([factors.homogeneous, factors.heterogeneous], dim=-1) * keep).flatten(1)
        return self.classifier(rep), rep

    def forward(self, text: Tensor, image: Tensor, transcript: Tensor, present: Tensor) -> Tensor:
        return self.represent(View(text, image, transcript, present))[0]

    def compute_loss(self, batch: TrainBatch) -> LossOutput:
        """CE on both views + DAS between them + DHF constraints on the clean view."""
        logits, rep = self.represent(View.stack([batch.view, batch.view_b]))
        (logits_a, logits_b), (rep_a, rep_b) = logits.chunk(2), rep.chunk(2)
        terms = {"ce": F.cross_entropy(logits, batch.label.repeat(2))}
        terms |= das_losses(logits_a, logits_b, rep_a, rep_b, self.cfg)
        h_clean = project_all(self.projectors, batch.clean)
        terms |= dhf_losses(self.dhf, h_clean, batch.clean.present, self.cfg)
        return LossOutput(torch.stack(list(terms.values())).sum(), terms, logits_a)
