"""``sentiment-stream data baselines``: reference numbers for the benchmark, before any fusion model.

On the random split (train → test), the held-out-topic split (topic_train → topic_test) and the
random-pairing control (control_train → control_test): majority class, the VADER lexicon (no
training), and logistic regression on the cached features of one modality at a time (text,
image, transcript). Writes ``<data_dir>/baselines.json`` and prints a Markdown table.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, Final

import numpy as np
from sklearn.linear_model import LogisticRegression

from models.features import FeatureSet, load_features
from stream.service.events import LABELS, MODALITIES
from stream.tools.classification import classification_metrics
from stream.tools.dataset import read_posts

__all__ = ["SETTINGS", "run_baselines", "vader_predict"]

log = logging.getLogger(__name__)

# (name, train split, test split)
SETTINGS: Final = (
    ("random", "train", "test"),
    ("held-out topic", "topic_train", "topic_test"),
    ("random-pairing control", "control_train", "control_test"),
)
# Hutto & Gilbert's recommended cut-offs on the compound score.
VADER_THRESHOLD: Final = 0.05


def vader_predict(texts: list[str]) -> np.ndarray:
    """VADER labels (index into LABELS): compound ≥ 0.05 positive, ≤ -0.05 negative, else neutral."""
    try:
        from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer
    except ImportError as exc:
        raise ImportError("the VADER baseline needs vaderSentiment: pip install vaderSentiment==3.3.2") from exc
    analyzer = SentimentIntensityAnalyzer()
    out = np.empty(len(texts), dtype=np.int64)
    for i, text in enumerate(texts):
        compound = analyzer.polarity_scores(text)["compound"]
        out[i] = 2 if compound >= VADER_THRESHOLD else 0 if compound <= -VADER_THRESHOLD else 1
    return out


def _logistic(train: FeatureSet, test: FeatureSet, modality: str) -> np.ndarray:
    # features are L2-normalised (text) or non-negative pooled ReLU6 maps (image): standardise the
    # image ones so one C works for both
    x_train, x_test = train.modality(modality), test.modality(modality)
    if modality == "image":
        mean, std = x_train.mean(0), x_train.std(0) + 1e-6
        x_train, x_test = (x_train - mean) / std, (x_test - mean) / std
    model = LogisticRegression(max_iter=2000, C=1.0)
    model.fit(x_train, train.label)
    predicted: np.ndarray = model.predict(x_test)
    return predicted


def run_baselines(data_dir: str | Path) -> dict[str, Any]:
    """Compute every baseline on every setting; writes and returns ``baselines.json``'s content."""
    data_dir = Path(data_dir)
    results: dict[str, Any] = {}
    for setting, train_split, test_split in SETTINGS:
        train, test = load_features(data_dir, train_split), load_features(data_dir, test_split)
        rows: dict[str, dict[str, float]] = {}
        majority = int(np.bincount(train.label, minlength=len(LABELS)).argmax())
        rows["majority class"] = classification_metrics(test.label, np.full(len(test), majority))
        texts = [p["text"] for p in read_posts(data_dir, test_split)]
        rows["VADER lexicon (text)"] = classification_metrics(test.label, vader_predict(texts))
        for modality in MODALITIES:
            name = f"{'MiniLM' if modality != 'image' else 'MobileNetV2'} + LR ({modality} only)"
            rows[name] = classification_metrics(test.label, _logistic(train, test, modality))
            log.info("%s / %s: %s", setting, name, rows[name])
        results[setting] = {"train": train_split, "test": test_split, "n_train": len(train),
                            "n_test": len(test), "p_image": test.meta["p_image"],
                            "p_transcript": test.meta["p_transcript"], "seed": test.meta["seed"],
                            "results": rows}
    (data_dir / "baselines.json").write_text(json.dumps(results, indent=2) + "\n")
    print(markdown_table(results))
    return results


def markdown_table(results: dict[str, Any]) -> str:
    """The baselines as a Markdown table (one block per setting)."""
    lines = ["| setting (n test) | baseline | accuracy | macro-F1 | weighted-F1 |", "|---|---|---|---|---|"]
    for setting, block in results.items():
        for name, m in block["results"].items():
            lines.append(f"| {setting} ({block['n_test']}) | {name} | {m['accuracy']:.3f} | "
                         f"{m['macro_f1']:.3f} | {m['weighted_f1']:.3f} |")
    return "\n".join(lines)
