"""DRF: distribution-based feature recovery and fusion (Wu et al., ACM MM 2024, arXiv 2511.18751).

The paper's full text was unreachable: the design below is inferred from its summary, not taken from it.

1. **Feature queues.** Per modality a FIFO of the last K projected features of *clean* samples
   approximates the modality's feature distribution by its diagonal moments (mean, variance).
2. **Quality.** A present modality's distance to its queue is a diagonal Mahalanobis distance normalised
   by the dimension, ``D_m = mean_j (h_mj - mu_mj)^2 / var_mj`` (about 1 for a typical feature), and
   its quality is ``q_m = exp(-max(D_m - 1, 0) / tau)`` in (0, 1] (``quality="distance"``, the
   paper's reading). ``quality="learned"`` (this project's extension, docs/robustness/quality.md): ``q_m``
   is a logistic detector ``sigmoid(a_m + w_m . f_m)`` on queue-relative statistics ``f_m`` of ``h_m``
   (the z-scores, their squares and 15 summary statistics), trained with the known content corruption
   of the training views as its target; the fusion reads ``log q_m`` as before.
3. **Quality-aware fusion.** Fusion weights ``w = softmax_m(log q_m + b_m)`` over the available
   modalities (``b_m`` a learned modality prior); the classifier reads ``concat_m(M * w_m * h_m)``.
4. **Recovery.** Inter-modal mapping networks ``g_{s->t}``; a missing modality ``t`` is the mean of
   ``g_{s->t}(h_s)`` over the present ``s``. They are supervised by samples
   (``L_sample = MSE(g_{s->t}(h_s), sg(h_t))`` on clean pairs) and by distributions (``L_dist``: the
   mapped batch against queue ``t``, Gaussian KL or RBF-MMD).

``L = CE + w_sample * L_sample + w_dist * L_dist``. Every part is a config switch.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from models.common import (
    FEATURE_DIMS,
    MODALITIES,
    N_MODALITIES,
    Classifier,
    GroupedMLP,
    LossOutput,
    TrainBatch,
    View,
    batch_moments,
    diag_gaussian_kl,
    masked_mean,
    masked_softmax,
    modality_projectors,
    project_all,
    rbf_mmd,
)
from stream.service.moments import QUEUE_VAR_FLOOR

__all__ = [
    "DRF",
    "DRFConfig",
    "DetectorRows",
    "FeatureQueue",
    "InterModalMapping",
    "QualityEstimator",
    "drf_losses",
    "enqueue_clean",
    "quality_fusion",
    "queue_statistics",
]

QUALITY_MODES = ("distance", "learned")
# a learned detector's raw-encoder-output part: none, all (it alone), or ``auto``: per modality the blend with
# the queue-statistics detector that generalises best to fault kinds left out of the fit (chosen by the refit)
QUALITY_RAW_MODES = ("none", "all", "auto")
N_QUEUE_STATS = 15
Z_CLIP = 8.0


def queue_statistics(h: Tensor, mean: Tensor, var: Tensor) -> Tensor:
    """Inputs of the learned quality: ``h [B,M,d]`` against queue ``mean/var [M,d]`` -> ``[B,M,15+2d]``.

    The 15 summary statistics of ``models/experiments/quality_auroc.py`` (distance, its log and two-sided
    log, mean/max |z|, tail shares, fourth moment, mean/std of z, norms and angles to the queue mean),
    then the clipped z-scores and their squares; all squashed by ``sign(x) log(1 + |x|)`` so a far-off
    input cannot blow the detector up. Element-wise ops and reductions only (plain ONNX).
    """
    tiny = 1e-12
    z = (h - mean) / torch.sqrt(var + 1e-6)
    z2 = z * z
    dist = z2.mean(-1)
    abs_z = z.abs()
    norm_h = torch.sqrt((h * h).sum(-1) + tiny)
    norm_mu = torch.sqrt((mean * mean).sum(-1) + tiny)  # [M]
    dev = h - mean
    norm_dev = torch.sqrt((dev * dev).sum(-1) + tiny)
    log_d = torch.log(dist + tiny)
    stats = torch.stack(
        [
            dist,
            log_d,
            log_d.abs(),
            abs_z.mean(-1),
            abs_z.amax(-1),
            (abs_z > 2.0).float().mean(-1),
            (abs_z < 0.5).float().mean(-1),
            (z2 * z2).mean(-1),
            z.mean(-1),
            z.std(-1, unbiased=False),
            torch.log(norm_h),
            torch.log(norm_h / norm_mu),
            (h * mean).sum(-1) / (norm_h * norm_mu),
            (dev * mean).sum(-1) / (norm_dev * norm_mu),
            torch.log(norm_dev / torch.sqrt(var.sum(-1))),
        ],
        dim=-1,
    )
    zc = z.clamp(-Z_CLIP, Z_CLIP)
    x = torch.cat([stats, zc, zc * zc], dim=-1)
    return torch.sign(x) * torch.log1p(x.abs())


@dataclass
class DRFConfig:
    """DRF hyper-parameters; every ``use_*`` field is an ablation switch."""

    d: int = 64
    hidden: int = 128
    dropout: float = 0.1
    queue_len: int = 1024
    use_quality: bool = True  # off: fusion weights ignore quality (it is still measured and reported)
    quality: str = "distance"  # "distance" (the paper's, exp(-max(D-1,0)/tau)) | "learned" (a fault detector)
    quality_tau: float = 1.0
    quality_loss_weight: float = 1.0  # the learned detector's balanced BCE (it touches nothing else)
    # learned quality: after training, refit the detector on the final (frozen) projected features and the
    # exported queue's moments by logistic regression, its strength chosen on val (``fit_detector``)
    quality_refit: bool = False
    # learned quality: a second detector reads the modality's raw encoder output beside the queue statistics
    # ("none" | "all": it alone | "auto": the refit blends the two per modality, the blend that generalises
    # best to fault kinds left out of the fit)
    quality_raw: str = "none"
    use_modality_prior: bool = True  # learned per-modality bias on the fusion logits
    use_recovery: bool = True  # off: a missing modality is dropped from the fusion (zero weight)
    use_sample_loss: bool = True
    sample_loss_weight: float = 1.0
    use_dist_loss: bool = True
    dist_loss: str = "kl"  # "kl" (diagonal Gaussians) | "mmd" (RBF, against queue samples)
    dist_loss_weight: float = 0.1
    mmd_queue_samples: int = 256


class FeatureQueue(nn.Module):
    """Per-modality FIFO of projected features ``[M,K,d]`` with its diagonal moments.

    Buffers (saved with the state dict): ``features``, ``ptr`` (next write slot), ``count`` (filled slots).
    """

    features: Tensor
    ptr: Tensor
    count: Tensor

    def __init__(self, n_modalities: int, length: int, dim: int) -> None:
        super().__init__()
        self.length = length
        self.register_buffer("features", torch.zeros(n_modalities, length, dim))
        self.register_buffer("ptr", torch.zeros(n_modalities, dtype=torch.long))
        self.register_buffer("count", torch.zeros(n_modalities, dtype=torch.long))

    @torch.no_grad()
    def enqueue(self, modality: int, x: Tensor) -> None:
        """Append rows of ``x [n,d]`` (detached); the oldest rows are evicted once K are held."""
        x = x.detach()[-self.length :]
        n = x.shape[0]
        if n == 0:
            return
        start = int(self.ptr[modality])
        slots = (start + torch.arange(n, device=x.device)) % self.length
        self.features[modality, slots] = x
        self.ptr[modality] = (start + n) % self.length
        self.count[modality] = min(int(self.count[modality]) + n, self.length)

    def snapshot(self, modality: int) -> Tensor:
        """The held features of one modality, oldest first: ``[count,d]``."""
        count = int(self.count[modality])
        if count < self.length:
            return self.features[modality, :count].clone()
        return torch.roll(self.features[modality], -int(self.ptr[modality]), dims=0).clone()

    def moments(self) -> tuple[Tensor, Tensor]:
        """Mean and variance ``[M,d]`` of each queue; (0, 1) for a queue holding fewer than 2 rows."""
        means, variances = [], []
        for m in range(self.features.shape[0]):
            held = self.snapshot(m)
            if held.shape[0] < 2:
                means.append(torch.zeros(self.features.shape[-1], device=held.device))
                variances.append(torch.ones(self.features.shape[-1], device=held.device))
            else:
                means.append(held.mean(0))
                variances.append(held.var(0, unbiased=False).clamp_min(QUEUE_VAR_FLOOR))
        return torch.stack(means), torch.stack(variances)


DETECTOR_STRENGTHS = (0.01, 0.1, 1.0, 10.0)
# quality_raw=auto: the shares of the raw-reading detector in the blended logit the refit chooses among
# (0 = the queue-statistics detector alone, 1 = the one that also reads the raw encoder output alone)
RAW_BLENDS = (0.0, 0.25, 0.5, 0.75, 1.0)
STD_FLOOR = 1e-4  # detector input columns with a smaller spread are treated as constant


def _blend_name(share: float) -> str:
    return "stats" if share == 0 else "raw" if share == 1 else f"blend {share:g}"


@dataclass
class DetectorRows:
    """Rows a learned detector is refitted on: ``h [n,M,d]`` (projected; the modality's column is read),
    ``kind [n]`` (-1 clean, else the index of the content fault), ``raw [n, FEATURE_DIMS[m]]`` or None."""

    h: Tensor
    kind: Tensor
    raw: Tensor | None = None

    @property
    def target(self) -> np.ndarray:
        return (self.kind < 0).double().numpy()

    def weights(self, keep: Any = None) -> Any:
        """Sample weights: each clean row counts once per fault kind present, so both classes weigh alike."""
        kind = self.kind.numpy()
        keep = np.ones(len(kind), dtype=bool) if keep is None else keep
        n_kinds = max(len(set(kind[keep & (kind >= 0)].tolist())), 1)
        return np.where(kind < 0, float(n_kinds), 1.0)[keep]


def _fit_logistic(
    x_fit: Any, fit: DetectorRows, x_val: Any, val: DetectorRows, strengths: tuple[float, ...], keep: Any = None
) -> tuple[float, float, Any, Any]:
    """Standardise, fit a logistic regression per strength, keep the best by val AUROC.
    -> (val AUROC, C, model, scaler)."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import roc_auc_score
    from sklearn.preprocessing import StandardScaler

    x = x_fit if keep is None else x_fit[keep]
    y = fit.target if keep is None else fit.target[keep]
    w = fit.weights(keep)
    scaler = StandardScaler().fit(x, sample_weight=w)
    # a (near-)constant column carries no signal, only float noise: standardising by its ~0 spread would
    # blow that noise up; leave such columns unscaled
    scaler.scale_ = np.where(scaler.scale_ < STD_FLOOR, 1.0, scaler.scale_)
    z, z_val = scaler.transform(x), scaler.transform(x_val)
    best: tuple[float, float, Any, Any] | None = None
    for c in strengths:
        lr = LogisticRegression(C=c, max_iter=3000).fit(z, y, sample_weight=w)
        auroc = float(roc_auc_score(val.target, lr.decision_function(z_val), sample_weight=val.weights()))
        if best is None or auroc > best[0]:
            best = (auroc, c, lr, scaler)
    assert best is not None
    return best


def held_out_kind_auroc(
    inputs: tuple[Any, Any], fit: DetectorRows, val_inputs: tuple[Any, Any], val: DetectorRows,
    strengths: tuple[float, float], blends: tuple[float, ...],
) -> dict[float, dict[int, float]]:
    """Per blend share and fault kind of ``fit``: val AUROC (clean vs that kind) of the blended detector
    fitted without that kind. ``inputs`` / ``val_inputs``: (statistics-only, statistics + raw) matrices;
    ``strengths``: the C of each detector's full fit.

    What the refit of ``quality_raw=auto`` compares: how well a detector carries over to a fault it never
    saw (the papers' masking is never in a fit). Empty with fewer than two kinds."""
    from sklearn.metrics import roc_auc_score

    fk, vk = fit.kind.numpy(), val.kind.numpy()
    kinds = sorted(set(fk[fk >= 0].tolist()))
    out: dict[float, dict[int, float]] = {share: {} for share in blends}
    if len(kinds) < 2:
        return out
    for k in kinds:
        rows = (vk < 0) | (vk == k)
        if not (vk == k).any():
            continue
        scores = []
        for x_fit, x_val, c in zip(inputs, val_inputs, strengths, strict=True):
            _, _, lr, scaler = _fit_logistic(x_fit, fit, x_val, val, (c,), keep=fk != k)
            scores.append(lr.decision_function(scaler.transform(x_val[rows])))
        for share in blends:
            blended = (1 - share) * scores[0] + share * scores[1]
            out[share][int(k)] = round(float(roc_auc_score(val.target[rows], blended)), 4)
    return out


class QualityEstimator(nn.Module):
    """Quality of each modality from its distance to the queue, and the quality-normalised weights."""

    def __init__(self, cfg: DRFConfig, n_modalities: int = N_MODALITIES, d: int | None = None) -> None:
        super().__init__()
        d = cfg.d if d is None else d
        if cfg.quality not in QUALITY_MODES:
            raise ValueError(f"quality must be one of {QUALITY_MODES}, got {cfg.quality!r}")
        if cfg.quality_refit and cfg.quality != "learned":
            raise ValueError("quality_refit=true refits the learned detector: it needs quality=learned")
        if cfg.quality_raw not in QUALITY_RAW_MODES:
            raise ValueError(f"quality_raw must be one of {QUALITY_RAW_MODES}, got {cfg.quality_raw!r}")
        if cfg.quality_raw != "none" and cfg.quality != "learned":
            raise ValueError("quality_raw feeds the learned detector: it needs quality=learned")
        if cfg.quality_raw == "auto" and not cfg.quality_refit:
            raise ValueError("quality_raw=auto is decided by the refit: it needs quality_refit=true")
        self.use_quality = cfg.use_quality
        self.use_prior = cfg.use_modality_prior
        self.mode = cfg.quality
        self.tau = cfg.quality_tau
        self.loss_weight = cfg.quality_loss_weight
        self.prior = nn.Parameter(torch.zeros(n_modalities))
        if self.mode == "learned":
            n_in = n_modalities * (N_QUEUE_STATS + 2 * d)
            self.norm = nn.BatchNorm1d(n_in, affine=False)
            self.weight = nn.Parameter(torch.zeros(n_modalities, N_QUEUE_STATS + 2 * d))
            self.bias = nn.Parameter(torch.full((n_modalities,), 2.0))  # starts out trusting every input
        # the raw encoder output as a second input of each detector (``quality_raw``); a modality whose
        # raw weights are all zero (``auto`` chose against it) ignores it
        self.raw_mode = cfg.quality_raw if self.mode == "learned" else "none"
        self.raw_norm = nn.ModuleList()
        self.raw_weight = nn.ParameterList()
        if self.raw_mode != "none":
            if n_modalities != len(MODALITIES):
                raise ValueError("quality_raw needs one raw input per modality")
            for modality in MODALITIES:
                self.raw_norm.append(nn.BatchNorm1d(FEATURE_DIMS[modality], affine=False))
                self.raw_weight.append(nn.Parameter(torch.zeros(FEATURE_DIMS[modality])))

    def raw_logit(self, raw: Sequence[Tensor] | None, present: Tensor | None = None) -> Tensor | None:
        """The raw inputs' part of the detector logit ``[B,M]`` (None without raw inputs). ``present``: where
        the raw input is the one ``h`` came from; a recovered row has no encoder output, so its part is 0."""
        if not len(self.raw_weight) or raw is None:
            return None
        parts = [norm(x.detach()) @ weight for norm, weight, x in zip(self.raw_norm, self.raw_weight, raw, strict=True)]
        out = torch.stack(parts, dim=-1)
        return out if present is None else out * present

    def detector_logit(
        self,
        h: Tensor,
        mean: Tensor,
        var: Tensor,
        raw: Sequence[Tensor] | None = None,
        present: Tensor | None = None,
    ) -> Tensor:
        """The learned detector's logit ``[B,M]`` that each row of ``h`` is clean (``quality="learned"``).

        ``raw``: per modality the encoder output ``[B, FEATURE_DIMS[m]]`` the row was projected from, read
        only when the detector has raw inputs (``quality_raw``) and only where ``present`` (default: all)."""
        x = queue_statistics(h.detach(), mean, var)
        b, m, f = x.shape
        x = self.norm(x.reshape(b, m * f)).reshape(b, m, f)
        logit = (x * self.weight).sum(-1) + self.bias
        extra = self.raw_logit(raw, present)
        return logit if extra is None else logit + extra

    def forward(
        self,
        h: Tensor,
        available: Tensor,
        mean: Tensor,
        var: Tensor,
        raw: Sequence[Tensor] | None = None,
        present: Tensor | None = None,
    ) -> tuple[Tensor, Tensor]:
        """``h [B,M,d]``, ``available [B,M]``, queue ``mean/var [M,d]`` -> (quality, weights) ``[B,M]``.

        ``raw`` / ``present``: the modalities' encoder outputs and where they exist (see :meth:`detector_logit`;
        a row recovered from the other modalities is judged by its statistics alone)."""
        # Quality is a measurement: the projector must not learn to make bad inputs look typical, and the
        # learned detector is trained by its own target only (the fusion reads it detached).
        if self.mode == "learned":
            log_quality = F.logsigmoid(self.detector_logit(h, mean, var, raw, present)).detach()
        else:
            distance = ((h.detach() - mean) ** 2 / (var + 1e-6)).mean(-1)
            log_quality = -F.relu(distance - 1.0) / self.tau
        prior = self.prior if self.use_prior else torch.zeros_like(self.prior)
        # switched off, quality is still measured and reported, but the fusion ignores it
        used = log_quality if self.use_quality else torch.zeros_like(log_quality)
        weights = masked_softmax(used + prior, available)
        return torch.exp(log_quality), weights

    @torch.no_grad()
    def detector_inputs(self, modality: int, rows: DetectorRows, mean: Tensor, var: Tensor, use_raw: bool) -> Any:
        """The detector's input matrix (float64 numpy) of ``rows`` for one modality, before standardisation."""
        x = queue_statistics(rows.h, mean, var)[:, modality].double().numpy()
        if use_raw:
            if rows.raw is None:
                raise ValueError("use_raw needs the rows' raw encoder outputs")
            x = np.concatenate([x, rows.raw.double().numpy()], axis=1)
        return x

    @torch.no_grad()
    def fit_detector(
        self,
        modality: int,
        fit: DetectorRows,
        val: DetectorRows,
        mean: Tensor,
        var: Tensor,
        strengths: tuple[float, ...] = DETECTOR_STRENGTHS,
        use_raw: bool | float | None = None,
    ) -> dict[str, Any]:
        """Refit one modality's detector by logistic regression (clean = 1) on frozen projected features.

        ``fit`` / ``val``: rows whose column ``modality`` is the input (:class:`DetectorRows`). Clean rows
        weigh as much as all the corrupted kinds together (as if repeated once per kind). Two detectors are
        fitted, one on the queue statistics alone and, with raw inputs, one on the statistics and the raw
        encoder output; the served logit is the blend ``(1 - share) * stats + share * raw`` — linear in the
        same inputs, so standardisation goes into the batch-norm statistics and the blended coefficients into
        ``weight`` / ``bias`` / ``raw_weight``: the ONNX graph is unchanged. Each detector's strength ``C`` is
        chosen by its val AUROC.

        ``use_raw``: the raw detector's ``share`` — ``False``/0: statistics only; ``True``/1: the raw
        detector alone; ``None``: as ``quality_raw`` says (none 0, all 1), and for ``auto`` the share of
        :data:`RAW_BLENDS` whose worst held-out-kind val AUROC is best (:func:`held_out_kind_auroc`; ties go to
        the smaller share). -> ``{"C", "val_auroc", "fit_rows", "raw", "raw_share", ...}``.
        """
        from sklearn.metrics import roc_auc_score

        if self.mode != "learned":
            raise ValueError("only a learned quality has a detector to fit")
        has_raw = bool(len(self.raw_weight))
        n_stats = self.weight.shape[1]
        auto = use_raw is None and self.raw_mode == "auto"
        share = float(use_raw) if use_raw is not None else 1.0 if self.raw_mode == "all" else 0.0
        if (share > 0 or auto) and not has_raw:
            raise ValueError("this detector has no raw inputs (quality_raw=none)")
        x_fit = [self.detector_inputs(modality, fit, mean, var, False)]
        x_val = [self.detector_inputs(modality, val, mean, var, False)]
        fits = [_fit_logistic(x_fit[0], fit, x_val[0], val, strengths)]
        if share > 0 or auto:
            x_fit.append(self.detector_inputs(modality, fit, mean, var, True))
            x_val.append(self.detector_inputs(modality, val, mean, var, True))
            fits.append(_fit_logistic(x_fit[1], fit, x_val[1], val, strengths))
        choice: dict[str, Any] = {}
        if auto:
            held = held_out_kind_auroc(
                (x_fit[0], x_fit[1]), fit, (x_val[0], x_val[1]), val, (fits[0][1], fits[1][1]), RAW_BLENDS
            )
            worst = {k: min(v.values()) if v else 0.0 for k, v in held.items()}
            share = max(RAW_BLENDS, key=lambda k: (worst[k], -k))
            choice = {"held_out_val_auroc": {_blend_name(k): v for k, v in held.items()}}
        scores = [lr.decision_function(scaler.transform(x)) for (_, _, lr, scaler), x in zip(fits, x_val, strict=False)]
        blended = (1 - share) * scores[0] + (share * scores[1] if share > 0 else 0.0)
        auroc = float(roc_auc_score(val.target, blended, sample_weight=val.weights()))
        # the blend of two linear detectors on standardised inputs is one linear detector: the statistics'
        # standardisation is the same in both fits (same columns, same rows), the raw block only in the second
        _, c_stats, lr_stats, scaler_stats = fits[0]
        coef = (1 - share) * torch.as_tensor(lr_stats.coef_[0], dtype=torch.float64)
        bias = (1 - share) * float(lr_stats.intercept_[0])
        raw_coef = None
        if share > 0:
            _, _, lr_raw, scaler_raw = fits[1]
            if not np.allclose(scaler_raw.mean_[:n_stats], scaler_stats.mean_) or not np.allclose(
                scaler_raw.scale_[:n_stats], scaler_stats.scale_
            ):
                raise AssertionError("the two fits standardised the queue statistics differently")
            coef = coef + share * torch.as_tensor(lr_raw.coef_[0][:n_stats], dtype=torch.float64)
            raw_coef = share * torch.as_tensor(lr_raw.coef_[0][n_stats:], dtype=torch.float64)
            bias += share * float(lr_raw.intercept_[0])
        # batch norm divides by sqrt(var + eps): keep var = std^2 and fold sqrt(std^2 + eps) / std into the
        # weights, so the head computes exactly the fitted logit whatever a column's spread
        block = slice(modality * n_stats, (modality + 1) * n_stats)
        assert self.norm.running_mean is not None and self.norm.running_var is not None
        std = torch.as_tensor(scaler_stats.scale_, dtype=torch.float64)
        self.norm.running_mean[block] = torch.as_tensor(scaler_stats.mean_, dtype=torch.float32)
        self.norm.running_var[block] = (std**2).float()
        self.weight[modality] = (coef * torch.sqrt(std**2 + self.norm.eps) / std).float()
        self.bias[modality] = bias
        if has_raw:
            norm: Any = self.raw_norm[modality]
            if raw_coef is not None:
                raw_std = torch.as_tensor(fits[1][3].scale_[n_stats:], dtype=torch.float64)
                norm.running_mean.copy_(torch.as_tensor(fits[1][3].mean_[n_stats:], dtype=torch.float32))
                norm.running_var.copy_((raw_std**2).float())
                self.raw_weight[modality].copy_((raw_coef * torch.sqrt(raw_std**2 + norm.eps) / raw_std).float())
            else:
                norm.running_mean.zero_()
                norm.running_var.fill_(1.0)
                self.raw_weight[modality].zero_()
        return {
            "C": c_stats,
            "C_raw": fits[1][1] if len(fits) > 1 else None,
            "val_auroc": round(auroc, 4),
            "fit_rows": len(fit.kind),
            "raw": share > 0,
            "raw_share": share,
            **choice,
        }

    def loss(
        self, h: Tensor, mean: Tensor, var: Tensor, target: Tensor | None, raw: Sequence[Tensor] | None = None
    ) -> dict[str, Tensor]:
        """The learned detector's class-balanced BCE against ``target [B,M]`` (NaN: no target); {} otherwise."""
        if self.mode != "learned" or target is None:
            return {}
        # raw inputs are trained jointly only with quality_raw=all; with auto the refit alone decides them
        logit = self.detector_logit(h, mean, var, raw if self.raw_mode == "all" else None)
        known = ~torch.isnan(target)
        bce = F.binary_cross_entropy_with_logits(logit, torch.nan_to_num(target, 0.0), reduction="none")
        parts = [bce[known & (target == cls)].mean() for cls in (1.0, 0.0) if bool((known & (target == cls)).any())]
        if not parts:
            return {}
        return {"quality": self.loss_weight * torch.stack(parts).mean()}


class InterModalMapping(nn.Module):
    """Mapping networks ``g_{s->t}`` for every ordered pair of modalities (grouped, one per pair)."""

    sources: Tensor
    targets: Tensor

    def __init__(self, d: int, hidden: int) -> None:
        super().__init__()
        # ordered by target, so pairs [2t, 2t+1] are the two sources of target t
        self.pairs = [(s, t) for t in range(N_MODALITIES) for s in range(N_MODALITIES) if s != t]
        self.register_buffer("sources", torch.tensor([s for s, _ in self.pairs]), persistent=False)
        self.register_buffer("targets", torch.tensor([t for _, t in self.pairs]), persistent=False)
        self.maps = GroupedMLP(len(self.pairs), d, d, hidden)

    def map_pairs(self, h: Tensor) -> Tensor:
        """``g_{s->t}(h_s)`` for every pair: ``[B,P,d]`` in ``self.pairs`` order."""
        return self.maps(h[:, self.sources])

    def forward(self, h: Tensor, present: Tensor) -> Tensor:
        """Recovered features ``[B,M,d]``: for each target, the mean mapping from the present sources."""
        b, _, d = h.shape
        mapped = self.map_pairs(h).reshape(b * N_MODALITIES, N_MODALITIES - 1, d)
        mask = present[:, self.sources].reshape(b * N_MODALITIES, N_MODALITIES - 1)
        return masked_mean(mapped, mask).reshape(b, N_MODALITIES, d)


def quality_fusion(
    quality: QualityEstimator,
    h: Tensor,
    present: Tensor,
    recover: Callable[[Tensor, Tensor], Tensor] | None,
    queue_mean: Tensor,
    queue_var: Tensor,
    raw: Sequence[Tensor] | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """Fill, weigh and fuse projected features ``h [B,M,d]``: the DRF fusion the DRF head and the serving head share.

    ``raw``: the encoder outputs ``h`` was projected from (a learned quality with raw inputs reads them).

    With ``recover`` (a missing modality's features from the present ones, ``(h, present) -> [B,M,d]``)
    missing rows are filled and every modality takes part in the fusion; without it a missing modality
    gets zero weight. -> (fused ``[B,M*d]``, quality ``[B,M]`` (0 for a missing modality), filled ``h``).
    """
    if recover is not None:
        keep = present.unsqueeze(-1)
        h = keep * h + (1.0 - keep) * recover(h, present)
        available = torch.ones_like(present)
    else:
        available = present
    measured, weights = quality(h, available, queue_mean, queue_var, raw, present)
    fused = (N_MODALITIES * weights.unsqueeze(-1) * h).flatten(1)
    return fused, measured * present, h


def drf_losses(
    mapping: InterModalMapping, h_clean: Tensor, available: Tensor, queue: FeatureQueue, cfg: DRFConfig
) -> dict[str, Tensor]:
    """DRF's recovery supervision on clean projected features ``h_clean [B,M,d]`` (weighted terms)."""
    terms: dict[str, Tensor] = {}
    if not cfg.use_recovery:
        return terms
    mapped = mapping.map_pairs(h_clean)  # [B,P,d]
    source = available[:, mapping.sources]  # [B,P]
    pair = source * available[:, mapping.targets]
    if cfg.use_sample_loss:
        per_row = ((mapped - h_clean[:, mapping.targets].detach()) ** 2).mean(-1)
        sample = (per_row * pair).sum(0) / pair.sum(0).clamp_min(1.0)
        terms["drf_sample"] = cfg.sample_loss_weight * sample.mean()
    # The distribution target means nothing until the queue holds a few batches.
    if cfg.use_dist_loss and int(queue.count.min()) >= min(queue.length, 128):
        queue_mean, queue_var = queue.moments()
        dist = []
        for p, (_, t) in enumerate(mapping.pairs):
            if cfg.dist_loss == "kl":
                mean, var = batch_moments(mapped[:, p], source[:, p])
                dist.append(diag_gaussian_kl(mean, var, queue_mean[t], queue_var[t]))
            else:
                held = queue.snapshot(t)
                pick = torch.randperm(held.shape[0], device=held.device)[: cfg.mmd_queue_samples]
                rows = torch.nonzero(source[:, p] > 0).squeeze(-1)[: cfg.mmd_queue_samples]
                dist.append(rbf_mmd(mapped[rows, p], held[pick]))
        terms["drf_dist"] = cfg.dist_loss_weight * torch.stack(dist).mean()
    return terms


def enqueue_clean(queue: FeatureQueue, h_clean: Tensor, available: Tensor) -> None:
    """Push every available modality's clean projected feature into its queue."""
    for m in range(N_MODALITIES):
        queue.enqueue(m, h_clean[:, m][available[:, m] > 0])


class DRF(nn.Module):
    """Projectors, feature queues, quality-aware fusion and inter-modal recovery."""

    def __init__(self, cfg: DRFConfig | None = None) -> None:
        super().__init__()
        self.cfg = cfg = cfg or DRFConfig()
        self.projectors = modality_projectors(cfg.d, cfg.dropout)
        self.queue = FeatureQueue(N_MODALITIES, cfg.queue_len, cfg.d)
        self.quality = QualityEstimator(cfg)
        self.mapping = InterModalMapping(cfg.d, cfg.hidden)
        self.classifier = Classifier(N_MODALITIES * cfg.d, cfg.hidden, cfg.dropout)

    def fuse(self, view: View, queue_mean: Tensor, queue_var: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """-> (logits ``[B,C]``, quality ``[B,M]``, filled projected features ``[B,M,d]``)."""
        recover = self.mapping if self.cfg.use_recovery else None
        fused, quality, h = quality_fusion(
            self.quality, project_all(self.projectors, view), view.present, recover, queue_mean, queue_var,
            view.features,
        )
        return self.classifier(fused), quality, h

    def forward(self, text: Tensor, image: Tensor, transcript: Tensor, present: Tensor) -> Tensor:
        queue_mean, queue_var = self.queue.moments()
        return self.fuse(View(text, image, transcript, present), queue_mean, queue_var)[0]

    def compute_loss(self, batch: TrainBatch) -> LossOutput:
        """CE on the disrupted view + sample/distribution recovery losses; then enqueue clean features."""
        queue_mean, queue_var = self.queue.moments()
        logits, _, h = self.fuse(batch.view, queue_mean, queue_var)
        terms = {"ce": F.cross_entropy(logits, batch.label)}
        terms |= self.quality.loss(h, queue_mean, queue_var, batch.quality_target, batch.view.features)
        h_clean = project_all(self.projectors, batch.clean)
        terms |= drf_losses(self.mapping, h_clean, batch.clean.present, self.queue, self.cfg)
        if self.training:
            enqueue_clean(self.queue, h_clean, batch.clean.present)
        return LossOutput(torch.stack(list(terms.values())).sum(), terms, logits)
