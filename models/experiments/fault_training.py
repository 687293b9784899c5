"""Feature-noise training vs training on real content faults: the comparison tables.

``python -m models.experiments.fault_training --noise RESULTS_A --real RESULTS_B [--seed S]``

``RESULTS_A`` / ``RESULTS_B`` are ``sentiment-stream evaluate --out`` folders of the same methods and
seed, trained with ``--train-corruption noise`` and ``--train-corruption real`` on a cache whose train,
val and test splits have the per-kind ``corrupt_*`` variants (docs/data.md). Prints Markdown: per text
fault the weighted and macro F1 next to the text dropped (``fixed_D_text``) and ``random_C+D_0.6``; the
share of the majority predicted class per text fault; the image and transcript faults. Values in percent:
one seed with ``--seed S``, else mean ± std over the seeds both runs have.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import numpy as np

from models.disruptions import CORRUPT_KINDS, corrupt_variant

__all__ = ["comparison_markdown", "main"]


def _fault_conditions(modality: str) -> list[tuple[str, str]]:
    """(condition, column label) of every content fault of ``modality``, masking first."""
    out = [(f"fixed_C_{modality}", "mask")]
    out += [(f"fixed_C_{modality}_{k}", k) for k in CORRUPT_KINDS[modality][1:]]
    return out


def _value(results: dict[str, Any], method: str, seed: int | None, condition: str, metric: str) -> str:
    """One seed's value, or the mean ± std over seeds (``seed`` None), in percent; "—" when absent."""
    per_seed = results.get("per_seed", {}).get(method, {})  # results.json keys seeds as strings
    seeds = [str(seed)] if seed is not None else sorted(per_seed)
    values = [float(per_seed[s][condition][metric]) for s in seeds
              if metric in per_seed.get(s, {}).get(condition, {})]
    if not values:
        return "—"
    if seed is not None:
        return f"{100 * values[0]:.1f}"
    return f"{100 * np.mean(values):.1f} ± {100 * np.std(values):.1f}"


def comparison_markdown(noise: dict[str, Any], real: dict[str, Any], seed: int | None = 0) -> str:
    """The Markdown tables of the module docstring."""
    methods = [m for m in noise.get("per_seed", {}) if m in real.get("per_seed", {})]
    runs = [(m, "noise", noise) for m in methods] + [(m, "real", real) for m in methods]
    runs.sort(key=lambda r: (methods.index(r[0]), r[1] != "noise"))
    text = _fault_conditions("text")
    seeds = f"seed {seed}" if seed is not None else f"mean ± std over seeds {noise.get('seeds')}"
    lines: list[str] = [f"Test n = {noise.get('n_test')}, {seeds}. Values in percent.", ""]
    def table(title: str, columns: list[tuple[str, str]], metric: str) -> None:
        lines.extend([f"**{title}**", "", "| head | training | " + " | ".join(label for _, label in columns) + " |",
                      "|---|---|" + "---|" * len(columns)])
        for method, mode, res in runs:
            cells = [_value(res, method, seed, c, metric) for c, _ in columns]
            lines.append(f"| {method} | {mode} | " + " | ".join(cells) + " |")
        lines.append("")

    text_columns = [("clean", "clean"), ("fixed_D_text", "text dropped"), *[(c, f"C text {k}") for c, k in text]]
    for metric, title in (("weighted_f1", "weighted F1"), ("macro_f1", "macro F1")):
        table(title, [*text_columns, ("random_C+D_0.6", "random C+D 0.6")], metric)
    table("share of the majority predicted class", text_columns, "majority_share")
    for modality in ("transcript", "image"):
        columns = [(f"fixed_D_{modality}", "dropped"), *[(c, k) for c, k in _fault_conditions(modality)]]
        table(f"{modality} faults, macro F1", columns, "macro_f1")
    missing = sorted({corrupt_variant(m, k) for m in CORRUPT_KINDS for k in CORRUPT_KINDS[m]
                      if (f"fixed_C_{m}" if k == "mask" else f"fixed_C_{m}_{k}") in noise.get("skipped", [])})
    if missing:
        lines += [f"Not in the cache (skipped): {', '.join(missing)}", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--noise", type=Path, required=True, help="evaluate --out of the feature-noise runs")
    parser.add_argument("--real", type=Path, required=True, help="evaluate --out of the real-fault runs")
    parser.add_argument("--seed", type=int, default=None, help="one seed (default: mean ± std over seeds)")
    args = parser.parse_args(argv)
    noise = json.loads((args.noise / "results.json").read_text())
    real = json.loads((args.real / "results.json").read_text())
    print(comparison_markdown(noise, real, args.seed))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
