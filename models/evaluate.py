"""``sentiment-stream evaluate``: the robustness protocol over methods and seeds.

    sentiment-stream evaluate --runs-dir RUNS --out DIR [--data-dir D] [--split random|topic|control]
        [--methods TAG ...] [--ablations] [--seeds 0 1 2] [--train-missing --epochs E]
        [--train-corruption auto|real|noise] [--p-noise P]

A *method* is a trained head plus its options (``serving_fsrf`` = serving head trained with FSRF
recovery; ``fsrf-no_orth`` = FSRF with the orthogonality loss off). Runs live in
``RUNS/<split>/<tag>/seed<S>/`` (the trained model dir layout); ``--train-missing`` trains the
missing ones first with ``models.train``.

Every condition of :func:`models.disruptions.protocol_grid` is evaluated on the test split of
``--split``: clean; Fixed C / D / C+D on each modality; Fixed C under each other content fault
(``fixed_C_<m>_<kind>``); Random ratios 0.2…1.0; every non-empty subset of modalities; intra-modal rates
0.0…0.9. Corruption uses the *real* corrupted feature variants (``corrupt_<m>``,
``corrupt_<m>_<kind>``, ``rate_<m>_<r>``); a condition whose variant is not in the cache is reported as
skipped. Besides accuracy and the F1s, every condition records ``majority_share``: the share of posts
given the most frequent predicted class (a head that collapses to one class under a fault shows ~1.0).
The disruption plan of a run is drawn with that run's seed, so the spread over seeds covers
both training and disruption randomness. Writes ``results.json``, ``results.md`` and PNG plots.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
import zlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

import numpy as np
import torch
from scipy.stats import rankdata
from torch import Tensor, nn

from models.common import LABELS, MODALITIES, View
from models.disruptions import (
    CORRUPT_KINDS,
    INTRA_RATES,
    RANDOM_RATIOS,
    Condition,
    corrupt_variant,
    plan_condition,
    protocol_grid,
)
from models.drf import DRF
from models.head import ServingHead
from models.train import (
    DRF_PARTS,
    FSRF_PARTS,
    SPLITS,
    FeatureTable,
    TrainDisruption,
    add_corruption_arguments,
    load_corrupted,
    load_model_dir,
    load_table,
    make_config,
    make_disruption,
    predict_proba,
    save_model_dir,
    train_model,
)
from stream.service.settings import get_settings
from stream.tools.classification import METRIC_KEYS, classification_metrics

__all__ = ["ABLATION_METHODS", "MAIN_METHODS", "EvalData", "Method", "add_arguments", "evaluate_run", "run"]

log = logging.getLogger(__name__)
METRICS: Final = (*METRIC_KEYS, "majority_share")  # accuracy, weighted_f1, macro_f1, majority_share
F1_METRICS: Final = ("weighted_f1", "macro_f1")


@dataclass(frozen=True)
class Method:
    """A head, its recovery path (serving head) and the parts switched off (ablations)."""

    tag: str
    model: str
    recovery: str | None = None
    ablate: tuple[str, ...] = ()
    weights_of: str | None = None  # evaluate another method's trained runs (e.g. a swapped recovery path)
    overrides: tuple[str, ...] = ()  # config fields set as by `train --set KEY=VALUE`

    @property
    def runs_tag(self) -> str:
        return self.weights_of or self.tag


MAIN_METHODS: Final = (
    Method("text_only", "text_only"),
    Method("late_zero", "late_zero"),
    Method("early_dropout", "early_dropout"),
    Method("drf", "drf"),
    Method("fsrf", "fsrf"),
    Method("serving_fsrf", "serving", "fsrf"),
    Method("serving_drf", "serving", "drf"),
    # the serving head trained on the FSRF path, exported with the DRF path (recovery is fixed per export)
    Method("serving_fsrf_as_drf", "serving", "drf", weights_of="serving_fsrf"),
    # the learned quality (a content-fault detector on queue-relative statistics) instead of the distance
    Method("serving_fsrf-learned_quality", "serving", "fsrf", overrides=("drf.quality=learned",)),
    Method("drf-learned_quality", "drf", overrides=("quality=learned",)),
    # ... its detector refitted on the trained head (logistic regression, strength chosen on val)
    Method("serving_fsrf-learned_quality_refit", "serving", "fsrf",
           overrides=("drf.quality=learned", "drf.quality_refit=true")),
    # ... reported per event (and gating the queue) but not weighting the fusion
    Method("serving_fsrf-quality_reported_only", "serving", "fsrf",
           overrides=("drf.quality=learned", "drf.quality_refit=true", "drf.use_quality=false")),
    # ... whose detector may also read the raw encoder output, per modality where that generalises better
    Method("serving_fsrf-quality_raw_auto", "serving", "fsrf",
           overrides=("drf.quality=learned", "drf.quality_refit=true", "drf.use_quality=false",
                      "drf.quality_raw=auto")),
)
ABLATION_METHODS: Final = (
    *(Method(f"drf-no_{p}", "drf", ablate=(p,)) for p in DRF_PARTS),
    *(Method(f"fsrf-no_{p}", "fsrf", ablate=(p,)) for p in FSRF_PARTS),
)
METHODS: Final = {m.tag: m for m in (*MAIN_METHODS, *ABLATION_METHODS)}


# -- test data ---------------------------------------------------------------------------------


@dataclass
class EvalData:
    """The clean test table and the real corrupted variants that exist for it."""

    clean: FeatureTable
    corrupt: dict[str, np.ndarray]  # modality -> masked (``corrupt_<m>``) features, rows aligned with ``clean``
    rates: dict[str, FeatureTable]  # rate variant name -> its table (a subset of posts)
    faults: dict[str, np.ndarray] = field(default_factory=dict)  # ``corrupt_<m>_<kind>`` -> features, aligned

    @classmethod
    def load(cls, data_dir: Path, split: str) -> EvalData:
        clean = load_table(data_dir, split)
        position = {str(i): n for n, i in enumerate(clean.ids)}
        corrupt: dict[str, np.ndarray] = {}
        faults: dict[str, np.ndarray] = {}
        for m, modality in enumerate(MODALITIES):
            for kind in CORRUPT_KINDS[modality]:
                name = corrupt_variant(modality, kind)
                try:
                    variant = load_table(data_dir, split, name)
                except FileNotFoundError:
                    continue
                rows = np.array([position[str(i)] for i in variant.ids])
                full = clean.features[m].copy()  # a post the variant lacks stays clean (none expected)
                full[rows] = variant.features[m]
                if kind == "mask":
                    corrupt[modality] = full
                else:
                    faults[name] = full
        rates: dict[str, FeatureTable] = {}
        for condition in protocol_grid():
            if condition.family != "rate":
                continue
            name = next(iter(condition.variants.values()))
            try:
                rates[name] = load_table(data_dir, split, name)
            except (FileNotFoundError, ValueError):
                continue
        return cls(clean, corrupt, rates, faults)


def condition_view(data: EvalData, condition: Condition, seed: int) -> tuple[View, np.ndarray] | None:
    """Features, presence and labels of the test posts under ``condition``; ``None`` if not evaluable."""
    if condition.family == "rate":
        name = next(iter(condition.variants.values()))
        table = data.rates.get(name)
        if table is None:
            return None
        return _view(table.features, table.available), table.label
    needed = condition.variants
    pool = data.faults if condition.family == "fault" else data.corrupt
    keys = {m: (v if condition.family == "fault" else m) for m, v in needed.items()}
    if any(k not in pool for k in keys.values()):
        return None
    source = {m: pool[k] for m, k in keys.items()}
    clean = data.clean
    rng = np.random.default_rng([seed, zlib.crc32(condition.name.encode())])
    plan = plan_condition(condition, len(clean), rng)
    present = plan.present & (clean.available > 0)
    nothing = ~present.any(1)
    present[nothing, 0] = True  # a post keeps its text rather than vanish (text always exists)
    features = []
    for m, modality in enumerate(MODALITIES):
        x = clean.features[m]
        hit = plan.corrupted[:, m] & present[:, m]
        if hit.any():
            x = np.where(hit[:, None], source[modality], x)
        features.append(x * present[:, m : m + 1])
    return _view(features, present.astype(np.float32)), clean.label


def _view(features: Sequence[np.ndarray], present: np.ndarray) -> View:
    text, image, transcript = (torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32)) for x in features)
    return View(text, image, transcript, torch.from_numpy(np.ascontiguousarray(present, dtype=np.float32)))


def evaluate_run(model: nn.Module, data: EvalData, seed: int) -> dict[str, dict[str, float]]:
    """Metrics of one trained head on every evaluable condition."""
    out: dict[str, dict[str, float]] = {}
    for condition in protocol_grid():
        built = condition_view(data, condition, seed)
        if built is None:
            continue
        view, label = built
        predicted = predict_proba(model, view).argmax(-1)
        metrics = dict(classification_metrics(label, predicted))
        counts = np.bincount(predicted, minlength=len(LABELS))
        metrics["majority_share"] = float(counts.max() / max(len(predicted), 1))
        out[condition.name] = metrics
    return out


# -- quality ------------------------------------------------------------------------------------


@torch.no_grad()
def quality_of(model: nn.Module, view: View) -> Tensor | None:
    """The DRF quality ``[B,M]`` a head reports for ``view`` with its own queue; None for a head without one."""
    model.eval()
    if isinstance(model, ServingHead):
        mean, var = model.queue.moments()
        return model.run(view, mean, var).quality
    if isinstance(model, DRF):
        mean, var = model.queue.moments()
        return model.fuse(view, mean, var)[1]
    return None


def auroc(clean: np.ndarray, corrupted: np.ndarray) -> float:
    """P(a clean score > a corrupted score), ties counted half (Mann-Whitney U / (n_clean * n_corrupted))."""
    clean = np.asarray(clean, np.float64).ravel()
    corrupted = np.asarray(corrupted, np.float64).ravel()
    if clean.size == 0 or corrupted.size == 0:
        raise ValueError("auroc needs at least one clean and one corrupted score")
    ranks = rankdata(np.concatenate([clean, corrupted]))
    u = ranks[: clean.size].sum() - clean.size * (clean.size + 1) / 2.0
    return float(u / (clean.size * corrupted.size))


def quality_auroc(model: nn.Module, data: EvalData) -> dict[str, float]:
    """Per ``modality:kind``, the AUROC of the head's quality for clean vs content-corrupted test inputs.

    Every test post that has the modality, its clean feature against its cached corrupted one (the other
    modalities as they are: a modality's quality depends on its own input and the queue only). 1.0: the
    quality always rates the clean input higher; 0.5: it cannot tell; below 0.5: it prefers the damage.
    """
    clean = data.clean
    base = quality_of(model, _view(clean.features, clean.available))
    if base is None:
        return {}
    out: dict[str, float] = {}
    for m, modality in enumerate(MODALITIES):
        has = clean.available[:, m] > 0
        for kind in CORRUPT_KINDS[modality]:
            source = data.corrupt.get(modality) if kind == "mask" else data.faults.get(corrupt_variant(modality, kind))
            if source is None or not has.any():
                continue
            features = list(clean.features)
            features[m] = source
            broken = quality_of(model, _view(features, clean.available))
            assert broken is not None
            out[f"{modality}:{kind}"] = auroc(base[has, m].numpy(), broken[has, m].numpy())
    return out


# -- runs --------------------------------------------------------------------------------------


def run_dir(runs_dir: Path, split: str, method: Method, seed: int) -> Path:
    return runs_dir / split / method.runs_tag / f"seed{seed}"


def train_run(
    method: Method,
    seed: int,
    split: str,
    train: FeatureTable,
    val: FeatureTable,
    out: Path,
    epochs: int,
    patience: int,
    data_dir: Path,
    disruption: TrainDisruption | None = None,
) -> None:
    """Train one (method, seed) into ``out`` exactly as ``sentiment-stream train`` would.

    ``train`` / ``val`` carry their real corrupted variants already (``models.train.load_corrupted``).
    """
    config = make_config(method.model, method.ablate, method.overrides, method.recovery)
    disruption = disruption or TrainDisruption()
    result = train_model(
        method.model, config, train, val, seed=seed, epochs=epochs, patience=patience, disruption=disruption
    )
    train_split, val_split, _ = SPLITS[split]
    extra = {
        "seed": seed,
        "split": split,
        "splits": {"train": train_split, "val": val_split},
        "data_dir": str(data_dir),
        "ablate": list(method.ablate),
        "overrides": list(method.overrides),
        "tag": method.tag,
        "train": {
            "epochs": epochs,
            "batch_size": 256,
            "lr": 1e-3,
            "patience": patience,
            "disruption": vars(disruption),
        },
        "data_meta": train.meta,
        "queue_len": int(next(iter(result.queue.values())).shape[0]),
    }
    save_model_dir(out, result, config, extra)


def _aggregate(per_seed: dict[int, dict[str, dict[str, float]]]) -> dict[str, dict[str, dict[str, float]]]:
    conditions = sorted({c for res in per_seed.values() for c in res})
    agg: dict[str, dict[str, dict[str, float]]] = {}
    for c in conditions:
        agg[c] = {}
        for metric in METRICS:
            values = [res[c][metric] for res in per_seed.values() if c in res and metric in res[c]]
            if not values:
                continue
            agg[c][metric] = {"mean": float(np.mean(values)), "std": float(np.std(values)), "n": len(values)}
    return agg


# -- report ------------------------------------------------------------------------------------


def _cell(agg: dict[str, Any], method: str, condition: str, metric: str) -> str:
    entry = agg.get(method, {}).get(condition, {}).get(metric)
    if entry is None:
        return "—"
    return f"{100 * entry['mean']:.2f} ± {100 * entry['std']:.2f}"


def markdown_report(results: dict[str, Any]) -> str:
    """Markdown tables (mean ± std over seeds, in percent) of every condition family."""
    agg = results["aggregate"]
    methods = list(agg)
    conditions = [c.name for c in protocol_grid()]
    lines = [
        f"# Robustness results — split `{results['split']}` (test: `{results['test_split']}`)",
        "",
        f"Seeds: {results['seeds']}. Cells: mean ± std over seeds, in percent. "
        "C = corrupt (real corrupted features), D = discard, C+D = either, with probability 1/2.",
        "",
    ]
    families = [
        ("Clean and Fixed (one modality always disrupted; fixed_C_<m>_<kind>: another content fault)",
         lambda c: c == "clean" or c.startswith("fixed_")),
        ("Random (ratio of posts disrupted, one random modality each)", lambda c: c.startswith("random_")),
        ("Modality subsets (the others discarded)", lambda c: c.startswith("subset_")),
        ("Intra-modal corruption rate (documented test subset)", lambda c: c.startswith("rate_")),
    ]
    for metric in (*F1_METRICS, "accuracy", "majority_share"):
        for title, keep in families:
            if metric == "majority_share" and not title.startswith("Clean and Fixed"):
                continue
            rows = [c for c in conditions if keep(c) and any(c in agg[m] for m in methods)]
            if not rows:
                continue
            lines += [f"## {title} — {metric}", "", "| condition | " + " | ".join(methods) + " |"]
            lines.append("|---|" + "---|" * len(methods))
            for c in rows:
                lines.append(f"| {c} | " + " | ".join(_cell(agg, m, c, metric) for m in methods) + " |")
            lines.append("")
    qualities = results.get("quality_auroc") or {}
    if qualities:
        def order(cell: str) -> tuple[int, int]:
            modality, kind = cell.split(":")
            return MODALITIES.index(modality), CORRUPT_KINDS[modality].index(kind)

        cells = sorted({c for per_seed in qualities.values() for q in per_seed.values() for c in q}, key=order)
        lines += ["## Quality AUROC: clean vs content-corrupted test input (mean ± std over seeds)", "",
                  "| method | " + " | ".join(cells) + " |", "|---|" + "---|" * len(cells)]
        for tag, per_seed in qualities.items():
            row = []
            for c in cells:
                values = [q[c] for q in per_seed.values() if c in q]
                row.append(f"{np.mean(values):.3f} ± {np.std(values):.3f}" if values else "—")
            lines.append(f"| {tag} | " + " | ".join(row) + " |")
        lines.append("")
    if results.get("train_seconds"):
        lines += ["## Training time (seconds, this CPU, 1 thread)", "", "| method | mean | std | epochs |"]
        lines.append("|---|---|---|---|")
        for m, t in results["train_seconds"].items():
            lines.append(f"| {m} | {t['mean']:.1f} | {t['std']:.1f} | {t['epochs']:.1f} |")
        lines.append("")
    skipped = results.get("skipped", [])
    if skipped:
        lines += [f"Skipped (feature variant not in the cache): {', '.join(skipped)}", ""]
    return "\n".join(lines)


def plot_results(results: dict[str, Any], out: Path) -> list[Path]:
    """F1 vs Random ratio (per C / D / C+D) and F1 vs intra-modal rate (per modality), per method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    agg = results["aggregate"]
    random_panels = [
        (f"Random {kind}", ["clean"] + [f"random_{kind}_{r:.1f}" for r in RANDOM_RATIOS], [0.0, *RANDOM_RATIOS])
        for kind in ("C", "D", "C+D")
    ]
    rate_panels = [
        (f"intra-modal rate: {modality}", [f"rate_{modality}_{r:.1f}" for r in INTRA_RATES], INTRA_RATES)
        for modality in MODALITIES
    ]
    written: list[Path] = []
    for metric in F1_METRICS:
        for panels, x_label, prefix in (
            (random_panels, "ratio of posts disrupted", "random"),
            (rate_panels, "missing rate", "rates"),
        ):
            path = out / f"{prefix}_{metric}.png"
            _plot_panels(plt, agg, metric, panels, x_label, path)
            written.append(path)
    return written


def _plot_panels(
    plt: Any,
    agg: dict[str, Any],
    metric: str,
    panels: Sequence[tuple[str, list[str], Sequence[float]]],
    x_label: str,
    path: Path,
) -> None:
    """One figure, a panel per ``(title, condition names, x values)``: ``metric`` (%) of every method, ± std."""
    fig, axes = plt.subplots(1, len(panels), figsize=(15, 4.2), sharey=True)
    for ax, (title, names, xs) in zip(axes, panels, strict=True):
        for method in agg:
            _curve(ax, agg[method], names, xs, metric, method)
        ax.set_title(title)
        ax.set_xlabel(x_label)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel(f"{metric} (%)")
    if axes[-1].get_legend_handles_labels()[0]:
        axes[-1].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _curve(
    ax: Any, by_condition: dict[str, Any], names: list[str], xs: Sequence[float], metric: str, label: str
) -> None:
    """Mean (%) with a ± std band over the conditions ``names`` a method has results for."""
    points = [(x, by_condition[n][metric]) for x, n in zip(xs, names, strict=True) if n in by_condition]
    if not points:
        return
    x, entries = zip(*points, strict=True)
    mean = np.array([100 * e["mean"] for e in entries])
    std = np.array([100 * e["std"] for e in entries])
    ax.plot(x, mean, marker="o", label=label)
    ax.fill_between(x, mean - std, mean + std, alpha=0.15)


def _paired_delta(results: dict[str, Any], method: str, base: str, condition: str, metric: str) -> str:
    per_seed = results["per_seed"]
    seeds = sorted(set(per_seed.get(method, {})) & set(per_seed.get(base, {})))
    diffs = [
        per_seed[method][s][condition][metric] - per_seed[base][s][condition][metric]
        for s in seeds
        if condition in per_seed[method][s] and condition in per_seed[base][s]
    ]
    if not diffs:
        return "—"
    return f"{100 * np.mean(diffs):+.2f} ± {100 * np.std(diffs):.2f}"


def summary_markdown(results: dict[str, Any], focus: str = "random_C+D_0.6", base: str = "late_zero") -> str:
    """The headline table: clean metrics, the focus condition and paired deltas against ``base``."""
    agg = results["aggregate"]
    header = (
        f"| method | clean acc | clean wF1 | clean mF1 | {focus} wF1 | {focus} mF1 "
        f"| Δ clean wF1 vs {base} | Δ {focus} wF1 vs {base} | train s |"
    )
    lines = [header, "|---|" + "---|" * 8]
    for m in agg:
        seconds = results.get("train_seconds", {}).get(m, {})
        lines.append(
            f"| {m} | {_cell(agg, m, 'clean', 'accuracy')} | {_cell(agg, m, 'clean', 'weighted_f1')} "
            f"| {_cell(agg, m, 'clean', 'macro_f1')} | {_cell(agg, m, focus, 'weighted_f1')} "
            f"| {_cell(agg, m, focus, 'macro_f1')} | {_paired_delta(results, m, base, 'clean', 'weighted_f1')} "
            f"| {_paired_delta(results, m, base, focus, 'weighted_f1')} "
            f"| {seconds.get('mean', float('nan')):.0f} ± {seconds.get('std', float('nan')):.0f} |"
        )
    return "\n".join(lines) + "\n"


# -- command -----------------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--runs-dir", type=Path, required=True, help="RUNS/<split>/<method>/seed<S>/")
    parser.add_argument("--out", type=Path, required=True, help="where results.json, results.md, *.png go")
    parser.add_argument("--data-dir", type=Path, default=None, help="feature cache (default: SENTIMENT_DATA_DIR)")
    parser.add_argument("--split", choices=sorted(SPLITS), default="random")
    parser.add_argument("--methods", nargs="+", default=None, choices=sorted(METHODS), help="default: main methods")
    parser.add_argument("--ablations", action="store_true", help="add the DRF and FSRF ablations")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--train-missing", action="store_true", help="train runs that do not exist yet")
    parser.add_argument("--train-only", action="store_true", help="train missing runs, evaluate nothing")
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--patience", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    add_corruption_arguments(parser)
    parser.add_argument("--summary", action="store_true", help="print the headline table of --out/results.json")


def run(args: argparse.Namespace) -> int:
    torch.set_num_threads(args.threads)
    if args.summary:
        print(summary_markdown(json.loads((args.out / "results.json").read_text())))
        return 0
    tags = args.methods or [m.tag for m in MAIN_METHODS]
    if args.ablations:
        tags += [m.tag for m in ABLATION_METHODS if m.tag not in tags]
    methods = [METHODS[t] for t in tags]
    train_split, val_split, test_split = SPLITS[args.split]
    data_dir = args.data_dir or get_settings().data_dir

    if args.train_missing or args.train_only:
        disruption = make_disruption(args)  # a value it refuses stops here, before any data loads
        missing = [
            (m, s)
            for m in methods
            if m.weights_of is None
            for s in args.seeds
            if not (run_dir(args.runs_dir, args.split, m, s) / "head.pt").exists()
        ]
        if missing:
            train = load_table(data_dir, train_split)
            val = load_table(data_dir, val_split)
            train, val = load_corrupted(disruption, train, val, data_dir, (train_split, val_split))
            for method, seed in missing:
                log.info("training %s seed %d on %s", method.tag, seed, args.split)
                out = run_dir(args.runs_dir, args.split, method, seed)
                train_run(method, seed, args.split, train, val, out, args.epochs, args.patience, data_dir, disruption)
        if args.train_only:
            return 0

    data = EvalData.load(data_dir, test_split)
    skipped = [c.name for c in protocol_grid() if condition_view(data, c, 0) is None]
    per_method: dict[str, dict[int, dict[str, dict[str, float]]]] = {}
    qualities: dict[str, dict[int, dict[str, float]]] = {}
    seconds: dict[str, dict[str, float]] = {}
    started = time.perf_counter()
    for method in methods:
        per_seed: dict[int, dict[str, dict[str, float]]] = {}
        times, epochs = [], []
        for seed in args.seeds:
            path = run_dir(args.runs_dir, args.split, method, seed)
            if not (path / "head.pt").exists():
                log.warning("no run %s: skipped (use --train-missing)", path)
                continue
            model, _ = load_model_dir(path)
            if method.recovery is not None:
                model.set_recovery(method.recovery)  # type: ignore[operator]
            per_seed[seed] = evaluate_run(model, data, seed)
            quality = quality_auroc(model, data)
            if quality:
                qualities.setdefault(method.tag, {})[seed] = quality
            metrics = json.loads((path / "metrics.json").read_text())
            times.append(metrics["train_seconds"])
            epochs.append(metrics["epochs_run"])
        if per_seed:
            per_method[method.tag] = per_seed
            seconds[method.tag] = {
                "mean": float(np.mean(times)),
                "std": float(np.std(times)),
                "epochs": float(np.mean(epochs)),
            }
    results = {
        "split": args.split,
        "test_split": test_split,
        "seeds": list(args.seeds),
        "n_test": len(data.clean),
        "data_meta": data.clean.meta,
        "skipped": skipped,
        "per_seed": per_method,
        "aggregate": {tag: _aggregate(res) for tag, res in per_method.items()},
        "quality_auroc": qualities,
        "train_seconds": seconds,
        "eval_seconds": round(time.perf_counter() - started, 1),
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps(results, indent=1, sort_keys=True) + "\n")
    (args.out / "results.md").write_text(markdown_report(results))
    plots = plot_results(results, args.out)
    log.info("results for %d methods in %s (%d plots)", len(per_method), args.out, len(plots))
    return 0
