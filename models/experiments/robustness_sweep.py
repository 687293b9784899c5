"""Issue 7: the served model vs the zero-fill late-fusion baseline across modality drop rates, through the real stream.

``python -m models.experiments.robustness_sweep [--posts N] [--rates 0,0.3,0.6,0.9] [--seed 0]
[--text-corrupt-rates 0.3,0.6] [--text-kinds mask,delete,truncate,typos] [--skip-drops] [--reuse]``

1. A recording of N labelled test posts with all three modalities (a seeded sample of the benchmark's
   ``test`` split; synthetic Poisson timing, byte-identical for the same N and seed).
2. The local stack (started if needed) and one ``sentiment-stream worker`` serving the exported model, on
   fresh topics and a fresh consumer group, with its own metrics/health ports and Redis database.
3. For each drop rate r: ``replay --as-fast-as-possible --drop image=r,transcript=r --seed S`` through
   the broker and the worker; one seed for every rate, so the drops are nested across rates.
   Then, for each text kind k and text rate r (``--text-kinds``, ``--text-corrupt-rates``): ``replay
   --corrupt text=r --text-corruption k --seed S`` with no drops (image and transcript stay present),
   after a clean run (no faults) that is the reference when the drop sweep has no drop 0.0 of its own
   (``--skip-drops`` runs only these). Every run's raw result is saved in the work dir; ``--reuse``
   rescores saved results (the drop runs all together, the text-fault runs one by one).
4. After the worker has stopped (so its latency is not disturbed): the baselines on exactly the inputs
   the worker saw (``plan_recording`` with the run's id → ``decode_post`` → the export's ONNX encoders
   via :class:`~stream.service.scoring.PostScorer` → a trained PyTorch head): ``late_zero`` (zero-fill late
   fusion) and ``text_only``.
5. Per-rate reports (``build_report`` with the baselines), one comparison (``compare_reports``), an
   offline random-pairing control on cached features, and the summary ``docs/robustness.md``.
   For the text faults: ``text-faults.md`` / ``text-faults.json`` in ``--out`` (``docs/robustness``): per
   (kind, rate), served vs ``late_zero`` vs ``text_only`` on the posts whose text was corrupted (and on all
   posts), paired-bootstrap intervals of served − each baseline, each scorer's majority-class share, and
   each scorer on the same posts clean; ``docs/robustness.md`` is never written from them.

Pairing of images and transcripts with tweets is synthetic (by label with probability p, docs/data.md);
the summary says so, with p and the seed from the benchmark manifest, and shows the text-only scorer and
the random-pairing control beside fusion.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import os
import shutil
import time
import uuid
from collections import Counter
from collections.abc import Callable, Collection, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from models.common import View
from models.train import load_model_dir, load_table, predict_proba
from stream.service.events import LABELS, MODALITIES, Post, decode_post
from stream.service.manifest import Manifest
from stream.service.scoring import PostScorer
from stream.service.settings import Settings, get_settings
from stream.tools.dataset import benchmark_posts
from stream.tools.faults import TEXT_CORRUPTIONS
from stream.tools.launcher import WorkerNotReady, WorkerProcess
from stream.tools.recording import write_recording
from stream.tools.replay import EVENT, Faults, ReplayOptions, ReplayResult, plan_recording, replay
from stream.tools.replay_results import PublishedPost
from stream.tools.report import (
    build_report,
    classification_metrics,
    compare_reports,
    normalize_predictions,
    served_predictions,
    strict_json,
)
from stream.tools.services import LocalStack, create_topics

REPO = Path(__file__).resolve().parents[2]
DEFAULT_RATES = (0.0, 0.3, 0.6, 0.9)
KEEP_IN_DOCS = ("report.md", "report.json")  # per rate; plots and the raw result go to the work dir
Prediction = tuple[str, str | None, Sequence[float] | None]


def _say(message: str) -> None:
    print(f"[sweep {time.strftime('%H:%M:%S')}] {message}", flush=True)


def _loadavg() -> float:
    with open("/proc/loadavg") as fh:
        return float(fh.read().split()[0])


# -- 1. the recording ------------------------------------------------------------------------------


def make_recording(data_dir: Path, n: int, seed: int, path: Path) -> list[str]:
    """N labelled test posts with text, image and transcript, sampled with ``seed``; returns their ids."""
    rows = [
        r
        for r in benchmark_posts(data_dir, "test")
        if r.get("label") in LABELS and r.get("text") and r.get("image") is not None and r.get("transcript")
    ]
    if n > len(rows):
        raise SystemExit(f"only {len(rows)} complete labelled test posts; asked for {n}")
    pick = sorted(np.random.default_rng(seed).choice(len(rows), size=n, replace=False).tolist())
    chosen = [rows[i] for i in pick]
    path.parent.mkdir(parents=True, exist_ok=True)
    write_recording(
        path,
        chosen,
        start_ts=1_700_000_000.0,
        rate=50.0,
        seed=seed,
        created=1_700_000_000.0,
        meta={"split": "test", "synthetic_pairing": True, "sample": n, "sample_seed": seed},
    )
    return [str(r["id"]) for r in chosen]


# -- 2. the worker ---------------------------------------------------------------------------------


def sweep_settings(base: Settings, model_dir: Path, redis_db: int) -> Settings:
    suffix = uuid.uuid4().hex[:8]
    host, port = base.redis_host_port
    return base.model_copy(
        update={
            "topic_posts": f"posts-sweep-{suffix}",
            "topic_sentiment": f"sentiment-sweep-{suffix}",
            "topic_dlq": f"posts-dlq-sweep-{suffix}",
            "consumer_group": f"sentiment-sweep-{suffix}",
            "model_dir": model_dir,
            "redis_url": f"redis://{host}:{port}/{redis_db}",
        }
    )


@contextmanager
def running_worker(settings: Settings, log_path: Path, ready_s: float = 240.0) -> Iterator[WorkerProcess]:
    """One worker on free ports, healthy, stopped (SIGTERM, SIGKILL after 60 s) on exit."""
    worker = WorkerProcess(settings, log_path, cwd=REPO).start()
    try:
        try:
            worker.wait_ready(timeout=ready_s)
        except WorkerNotReady as exc:
            raise SystemExit(str(exc)) from None
        _say(f"worker up (pid {worker.pid}); log {log_path}")
        yield worker
    finally:
        code = worker.terminate(timeout=60)
        _say(f"worker stopped (pid {worker.pid}, exit {code})")


# -- 4. baselines on exactly the worker's inputs -----------------------------------------------------


class FeatureCache:
    """ONNX encodings of post contents (the export's encoders), cached by content: drops never change content."""

    def __init__(self, scorer: PostScorer) -> None:
        self.scorer = scorer
        self.cache: dict[tuple[str, str], np.ndarray] = {}

    @staticmethod
    def _key(modality: str, post: Post) -> tuple[str, str]:
        data = {"text": post.text, "transcript": post.transcript}.get(modality)
        raw = post.image if modality == "image" else (data or "").encode()
        return modality, hashlib.sha256(raw or b"").hexdigest()

    def features(self, posts: Sequence[Post]) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """text [n,384], image [n,1280], transcript [n,384] (zeros where absent) and present [n,3]."""
        n = len(posts)
        present = np.zeros((n, 3), np.float32)
        present[:, 0] = [p.text is not None for p in posts]
        present[:, 1] = [p.pixels is not None for p in posts]
        present[:, 2] = [p.transcript is not None for p in posts]
        dims = (384, 1280, 384)
        out = [np.zeros((n, d), np.float32) for d in dims]
        for j, modality in enumerate(MODALITIES):
            todo: dict[tuple[str, str], Post] = {}
            for i, post in enumerate(posts):
                if present[i, j]:
                    key = self._key(modality, post)
                    if key not in self.cache:
                        todo.setdefault(key, post)
            keys = list(todo)
            for start in range(0, len(keys), 64):
                chunk = keys[start : start + 64]
                batch = [todo[k] for k in chunk]
                if modality == "image":
                    vecs = self.scorer.encode_images(batch)
                elif modality == "text":
                    vecs = self.scorer.encode_texts([p.text or "" for p in batch], self.scorer.tokenizer)
                else:
                    vecs = self.scorer.encode_texts(
                        [p.transcript or "" for p in batch], self.scorer.transcript_tokenizer
                    )
                for k, v in zip(chunk, vecs, strict=True):
                    self.cache[k] = np.asarray(v, np.float32)
            for i, post in enumerate(posts):
                if present[i, j]:
                    out[j][i] = self.cache[self._key(modality, post)]
        return out[0], out[1], out[2], present


def worker_inputs(result: ReplayResult, settings: Settings) -> list[tuple[str, Post]]:
    """The valid posts of a run exactly as published (faults applied with the run's id and seed)."""
    faults = Faults.from_dict(result.options["faults"])
    return [
        (p.info.original_id, decode_post(p.payload(None), settings=settings))
        for p in plan_recording(result.recording, faults, run_id=result.run_id, settings=settings)
        if p.info.expected == EVENT
    ]


def head_predictions(model: torch.nn.Module, ids: Sequence[str], feats: Sequence[np.ndarray]) -> list[Prediction]:
    present = feats[3]
    # the heads were trained on zero-filled features with the presence mask (models.train.load_table / disrupt)
    t, im, tr = (torch.from_numpy(np.ascontiguousarray(x * present[:, j : j + 1])) for j, x in enumerate(feats[:3]))
    view = View(t, im, tr, torch.from_numpy(present))
    probs = predict_proba(model, view)
    return [(i, None, p.tolist()) for i, p in zip(ids, probs, strict=True)]


def encoder_parity(data_dir: Path, ids: Sequence[str], feats: Sequence[np.ndarray]) -> dict[str, float]:
    """Max |ONNX encoding here − the benchmark's cached feature| per modality (present entries only)."""
    table = load_table(data_dir, "test")
    index = {str(t): k for k, t in enumerate(table.ids)}
    rows = table.rows(np.asarray([index[i] for i in ids]))
    present = feats[3] > 0
    return {
        m: float(np.abs(feats[j][present[:, j]] - rows.features[j][present[:, j]]).max(initial=0.0))
        for j, m in enumerate(MODALITIES)
    }


# -- 5. the random-pairing control (offline, cached features) ---------------------------------------


def control_rows(
    data_dir: Path,
    ids: Sequence[str],
    results: Sequence[tuple[float, ReplayResult]],
    scorers: dict[str, Callable[[Sequence[np.ndarray]], np.ndarray]],
) -> list[dict[str, Any]]:
    """Each scorer on the cached features of the same tweets paired as in ``test`` (p) and in
    ``control_test`` (random pairing), with the presence pattern each post had in each stream run."""
    rows: list[dict[str, Any]] = []
    tables = {}
    for split in ("test", "control_test"):
        table = load_table(data_dir, split)
        index = {str(t): k for k, t in enumerate(table.ids)}
        missing = [i for i in ids if i not in index]
        if missing:
            raise ValueError(f"{len(missing)} sampled ids missing from the cached {split} features")
        tables[split] = table.rows(np.asarray([index[i] for i in ids]))
    for rate, result in results:
        present_of = {p.original_id: p.present for p in result.posts if p.expected == EVENT}
        mask = np.asarray([[m in present_of.get(i, MODALITIES) for m in MODALITIES] for i in ids], np.float32)
        for split, table in tables.items():
            present = mask * table.available
            feats = [x * present[:, j : j + 1] for j, x in enumerate(table.features)] + [present]
            y_true = [LABELS[k] for k in table.label]
            for name, score in scorers.items():
                probs = score(feats)
                y_pred = [LABELS[k] for k in probs.argmax(1)]
                rows.append({"rate": rate, "pairing": split, "scorer": name} | classification_metrics(y_true, y_pred))
    return rows


# -- paired bootstrap -------------------------------------------------------------------------------


def _f1s(true: np.ndarray, pred: np.ndarray) -> tuple[float, float]:
    """(weighted F1, macro F1) over the three labels, label indices as int arrays."""
    k = len(LABELS)
    tp = np.bincount(true[true == pred], minlength=k).astype(float)
    n_pred = np.bincount(pred, minlength=k).astype(float)
    n_true = np.bincount(true, minlength=k).astype(float)
    denom = n_pred + n_true
    f1 = np.divide(2 * tp, denom, out=np.zeros(k), where=denom > 0)
    seen = denom > 0
    return float((f1 * n_true).sum() / n_true.sum()), float(f1[seen].mean())


def paired_bootstrap(
    result: ReplayResult,
    baselines: Mapping[str, list[Prediction]],
    pairs: Sequence[tuple[str, str]],
    n_boot: int,
    seed: int,
    only: Collection[str] | None = None,
) -> dict[str, dict[str, Any]]:
    """Differences a − b in weighted and macro F1 on the same posts, with 95 % paired-bootstrap intervals.

    ``only``: original ids to restrict the comparison to (e.g. the posts whose text was corrupted); all if None.
    """
    preds = {"served": served_predictions(result)} | {
        k: normalize_predictions(v, result.run_id) for k, v in baselines.items()
    }
    posts = [
        p
        for p in result.posts
        if p.expected == EVENT and p.label is not None and (only is None or p.original_id in only)
    ]
    out: dict[str, dict[str, Any]] = {}
    rng = np.random.default_rng(seed)
    for a, b in pairs:
        both = [p for p in posts if p.original_id in preds[a] and p.original_id in preds[b]]
        true = np.asarray([LABELS.index(p.label or "") for p in both])
        pa = np.asarray([LABELS.index(preds[a][p.original_id]) for p in both])
        pb = np.asarray([LABELS.index(preds[b][p.original_id]) for p in both])
        if not both:  # nothing to compare (e.g. no post of this run was corrupted)
            nan = {"diff": float("nan"), "ci95": [float("nan"), float("nan")]}
            out[f"{a}-{b}"] = {"n": 0, "weighted_f1": dict(nan), "macro_f1": dict(nan)}
            continue
        point = np.subtract(_f1s(true, pa), _f1s(true, pb))
        draws = np.empty((n_boot, 2))
        for i in range(n_boot):
            idx = rng.integers(0, len(both), len(both))
            draws[i] = np.subtract(_f1s(true[idx], pa[idx]), _f1s(true[idx], pb[idx]))
        lo, hi = np.percentile(draws, [2.5, 97.5], axis=0)
        out[f"{a}-{b}"] = {
            "n": len(both),
            "weighted_f1": {"diff": float(point[0]), "ci95": [float(lo[0]), float(hi[0])]},
            "macro_f1": {"diff": float(point[1]), "ci95": [float(lo[1]), float(hi[1])]},
        }
    return out


# -- the summary -----------------------------------------------------------------------------------


def _f(x: Any, digits: int = 3) -> str:
    if x is None or (isinstance(x, float) and not np.isfinite(x)):
        return "–"
    return f"{x:.{digits}f}" if isinstance(x, float) else str(x)


def _ci(d: dict[str, Any]) -> str:
    lo, hi = d["ci95"]
    return f"{d['diff']:+.3f} [{lo:+.3f}, {hi:+.3f}]"


def _diff_rows(diffs: dict[str, dict[str, dict[str, Any]]]) -> list[str]:
    names = {"served-late_zero": "served − zero-fill", "served-text_only": "served − text only"}
    return [
        f"| {rate} | {names.get(pair, pair)} | {_ci(d['weighted_f1'])} | {_ci(d['macro_f1'])} |"
        for rate, by_pair in diffs.items()
        for pair, d in by_pair.items()
    ]


def _findings(
    reports: Sequence[tuple[float, dict[str, Any]]],
    control: Sequence[dict[str, Any]],
    diffs: dict[str, dict[str, dict[str, Any]]],
) -> list[str]:
    """Plain statements computed from the numbers above (so a re-run cannot leave stale prose)."""

    def overall(rate: float, scorer: str) -> dict[str, Any]:
        rep = dict(reports)[rate]
        return dict(rep["metrics"].get(scorer, {}).get("overall", {}))

    def ctrl(rate: float, pairing: str, scorer: str) -> dict[str, Any]:
        return next(r for r in control if r["rate"] == rate and r["pairing"] == pairing and r["scorer"] == scorer)

    rates = [r for r, _ in reports]
    lo, hi = rates[0], rates[-1]
    served_lo, served_hi = overall(lo, "served"), overall(hi, "served")
    zero_lo, zero_hi = overall(lo, "late_zero"), overall(hi, "late_zero")
    text = overall(lo, "text_only")
    separated = [
        rate
        for rate, by_pair in diffs.items()
        if "served-late_zero" in by_pair
        and (
            by_pair["served-late_zero"]["macro_f1"]["ci95"][0] > 0
            or by_pair["served-late_zero"]["macro_f1"]["ci95"][1] < 0
        )
    ]
    out = [
        "**Findings (computed from the tables).**",
        "",
        f"* Served macro F1 goes from {served_lo['macro_f1']:.3f} (drop {lo}) to {served_hi['macro_f1']:.3f} "
        f"(drop {hi}); zero-fill from {zero_lo['macro_f1']:.3f} to {zero_hi['macro_f1']:.3f}.",
        "* Served vs zero-fill: "
        + (
            "the 95 % interval of the macro-F1 difference excludes 0 at drop rate(s) " + ", ".join(separated) + "."
            if separated
            else "the 95 % interval of the macro-F1 difference contains 0 at every drop rate: no difference is "
            "detectable at this N."
        ),
    ]
    if text:
        out.append(
            f"* Text only scores macro F1 {text['macro_f1']:.3f} (flat: it never sees the dropped ones): "
            f"with every modality present, fusion changes macro F1 by {served_lo['macro_f1'] - text['macro_f1']:+.3f} "
            f"(served) / {zero_lo['macro_f1'] - text['macro_f1']:+.3f} (zero-fill) relative to text only."
        )
    with suppress(StopIteration):
        c_served = ctrl(lo, "control_test", "served (FSRF)")
        c_text = ctrl(lo, "control_test", "text only")
        p_served = ctrl(lo, "test", "served (FSRF)")
        out.append(
            f"* Random-pairing control (drop {lo}, offline): with images/transcripts paired at random the served head "
            f"scores macro F1 {c_served['macro_f1']:.3f} against {p_served['macro_f1']:.3f} with the synthetic pairing "
            f"and {c_text['macro_f1']:.3f} for text only. Images and transcripts carry label information here only "
            "through the label-based pairing"
            + (
                "; heads trained with that pairing lean on the extra modalities, so on unrelated images/transcripts "
                "they do worse than text alone (and dropping modalities then helps them)."
                if c_served["macro_f1"] < c_text["macro_f1"]
                else "."
            )
        )
    gaps = []
    for rate in rates:
        with suppress(StopIteration):
            offline = ctrl(rate, "test", "served (FSRF)")["macro_f1"]
            gaps.append(f"{overall(rate, 'served')['macro_f1'] - offline:+.3f} (drop {rate})")
    if gaps:
        out.append(
            "* Served in the stream vs the same exported head offline on cached features with the training-time "
            "queue moments (macro F1, stream − offline): " + ", ".join(gaps) + ". The encodings agree (encoder check "
            "above), so the gap comes from the worker's live Redis queue moments (DRF quality weights) instead of "
            "the training-time ones, or from batching numerics; not separated here."
        )
    return out


def plot_sweep(
    path: Path,
    reports: Sequence[tuple[float, dict[str, Any]]],
    control: Sequence[dict[str, Any]],
    diffs: dict[str, dict[str, dict[str, Any]]],
) -> bool:
    """Macro F1 per rate on a zoomed axis (stream scorers + the random-pairing control), and served − zero-fill."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    rates = [r for r, _ in reports]
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(9, 3.4), dpi=90)
    names = {"served": "served (FSRF)", "late_zero": "zero-fill late fusion", "text_only": "text only"}
    for scorer, name in names.items():
        ys = [rep["metrics"][scorer]["overall"]["macro_f1"] for _, rep in reports if scorer in rep["metrics"]]
        if len(ys) == len(rates):
            ax.plot(rates, ys, marker="o", label=f"{name} (stream)")
    for scorer in ("served (FSRF)", "zero-fill late fusion"):
        ys = [r["macro_f1"] for r in control if r["pairing"] == "control_test" and r["scorer"] == scorer]
        if len(ys) == len(rates):
            ax.plot(rates, ys, marker="x", linestyle="--", label=f"{scorer}, random pairing")
    ax.set_xlabel("drop rate (image and transcript)")
    ax.set_ylabel("macro F1")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    pair = "served-late_zero"
    d = [diffs[str(r)][pair]["macro_f1"] for r in rates if pair in diffs.get(str(r), {})]
    if len(d) == len(rates):
        mid = np.asarray([x["diff"] for x in d])
        lo = np.asarray([x["ci95"][0] for x in d])
        hi = np.asarray([x["ci95"][1] for x in d])
        bx.errorbar(rates, mid, yerr=[mid - lo, hi - mid], marker="o", capsize=4)
        bx.axhline(0, color="grey", linewidth=0.8)
    bx.set_xlabel("drop rate (image and transcript)")
    bx.set_ylabel("served − zero-fill, macro F1 (95 % CI)")
    bx.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return True


def write_summary(
    path: Path,
    info: dict[str, Any],
    reports: Sequence[tuple[float, dict[str, Any]]],
    control: Sequence[dict[str, Any]],
    out_dir: Path,
    diffs: dict[str, dict[str, dict[str, Any]]],
) -> None:
    rel = os.path.relpath(out_dir, path.parent)
    data = info["data_manifest"]
    pairing = data.get("pairing", {})
    lines = [
        "# Robustness to missing modalities through the real stream (issue 7)",
        "",
        f"Generated by `python -m models.experiments.robustness_sweep --posts {info['n']} --seed {info['seed']}` on "
        f"{info['date']} on a shared 2-core machine (load ≈ {info['load']:.0f}): the four stream runs took "
        f"{sum(info['run_s'].values()) / 60:.1f} min"
        + (
            " (rescored later from the saved results with `--reuse`)."
            if info["reused"]
            else f", {info['total_s'] / 60:.1f} min in all."
        ),
        "",
        "**Honest data.** Tweets and their labels are real (CrowdFlower); images (emoji) and transcripts are real "
        "labelled items, but **pairing them with a tweet is synthetic**: drawn from the same-label pool with "
        f"probability p_image = {pairing.get('p_image')}, p_transcript = {pairing.get('p_transcript')}, else uniformly "
        f"(benchmark seed {data.get('seed')}, generator {data.get('generator_version')}; every post carries "
        "`synthetic_pairing=true`). Any gain of fusion over text-only comes from that synthetic pairing; the "
        "random-pairing control below (p = 0) shows what is left without it. The recording's arrival times are "
        "synthetic too (Poisson); it was replayed as fast as possible, so latency describes this load on this "
        "machine, nothing more.",
        "",
        "## Setup",
        "",
        f"* **Posts:** N = {info['n']} labelled posts of the benchmark's `test` split with all three modalities "
        f"(seeded sample, seed {info['seed']}), one recording replayed four times.",
        f"* **Faults:** `--drop image=r,transcript=r --seed {info['seed']}` for r in "
        f"{', '.join(str(r) for r in info['rates'])}. One seed → nested drops (the posts that lose a modality at "
        "0.3 also lose it at 0.6). Text is never dropped, so every post keeps at least its text.",
        f"* **Served (FSRF):** `sentiment-stream worker` serving `{info['model_dir']}` (model "
        f"{info['model_version']}, recovery `{info['recovery']}`), one worker, fresh topics and consumer group, its "
        "own Redis database for the DRF queue; the first event per post is scored.",
        f"* **Zero-fill (`late_zero`):** the PyTorch late-fusion head `{info['late_zero']}` (trained on the random "
        "split's cached features) on exactly the inputs the worker saw (`plan_recording` with the run id → "
        "`decode_post` → the export's ONNX encoders → zeros for the missing modalities).",
        f"* **Text only:** `{info['text_only']}` on the same text encodings.",
        "* **Encoder check:** the baselines' ONNX encodings equal the benchmark's cached features (what the heads "
        "were trained on) within max |Δ| = "
        + ", ".join(f"{v:.1e} ({m})" for m, v in info["encoder_parity"].items())
        + f" on the {info['n']} posts.",
        "",
        "## Quality per drop rate (stream, same inputs for every scorer)",
        "",
        "| drop rate | scorer | n | accuracy | weighted F1 | macro F1 |",
        "|---:|---|---:|---:|---:|---:|",
    ]
    for rate, rep in reports:
        for scorer, tables in rep["metrics"].items():
            m = tables["overall"]
            name = {"served": "served (FSRF)", "late_zero": "zero-fill late fusion", "text_only": "text only"}.get(
                scorer, scorer
            )
            lines.append(
                f"| {rate} | {name} | {m['n']} | {_f(m['accuracy'])} | {_f(m['weighted_f1'])} | {_f(m['macro_f1'])} |"
            )
    lines += [
        "",
        f"![macro F1 per drop rate, and served − zero-fill]({rel}/sweep.png)",
        "",
        "## Served minus baseline (paired bootstrap)",
        "",
        "Differences on the same posts (served − baseline), with 95 % intervals from 2,000 paired bootstrap "
        "resamples of the posts. An interval that contains 0 means this sample cannot tell the two apart.",
        "",
        "| drop rate | comparison | Δ weighted F1 [95 % CI] | Δ macro F1 [95 % CI] |",
        "|---:|---|---|---|",
        *_diff_rows(diffs),
        "",
        *_findings(reports, control, diffs),
        "",
        "## Delivery and latency (served)",
        "",
        "| drop rate | published | events | lost | duplicated ids | extra copies | DLQ | present mismatch | "
        "latency p50 / p95 / p99 (s) | events/s | run (s) |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---|---:|---:|",
    ]
    for rate, rep in reports:
        d = rep["delivery"]
        lat = rep["latency_s"]["event"]
        tp = rep["throughput"]
        lines.append(
            f"| {rate} | {d['published']} | {d['events_received_distinct']} | {d['lost_events']} | "
            f"{d['duplicated_event_ids']} | {d['duplicate_event_copies']} | {d['dead_letters_received_total']} | "
            f"{d['present_mismatch']} | {_f(lat['p50'], 2)} / {_f(lat['p95'], 2)} / "
            f"{_f(lat['p99'], 2)} | {_f(tp.get('events_per_s'), 1)} | {info['run_s'][str(rate)]:.0f} |"
        )
    lines += [
        "",
        "Latency is the event's `latency_s` (publish → emit). Replaying as fast as possible puts the whole "
        "recording in the topic within seconds, so these numbers are dominated by queueing behind the backlog "
        "(the worker's throughput on a loaded machine), not by the per-post service time.",
        "",
        "## Random-pairing control (offline, cached features)",
        "",
        "The same tweets with the presence pattern each post had in the stream run, scored offline on the feature "
        "cache: paired as in `test` (p as above) and as in `control_test` (images/transcripts paired at random, "
        "p = 0). Same heads as above (served = the exported ONNX head with the training-time queue moments; the "
        "worker uses the live Redis queue moments instead, so its stream rows differ slightly from the offline "
        "served rows; see the findings).",
        "",
        "| drop rate | pairing | scorer | accuracy | weighted F1 | macro F1 |",
        "|---:|---|---|---:|---:|---:|",
    ]
    for row in control:
        pair = "synthetic p" if row["pairing"] == "test" else "random (control)"
        lines.append(
            f"| {row['rate']} | {pair} | {row['scorer']} | {_f(row['accuracy'])} | {_f(row['weighted_f1'])} | "
            f"{_f(row['macro_f1'])} |"
        )
    lines += [
        "",
        "## Files",
        "",
        f"* `{rel}/sweep.png`: the plot above; `{rel}/comparison.md`, `comparison.json`, `comparison.png`: the "
        "table and plot across rates from `compare_reports` (full 0–1 axis).",
        f"* `{rel}/drop-<r>/report.md`, `report.json`: the full report per rate (per missing pattern, per fault, "
        "DLQ, delivery, latency, throughput) with the baselines side by side.",
        f"* `{rel}/sweep.json`: the run's parameters, timings and the control rows.",
        "",
        "Reproduce: `python -m models.experiments.robustness_sweep --posts N` "
        "(starts the local stack if needed, one worker, "
        "stops the worker at the end). Raw results and plots per rate stay in the work dir "
        f"(`{info['work_dir']}`).",
        "",
    ]
    path.write_text("\n".join(lines))


# -- text content faults (issue: --corrupt text=r with masking and the realistic kinds) ------------------

DEFAULT_TEXT_RATES = (0.3, 0.6)
DEFAULT_TEXT_KINDS = ("mask", "delete", "truncate", "typos")
TEXT_SCORERS = ("served", "late_zero", "text_only")
SCORER_NAMES = {"served": "served (FSRF)", "late_zero": "zero-fill late fusion", "text_only": "text only"}


def text_cell_name(kind: str, rate: float) -> str:
    """The name of a text-fault cell in file names and JSON keys, e.g. ``text-typos-0.3``."""
    return f"text-{kind}-{rate}"


def text_faults(kind: str, rate: float, seed: int) -> Faults:
    """A fraction ``rate`` of the posts get their text corrupted (40–80 % of the words) with ``kind``; no drops."""
    return Faults(corrupt={"text": rate}, text_corruption=(kind,), seed=seed)


def parse_rate_list(spec: str) -> list[float]:
    """``"0.3,0.6"`` → ``[0.3, 0.6]``; an empty string → ``[]``; every rate in [0, 1]."""
    rates = [float(x) for x in spec.split(",") if x.strip()]
    bad = [r for r in rates if not 0.0 <= r <= 1.0]
    if bad:
        raise ValueError(f"rates must be in [0, 1], got {bad}")
    return rates


def parse_text_kinds(spec: str) -> list[str]:
    """``"mask,typos"`` → ``["mask", "typos"]``, each one of :data:`~stream.tools.faults.TEXT_CORRUPTIONS`."""
    kinds = list(dict.fromkeys(k.strip() for k in spec.split(",") if k.strip()))
    unknown = [k for k in kinds if k not in TEXT_CORRUPTIONS]
    if unknown or not kinds:
        raise ValueError(f"text kinds must be a non-empty list of {', '.join(TEXT_CORRUPTIONS)}, got {spec!r}")
    return kinds


def text_corrupted_ids(result: ReplayResult) -> set[str]:
    """Original ids of the labelled posts expected to be scored whose text this run corrupted."""
    return {
        p.original_id for p in result.posts if p.expected == EVENT and p.label is not None and "text" in p.corrupted
    }


def majority_share(labels: Sequence[str]) -> dict[str, Any]:
    """The most frequent label (ties: the first in :data:`LABELS` order) and its share; share NaN when empty."""
    if not labels:
        return {"majority_label": None, "majority_share": float("nan")}
    counts = Counter(labels)
    order = [*LABELS, *sorted(set(counts) - set(LABELS))]
    top = max((lab for lab in order if lab in counts), key=counts.__getitem__)
    return {"majority_label": top, "majority_share": counts[top] / len(labels)}


def scorer_summary(
    posts: Sequence[PublishedPost], predictions: Mapping[str, str], only: Collection[str] | None = None
) -> dict[str, Any]:
    """n, accuracy, weighted/macro F1 and the majority predicted label's share of one scorer.

    Scored: labelled posts expected to produce an event (restricted to ``only`` when given) that have a
    prediction in ``predictions`` (original id → label).
    """
    y_true: list[str] = []
    y_pred: list[str] = []
    for p in posts:
        if p.expected != EVENT or p.label is None or (only is not None and p.original_id not in only):
            continue
        pred = predictions.get(p.original_id)
        if pred is not None:
            y_true.append(p.label)
            y_pred.append(pred)
    return dict(classification_metrics(y_true, y_pred)) | majority_share(y_pred)


def all_predictions(result: ReplayResult, baselines: Mapping[str, Iterable[Prediction]]) -> dict[str, dict[str, str]]:
    """Every scorer's labels by original id: ``served`` (first event per post) and each baseline."""
    return {"served": served_predictions(result)} | {
        k: normalize_predictions(v, result.run_id) for k, v in baselines.items()
    }


def text_cell(
    result: ReplayResult,
    baselines: Mapping[str, list[Prediction]],
    clean: tuple[ReplayResult, Mapping[str, list[Prediction]]] | None,
    *,
    n_boot: int,
    seed: int,
    text_absent: Collection[str] = (),
) -> dict[str, Any]:
    """One (kind, rate) cell: each scorer on the posts whose text was corrupted and on all posts, the paired
    bootstrap of served − each baseline on the corrupted posts, and each scorer on the same posts clean.

    ``clean``: the clean run (drop 0.0 or the clean cell) and the baselines on its inputs; the reference.
    ``text_absent``: original ids whose corrupted text was blank (the worker treats it as missing).
    """
    faults = result.options.get("faults", {})
    kinds = list(faults.get("text_corruption", ()))
    rate = float(faults.get("corrupt", {}).get("text", float("nan")))
    corrupted = text_corrupted_ids(result)
    preds = all_predictions(result, baselines)
    scorers = [s for s in TEXT_SCORERS if s in preds] + [s for s in preds if s not in TEXT_SCORERS]
    truth = [p.label for p in result.posts if p.original_id in corrupted and p.label is not None]
    pairs = [("served", b) for b in scorers if b != "served"]
    cell: dict[str, Any] = {
        "kind": kinds[0] if len(kinds) == 1 else ",".join(kinds),
        "rate": rate,
        "run_id": result.run_id,
        "published": len(result.posts),
        "timed_out": result.timed_out,
        "lost_events": sum(
            p.expected == EVENT and p.original_id not in preds["served"] and p.id not in result.publish_errors
            for p in result.posts
        ),
        "n_corrupted": len(corrupted),
        "n_corrupted_not_scored_valid": sum("text" in p.corrupted and p.expected != EVENT for p in result.posts),
        "n_text_blank": len(corrupted & set(text_absent)),
        "true_majority": majority_share([t for t in truth if t is not None]),
        "corrupted": {s: scorer_summary(result.posts, preds[s], corrupted) for s in scorers},
        "all": {s: scorer_summary(result.posts, preds[s]) for s in scorers},
        "clean": {},
        "paired_bootstrap": paired_bootstrap(result, baselines, pairs, n_boot=n_boot, seed=seed, only=corrupted),
    }
    if clean is not None:
        clean_result, clean_baselines = clean
        clean_preds = all_predictions(clean_result, clean_baselines)
        cell["clean"] = {
            s: scorer_summary(clean_result.posts, clean_preds[s], corrupted) for s in scorers if s in clean_preds
        }
        cell["clean_run_id"] = clean_result.run_id
    return cell


def _share(m: Mapping[str, Any] | None) -> str:
    if not m or m.get("majority_label") is None:
        return "–"
    return f"{m['majority_share']:.2f} ({str(m['majority_label'])[:3]})"


def _mf1_clean(cell: Mapping[str, Any], scorer: str) -> str:
    m = cell["corrupted"].get(scorer)
    if m is None:
        return "–"
    c = cell["clean"].get(scorer)
    return f"{_f(m['macro_f1'])} ({_f(c['macro_f1']) if c else '–'})"


def _ci_cell(cell: Mapping[str, Any], pair: str) -> str:
    d = cell["paired_bootstrap"].get(pair)
    if d is None or d["n"] == 0:
        return "–"
    return _ci(d["macro_f1"])


def _separated(d: Mapping[str, Any]) -> int:
    """+1 / −1 when the 95 % interval of the macro-F1 difference lies above / below 0, else 0."""
    lo, hi = d["macro_f1"]["ci95"]
    return 1 if lo > 0 else -1 if hi < 0 else 0


def text_fault_tables(cells: Sequence[Mapping[str, Any]]) -> list[str]:
    """Markdown: per rate, one row per kind on the corrupted posts, then the same scorers on all posts."""
    lines: list[str] = []
    rates = list(dict.fromkeys(c["rate"] for c in cells))
    for rate in rates:
        rows = [c for c in cells if c["rate"] == rate]
        lines += [
            f"### Text corrupted in a fraction {rate} of the posts",
            "",
            "On the posts whose text was corrupted (macro F1; in brackets the same scorer on the same posts clean). "
            "Majority share: the share of the most frequent predicted label (first three letters) on those posts; "
            "the last column is the share of the most frequent true label, for reference.",
            "",
            "| kind | n corrupted | served mF1 (clean) | zero-fill mF1 (clean) | text only mF1 (clean) | "
            "served − zero-fill Δ mF1 [95 % CI] | served − text only Δ mF1 [95 % CI] | "
            "majority share served | zero-fill | text only | true labels |",
            "|---|---:|---:|---:|---:|---|---|---:|---:|---:|---:|",
        ]
        for c in rows:
            lines.append(
                f"| {c['kind']} | {c['n_corrupted']} | {_mf1_clean(c, 'served')} | {_mf1_clean(c, 'late_zero')} | "
                f"{_mf1_clean(c, 'text_only')} | {_ci_cell(c, 'served-late_zero')} | {_ci_cell(c, 'served-text_only')} "
                f"| {_share(c['corrupted'].get('served'))} | {_share(c['corrupted'].get('late_zero'))} | "
                f"{_share(c['corrupted'].get('text_only'))} | {_share(c['true_majority'])} |"
            )
        lines += [
            "",
            "All posts of the same runs (corrupted and untouched), macro F1 / weighted F1:",
            "",
            "| kind | n | served | zero-fill | text only |",
            "|---|---:|---:|---:|---:|",
        ]
        for c in rows:
            cols = [
                f"{_f(c['all'][s]['macro_f1'])} / {_f(c['all'][s]['weighted_f1'])}" if s in c["all"] else "–"
                for s in TEXT_SCORERS
            ]
            lines.append(f"| {c['kind']} | {c['all']['served']['n']} | " + " | ".join(cols) + " |")
        blank = [c for c in rows if c["n_text_blank"] or c["n_corrupted_not_scored_valid"]]
        notes = [
            f"{c['kind']}: {c['n_text_blank']} corrupted text(s) left blank (scored without text: the worker treats "
            f"a blank text as missing), {c['n_corrupted_not_scored_valid']} corrupted post(s) no longer valid"
            for c in blank
        ]
        lost = [c for c in rows if c["lost_events"] or c["timed_out"]]
        notes += [
            f"{c['kind']}: {c['lost_events']} post(s) without an event (timed out: {c['timed_out']})"
            for c in lost
        ]
        if notes:
            lines += ["", "Notes: " + "; ".join(notes) + "."]
        lines.append("")
    return lines


def text_fault_findings(cells: Sequence[Mapping[str, Any]]) -> list[str]:
    """Plain statements computed from the cells (so a re-run cannot leave stale prose)."""
    out = ["**Findings (computed from the tables).**", ""]
    for pair, name in (("served-late_zero", "zero-fill"), ("served-text_only", "text only")):
        signs = [
            (_separated(c["paired_bootstrap"][pair]), f"{c['kind']} {c['rate']}")
            for c in cells
            if c["paired_bootstrap"].get(pair, {}).get("n")
        ]
        if not signs:
            continue
        above = [where for sign, where in signs if sign > 0]
        below = [where for sign, where in signs if sign < 0]
        if not above and not below:
            out.append(
                f"* Served vs {name} on the corrupted posts: the 95 % interval of the macro-F1 difference contains 0 "
                "in every cell: no difference is detectable at this N."
            )
        else:
            out.append(
                f"* Served vs {name} on the corrupted posts: served higher (interval above 0) in "
                f"{', '.join(above) or 'no cell'}; lower (interval below 0) in {', '.join(below) or 'no cell'}; "
                "elsewhere the interval contains 0."
            )
    for s in TEXT_SCORERS:
        drops = [
            (c["corrupted"][s]["macro_f1"] - c["clean"][s]["macro_f1"], f"{c['kind']} {c['rate']}")
            for c in cells
            if s in c["corrupted"] and s in c["clean"] and c["corrupted"][s]["n"]
        ]
        shares = [
            (c["corrupted"][s]["majority_share"], f"{c['kind']} {c['rate']}")
            for c in cells
            if s in c["corrupted"] and c["corrupted"][s]["n"]
        ]
        if drops and shares:
            worst, where = min(drops)
            top, at = max(shares)
            out.append(
                f"* {SCORER_NAMES[s]}: on the corrupted posts, macro F1 corrupted − clean is {worst:+.3f} at worst "
                f"({where}); its largest majority share is {top:.2f} ({at})."
            )
    return out


def write_text_faults(md_path: Path, info: Mapping[str, Any], cells: Sequence[Mapping[str, Any]]) -> None:
    """``text-faults.md`` and, beside it, ``text-faults.json`` (the cells with the run's parameters)."""
    data = info.get("data_manifest", {})
    pairing = data.get("pairing", {})
    command = info["command"]
    md_path.parent.mkdir(parents=True, exist_ok=True)
    payload = {k: v for k, v in info.items() if k != "data_manifest"} | {
        "pairing": pairing,
        "data_seed": data.get("seed"),
        "synthetic_pairing": True,
        "cells": list(cells),
    }
    md_path.with_suffix(".json").write_text(json.dumps(strict_json(payload), indent=1, allow_nan=False) + "\n")
    lines = [
        "# Text content faults through the real stream: served vs zero-fill vs text only",
        "",
        f"Generated by `{command}` on {info['date']} (N = {info['n']} posts, seed {info['seed']}; stream runs "
        f"{sum(info['run_s'].values()) / 60:.1f} min"
        + (", some rescored from saved results with `--reuse`" if info["reused"] else "")
        + f"; load ≈ {info['load']:.1f}).",
        "",
        "**Honest data.** Tweets and their labels are real (CrowdFlower); images (emoji) and transcripts are real "
        "labelled items, but **their pairing with a tweet is synthetic** (by label: the same-label pool with "
        f"probability p_image = {pairing.get('p_image')}, p_transcript = {pairing.get('p_transcript')}, else "
        f"uniformly; benchmark seed {data.get('seed')}; see docs/data.md). So the image and transcript still "
        "carry label information when the text is damaged only through that pairing rule: any advantage of "
        "fusion over text only below measures the pairing, not real multimodal sentiment.",
        "",
        "## Setup",
        "",
        f"* **Posts:** the recording of the drop sweep: N = {info['n']} labelled `test` posts with text, image and "
        f"transcript (seed {info['seed']}), replayed as fast as possible through the broker and one worker.",
        "* **Faults:** one replay per (kind, rate): `replay --corrupt text=r --text-corruption KIND --seed "
        f"{info['seed']}`, no drops (image and transcript stay present). A fraction r of the posts gets 40–80 % of "
        "the words of its text damaged: `mask` ([MASK] tokens, the papers' protocol), `delete` (words removed), "
        "`truncate` (the end cut off), `typos` (one character edit per chosen word). One seed: the same posts at "
        "the same damage rate are corrupted for every kind, and those corrupted at 0.3 are among those at 0.6.",
        f"* **Served:** the worker serving `{info['model_dir']}` (model {info['model_version']}, recovery "
        f"`{info['recovery']}`); the first event per post.",
        f"* **Zero-fill (`late_zero`):** `{info['late_zero']}`; **text only:** `{info['text_only']}`; both on exactly "
        "the inputs the worker saw (the run's plan → `decode_post` → the export's ONNX encoders).",
        f"* **Clean reference:** the same scorers on the same posts in the {info['clean_source']} run "
        f"`{info['clean_run']}` (no faults).",
        "* **Intervals:** 95 % paired bootstrap over the corrupted posts (2,000 resamples), served − baseline.",
        "",
        "## Results",
        "",
        *text_fault_tables(cells),
        *text_fault_findings(cells),
        "",
        "## Files",
        "",
        "* `text-faults.json`: every cell (per scorer: n, accuracy, weighted/macro F1 and majority share on the "
        "corrupted posts, on all posts and on the corrupted posts clean; the paired bootstrap; delivery).",
        f"* Raw results and the full per-cell reports stay in the work dir (`{info['work_dir']}`, "
        "`result-<N>-<seed>-text-<kind>-<rate>.json`, `text-<kind>-<rate>/report.md`).",
        "",
        f"Regenerate: `{command}` (starts the local stack if needed and one worker; add `--reuse` to rescore the "
        "saved stream results).",
        "",
    ]
    md_path.write_text("\n".join(lines))


# -- the command -----------------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m models.experiments.robustness_sweep", description=__doc__.split("\n\n")[0]
    )
    p.add_argument("--posts", type=int, default=2000, help="posts in the recording (default 2000)")
    p.add_argument("--rates", default=",".join(str(r) for r in DEFAULT_RATES), help="drop rates (image and transcript)")
    p.add_argument("--seed", type=int, default=0, help="sample and fault seed (default 0)")
    p.add_argument(
        "--text-corrupt-rates",
        default=",".join(str(r) for r in DEFAULT_TEXT_RATES),
        help="fractions of posts whose text is corrupted, one replay per (kind, rate), no drops "
        "(default 0.3,0.6; empty: no text-fault cells)",
    )
    p.add_argument(
        "--text-kinds",
        default=",".join(DEFAULT_TEXT_KINDS),
        help=f"text corruption kinds, one replay each per rate (default {','.join(DEFAULT_TEXT_KINDS)}; "
        f"known: {','.join(TEXT_CORRUPTIONS)})",
    )
    p.add_argument(
        "--skip-drops",
        action="store_true",
        help="run only the text-fault cells (and a clean reference run); no drop sweep, docs/robustness.md untouched",
    )
    settings = get_settings()
    runs = settings.data_dir.parent / "runs"  # next to the benchmark: <runs>/<split>/<method>/seed<S>
    p.add_argument("--data-dir", type=Path, default=settings.data_dir, help="built benchmark (settings.data_dir)")
    p.add_argument("--model-dir", type=Path, default=settings.model_dir, help="exported model the worker serves")
    p.add_argument("--late-zero", type=Path, default=runs / "random" / "late_zero" / "seed0")
    p.add_argument("--text-only", type=Path, default=runs / "random" / "text_only" / "seed0")
    p.add_argument("--out", type=Path, default=REPO / "docs" / "robustness", help="reports (committed)")
    p.add_argument("--summary", type=Path, default=REPO / "docs" / "robustness.md")
    p.add_argument("--work-dir", type=Path, default=None, help="recording, raw results, plots (default: state dir)")
    p.add_argument("--reuse", action="store_true", help="reuse the stream results saved in the work dir (rescore only)")
    p.add_argument("--redis-db", type=int, default=9, help="Redis database for the worker's DRF queue (default 9)")
    p.add_argument("--timeout", type=float, default=900.0, help="replay timeout after publishing, s (default 900)")
    return p.parse_args(argv)


def regenerate_command(args: argparse.Namespace, kinds: Sequence[str]) -> str:
    """The command line that regenerates the text-fault files: the run's choices, paths only where not default."""
    defaults = parse_args([])
    parts = ["python -m models.experiments.robustness_sweep", f"--posts {args.posts}", f"--seed {args.seed}"]
    if args.skip_drops:
        parts.append("--skip-drops")
    elif args.rates != defaults.rates:
        parts.append(f"--rates {args.rates}")
    parts += [f"--text-corrupt-rates {args.text_corrupt_rates}", f"--text-kinds {','.join(kinds)}"]
    for flag in ("data_dir", "model_dir", "late_zero", "text_only", "out"):
        if getattr(args, flag) != getattr(defaults, flag):
            parts.append(f"--{flag.replace('_', '-')} {getattr(args, flag)}")
    return " ".join(parts)


@dataclass
class Scoring:
    """What scores the baselines offline: the export's encoders (cached) and the two PyTorch heads."""

    settings: Settings
    manifest: Manifest
    scorer: PostScorer
    cache: FeatureCache
    late_zero: torch.nn.Module
    text_only: torch.nn.Module | None
    lz_meta: dict[str, Any]
    to_meta: dict[str, Any]

    @classmethod
    def load(cls, args: argparse.Namespace, settings: Settings) -> Scoring:
        manifest = Manifest.load(args.model_dir)
        scorer = PostScorer(manifest, settings)
        late_zero, lz_meta = load_model_dir(args.late_zero)
        text_only, to_meta = load_model_dir(args.text_only) if args.text_only.is_dir() else (None, {})
        return cls(settings, manifest, scorer, FeatureCache(scorer), late_zero, text_only, lz_meta, to_meta)

    def baselines(
        self, result: ReplayResult
    ) -> tuple[dict[str, list[Prediction]], list[tuple[str, Post]], tuple[np.ndarray, ...]]:
        """The heads' predictions on exactly the worker's inputs of ``result``, the inputs and their features."""
        inputs = worker_inputs(result, self.settings)
        pids = [i for i, _ in inputs]
        feats = self.cache.features([p for _, p in inputs])
        out = {"late_zero": head_predictions(self.late_zero, pids, feats)}
        if self.text_only is not None:
            out["text_only"] = head_predictions(self.text_only, pids, feats)
        return out, inputs, feats


def _replay_run(settings: Settings, recording: Path, faults: Faults, timeout: float, what: str) -> ReplayResult:
    options = ReplayOptions(faults=faults, speed=None, timeout_s=timeout, settle_s=2.0)
    t0 = time.monotonic()
    result = asyncio.run(replay(settings, recording, options))
    got = len({e.id for e in result.events})
    _say(
        f"{what}: run {result.run_id}, {len(result.posts)} published, {got} with events, "
        f"timed out {result.timed_out}, {time.monotonic() - t0:.0f} s"
    )
    return result


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    started = time.monotonic()
    try:
        rates = [] if args.skip_drops else [float(r) for r in args.rates.split(",")]
        text_rates = parse_rate_list(args.text_corrupt_rates)
        kinds = parse_text_kinds(args.text_kinds) if text_rates else []
    except ValueError as exc:
        raise SystemExit(f"error: {exc}") from None
    if not rates and not text_rates:
        raise SystemExit("error: nothing to run (--skip-drops with no --text-corrupt-rates)")
    base = get_settings()
    work = args.work_dir or base.state_dir / "robustness-sweep"
    work.mkdir(parents=True, exist_ok=True)
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(1)

    recording = work / f"test-{args.posts}-seed{args.seed}.srec"
    t0 = time.monotonic()
    ids = make_recording(args.data_dir, args.posts, args.seed, recording)
    _say(f"recording {recording}: {len(ids)} posts in {time.monotonic() - t0:.0f} s")

    # The drop sweep's stream results (reused only all together, as before).
    results: list[tuple[float, ReplayResult]] = []
    run_s: dict[str, float] = {}
    loads: list[float] = []
    saved = [work / f"result-{args.posts}-{args.seed}-{rate}.json" for rate in rates]
    timings = work / f"run_s-{args.posts}-{args.seed}.json"
    reused = bool(rates) and args.reuse and all(p.is_file() for p in saved) and timings.is_file()
    if reused:
        results = [(rate, ReplayResult.load(p)) for rate, p in zip(rates, saved, strict=True)]
        saved_timings = json.loads(timings.read_text())
        run_s = saved_timings.get("run_s", saved_timings)
        loads = saved_timings.get("load", [])
        _say("reusing the saved drop-sweep stream results")

    # The text-fault cells (reused one by one): a clean reference run unless the drop sweep has drop 0.0.
    clean_from_drops = 0.0 in rates
    text_jobs: list[tuple[str, Faults]] = []
    if text_rates and not clean_from_drops:
        text_jobs.append(("clean", Faults(seed=args.seed)))
    text_jobs += [(text_cell_name(k, r), text_faults(k, r, args.seed)) for r in text_rates for k in kinds]
    text_saved = {name: work / f"result-{args.posts}-{args.seed}-{name}.json" for name, _ in text_jobs}
    text_timings = work / f"run_s-text-{args.posts}-{args.seed}.json"
    text_t: dict[str, dict[str, float]] = {"run_s": {}, "load": {}}
    if text_timings.is_file():
        text_t |= json.loads(text_timings.read_text())
    text_results: dict[str, ReplayResult] = {}
    if args.reuse:
        text_results = {name: ReplayResult.load(p) for name, p in text_saved.items() if p.is_file()}
        if text_results:
            _say(f"reusing the saved text-fault stream results: {', '.join(text_results)}")
    text_todo = [(name, faults) for name, faults in text_jobs if name not in text_results]

    settings = base.model_copy(update={"model_dir": args.model_dir})
    if (rates and not reused) or text_todo:
        LocalStack(base).start()
        settings = sweep_settings(base, args.model_dir, args.redis_db)
        asyncio.run(create_topics(settings))
        _say(f"topics {settings.topics}, group {settings.consumer_group}, redis {settings.redis_url}")
        with running_worker(settings, work / "worker.log"):
            if rates and not reused:
                for rate, path in zip(rates, saved, strict=True):
                    faults = Faults(drop={"image": rate, "transcript": rate}, seed=args.seed)
                    t0 = time.monotonic()
                    result = _replay_run(settings, recording, faults, args.timeout, f"drop {rate}")
                    run_s[str(rate)] = time.monotonic() - t0
                    loads.append(_loadavg())
                    result.save(path)
                    results.append((rate, result))
                timings.write_text(json.dumps({"run_s": run_s, "load": loads, "total_s": time.monotonic() - started}))
            for name, faults in text_todo:
                t0 = time.monotonic()
                result = _replay_run(settings, recording, faults, args.timeout, name)
                text_t["run_s"][name] = time.monotonic() - t0
                text_t["load"][name] = _loadavg()
                result.save(text_saved[name])
                text_results[name] = result
                text_timings.write_text(json.dumps(text_t))

    _say("scoring the baselines on the worker's inputs (ONNX encoders + PyTorch heads)")
    scoring = Scoring.load(args, settings)
    if rates:
        score_drops(args, scoring, ids, results, rates, run_s, loads, reused, started, work)
    if text_rates:
        clean = dict(results)[0.0] if clean_from_drops else text_results["clean"]
        cells = [text_results[text_cell_name(k, r)] for r in text_rates for k in kinds]
        names = ["clean"] if not clean_from_drops else []
        names += [text_cell_name(k, r) for r in text_rates for k in kinds]
        t_run_s = {n: text_t["run_s"][n] for n in names if n in text_t["run_s"]}
        t_loads = [text_t["load"][n] for n in names if n in text_t["load"]]
        meta = {
            "command": regenerate_command(args, kinds),
            "text_rates": text_rates,
            "kinds": kinds,
            "run_s": t_run_s,
            "load": float(np.mean(t_loads)) if t_loads else _loadavg(),
            "reused": bool(set(text_results) - {n for n, _ in text_todo}) or (clean_from_drops and reused),
            "clean_run": clean.run_id,
            "clean_source": "drop-0.0" if clean_from_drops else "clean",
        }
        score_text(args, scoring, clean, cells, meta, work)
    _say(f"done in {(time.monotonic() - started) / 60:.1f} min")
    return 0


def score_drops(
    args: argparse.Namespace,
    scoring: Scoring,
    ids: Sequence[str],
    results: Sequence[tuple[float, ReplayResult]],
    rates: Sequence[float],
    run_s: dict[str, float],
    loads: Sequence[float],
    reused: bool,
    started: float,
    work: Path,
) -> None:
    """The drop sweep's reports, comparison, random-pairing control, ``sweep.json`` and ``docs/robustness.md``."""
    t0 = time.monotonic()
    out: Path = args.out
    scorer, late_zero, text_only = scoring.scorer, scoring.late_zero, scoring.text_only
    reports: list[tuple[float, dict[str, Any]]] = []
    diffs: dict[str, dict[str, dict[str, Any]]] = {}
    parity: dict[str, float] = {}
    for rate, result in results:
        baselines, inputs, feats = scoring.baselines(result)
        pids = [i for i, _ in inputs]
        rate_dir = work / f"drop-{rate}"
        report = build_report(result, rate_dir, baselines=baselines)
        dest = out / f"drop-{rate}"
        dest.mkdir(parents=True, exist_ok=True)
        for name in KEEP_IN_DOCS:
            shutil.copy(rate_dir / name, dest / name)
        pairs = [("served", "late_zero")] + ([("served", "text_only")] if "text_only" in baselines else [])
        diffs[str(rate)] = paired_bootstrap(result, baselines, pairs, n_boot=2000, seed=args.seed)
        reports.append((rate, report))
        if not parity:
            parity = encoder_parity(args.data_dir, pids, feats)
    _say(f"baselines in {time.monotonic() - t0:.0f} s ({len(scoring.cache.cache)} encodings)")
    compare_reports(reports, out, x_label="drop rate (image and transcript)")

    def served_head(feats: Sequence[np.ndarray]) -> np.ndarray:
        mean, var = scorer.moments(None)
        text, image, transcript, present = (np.ascontiguousarray(x, np.float32) for x in feats)
        res = scorer.head_session.run(
            {
                "text": text,
                "image": image,
                "transcript": transcript,
                "present": present,
                "queue_mean": mean,
                "queue_var": var,
            }
        )
        return np.asarray(res["probs"])

    def torch_head(model: torch.nn.Module) -> Callable[[Sequence[np.ndarray]], np.ndarray]:
        def score(feats: Sequence[np.ndarray]) -> np.ndarray:
            text, image, transcript, present = (torch.from_numpy(np.ascontiguousarray(x, np.float32)) for x in feats)
            view = View(text, image, transcript, present)
            return predict_proba(model, view)

        return score

    control_scorers: dict[str, Callable[[Sequence[np.ndarray]], np.ndarray]] = {
        "served (FSRF)": served_head,
        "zero-fill late fusion": torch_head(late_zero),
    }
    if text_only is not None:
        control_scorers["text only"] = torch_head(text_only)
    control = control_rows(args.data_dir, ids, results, control_scorers)

    load = float(np.mean(loads)) if loads else _loadavg()
    info = {
        "n": args.posts,
        "seed": args.seed,
        "rates": rates,
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "total_s": time.monotonic() - started,
        "reused": reused,
        "encoder_parity": parity,
        "run_s": run_s,
        "load": load,
        "model_dir": str(args.model_dir),
        "model_version": scoring.manifest.version,
        "recovery": scorer.recovery,
        "late_zero": str(args.late_zero),
        "text_only": str(args.text_only),
        "work_dir": str(work),
        "data_manifest": json.loads((args.data_dir / "manifest.json").read_text()),
        "late_zero_data": scoring.lz_meta.get("data_meta"),
        "text_only_data": scoring.to_meta.get("data_meta"),
    }
    sweep = {k: v for k, v in info.items() if k != "data_manifest"} | {
        "pairing": info["data_manifest"].get("pairing"),
        "data_seed": info["data_manifest"].get("seed"),
        "run_ids": {str(r): res.run_id for r, res in results},
        "control": control,
        "paired_bootstrap": diffs,
    }
    (out / "sweep.json").write_text(json.dumps(sweep, indent=1, default=str) + "\n")
    plot_sweep(out / "sweep.png", reports, control, diffs)
    write_summary(args.summary, info, reports, control, out, diffs)
    _say(f"drop sweep written; summary {args.summary}")


def score_text(
    args: argparse.Namespace,
    scoring: Scoring,
    clean: ReplayResult,
    results: Sequence[ReplayResult],
    meta: dict[str, Any],
    work: Path,
) -> list[dict[str, Any]]:
    """Each text-fault cell against the clean reference; ``text-faults.md`` and ``text-faults.json`` in ``--out``."""
    t0 = time.monotonic()
    clean_baselines, clean_inputs, clean_feats = scoring.baselines(clean)
    parity = encoder_parity(args.data_dir, [i for i, _ in clean_inputs], clean_feats)
    cells: list[dict[str, Any]] = []
    for result in results:
        baselines, inputs, _ = scoring.baselines(result)
        faults = result.options["faults"]
        name = text_cell_name(faults["text_corruption"][0], float(faults["corrupt"]["text"]))
        build_report(result, work / name, baselines=baselines)
        absent = [i for i, post in inputs if post.text is None]
        cell = text_cell(
            result, baselines, (clean, clean_baselines), n_boot=2000, seed=args.seed, text_absent=absent
        )
        cell["run_s"] = meta["run_s"].get(name)
        cells.append(cell)
    _say(f"text-fault cells scored in {time.monotonic() - t0:.0f} s ({len(scoring.cache.cache)} encodings)")
    info = meta | {
        "n": args.posts,
        "seed": args.seed,
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "encoder_parity": parity,
        "model_dir": str(args.model_dir),
        "model_version": scoring.manifest.version,
        "recovery": scoring.scorer.recovery,
        "late_zero": str(args.late_zero),
        "text_only": str(args.text_only) if scoring.text_only is not None else None,
        "work_dir": str(work),
        "data_manifest": json.loads((args.data_dir / "manifest.json").read_text()),
    }
    path = args.out / "text-faults.md"
    write_text_faults(path, info, cells)
    _say(f"text faults written: {path} and {path.with_suffix('.json')}")
    return cells


if __name__ == "__main__":
    raise SystemExit(main())
