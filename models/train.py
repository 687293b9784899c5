"""``sentiment-stream train``: train one head on cached features, with training-time disruptions.

    sentiment-stream train --model {serving,drf,fsrf,text_only,late_zero,early_dropout} --seed S
        --epochs E --out DIR [--data-dir D] [--split random|topic|control] [--recovery fsrf|drf]
        [--ablate PART ...] [--set KEY=VALUE ...] [--train-corruption auto|real|noise] [--p-noise P]

Writes the trained model dir (``docs/architecture.md``): ``config.json``, ``head.pt``, ``queue.npz``
(one ``[K,d]`` float32 array per modality: projected features of clean, complete, confident training
posts) and ``metrics.json``.

**Training disruptions.** Each training view disrupts a random ``ratio`` of the samples: one random
available modality (a second one with probability ``p_second``) is *discarded* (presence mask) with
probability ``p_discard``, else *corrupted*. What "corrupted" means is ``--train-corruption``:

* ``real`` / ``auto`` (default): when the cache holds real corrupted variants of the train split
  (``data features --corrupt-splits train,val,... --corrupt-kinds ...``), a corrupted modality is
  replaced by that post's encoded, content-corrupted feature of a kind drawn uniformly per sample
  among the cached ones (``corrupt_text``, ``corrupt_text_typos``, ...). With ``p_noise`` > 0 that
  share of corrupted cells gets feature noise instead (extra augmentation). A modality without cached
  variants falls back to feature noise; ``real`` refuses to train when the train split has none.
* ``noise``: feature-level noise ``x' = (1-a) x + a (mu + sd * eps)`` with ``a ~ U(0.4, 0.8)`` (the
  40–80 % content-masking range) and the training set's per-dimension mean and std (the only option
  before train and val variants existed).

The validation "disrupted" score uses the val split's real variants the same way when present. Every
head sees the same views, so the comparison stays fair; evaluation always uses the real test variants.

**Model selection.** Early stopping on the validation score: the mean of the macro-F1 on clean
validation posts and on validation posts disrupted as in training (fixed seed). The test split is
never read here.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

import numpy as np
import torch
from torch import Tensor, nn

from models.baselines import BaselineConfig, EarlyFusionDropout, LateFusionZeroFill, TextOnly
from models.common import (
    FEATURE_DIMS,
    LABELS,
    MODALITIES,
    N_MODALITIES,
    TrainBatch,
    View,
    config_from_dict,
    project_all,
    seed_everything,
    set_config_value,
)
from models.drf import DRF, DetectorRows, DRFConfig, QualityEstimator
from models.fsrf import FSRF, FSRFConfig
from models.head import ServingHead, ServingHeadConfig
from stream.service.settings import get_settings
from stream.tools.classification import classification_metrics

__all__ = [
    "MODELS",
    "SPLITS",
    "FeatureTable",
    "TrainDisruption",
    "TrainResult",
    "add_arguments",
    "attach_corrupted",
    "build_model",
    "load_model_dir",
    "load_table",
    "predict_proba",
    "run",
    "synthetic_table",
    "train_model",
]

log = logging.getLogger(__name__)

# name -> (config class, model class)
MODELS: Final[dict[str, tuple[type[Any], type[nn.Module]]]] = {
    "serving": (ServingHeadConfig, ServingHead),
    "drf": (DRFConfig, DRF),
    "fsrf": (FSRFConfig, FSRF),
    "text_only": (BaselineConfig, TextOnly),
    "late_zero": (BaselineConfig, LateFusionZeroFill),
    "early_dropout": (BaselineConfig, EarlyFusionDropout),
}
# --split -> (train, validation, test) feature-cache split names (docs/data.md)
SPLITS: Final = {
    "random": ("train", "val", "test"),
    "topic": ("topic_train", "topic_val", "topic_test"),
    "control": ("control_train", "control_val", "control_test"),
}
# --ablate NAME -> config field switched off, per model family
DRF_PARTS: Final = ("quality", "modality_prior", "recovery", "sample_loss", "dist_loss")
FSRF_PARTS: Final = ("recovery", "recon", "orth", "align", "dered", "recovery_loss", "das_kl", "das_dist")
# queue.npz keeps clean, complete posts predicted with at least this probability. config.json records it,
# the export copies it into the manifest, and serving enqueues by the same cut-off unless told otherwise.
ENQUEUE_MIN_CONFIDENCE: Final = 0.8


# -- data --------------------------------------------------------------------------------------


@dataclass
class FeatureTable:
    """Cached features of one split (and variant) as arrays, rows aligned with ``ids``."""

    ids: np.ndarray
    features: tuple[np.ndarray, np.ndarray, np.ndarray]  # text, image, transcript; zeros where absent
    available: np.ndarray  # float32 [N,3]: the modality exists in the data
    label: np.ndarray  # int64 [N]
    meta: dict[str, Any]
    # modality -> float32 [K, N, d]: the rows under K cached content faults (``attach_corrupted``)
    corrupted: dict[str, np.ndarray] = field(default_factory=dict)
    corrupted_variants: dict[str, list[str]] = field(default_factory=dict)  # modality -> the K variant names

    def __len__(self) -> int:
        return len(self.label)

    def rows(self, index: np.ndarray) -> FeatureTable:
        return FeatureTable(
            self.ids[index],
            tuple(x[index] for x in self.features),
            self.available[index],
            self.label[index],
            self.meta,
            {m: bank[:, index] for m, bank in self.corrupted.items()},
            dict(self.corrupted_variants),
        )

    def corrupted_variants_flat(self) -> list[str]:
        """Every cached corrupted variant's name, all modalities."""
        return [name for names in self.corrupted_variants.values() for name in names]

    def corrupted_bank(self, index: np.ndarray | Tensor | None = None) -> list[Tensor | None]:
        """Per modality (MODALITIES order) the ``[K, B, d]`` corrupted rows of ``index`` (all rows if None)."""
        out: list[Tensor | None] = []
        for m in MODALITIES:
            bank = self.corrupted.get(m)
            if bank is None:
                out.append(None)
            else:
                rows = bank if index is None else bank[:, np.asarray(index)]
                out.append(torch.from_numpy(np.ascontiguousarray(rows)))
        return out


def load_table(data_dir: Path, split: str, variant: str = "clean") -> FeatureTable:
    """Read one split of the feature cache through ``models.features.load_features``."""
    from models.features import load_features

    fs = load_features(data_dir, split, variant)
    n = len(fs.label)
    has = [np.ones(n, dtype=bool)]
    for name in ("has_image", "has_transcript"):
        has.append(np.asarray(getattr(fs, name, np.ones(n, dtype=bool)), dtype=bool))
    available = np.stack(has, axis=1).astype(np.float32)
    features = tuple(
        np.asarray(x, dtype=np.float32) * available[:, i : i + 1]
        for i, x in enumerate((fs.text, fs.image, fs.transcript))
    )
    # per-post arrays stay out: meta is copied into config.json
    meta = {k: v for k, v in (getattr(fs, "meta", {}) or {}).items() if isinstance(v, str | int | float | bool | None)}
    return FeatureTable(np.asarray(fs.ids), features, available, np.asarray(fs.label, dtype=np.int64), meta)  # type: ignore[arg-type]


def attach_corrupted(table: FeatureTable, data_dir: Path, split: str) -> FeatureTable:
    """``table`` with every cached ``corrupt_*`` variant of ``split`` that covers all its rows attached.

    Rows are aligned by post id; a variant missing some post is skipped with a warning. Returns the table
    unchanged when the split has no variants (the training disruption then falls back to feature noise).
    """
    from models.features import built_corrupt_variants

    position = {str(i): n for n, i in enumerate(table.ids)}
    banks: dict[str, np.ndarray] = {}
    names: dict[str, list[str]] = {}
    for m, variants in built_corrupt_variants(data_dir, split).items():
        i = MODALITIES.index(m)
        rows: list[np.ndarray] = []
        for variant in variants:
            v = load_table(data_dir, split, variant)
            where = np.array([position.get(str(pid), -1) for pid in v.ids])
            if len(where) != len(table) or (where < 0).any() or len(set(where.tolist())) != len(table):
                log.warning("%s/%s does not cover the split's %d posts: not used for training", split, variant,
                            len(table))
                continue
            x = np.empty_like(table.features[i])
            x[where] = v.features[i]
            rows.append(x * table.available[:, i : i + 1])
            names.setdefault(m, []).append(variant)
        if rows:
            banks[m] = np.stack(rows)
    return dataclasses.replace(table, corrupted=banks, corrupted_variants=names)


def synthetic_table(n: int, seed: int, signal: Sequence[float] = (1.5, 0.8, 0.8)) -> FeatureTable:
    """Label-dependent Gaussian features (for tests and smoke runs): class mean times ``signal[m]``."""
    rng = np.random.default_rng([seed, 7])
    centres = np.random.default_rng(1234)  # the same class means for every split
    label = rng.integers(0, len(LABELS), size=n).astype(np.int64)
    features = []
    for m, strength in zip(MODALITIES, signal, strict=True):
        means = centres.normal(size=(len(LABELS), FEATURE_DIMS[m])).astype(np.float32)
        noise = rng.normal(size=(n, FEATURE_DIMS[m])).astype(np.float32)
        features.append((strength * means[label] / np.sqrt(FEATURE_DIMS[m]) * 8 + noise).astype(np.float32))
    ids = np.array([f"syn-{seed}-{i}" for i in range(n)])
    available = np.ones((n, N_MODALITIES), dtype=np.float32)
    return FeatureTable(ids, (features[0], features[1], features[2]), available, label, {"synthetic": True})


# -- training disruptions ----------------------------------------------------------------------


CORRUPTION_SOURCES: Final = ("auto", "real", "noise")


@dataclass
class TrainDisruption:
    """How training views are disrupted (see the module docstring).

    ``corruption``: ``auto`` / ``real`` use the real corrupted rows passed to :func:`disrupt` where a
    modality has them (``real`` additionally requires them when loading), ``noise`` always uses feature
    noise. ``p_noise``: share of really-corrupted cells that get feature noise instead.
    """

    ratio: float = 0.5
    p_discard: float = 0.5
    p_second: float = 0.25
    noise_low: float = 0.4
    noise_high: float = 0.8
    corruption: str = "auto"
    p_noise: float = 0.0
    # the cached content faults training views draw from (``--corrupt-kinds`` syntax; the papers' masking
    # is always in); "" = every cached kind. The learned quality's refit still sees every cached kind.
    kinds: str = ""

    def __post_init__(self) -> None:
        if self.corruption not in CORRUPTION_SOURCES:
            raise ValueError(f"corruption must be one of {CORRUPTION_SOURCES}, got {self.corruption!r}")
        if self.kinds:
            from models.features import parse_corrupt_kinds

            parse_corrupt_kinds(self.kinds)  # an unknown kind is an error here, not after loading
        if not 0.0 <= self.p_noise <= 1.0:
            raise ValueError(f"p_noise must be in [0, 1], got {self.p_noise}")


@dataclass
class FeatureStats:
    mean: tuple[Tensor, Tensor, Tensor]
    std: tuple[Tensor, Tensor, Tensor]

    @classmethod
    def of(cls, table: FeatureTable) -> FeatureStats:
        means, stds = [], []
        for i, x in enumerate(table.features):
            rows = x[table.available[:, i] > 0]
            means.append(torch.from_numpy(rows.mean(0)))
            stds.append(torch.from_numpy(rows.std(0) + 1e-6))
        return cls(tuple(means), tuple(stds))  # type: ignore[arg-type]


def disrupt(
    features: Sequence[Tensor],
    available: Tensor,
    cfg: TrainDisruption,
    stats: FeatureStats,
    gen: torch.Generator,
    corrupted: Sequence[Tensor | None] | None = None,
) -> View:
    """One disrupted view of a batch; at least one modality of every sample stays present.

    ``corrupted``: per modality ``None`` or ``[K, B, d]``, the batch's rows under K real content faults.
    Unless ``cfg.corruption`` is ``noise``, a corrupted cell of such a modality takes the row of a kind
    drawn uniformly per sample; other modalities get feature noise. The noise draws happen either way,
    so ``noise`` mode reproduces the views of a run without real variants exactly.
    """
    return disrupt_with_target(features, available, cfg, stats, gen, corrupted)[0]


def disrupt_with_target(
    features: Sequence[Tensor],
    available: Tensor,
    cfg: TrainDisruption,
    stats: FeatureStats,
    gen: torch.Generator,
    corrupted: Sequence[Tensor | None] | None = None,
    target_kinds: Sequence[Tensor | None] | None = None,
) -> tuple[View, Tensor]:
    """:func:`disrupt` (the same draws, the same view) and the learned quality's target ``[B,M]``.

    The target is 1 for a present, untouched cell, 0 for a cell replaced by a real content fault whose
    kind ``target_kinds[m][k]`` marks as fitted on, NaN otherwise (missing, feature noise, held-out kind:
    the papers' ``[MASK]`` kinds are held out, so the detector never learns the marker).
    """
    b = available.shape[0]

    def pick(mask: Tensor) -> Tensor:
        scores = torch.rand(b, N_MODALITIES, generator=gen) * mask
        return nn.functional.one_hot(scores.argmax(-1), N_MODALITIES).float() * mask

    hit = (torch.rand(b, 1, generator=gen) < cfg.ratio).float()
    first = pick(available) * hit
    second = pick(available - first) * (torch.rand(b, 1, generator=gen) < cfg.p_second).float() * hit
    disrupted = (first + second).clamp(max=1.0)
    discard = disrupted * (torch.rand(b, N_MODALITIES, generator=gen) < cfg.p_discard).float()
    present = available * (1 - discard)
    nothing_left = (present.sum(-1, keepdim=True) == 0).float()
    present = present + nothing_left * first  # that modality is corrupted instead of discarded
    corrupt = disrupted * present
    target = torch.where((present > 0) & (corrupt == 0), 1.0, float("nan"))
    out = []
    for i, x in enumerate(features):
        a = torch.empty(b, 1).uniform_(cfg.noise_low, cfg.noise_high, generator=gen)
        eps = torch.randn(x.shape, generator=gen)
        noisy = (1 - a) * x + a * (stats.mean[i] + stats.std[i] * eps)
        bank = corrupted[i] if corrupted is not None and cfg.corruption != "noise" else None
        if bank is not None:
            if bank.shape[1:] != x.shape:
                raise ValueError(f"corrupted rows {tuple(bank.shape)} do not match the batch {tuple(x.shape)}")
            kind = torch.randint(bank.shape[0], (b,), generator=gen)
            real = bank[kind, torch.arange(b)]
            fitted = torch.ones(b, dtype=torch.bool)
            if target_kinds is not None and target_kinds[i] is not None:
                fitted = target_kinds[i][kind]  # type: ignore[index]
            if cfg.p_noise > 0:
                use_noise = (torch.rand(b, 1, generator=gen) < cfg.p_noise).float()
                real = use_noise * noisy + (1 - use_noise) * real
                fitted = fitted & (use_noise[:, 0] == 0)
            noisy = real
            target[:, i] = torch.where((corrupt[:, i] > 0) & fitted, 0.0, target[:, i])
        c = corrupt[:, i : i + 1]
        out.append((c * noisy + (1 - c) * x) * present[:, i : i + 1])
    return View(out[0], out[1], out[2], present), target


def asked_variants(kinds: str, masking: bool = True) -> list[str]:
    """The ``corrupt_*`` variant names of ``kinds`` (``--corrupt-kinds`` syntax: the papers' masking is always
    in; ``masking=False`` leaves it out, keeping only the kinds actually named)."""
    from models.disruptions import corrupt_variant
    from models.features import parse_corrupt_kinds

    return [
        corrupt_variant(m, k) for m, ks in parse_corrupt_kinds(kinds).items() for k in ks if masking or k != "mask"
    ]


def restrict_kinds(table: FeatureTable, kinds: str) -> FeatureTable:
    """``table`` with only the corrupted variants of ``kinds`` (``--corrupt-kinds`` syntax; "" = all)."""
    if not kinds or not table.corrupted:
        return table
    allowed = set(asked_variants(kinds))
    banks: dict[str, np.ndarray] = {}
    names: dict[str, list[str]] = {}
    for m, variants in table.corrupted_variants.items():
        keep = [i for i, name in enumerate(variants) if name in allowed]
        if keep:
            banks[m] = table.corrupted[m][keep] if len(keep) < len(variants) else table.corrupted[m]
            names[m] = [variants[i] for i in keep]
    return dataclasses.replace(table, corrupted=banks, corrupted_variants=names)


def quality_target_kinds(table: FeatureTable) -> list[Tensor | None]:
    """Per modality, which cached corrupted variants the learned quality is fitted on: every realistic
    kind, never the papers' masking (``corrupt_<m>``), whose literal ``[MASK]`` no real post carries."""
    out: list[Tensor | None] = []
    for m in MODALITIES:
        names = table.corrupted_variants.get(m)
        out.append(None if not names else torch.tensor([n != f"corrupt_{m}" for n in names]))
    return out


# -- models ------------------------------------------------------------------------------------


def build_model(name: str, config: Any = None) -> nn.Module:
    """Instantiate a registered head (``MODELS``) with its config (default config if ``None``)."""
    cfg_cls, model_cls = MODELS[name]
    return model_cls(config if config is not None else cfg_cls())


def default_config(name: str) -> Any:
    return MODELS[name][0]()


def apply_ablation(name: str, config: Any, part: str) -> None:
    """Switch one part off: ``quality`` -> ``use_quality=False`` (``drf.``/``fsrf.`` for the serving head)."""
    if name == "serving":
        if part == "recovery":
            config.use_recovery = False
            return
        family = "drf" if part in DRF_PARTS else "fsrf"
        set_config_value(config, f"{family}.use_{part}", "false")
        return
    set_config_value(config, f"use_{part}", "false")


def logits_of(model: nn.Module, view: View) -> Tensor:
    if isinstance(model, ServingHead):
        return model.logits(*view.features, view.present)
    return model(*view.features, view.present)


@torch.no_grad()
def predict_proba(model: nn.Module, view: View, batch_size: int = 4096) -> np.ndarray:
    """Class probabilities ``[N,3]`` for a (possibly disrupted) view, in eval mode."""
    model.eval()
    out = []
    for start in range(0, view.present.shape[0], batch_size):
        part = slice(start, start + batch_size)
        sub = View(view.text[part], view.image[part], view.transcript[part], view.present[part])
        out.append(torch.softmax(logits_of(model, sub), dim=-1))
    return torch.cat(out).numpy()


def table_view(table: FeatureTable) -> View:
    text, image, transcript = (torch.from_numpy(x) for x in table.features)
    return View(text, image, transcript, torch.from_numpy(table.available))


# -- training ----------------------------------------------------------------------------------


@dataclass
class TrainResult:
    model: nn.Module
    metrics: dict[str, Any]
    queue: dict[str, np.ndarray]


def _val_views(val: FeatureTable, disruption: TrainDisruption, stats: FeatureStats) -> tuple[View, View]:
    clean = table_view(val)
    gen = torch.Generator().manual_seed(12345)
    disrupted = disrupt(clean.features, clean.present, disruption, stats, gen, val.corrupted_bank())
    return clean, disrupted


def corruption_sources(disruption: TrainDisruption, train: FeatureTable, val: FeatureTable) -> dict[str, Any]:
    """What the corrupt branch used per modality for training and for the validation score."""
    real = disruption.corruption != "noise"
    return {
        "mode": disruption.corruption,
        "p_noise": disruption.p_noise,
        **{
            part: {m: (table.corrupted_variants.get(m) if real else None) or "feature noise" for m in MODALITIES}
            for part, table in (("train", train), ("val", val))
        },
    }


def load_corrupted(
    disruption: TrainDisruption, train: FeatureTable, val: FeatureTable, data_dir: Path, splits: tuple[str, str]
) -> tuple[FeatureTable, FeatureTable]:
    """Attach the cached corrupted variants of the train and val splits unless the mode is ``noise``."""
    if disruption.corruption == "noise":
        return train, val
    train = attach_corrupted(train, data_dir, splits[0])
    val = attach_corrupted(val, data_dir, splits[1])
    if disruption.corruption == "real" and not train.corrupted:
        raise SystemExit(
            f"--train-corruption real: split {splits[0]!r} has no corrupted variants; build them with "
            f"`sentiment-stream data features --corrupt-splits {splits[0]},{splits[1]},... --corrupt-kinds all`"
        )
    if disruption.kinds:
        for split, table in zip(splits, (train, val), strict=True):
            named = asked_variants(disruption.kinds, masking=False)
            missing = sorted(set(named) - set(table.corrupted_variants_flat()))
            if missing:
                raise SystemExit(
                    f"--train-corruption-kinds: split {split!r} has no cached {', '.join(missing)}; build them with "
                    f"`sentiment-stream data features --corrupt-splits {splits[0]},{splits[1]},... --corrupt-kinds "
                    f"{disruption.kinds}`"
                )
    for part, table in (("train", train), ("val", val)):
        log.info("%s corruption: %s", part,
                 {m: table.corrupted_variants.get(m, "feature noise") for m in MODALITIES})
    return train, val


def evaluate_views(model: nn.Module, views: Sequence[View], label: np.ndarray) -> list[dict[str, float]]:
    return [classification_metrics(label, predict_proba(model, v).argmax(-1)) for v in views]


def train_model(
    name: str,
    config: Any,
    train: FeatureTable,
    val: FeatureTable,
    *,
    seed: int = 0,
    epochs: int = 30,
    batch_size: int = 256,
    lr: float = 1e-3,
    weight_decay: float = 1e-4,
    patience: int = 5,
    disruption: TrainDisruption | None = None,
    progress: bool = True,
    on_epoch: Callable[[int, dict[str, float]], None] | None = None,
) -> TrainResult:
    """Train one head with early stopping on the validation score; returns the best weights."""
    seed_everything(seed)
    disruption = disruption or TrainDisruption()
    model = build_model(name, config)
    stats = FeatureStats.of(train)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    gen = torch.Generator().manual_seed(seed)
    data = table_view(train)
    label = torch.from_numpy(train.label)
    # training views draw from the kinds asked for; the quality refit (below) sees every cached kind
    full_train, full_val = train, val
    train, val = restrict_kinds(train, disruption.kinds), restrict_kinds(val, disruption.kinds)
    if disruption.kinds:
        log.info("training views draw from %s", {m: train.corrupted_variants.get(m) for m in MODALITIES})
    kinds = quality_target_kinds(train)
    if _quality_of(model) is not None and not any(k is not None and bool(k.any()) for k in kinds):
        log.warning("quality=learned but the train split has no cached realistic faults: the detector sees no "
                    "corrupted example and will rate every input clean (build them with `sentiment-stream data "
                    "features --corrupt-splits train,val --corrupt-kinds all`; --train-corruption real)")
    val_views = _val_views(val, disruption, stats)
    best_score, best_state, best_epoch, bad = -1.0, None, 0, 0
    history: list[dict[str, float]] = []
    started = time.perf_counter()
    bar = _progress(progress, epochs, name)
    for epoch in range(1, epochs + 1):
        model.train()
        order = torch.randperm(len(train), generator=gen)
        sums: dict[str, float] = {}
        n_batches = 0
        for start in range(0, len(order), batch_size):
            idx = order[start : start + batch_size]
            if len(idx) < 2:
                continue
            feats = [x[idx] for x in data.features]
            available = data.present[idx]
            bank = train.corrupted_bank(idx.numpy()) if train.corrupted else None
            view, target = disrupt_with_target(feats, available, disruption, stats, gen, bank, kinds)
            view_b, target_b = disrupt_with_target(feats, available, disruption, stats, gen, bank, kinds)
            batch = TrainBatch(
                view=view,
                view_b=view_b,
                clean=View(feats[0], feats[1], feats[2], available),
                label=label[idx],
                quality_target=target,
                quality_target_b=target_b,
            )
            out = model.compute_loss(batch)  # type: ignore[operator]
            optimizer.zero_grad(set_to_none=True)
            out.total.backward()
            nn.utils.clip_grad_norm_(model.parameters(), 5.0)
            optimizer.step()
            for key, value in out.terms.items():
                sums[key] = sums.get(key, 0.0) + float(value.detach())
            n_batches += 1
        clean_m, disrupted_m = evaluate_views(model, val_views, val.label)
        score = 0.5 * (clean_m["macro_f1"] + disrupted_m["macro_f1"])
        record = {
            "epoch": epoch,
            **{f"loss_{k}": v / max(n_batches, 1) for k, v in sums.items()},
            "val_clean_macro_f1": clean_m["macro_f1"],
            "val_disrupted_macro_f1": disrupted_m["macro_f1"],
            "val_score": score,
        }
        history.append(record)
        if on_epoch is not None:
            on_epoch(epoch, record)
        bar.update(epoch, record)
        if score > best_score + 1e-4:
            best_score, best_epoch, bad = score, epoch, 0
            best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        else:
            bad += 1
            if bad >= patience:
                break
    bar.close()
    train_seconds = time.perf_counter() - started
    if best_state is not None:
        model.load_state_dict(best_state)
    queue = build_queue(model, train)
    quality_fit = refit_quality(model, full_train, full_val)
    clean_m, disrupted_m = evaluate_views(model, val_views, val.label)
    metrics = {
        "model": name,
        "seed": seed,
        "best_epoch": best_epoch,
        "epochs_run": len(history),
        "train_seconds": round(train_seconds, 2),
        "seconds_per_epoch": round(train_seconds / max(len(history), 1), 3),
        "n_parameters": sum(p.numel() for p in model.parameters()),
        "val_clean": clean_m,
        "val_disrupted": disrupted_m,
        "val_score": 0.5 * (clean_m["macro_f1"] + disrupted_m["macro_f1"]),
        "history": history,
        "corruption": corruption_sources(disruption, train, val),
    }
    if quality_fit:
        metrics["quality_refit"] = quality_fit
    return TrainResult(model, metrics, queue)


def _quality_of(model: nn.Module) -> Any:
    quality = getattr(model, "quality", None)
    return quality if isinstance(quality, QualityEstimator) and quality.mode == "learned" else None


def _detector_rows(
    model: nn.Module,
    table: FeatureTable,
    m: int,
    fitted: Sequence[int],
    cap: int,
    seed: int,
    labels: Sequence[int] | None = None,
) -> DetectorRows:
    """Rows of up to ``cap`` posts with modality ``m``: clean (kind -1), then each fitted fault (kind
    ``labels[i]`` for ``fitted[i]``, default its own index); projected features in column ``m`` and the raw
    encoder outputs."""
    rows = np.flatnonzero(table.available[:, m] > 0)
    if len(rows) > cap:
        rows = np.sort(np.random.default_rng(seed).choice(rows, cap, replace=False))
    projector: nn.Module = model.projectors[MODALITIES[m]]  # type: ignore[index, assignment]
    bank = table.corrupted[MODALITIES[m]]
    parts = [table.features[m][rows]] + [bank[k][rows] for k in fitted]
    raw = torch.cat([torch.from_numpy(np.ascontiguousarray(x, np.float32)) for x in parts])
    h = projector(raw)
    full = torch.zeros(h.shape[0], N_MODALITIES, h.shape[1])
    full[:, m] = h
    labels = fitted if labels is None else labels
    kind = torch.cat([torch.full((len(rows),), -1)] + [torch.full((len(rows),), k) for k in labels])
    return DetectorRows(full, kind, raw)


@torch.no_grad()
def refit_quality(
    model: nn.Module, train: FeatureTable, val: FeatureTable, cap: int = 6000, use_raw: bool | float | None = None
) -> dict[str, Any]:
    """With ``quality="learned"`` and ``quality_refit``: refit each modality's detector on the trained head.

    Inputs are the final projected features and the moments of the queue the head is exported with;
    targets are clean (1) vs the cached realistic faults (0) of up to ``cap`` train posts per modality,
    never the papers' masking; the strength is chosen on val. A modality without cached realistic faults
    keeps its jointly trained detector. ``use_raw`` forces the blend: the share of the detector that also
    reads the raw encoder output, 0 / False = queue statistics only, 1 / True = that detector alone (None: as
    ``quality_raw`` says; see :meth:`QualityEstimator.fit_detector`). -> per modality what was fitted (empty
    when nothing was).
    """
    quality = _quality_of(model)
    cfg = getattr(model, "cfg", None)
    drf_cfg = getattr(cfg, "drf", cfg)
    if quality is None or not getattr(drf_cfg, "quality_refit", False):
        return {}
    model.eval()
    mean, var = model.queue.moments()  # type: ignore[union-attr, operator]
    kinds = quality_target_kinds(train)
    out: dict[str, Any] = {}
    for m, modality in enumerate(MODALITIES):
        names = train.corrupted_variants.get(modality) or []
        marks = kinds[m]
        fitted = [k for k, ok in enumerate(marks.tolist()) if ok] if marks is not None else []
        val_names = val.corrupted_variants.get(modality) or []
        to_train = {val_names.index(names[k]): k for k in fitted if names[k] in val_names}
        val_fitted = list(to_train)
        if not fitted or not val_fitted:
            continue
        fit_rows = _detector_rows(model, train, m, fitted, cap, seed=m)
        # val kinds numbered as in train, so a held-out kind is the same fault in both
        val_rows = _detector_rows(model, val, m, val_fitted, cap, seed=m, labels=list(to_train.values()))
        fit = quality.fit_detector(m, fit_rows, val_rows, mean, var, use_raw=use_raw)
        if "held_out_val_auroc" in fit:  # kind index -> variant name
            held = fit["held_out_val_auroc"]
            fit["held_out_val_auroc"] = {b: {names[int(k)]: v for k, v in sc.items()} for b, sc in held.items()}
        out[modality] = {**fit, "kinds": [names[k] for k in fitted]}
    return out


@torch.no_grad()
def build_queue(model: nn.Module, train: FeatureTable) -> dict[str, np.ndarray]:
    """Projected features of clean, complete, confident training posts (last K, FIFO order).

    The model's own queue (DRF, serving head) is refilled with them, so ``head.pt`` and ``queue.npz``
    agree. Heads without the three projectors get empty arrays.
    """
    projectors = getattr(model, "projectors", None)
    queue = getattr(model, "queue", None)
    d = int(getattr(getattr(model, "cfg", None), "d", 0))
    if not isinstance(projectors, nn.ModuleDict):
        return {m: np.zeros((0, d), dtype=np.float32) for m in MODALITIES}
    complete = np.flatnonzero(train.available.min(1) > 0)
    view = table_view(train.rows(complete))
    confident = predict_proba(model, view).max(-1) >= ENQUEUE_MIN_CONFIDENCE
    if confident.sum() < 2:
        confident[:] = True
    model.eval()
    h = project_all(projectors, view)[torch.from_numpy(confident)]
    length = queue.length if queue is not None else 1024
    h = h[-length:]
    if queue is not None:
        queue.count.zero_()
        queue.ptr.zero_()
        for m in range(N_MODALITIES):
            queue.enqueue(m, h[:, m])
    return {m: h[:, i].numpy().astype(np.float32) for i, m in enumerate(MODALITIES)}


class _Progress:
    """Epoch progress with tqdm on stderr, the project's one progress library (falls back to log lines)."""

    def __init__(self, enabled: bool, total: int, name: str) -> None:
        self.progress: Any = None
        if enabled:
            from tqdm import tqdm

            self.progress = tqdm(total=total, desc=name, unit="epoch", dynamic_ncols=True, leave=True)

    def update(self, epoch: int, record: dict[str, float]) -> None:
        info = (
            f"loss {sum(v for k, v in record.items() if k.startswith('loss_')):.3f} "
            f"val clean {record['val_clean_macro_f1']:.3f} disrupted {record['val_disrupted_macro_f1']:.3f}"
        )
        if self.progress is not None:
            self.progress.set_postfix_str(info, refresh=False)
            self.progress.update(epoch - self.progress.n)
        else:
            log.debug("epoch %d %s", epoch, info)

    def close(self) -> None:
        if self.progress is not None:
            self.progress.close()


def _progress(enabled: bool, total: int, name: str) -> _Progress:
    return _Progress(enabled, total, name)


# -- model dirs --------------------------------------------------------------------------------


def save_model_dir(out: Path, result: TrainResult, config: Any, extra: dict[str, Any]) -> None:
    """Write ``config.json``, ``head.pt``, ``queue.npz`` and ``metrics.json`` into ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    meta = {
        "model": result.metrics["model"],
        "config": dataclasses.asdict(config),
        "modalities": list(MODALITIES),
        "labels": list(LABELS),
        "feature_dims": dict(FEATURE_DIMS),
        "d": int(getattr(config, "d", 0)),
        "enqueue_min_confidence": ENQUEUE_MIN_CONFIDENCE,
        **extra,
    }
    (out / "config.json").write_text(json.dumps(meta, indent=2, sort_keys=True, default=str) + "\n")
    torch.save(result.model.state_dict(), out / "head.pt")
    np.savez(out / "queue.npz", **result.queue)  # type: ignore[arg-type]
    (out / "metrics.json").write_text(json.dumps(result.metrics, indent=2, sort_keys=True) + "\n")


def load_model_dir(model_dir: Path) -> tuple[nn.Module, dict[str, Any]]:
    """Rebuild a trained head from its model dir; returns (model in eval mode, config.json)."""
    meta = json.loads((model_dir / "config.json").read_text())
    config = config_from_dict(MODELS[meta["model"]][0], meta["config"])
    model = build_model(meta["model"], config)
    model.load_state_dict(torch.load(model_dir / "head.pt", map_location="cpu", weights_only=True))
    return model.eval(), meta


# -- command -----------------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, choices=sorted(MODELS))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--epochs", type=int, default=30, help="maximum epochs (early stopping)")
    parser.add_argument("--out", type=Path, required=True, help="trained model dir to write")
    parser.add_argument("--data-dir", type=Path, default=None, help="feature cache (default: SENTIMENT_DATA_DIR)")
    parser.add_argument("--split", choices=sorted(SPLITS), default="random")
    parser.add_argument("--recovery", choices=("fsrf", "drf"), default=None, help="serving head only")
    parser.add_argument(
        "--ablate",
        action="append",
        default=[],
        choices=sorted(set(DRF_PARTS) | set(FSRF_PARTS)),
        help="switch one part off (repeatable)",
    )
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config field, e.g. drf.quality_tau=2 (repeatable)",
    )
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--patience", type=int, default=5)
    parser.add_argument("--disrupt-ratio", type=float, default=TrainDisruption.ratio)
    add_corruption_arguments(parser)
    parser.add_argument("--threads", type=int, default=1, help="torch threads")
    parser.add_argument(
        "--synthetic",
        type=int,
        default=0,
        metavar="N",
        help="train on N synthetic rows instead of the cache (smoke runs)",
    )
    parser.add_argument("--no-progress", action="store_true")


def add_corruption_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--train-corruption",
        choices=CORRUPTION_SOURCES,
        default="auto",
        help="corrupt branch of the training disruption: real cached variants of the train/val splits "
        "(auto: where present, real: required) or feature noise",
    )
    parser.add_argument(
        "--p-noise", type=float, default=0.0, help="share of really-corrupted cells given feature noise instead"
    )
    parser.add_argument(
        "--train-corruption-kinds",
        default="",
        help="cached content faults the training views draw from (--corrupt-kinds syntax, masking always in; "
        "default: every cached kind); a learned quality's refit still fits every cached realistic kind",
    )


def make_config(name: str, ablate: Sequence[str], overrides: Sequence[str], recovery: str | None) -> Any:
    config = default_config(name)
    if recovery is not None:
        if name != "serving":
            raise SystemExit("--recovery applies to the serving head only")
        config.recovery = recovery
    try:
        for part in ablate:
            apply_ablation(name, config, part)
        for item in overrides:
            key, _, value = item.partition("=")
            set_config_value(config, key, value)
        build_model(name, config)  # a config the head refuses fails here, in one line, before any data loads
    except (KeyError, ValueError) as exc:
        raise SystemExit(f"error: {exc.args[0] if exc.args else exc}") from None
    return config


def make_disruption(args: argparse.Namespace) -> TrainDisruption:
    """The training disruption of ``add_corruption_arguments``' options; a value it refuses is one line."""
    try:
        return TrainDisruption(
            ratio=getattr(args, "disrupt_ratio", TrainDisruption.ratio),
            corruption=args.train_corruption,
            p_noise=args.p_noise,
            kinds=args.train_corruption_kinds,
        )
    except ValueError as exc:
        raise SystemExit(f"error: {exc.args[0] if exc.args else exc}") from None


def run(args: argparse.Namespace) -> int:
    torch.set_num_threads(args.threads)
    config = make_config(args.model, args.ablate, args.overrides, args.recovery)
    train_split, val_split, _ = SPLITS[args.split]
    data_dir = args.data_dir or get_settings().data_dir
    disruption = make_disruption(args)
    if args.synthetic:
        train = synthetic_table(args.synthetic, seed=1)
        val = synthetic_table(max(args.synthetic // 5, 64), seed=2)
    else:
        train = load_table(data_dir, train_split)
        val = load_table(data_dir, val_split)
        train, val = load_corrupted(disruption, train, val, data_dir, (train_split, val_split))
    result = train_model(
        args.model,
        config,
        train,
        val,
        seed=args.seed,
        epochs=args.epochs,
        batch_size=args.batch_size,
        lr=args.lr,
        patience=args.patience,
        disruption=disruption,
        progress=not args.no_progress,
    )
    extra = {
        "seed": args.seed,
        "split": args.split,
        "splits": {"train": train_split, "val": val_split},
        "data_dir": f"synthetic:{args.synthetic}" if args.synthetic else str(data_dir),
        "ablate": list(args.ablate),
        "overrides": list(args.overrides),
        "train": {
            "epochs": args.epochs,
            "batch_size": args.batch_size,
            "lr": args.lr,
            "patience": args.patience,
            "disruption": dataclasses.asdict(disruption),
        },
        "data_meta": train.meta,
        "queue_len": int(next(iter(result.queue.values())).shape[0]),
    }
    save_model_dir(args.out, result, config, extra)
    m = result.metrics
    log.info(
        "%s seed %d: best epoch %d/%d, %.1fs; val clean macro-F1 %.4f, disrupted %.4f -> %s",
        args.model,
        args.seed,
        m["best_epoch"],
        m["epochs_run"],
        m["train_seconds"],
        m["val_clean"]["macro_f1"],
        m["val_disrupted"]["macro_f1"],
        args.out,
    )
    return 0
