"""How much sentiment signal the image modality carries: image-only logistic regression, with controls.

``python -m models.experiments.image_signal --seeds 10 --model-dir EXPORT [--json out.json]``

For each seed a benchmark is built twice from the same sources — image identities ``recurring`` (train
holds Twemoji art of every emoji, test the Noto art of its own emoji) and ``disjoint`` (each pool only its
own emoji, the control) — and a logistic regression on the exported image encoder's features is scored
on the test split two ways:

* **emoji label**: train-pool images → their Emoji Sentiment Ranking label; test-pool images scored.
* **post label**: train posts carrying an image → the tweet's label; test posts carrying an image scored.
  The pairing rule draws a same-label image with probability ``p_image``, else any image of the pool, so
  even a perfect emoji classifier agrees with the tweet on only ``p + (1 - p) * share`` of the posts: that
  congruence is printed as the bound beside the score.

Chance is 1/3 macro F1 for a classifier that ignores its input (up to the label balance). Every record is
synthetic pairing; nothing here is a claim about real posts.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from sklearn.linear_model import LogisticRegression

from models.data import IMAGE_IDENTITIES, build_benchmark
from stream.service.manifest import Manifest
from stream.service.preprocess import images_to_batch
from stream.service.settings import get_settings
from stream.service.vocabulary import LABELS
from stream.tools.classification import classification_metrics
from stream.tools.dataset import read_images, read_posts

__all__ = ["image_signal", "main"]


def _encode(manifest: Manifest, files: list[Path]) -> np.ndarray:
    from stream.service.manifest import IMAGE_INPUT, IMAGE_OUTPUT
    from stream.service.runtime import create_session

    session = create_session(manifest.image_encoder_path(), get_settings())
    out = []
    for start in range(0, len(files), 16):
        images = []
        for path in files[start : start + 16]:
            with Image.open(path) as img:
                img.load()
                images.append(img.copy())
        out.append(session.run({IMAGE_INPUT: images_to_batch(images, manifest.image_size)})[IMAGE_OUTPUT])
    return np.concatenate(out).astype(np.float32)


def _lr(x: np.ndarray, y: np.ndarray, x_test: np.ndarray, y_test: np.ndarray, seed: int) -> dict[str, float]:
    clf = LogisticRegression(max_iter=2000, C=1.0, random_state=seed).fit(x, y)
    return classification_metrics(y_test, clf.predict(x_test))


def image_signal(manifest: Manifest, seed: int, identities: str, sample: int, work: Path) -> dict[str, Any]:
    """Image-only LR on the emoji label and on the post label for one seed and identity rule."""
    root = work / f"{identities}-{seed}"
    build_benchmark(root, seed=seed, sample=sample, image_identities=identities)
    images = read_images(root)
    feats = _encode(manifest, [root / "pools" / "images" / i.file for i in images])
    by_id = {item.id: k for k, item in enumerate(images)}
    label_index = {lab: k for k, lab in enumerate(LABELS)}
    pool = np.array([i.pool for i in images])
    y_emoji = np.array([label_index[i.label] for i in images])
    emoji = _lr(feats[pool == "train"], y_emoji[pool == "train"], feats[pool == "test"], y_emoji[pool == "test"], seed)

    def posts(split: str) -> tuple[np.ndarray, np.ndarray, float]:
        rows = [r for r in read_posts(root, split) if r.get("image_id") is not None]
        x = feats[[by_id[r["image_id"]] for r in rows]]
        y = np.array([label_index[r["label"]] for r in rows])
        congruent = float(np.mean([r["image_label"] == r["label"] for r in rows]))
        return x, y, congruent

    x_train, y_train, _ = posts("train")
    x_test, y_test, congruent = posts("test")
    post = _lr(x_train, y_train, x_test, y_test, seed)
    return {
        "seed": seed,
        "identities": identities,
        "emoji_label": emoji,
        "post_label": post,
        "test_congruence": congruent,
        "n_test_images": int((pool == "test").sum()),
        "n_test_posts_with_image": len(y_test),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m models.experiments.image_signal", description=__doc__)
    parser.add_argument("--model-dir", type=Path, default=None, help="an export (default: SENTIMENT_MODEL_DIR)")
    parser.add_argument("--seeds", type=int, default=10)
    parser.add_argument("--sample", type=int, default=4000, help="tweets per benchmark build (4000)")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    manifest = Manifest.load(args.model_dir or get_settings().model_dir)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for identities in IMAGE_IDENTITIES:
            for seed in range(args.seeds):
                rows.append(image_signal(manifest, seed, identities, args.sample, Path(tmp)))
    summary: dict[str, Any] = {}
    print("| identities | emoji label macro F1 | post label macro F1 | test congruence (bound) | chance |")
    print("|---|---|---|---|---|")
    for identities in IMAGE_IDENTITIES:
        mine = [r for r in rows if r["identities"] == identities]
        e = np.array([r["emoji_label"]["macro_f1"] for r in mine])
        p = np.array([r["post_label"]["macro_f1"] for r in mine])
        c = np.array([r["test_congruence"] for r in mine])
        summary[identities] = {"emoji_macro_f1": [float(e.mean()), float(e.std())],
                               "post_macro_f1": [float(p.mean()), float(p.std())],
                               "congruence": float(c.mean())}
        print(f"| {identities} | {e.mean():.3f} ± {e.std():.3f} | {p.mean():.3f} ± {p.std():.3f} "
              f"| {c.mean():.3f} | 0.333 |")
    if args.json is not None:
        args.json.write_text(json.dumps({"runs": rows, "summary": summary, "seeds": args.seeds,
                                         "sample": args.sample, "model": manifest.version}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
