"""``sentiment-stream ship``: make a trained serving head the one that ships with the project.

The shipped head (``models/shipped/serving-fsrf/``) is what ``export --shipped`` and ``make demo`` serve
when no model was exported: a few MB (config, weights, queue snapshot) plus a model card that says what it
was trained on, with which seed and command, which encoders its features came from (the export refuses other
encoders) and what it scores on the full benchmark's test split. This command writes all of that from a
trained model dir, its export and the full benchmark, and refuses a head trained on a sample.

The int8 text encoder's accuracy cost, measured by the export on the full test split, is recorded next to
the weights (``int8_accuracy.json``, tied to the sha256 of the exported ONNX files): an export without the
feature cache (the demo, CI) reuses it when it produced byte-identical files.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import shutil
from pathlib import Path
from typing import Any

import torch

from export.onnx_export import INT8_RECORD_FILE, SHIPPED_MODEL_DIR, current_feature_key, int8_record
from models.disruptions import corrupt_variant
from models.evaluate import EvalData, evaluate_run, quality_auroc
from models.train import load_model_dir
from stream.service.manifest import Manifest, sha256_file

__all__ = ["add_arguments", "card_markdown", "run", "ship"]

MODEL_FILES = ("config.json", "head.pt", "queue.npz", "metrics.json")
SHIPPED_DATA = "the full benchmark (card.json: data)"
# What the card reports (when the test split's feature variants exist): clean, text dropped, and the
# protocol's random disruptions at ratio 0.6.
HEADLINE = ("clean", "fixed_D_text", "fixed_C_text", "fixed_C_text_delete", "fixed_C_text_truncate",
            "fixed_C_text_typos", "random_D_0.6", "random_C_0.6", "random_C+D_0.6")
DATA_COMMAND = "sentiment-stream data build --out DATA --seed 0"


def ship(model_dir: Path, export_dir: Path, data_dir: Path, out: Path, command: str,
         data_command: str = DATA_COMMAND) -> dict[str, Any]:
    """Copy the head into ``out`` and write ``card.json``, ``MODEL_CARD.md`` and ``int8_accuracy.json``."""
    config = json.loads((model_dir / "config.json").read_text())
    data_manifest = json.loads((data_dir / "manifest.json").read_text())
    if data_manifest.get("sample") is not None:
        raise ValueError(f"{data_dir} is a {data_manifest['sample']}-tweet sample: ship a head trained on the full "
                         "benchmark (`sentiment-stream data build` without --sample)")
    if config.get("model") != "serving":
        raise ValueError(f"{model_dir} holds a {config.get('model')!r} head; only a serving head can be served")
    trained_key = (config.get("data_meta") or {}).get("feature_key")
    if trained_key != current_feature_key():
        raise ValueError(f"{model_dir} was trained on features {trained_key}, the installed encoders give "
                         f"{current_feature_key()}")
    manifest = Manifest.load(export_dir, check_graphs=False)
    head_sha = sha256_file(model_dir / "head.pt")
    if manifest.exporter.get("head_pt_sha256") != head_sha:
        raise ValueError(f"{export_dir} was not exported from {model_dir} (head.pt sha256 differs)")
    parity = json.loads((export_dir / "parity.json").read_text())

    torch.set_num_threads(1)
    model, _ = load_model_dir(model_dir)
    seed = int(json.loads((model_dir / "metrics.json").read_text()).get("seed", 0))
    test = EvalData.load(data_dir, "test")
    results = evaluate_run(model, test, seed)
    quality = {k: round(v, 4) for k, v in quality_auroc(model, test).items()}
    headline = {name: {k: round(float(v), 4) for k, v in results[name].items()}
                for name in HEADLINE if name in results}

    out.mkdir(parents=True, exist_ok=True)
    for name in MODEL_FILES:
        shutil.copyfile(model_dir / name, out / name)
    # where it was trained on the shipping machine means nothing elsewhere: the card says what the data was
    shipped_config = {**config, "data_dir": SHIPPED_DATA}
    (out / "config.json").write_text(json.dumps(shipped_config, indent=2, sort_keys=True) + "\n")
    if parity.get("int8_accuracy"):
        (out / INT8_RECORD_FILE).write_text(
            json.dumps(int8_record(manifest, parity["int8_accuracy"], Path(SHIPPED_DATA)), indent=1) + "\n")
    else:
        (out / INT8_RECORD_FILE).unlink(missing_ok=True)
    metrics = json.loads((model_dir / "metrics.json").read_text())
    card = {
        "name": out.name,
        "shipped_utc": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "command": command,
        "data_command": data_command,
        "seed": seed,
        "model": config.get("model"),
        "recovery": config["config"].get("recovery"),
        "n_parameters": metrics.get("n_parameters"),
        "best_epoch": metrics.get("best_epoch"),
        "epochs_run": metrics.get("epochs_run"),
        "feature_key": trained_key,
        "head_pt_sha256": head_sha,
        "files_sha256": {name: sha256_file(out / name) for name in MODEL_FILES},
        "data": {
            "generator_version": data_manifest.get("generator_version"),
            "seed": data_manifest.get("seed"),
            "counts": {s: data_manifest["counts"]["posts"][s]["total"] for s in ("train", "val", "test")
                       if s in data_manifest.get("counts", {}).get("posts", {})},
            "pairing": data_manifest.get("pairing"),
            "image_identities": (data_manifest.get("pools") or {}).get("image_identities"),
            "synthetic_pairing": True,
        },
        "test_metrics": headline,
        "quality_auroc": quality,
        # per modality what the learned detector was refitted on and whether it reads the raw encoder output
        "quality_fit": {
            m: {
                "kinds": fit.get("kinds", []),
                "raw_input": bool(fit.get("raw", False)),
                "raw_share": fit.get("raw_share", 1.0 if fit.get("raw") else 0.0),
                "C": fit.get("C"),
            }
            for m, fit in (metrics.get("quality_refit") or {}).items()
        },
        "test_conditions_available": sorted(results),
        "int8": parity.get("int8_gate"),
        "export_model_version": manifest.model_version,
    }
    (out / "card.json").write_text(json.dumps(card, indent=1) + "\n")
    (out / "MODEL_CARD.md").write_text(card_markdown(card))
    return card


def _pct(x: float) -> str:
    return f"{100 * x:.2f}"


def card_markdown(card: dict[str, Any]) -> str:
    data = card["data"]
    rows = "\n".join(
        f"| {name} | {_pct(m['accuracy'])} | {_pct(m['weighted_f1'])} | {_pct(m['macro_f1'])} |"
        for name, m in card["test_metrics"].items()
    )
    int8 = card.get("int8") or {}
    counts = ", ".join(f"{k} {v:,}" for k, v in data["counts"].items())
    data_line = (f"the full benchmark (docs/data.md), generator {data['generator_version']}, seed {data['seed']}: "
                 f"{counts}; image identities `{data['image_identities']}`")
    encoders = f"features `{card['feature_key']}` (MiniLM-L6, MobileNetV2 weight hashes): `export` refuses others"
    quality = card.get("quality_auroc") or {}
    fits = card.get("quality_fit") or {}

    def fitted(cell: str) -> str:
        modality, _, kind = cell.partition(":")
        if modality not in fits:
            return "no refit"
        return "yes" if corrupt_variant(modality, kind) in fits[modality]["kinds"] else "held out"

    quality_rows = "\n".join(f"| {cell} | {value:.3f} | {fitted(cell)} |" for cell, value in quality.items())
    def detector(fit: dict[str, Any]) -> str:
        share = float(fit.get("raw_share", 1.0 if fit["raw_input"] else 0.0))
        if share <= 0:
            return "the queue-statistics detector"
        if share >= 1:
            return "the detector on queue statistics + raw encoder output"
        return (f"{1 - share:g} × the queue-statistics detector + {share:g} × the one on queue statistics + raw "
                "encoder output")

    inputs = "; ".join(f"{m}: {detector(fit)}" for m, fit in fits.items())
    quality_part = f"""
## Quality AUROC (test split: clean vs content-corrupted input of each modality; 0.5 = cannot tell)

| modality:fault | AUROC | in the detector's fit |
|---|---:|---|
{quality_rows}
{f"{chr(10)}Detector inputs: {inputs}.{chr(10)}" if inputs else ""}""" if quality else ""
    data_command = card.get("data_command", DATA_COMMAND)
    return f"""# Model card: the shipped serving head `{card['name']}`

The serving head (DRF quality + {card['recovery']} recovery + fusion) that `sentiment-stream export --shipped`
and `make demo` serve when no model was exported. Written by `sentiment-stream ship` on {card['shipped_utc']}.

| | |
|---|---|
| trained with | `{card['command']}` |
| seed | {card['seed']} (best epoch {card['best_epoch']} of {card['epochs_run']}) |
| parameters | {card['n_parameters']:,} |
| data | {data_line} |
| encoders | {encoders} |
| weights | `head.pt` sha256 `{card['head_pt_sha256'][:16]}…` |
| int8 text encoder | {int8.get('reason', 'not measured')} |

**Synthetic pairing.** The tweets and their labels are real; each post's image and transcript are drawn by label
(p = 0.5), so what the fusion gains over text alone measures that rule, not real multimodal sentiment
(docs/data.md; docs/results.md shows the text-only and random-pairing controls).

## Test split (percent; the protocol of docs/results.md, seed {card['seed']})

| condition | accuracy | weighted F1 | macro F1 |
|---|---:|---:|---:|
{rows}
{quality_part}
Reproduce: build the full benchmark (`{data_command}`), then the command above
with `--data-dir DATA`; `sentiment-stream export --model-dir OUT --out EXPORT --data-dir DATA` and
`sentiment-stream ship --model-dir OUT --export EXPORT --data-dir DATA` rewrite this folder.
"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model-dir", type=Path, required=True, help="the trained serving head")
    parser.add_argument("--export", type=Path, required=True, help="its export (`sentiment-stream export`)")
    parser.add_argument("--data-dir", type=Path, required=True, help="the full benchmark it was trained on")
    parser.add_argument("--out", type=Path, default=SHIPPED_MODEL_DIR, help="where the shipped head lives")
    parser.add_argument("--command", required=True, help="the train command line, for the card")
    parser.add_argument("--data-command", default=DATA_COMMAND, help="the benchmark build command line, for the card")


def run(args: argparse.Namespace) -> int:
    try:
        card = ship(args.model_dir, args.export, args.data_dir, args.out, args.command, args.data_command)
    except (ValueError, FileNotFoundError) as exc:
        print(f"error: {exc}")
        return 2
    print(json.dumps({k: card[k] for k in ("name", "seed", "test_metrics", "int8")}, indent=1, default=str))
    return 0
