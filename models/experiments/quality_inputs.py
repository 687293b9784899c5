"""What the learned quality's detector inputs buy, per fault kind, on trained heads (no retraining).

``python -m models.experiments.quality_inputs --data-dir BENCH --runs RUN [RUN ...] --out DIR``

Each ``RUN`` is a trained model dir of a head with a learned, refitted quality whose detector has raw
inputs (``drf.quality=learned``, ``drf.quality_refit=true``, ``drf.quality_raw=auto`` or ``all``). For every
run the detector is refitted six ways on the same frozen head, the same train/val rows and the same
cached realistic faults (every ``corrupt_*`` variant of the train split but the papers' masking):

* ``stats`` — a detector on the queue statistics of the projected feature only (what ``quality_raw=none``
  fits);
* ``raw`` — a detector on the statistics and the modality's raw encoder output;
* ``blend 0.25`` / ``0.5`` / ``0.75`` — the logit ``(1 - share) * stats + share * raw`` of the two;
* ``auto`` — per modality the share (0, 0.25, 0.5, 0.75, 1) with the best worst val AUROC over fault kinds
  left out of the fit (what ``quality_raw=auto`` ships).

Each is scored by :func:`models.evaluate.quality_auroc` on the test split: clean vs the cached corrupted
input of every test post, per ``modality:kind``, the papers' masking included (never in a fit). Writes
``quality_inputs.json`` (per run and mean over runs) and ``quality_inputs.md``. The classification of a head
is untouched: only the detector is refitted, so nothing but the ``quality`` output changes.
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from models.evaluate import EvalData, quality_auroc
from models.train import attach_corrupted, load_model_dir, load_table, refit_quality

log = logging.getLogger(__name__)

# input set -> the refit's use_raw: the raw-reading detector's share of the blend (0: statistics only), None: auto
INPUTS: dict[str, float | None] = {
    "stats": 0.0, "blend 0.25": 0.25, "blend 0.5": 0.5, "blend 0.75": 0.75, "raw": 1.0, "auto": None
}
# the bar of docs/robustness/quality.md: the papers' masking 0.90, every realistic kind 0.75
MASK_BAR, REALISTIC_BAR = 0.90, 0.75


def bar(cell: str) -> float:
    return MASK_BAR if cell.endswith(":mask") else REALISTIC_BAR


def measure(run: Path, data_dir: Path, test: EvalData) -> dict[str, Any]:
    """Test AUROC per cell of each input set's refit on one trained head."""
    model, _ = load_model_dir(run)
    train = attach_corrupted(load_table(data_dir, "train"), data_dir, "train")
    val = attach_corrupted(load_table(data_dir, "val"), data_dir, "val")
    out: dict[str, Any] = {"run": str(run), "auroc": {}, "fit": {}, "seconds": {}}
    for name, use_raw in INPUTS.items():
        head = copy.deepcopy(model)
        started = time.perf_counter()
        fit = refit_quality(head, train, val, use_raw=use_raw)
        out["seconds"][name] = round(time.perf_counter() - started, 1)
        out["fit"][name] = fit
        out["auroc"][name] = {k: round(v, 4) for k, v in quality_auroc(head, test).items()}
        log.info("%s %s: %s", run, name, out["auroc"][name])
    return out


def summarise(runs: list[dict[str, Any]]) -> dict[str, Any]:
    cells = list(runs[0]["auroc"]["stats"])
    mean = {name: {c: round(float(np.mean([r["auroc"][name][c] for r in runs])), 4) for c in cells} for name in INPUTS}
    std = {name: {c: round(float(np.std([r["auroc"][name][c] for r in runs])), 4) for c in cells} for name in INPUTS}
    met = {name: sum(mean[name][c] >= bar(c) for c in cells) for name in INPUTS}
    return {"cells": cells, "mean": mean, "std": std, "cells_at_bar": met, "n_runs": len(runs)}


def markdown(summary: dict[str, Any], runs: list[dict[str, Any]]) -> str:
    cells = summary["cells"]
    head = "| detector inputs | " + " | ".join(cells) + " | at the bar |"
    rule = "|---|" + "---:|" * (len(cells) + 1)
    bars = "| bar | " + " | ".join(f"{bar(c):.2f}" for c in cells) + " | |"
    rows = []
    for name in INPUTS:
        values = [summary["mean"][name][c] for c in cells]
        text = [f"**{v:.3f}**" if v >= bar(c) else f"{v:.3f}" for v, c in zip(values, cells, strict=True)]
        rows.append(f"| {name} | " + " | ".join(text) + f" | {summary['cells_at_bar'][name]} of {len(cells)} |")
    chosen = [
        f"{Path(r['run']).name}: "
        + ", ".join(f"{m} raw share {f.get('raw_share', 0):g}" for m, f in r["fit"]["auto"].items())
        for r in runs
    ]
    return "\n".join([head, rule, bars, *rows, "", "`auto` chose: " + "; ".join(chosen), ""])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m models.experiments.quality_inputs",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--data-dir", type=Path, required=True, help="the benchmark the runs were trained on")
    parser.add_argument("--runs", type=Path, nargs="+", required=True, help="trained model dirs")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    torch.set_num_threads(args.threads)
    test = EvalData.load(args.data_dir, "test")
    runs = [measure(run, args.data_dir, test) for run in args.runs]
    summary = summarise(runs)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "quality_inputs.json").write_text(json.dumps({"summary": summary, "runs": runs}, indent=1) + "\n")
    (args.out / "quality_inputs.md").write_text(markdown(summary, runs))
    print(markdown(summary, runs))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
