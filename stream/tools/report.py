"""The robustness report of a replay run: JSON + Markdown + PNG plots.

:func:`summarize` turns a :class:`~stream.tools.replay.ReplayResult` into a plain dict (the JSON report);
:func:`build_report` also writes ``report.json``, ``report.md``, ``result.json`` (the raw result, so
a report can be rebuilt) and plots into a directory. Metrics come from :mod:`stream.tools.classification`
(numpy; no scikit-learn in ``stream``); matplotlib (train extra) is imported only to draw, and its
absence only skips the plots.

Scorers: the served model's predictions are the first event received per post. Other scorers (a
zero-fill baseline, say) are passed as ``baselines={"zero_fill": [(id, label, probs), ...]}`` and get
the same tables side by side; ids may be the run ids or the original ids. :func:`compare_reports`
puts several runs (e.g. drop rates 0, 0.3, 0.6, 0.9) on one table and one plot.
"""

from __future__ import annotations

import json
import logging
import math
from collections import Counter, defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

import numpy as np

from stream.service.events import LABELS, MODALITIES
from stream.tools.classification import classification_metrics as label_metrics
from stream.tools.replay_results import EVENT, PublishedPost, ReceivedEvent, ReplayResult

__all__ = [
    "SERVED",
    "baseline_record",
    "build_report",
    "classification_metrics",
    "compare_reports",
    "normalize_predictions",
    "prediction_tables",
    "regression_gate",
    "scorer_tables",
    "served_predictions",
    "strict_json",
    "summarize",
]

log = logging.getLogger(__name__)

SERVED: Final = "served"
_PERCENTILES: Final = (50, 95, 99)
_LIST_LIMIT: Final = 20  # ids listed per problem in the report; counts are always complete

Prediction = tuple[str, str | None, Sequence[float] | None]


# -- metrics ---------------------------------------------------------------------------------------


def classification_metrics(y_true: Sequence[str], y_pred: Sequence[str]) -> dict[str, float | int]:
    """``n``, ``accuracy``, ``weighted_f1`` and ``macro_f1`` of predicted labels against true ones.

    The metrics are :func:`stream.tools.classification.classification_metrics`; macro F1 averages over the
    labels seen in either sequence (scikit-learn's default label set), so a small group is not marked down
    for a label it never contains. Empty input gives NaN.
    """
    if len(y_true) != len(y_pred):
        raise ValueError("y_true and y_pred differ in length")
    return {"n": len(y_true), **label_metrics(y_true, y_pred, label_set="observed")}


def normalize_predictions(predictions: Iterable[Prediction], run_id: str | None = None) -> dict[str, str]:
    """Map ``(id, label, probs)`` triples to ``{original id: label}``; the first prediction per id wins.

    ``label`` None means the argmax of ``probs`` (in :data:`LABELS` order). An id with the
    ``{run_id}:`` prefix is reduced to the original id so offline baselines can use either.
    """
    prefix = f"{run_id}:" if run_id else None
    out: dict[str, str] = {}
    for post_id, label, probs in predictions:
        if label is None:
            if probs is None:
                raise ValueError(f"prediction for {post_id!r} has neither a label nor probabilities")
            label = LABELS[int(np.argmax(np.asarray(probs, dtype=float)))]
        key = post_id.removeprefix(prefix) if prefix else post_id
        out.setdefault(key, label)
    return out


def served_predictions(result: ReplayResult) -> dict[str, str]:
    """The served model's predictions: the first event received per post, by original id."""
    return normalize_predictions(((e.id, e.label, e.probs) for e in result.events), result.run_id)


def scorer_tables(posts: Sequence[PublishedPost], predictions: Mapping[str, str]) -> dict[str, Any]:
    """Metrics of one scorer overall, per missing pattern and per injected fault.

    ``predictions`` maps original ids to predicted labels. Scored: labelled posts expected to
    produce an event that have a prediction (a lost post is not scored; ``coverage`` says how many
    were). A post with several faults counts in each fault's row; ``clean`` has none.
    """
    by_pattern: dict[str, tuple[list[str], list[str]]] = defaultdict(lambda: ([], []))
    by_fault: dict[str, tuple[list[str], list[str]]] = defaultdict(lambda: ([], []))
    y_true: list[str] = []
    y_pred: list[str] = []
    eligible = 0
    for post in posts:
        if post.expected != EVENT or post.label is None:
            continue
        eligible += 1
        pred = predictions.get(post.original_id)
        if pred is None:
            continue
        y_true.append(post.label)
        y_pred.append(pred)
        groups = [by_pattern[post.pattern]] + [by_fault[f] for f in post.faults or ("clean",)]
        for t, p in groups:
            t.append(post.label)
            p.append(pred)
    return {
        "coverage": {"labelled_valid": eligible, "scored": len(y_true)},
        "overall": classification_metrics(y_true, y_pred),
        "missing_pattern": {k: classification_metrics(*v) for k, v in sorted(by_pattern.items(), key=_pattern_order)},
        "fault": {k: classification_metrics(*v) for k, v in sorted(by_fault.items())},
    }


def _pattern_order(item: tuple[str, Any]) -> tuple[int, str]:
    mods = item[0].split("+")
    return (-len(mods), "".join(str(MODALITIES.index(m)) if m in MODALITIES else "9" for m in mods))


def _percentiles(values: Sequence[float]) -> dict[str, float | int]:
    if not values:
        return {"n": 0} | {f"p{q}": float("nan") for q in _PERCENTILES} | {"mean": float("nan")}
    arr = np.asarray(values, dtype=float)
    return (
        {"n": len(values)} | {f"p{q}": float(np.percentile(arr, q)) for q in _PERCENTILES} | {"mean": float(arr.mean())}
    )


# -- the report ------------------------------------------------------------------------------------


def summarize(result: ReplayResult, baselines: Mapping[str, Iterable[Prediction]] | None = None) -> dict[str, Any]:
    """The robustness report of one run as a JSON-ready dict (see the module docstring for scorers)."""
    events, letters = _received_by_id(result)
    outcomes = _post_outcomes(result, events, letters)
    first_events = [v[0] for v in events.values()]
    metrics = _scorer_metrics(result, baselines)
    dlq = _dlq_section(result, letters)
    malformed = _malformed_section(outcomes)
    delivery = _delivery_section(result, events, letters, outcomes)
    latency = _latency_section(result, first_events)
    throughput = _throughput_section(result, first_events)
    return {
        "run": _run_section(result),
        "headline": _headline(delivery, metrics[SERVED]["overall"], dlq, malformed, latency, throughput),
        "metrics": metrics,
        "dlq": dlq,
        "malformed": malformed,
        "faults": _faults_section(result.posts),
        "delivery": delivery,
        "latency_s": latency,
        "throughput": throughput,
    }


def _received_by_id(result: ReplayResult) -> tuple[dict[str, list[ReceivedEvent]], dict[str, list[str]]]:
    """Events and dead-letter reasons received per post id, in arrival order."""
    events: dict[str, list[ReceivedEvent]] = defaultdict(list)
    for ev in result.events:
        events[ev.id].append(ev)
    letters: dict[str, list[str]] = defaultdict(list)
    for dl in result.dead_letters:
        letters[dl.id].append(dl.reason)
    return dict(events), dict(letters)


@dataclass
class _PostOutcomes:
    """What became of each published post, against what it should have produced."""

    lost: list[str] = field(default_factory=list)  # valid, no event and no dead letter
    missing_letters: list[str] = field(default_factory=list)  # invalid, no dead letter and no event
    rejected_valid: Counter[str] = field(default_factory=Counter)  # valid but dead-lettered, by reason
    accepted_invalid: list[str] = field(default_factory=list)  # invalid but scored
    wrong_reason: list[str] = field(default_factory=list)  # invalid, dead-lettered for another reason
    present_mismatch: int = 0  # event's present modalities differ from what was published
    malformed: dict[str, Counter[str]] = field(default_factory=lambda: defaultdict(Counter))
    malformed_failures: list[str] = field(default_factory=list)


def _post_outcomes(
    result: ReplayResult, events: Mapping[str, list[ReceivedEvent]], letters: Mapping[str, list[str]]
) -> _PostOutcomes:
    """Each published post (but those that failed to publish) against its expected outcome."""
    out = _PostOutcomes()
    for post in result.posts:
        if post.id in result.publish_errors:
            continue
        got_event = post.id in events
        reasons = letters.get(post.id, [])
        if post.expected == EVENT:
            if got_event:
                if tuple(events[post.id][0].present) != post.present:
                    out.present_mismatch += 1
            elif reasons:
                out.rejected_valid[reasons[0]] += 1
            else:
                out.lost.append(post.id)
        else:
            if got_event:
                out.accepted_invalid.append(post.id)
            elif not reasons:
                out.missing_letters.append(post.id)
            elif reasons[0] != post.expected:
                out.wrong_reason.append(post.id)
        if post.malformed:
            _count_malformed(out, post.malformed, post.id, got_event, reasons)
    return out


def _count_malformed(out: _PostOutcomes, kind: str, post_id: str, got_event: bool, reasons: Sequence[str]) -> None:
    """A malformed payload is handled right only as a dead letter with the reason it was made to trigger."""
    row = out.malformed[kind]
    row["injected"] += 1
    if reasons and reasons[0] == kind and not got_event:
        row["dlq_expected_reason"] += 1
        return
    out.malformed_failures.append(post_id)
    if got_event:
        row["event"] += 1
    elif reasons:
        row["dlq_other_reason"] += 1
    else:
        row["missing"] += 1


def _scorer_metrics(result: ReplayResult, baselines: Mapping[str, Iterable[Prediction]] | None) -> dict[str, Any]:
    """:func:`scorer_tables` of the served model and of every baseline."""
    scorers: dict[str, dict[str, str]] = {SERVED: served_predictions(result)}
    for name, preds in (baselines or {}).items():
        scorers[name] = normalize_predictions(preds, result.run_id)
    return {name: scorer_tables(result.posts, preds) for name, preds in scorers.items()}


def _run_section(result: ReplayResult) -> dict[str, Any]:
    header = result.header
    return {
        "run_id": result.run_id,
        "recording": result.recording,
        "recording_topic": header.get("topic"),
        "synthetic_timing": bool(header.get("synthetic_timing")),
        "recording_meta": header.get("meta", {}),
        "options": result.options,
        "topics": result.topics,
    }


def _dlq_section(result: ReplayResult, letters: Mapping[str, list[str]]) -> dict[str, Any]:
    known = {p.id for p in result.posts}
    return {
        "by_reason": dict(sorted(Counter(r[0] for i, r in letters.items() if i in known).items())),
        "letters_total": len(result.dead_letters),
    }


def _malformed_section(outcomes: _PostOutcomes) -> dict[str, Any]:
    return {
        "by_kind": {
            k: {c: v[c] for c in ("injected", "dlq_expected_reason", "dlq_other_reason", "event", "missing")}
            for k, v in sorted(outcomes.malformed.items())
        },
        "all_in_dlq_with_expected_reason": not outcomes.malformed_failures,
        "failure_ids": outcomes.malformed_failures[:_LIST_LIMIT],
    }


def _faults_section(posts: Sequence[PublishedPost]) -> dict[str, Any]:
    return {
        "dropped": dict(Counter(m for p in posts for m in p.dropped)),
        "drop_suppressed_last_modality": dict(Counter(m for p in posts for m in p.drop_suppressed)),
        "corrupted": dict(Counter(m for p in posts for m in p.corrupted)),
        "malformed": dict(Counter(p.malformed for p in posts if p.malformed)),
        "carrying": {m: sum(m in p.present or m in p.dropped for p in posts) for m in MODALITIES},
    }


def _delivery_section(
    result: ReplayResult,
    events: Mapping[str, list[ReceivedEvent]],
    letters: Mapping[str, list[str]],
    outcomes: _PostOutcomes,
) -> dict[str, Any]:
    posts = result.posts
    known = {p.id for p in posts}
    n_valid = sum(p.expected == EVENT for p in posts)
    dup_events = {i: len(v) for i, v in events.items() if len(v) > 1}
    dup_letters = {i: len(v) for i, v in letters.items() if len(v) > 1}
    unknown_ids = (set(events) | set(letters)) - known
    return {
        "published": len(posts),
        "publish_errors": len(result.publish_errors),
        "expected_events": n_valid,
        "expected_dead_letters": len(posts) - n_valid,
        "events_received_distinct": sum(1 for i in events if i in known),
        "events_received_total": len(result.events),
        "dead_letters_received_total": len(result.dead_letters),
        "lost_events": len(outcomes.lost),
        "lost_event_ids": outcomes.lost[:_LIST_LIMIT],
        "missing_dead_letters": len(outcomes.missing_letters),
        "missing_dead_letter_ids": outcomes.missing_letters[:_LIST_LIMIT],
        "valid_posts_rejected": dict(outcomes.rejected_valid),
        "invalid_posts_scored": len(outcomes.accepted_invalid),
        "invalid_posts_scored_ids": outcomes.accepted_invalid[:_LIST_LIMIT],
        "dead_letters_with_unexpected_reason": len(outcomes.wrong_reason),
        "duplicated_event_ids": len(dup_events),
        "duplicate_event_copies": sum(n - 1 for n in dup_events.values()),
        "duplicated_dead_letter_ids": len(dup_letters),
        "duplicate_dead_letter_copies": sum(n - 1 for n in dup_letters.values()),
        "present_mismatch": outcomes.present_mismatch,
        "outcomes_for_unknown_ids": len(unknown_ids),
        "timed_out": result.timed_out,
        "note": "at-least-once delivery: duplicates are allowed and counted; the key (post id) de-duplicates",
    }


def _latency_section(result: ReplayResult, first_events: Sequence[ReceivedEvent]) -> dict[str, Any]:
    by_id = {p.id: p for p in result.posts}
    transport = [
        e.receive_ts - by_id[e.id].publish_ts for e in first_events if e.id in by_id and by_id[e.id].publish_ts
    ]
    return {
        "event": _percentiles([e.latency_s for e in first_events]),
        "publish_to_receive": _percentiles(transport),
        "note": (
            "event: latency_s of each event (emit - event ts; event ts is the publish time unless "
            "--keep-ts); publish_to_receive: collector receive time - publish time (adds the "
            "collector's fetch delay, up to 25 ms)"
            + (
                "; WARNING: --keep-ts was set, so event latency is measured from the recorded time"
                if result.options.get("keep_ts")
                else ""
            )
        ),
    }


def _throughput_section(result: ReplayResult, first_events: Sequence[ReceivedEvent]) -> dict[str, Any]:
    publish_s = max(result.publish_finished - result.publish_started, 1e-9)
    receive_times = [e.receive_ts for e in first_events]
    events_s = (max(receive_times) - result.publish_started) if receive_times else float("nan")
    return {
        "published_per_s": len(result.posts) / publish_s,
        "events_per_s": len(first_events) / events_s if receive_times and events_s > 0 else float("nan"),
        "publish_seconds": publish_s,
        "collect_seconds": max(0.0, result.collect_finished - result.publish_started),
    }


def _headline(
    delivery: Mapping[str, Any],
    served: Mapping[str, Any],
    dlq: Mapping[str, Any],
    malformed: Mapping[str, Any],
    latency: Mapping[str, Any],
    throughput: Mapping[str, Any],
) -> dict[str, Any]:
    """The few numbers a reader looks at first, taken from the other sections."""
    kinds = malformed["by_kind"].values()
    return {
        "published": delivery["published"],
        "events": delivery["events_received_distinct"],
        "lost_events": delivery["lost_events"],
        "duplicate_event_copies": delivery["duplicate_event_copies"],
        "dead_letters": sum(dlq["by_reason"].values()),
        "malformed_injected": sum(k["injected"] for k in kinds),
        "malformed_in_dlq_with_expected_reason": sum(k["dlq_expected_reason"] for k in kinds),
        "accuracy": served["accuracy"],
        "weighted_f1": served["weighted_f1"],
        "macro_f1": served["macro_f1"],
        "latency_p99_s": latency["event"]["p99"],
        "published_per_s": throughput["published_per_s"],
        "timed_out": delivery["timed_out"],
    }


def build_report(
    result: ReplayResult, out_dir: str | Path, baselines: Mapping[str, Iterable[Prediction]] | None = None
) -> dict[str, Any]:
    """Write ``report.json``, ``report.md``, ``result.json`` and PNG plots into ``out_dir``; return the report."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    report = summarize(result, baselines)
    result.save(out / "result.json")
    plots = _plots(report, result, out)
    report["plots"] = plots
    (out / "report.json").write_text(json.dumps(strict_json(report), indent=1, allow_nan=False) + "\n")
    (out / "report.md").write_text(_markdown(report))
    return report


def strict_json(obj: Any) -> Any:
    """NaN (an empty group's metric) becomes null: strict JSON readers reject NaN."""
    if isinstance(obj, float) and obj != obj:
        return None
    if isinstance(obj, dict):
        return {k: strict_json(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [strict_json(v) for v in obj]
    return obj


def prediction_tables(result: ReplayResult, predictions: Iterable[Prediction]) -> dict[str, Any]:
    """:func:`scorer_tables` of ``(id, label, probs)`` predictions on the posts of ``result``.

    For a baseline scored offline on the same faulted inputs (see :func:`stream.tools.replay.plan_recording`
    with ``Faults.from_dict(result.options["faults"])`` and ``run_id=result.run_id``).
    """
    return scorer_tables(result.posts, normalize_predictions(predictions, result.run_id))


def compare_reports(
    runs: Sequence[tuple[float, Mapping[str, Any]]], out_dir: str | Path, x_label: str = "drop rate"
) -> dict[str, Any]:
    """One table and plot of overall metrics per scorer across runs, e.g. ``[(0.0, report), (0.3, report)]``.

    Writes ``comparison.json``, ``comparison.md`` and ``comparison.png`` (macro F1 vs ``x_label``).
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for x, report in sorted(runs, key=lambda r: r[0]):
        for scorer, tables in report["metrics"].items():
            rows.append({"x": x, "scorer": scorer, "run_id": report["run"]["run_id"], **tables["overall"]})
    comparison = {"x_label": x_label, "rows": rows}
    (out / "comparison.json").write_text(json.dumps(strict_json(comparison), indent=1, allow_nan=False) + "\n")
    lines = [
        f"# Robustness across {x_label}",
        "",
        f"| {x_label} | scorer | n | accuracy | weighted F1 | macro F1 |",
        "|---|---|---|---|---|---|",
    ]
    lines += [
        f"| {r['x']:g} | {r['scorer']} | {r['n']} | {_f(r['accuracy'])} | {_f(r['weighted_f1'])} "
        f"| {_f(r['macro_f1'])} |"
        for r in rows
    ]
    plt = _pyplot()
    if plt is not None:
        fig, ax = plt.subplots(figsize=(6, 4))
        for scorer in dict.fromkeys(r["scorer"] for r in rows):
            pts = [(r["x"], r["macro_f1"]) for r in rows if r["scorer"] == scorer]
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=scorer)
        ax.set_xlabel(x_label)
        ax.set_ylabel("macro F1")
        ax.set_ylim(0, 1)
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        fig.savefig(out / "comparison.png", dpi=110)
        plt.close(fig)
        lines += ["", "![macro F1](comparison.png)"]
    (out / "comparison.md").write_text("\n".join(lines) + "\n")
    return comparison


# -- the regression gate ---------------------------------------------------------------------------


def regression_gate(
    report: Mapping[str, Any],
    baseline: Mapping[str, Any],
    tolerance: float = 0.01,
    scorer: str = SERVED,
    min_posts: int = 20,
) -> list[str]:
    """Fault groups whose macro F1 fell by more than ``tolerance`` against ``baseline``; [] if none did.

    Compared: ``overall`` and every fault group of the baseline (``clean``, each ``drop:``, each
    ``corrupt:`` and per-kind ``corrupt:m:kind``) that holds at least ``min_posts`` posts in both reports —
    a smaller group's macro F1 moves by more than any useful tolerance from one post. A group the baseline
    has and the new report lacks fails too: the run no longer measures what the baseline did.
    """
    failures: list[str] = []
    try:
        new, old = report["metrics"][scorer], baseline["metrics"][scorer]
    except KeyError as exc:
        return [f"scorer {scorer!r} missing from {'the baseline' if scorer in report['metrics'] else 'the report'}"
                f" ({exc})"]
    groups = [("overall", old["overall"], new["overall"])]
    groups += [(f"fault {k}", v, new["fault"].get(k)) for k, v in sorted(old.get("fault", {}).items())]
    for name, before, after in groups:
        if after is None:
            failures.append(f"{name}: in the baseline (n={before.get('n', 0)}) but not in this run")
            continue
        if min(int(before.get("n", 0)), int(after.get("n", 0))) < min_posts:
            continue
        if before.get("macro_f1") is None:  # an empty group's NaN, written as null: nothing to hold
            continue
        b = float(before["macro_f1"])
        a = math.nan if after.get("macro_f1") is None else float(after["macro_f1"])
        if math.isnan(a) or a < b - tolerance:  # NaN counts as a fall
            failures.append(f"{name}: macro F1 {a:.4f} vs baseline {b:.4f} ({a - b:+.4f}, tolerance {tolerance})")
    return failures


def baseline_record(report: Mapping[str, Any], scorer: str = SERVED, **meta: Any) -> dict[str, Any]:
    """What :func:`regression_gate` reads of a report (overall and per fault group), with provenance.

    Small enough to commit: the demo's first run is the baseline every later run is held to.
    """
    scored = report["metrics"][scorer]
    return strict_json({
        "kind": "robustness-baseline",
        "meta": dict(meta),
        "metrics": {scorer: {"overall": scored["overall"], "fault": dict(sorted(scored["fault"].items()))}},
    })


# -- rendering -------------------------------------------------------------------------------------


def _f(x: Any, digits: int = 3) -> str:
    if isinstance(x, float):
        return "–" if x != x else f"{x:.{digits}f}"
    return str(x)


def _metric_table(metrics: Mapping[str, Any], section: str) -> list[str]:
    scorers = list(metrics)

    def groups(scorer: str) -> Mapping[str, Any]:
        table = metrics[scorer][section]
        return {"all": table} if section == "overall" else table

    keys = list(dict.fromkeys(k for s in scorers for k in groups(s)))
    head = "| group | " + " | ".join(f"{s} n | {s} acc | {s} wF1 | {s} mF1" for s in scorers) + " |"
    lines = [head, "|---|" + "---|---|---|---|" * len(scorers)]
    for key in keys:
        cells = []
        for s in scorers:
            m = groups(s).get(key)
            cells += (
                [str(m["n"]), _f(m["accuracy"]), _f(m["weighted_f1"]), _f(m["macro_f1"])] if m else ["0"] + ["–"] * 3
            )
        lines.append(f"| {key} | " + " | ".join(cells) + " |")
    return lines


def _markdown(report: Mapping[str, Any]) -> str:
    run, head, d = report["run"], report["headline"], report["delivery"]
    faults = run["options"]["faults"]
    lines = [
        f"# Robustness report — run `{run['run_id']}`",
        "",
        f"Recording `{run['recording']}` (topic `{run['recording_topic']}`) replayed into `{run['topics']['posts']}`; "
        f"outcomes read from `{run['topics']['sentiment']}` and `{run['topics']['dlq']}`.",
        "",
        f"Faults (seed {faults['seed']}): drop {faults['drop'] or 'none'}, corrupt {faults['corrupt'] or 'none'}, "
        f"malformed {faults['malformed']}. Pace: "
        + ("as fast as possible" if run["options"]["speed"] is None else f"speed ×{run['options']['speed']}")
        + (f", capped at {run['options']['rate']} posts/s" if run["options"]["rate"] else "")
        + ".",
    ]
    if run["synthetic_timing"]:
        lines += ["", "> The recording's order and timing are **synthetic** (Poisson arrivals), not observed."]
    if head["timed_out"]:
        lines += ["", "> **The run timed out**: some outcomes never arrived (see lost events)."]
    lines += [
        "",
        "## Headline",
        "",
        "| published | events | lost | duplicate copies | dead letters | malformed → DLQ ok | accuracy | wF1 | mF1 |",
        "|---|---|---|---|---|---|---|---|---|",
        f"| {head['published']} | {head['events']} | {head['lost_events']} | {head['duplicate_event_copies']} | "
        f"{head['dead_letters']} | {head['malformed_in_dlq_with_expected_reason']}/{head['malformed_injected']} | "
        f"{_f(head['accuracy'])} | {_f(head['weighted_f1'])} | {_f(head['macro_f1'])} |",
        "",
        "## Accuracy / F1",
        "",
        "Scored: labelled posts expected to produce an event that produced one (coverage per scorer: "
        + ", ".join(
            f"{s} {m['coverage']['scored']}/{m['coverage']['labelled_valid']}" for s, m in report["metrics"].items()
        )
        + ").",
        "",
        "### Overall",
        "",
        *_metric_table(report["metrics"], "overall"),
        "",
        "### By missing pattern (modalities present after faults)",
        "",
        *_metric_table(report["metrics"], "missing_pattern"),
        "",
        "### By injected fault (a post with several faults counts in each)",
        "",
        *_metric_table(report["metrics"], "fault"),
        "",
        "## Dead-letter queue",
        "",
        "| reason | posts |",
        "|---|---|",
        *[f"| {k} | {v} |" for k, v in report["dlq"]["by_reason"].items()],
        "",
        "Injected malformed payloads:",
        "",
        "| kind | injected | DLQ, expected reason | DLQ, other reason | scored (!) | missing |",
        "|---|---|---|---|---|---|",
        *[
            f"| {k} | {v['injected']} | {v['dlq_expected_reason']} | {v['dlq_other_reason']} | {v['event']} | "
            f"{v['missing']} |"
            for k, v in report["malformed"]["by_kind"].items()
        ],
        "",
        "## Delivery (at-least-once)",
        "",
        "| what | count |",
        "|---|---|",
        *[f"| {k.replace('_', ' ')} | {v} |" for k, v in d.items() if not isinstance(v, list) and k != "note"],
        "",
        f"Lost event ids (first {_LIST_LIMIT}): {', '.join(d['lost_event_ids']) or 'none'}.",
        "",
        "## Latency and throughput",
        "",
        "| latency (s) | n | p50 | p95 | p99 | mean |",
        "|---|---|---|---|---|---|",
        *[
            f"| {name} | {v['n']} | {_f(v['p50'], 4)} | {_f(v['p95'], 4)} | {_f(v['p99'], 4)} | {_f(v['mean'], 4)} |"
            for name, v in report["latency_s"].items()
            if isinstance(v, dict)
        ],
        "",
        report["latency_s"]["note"] + ".",
        "",
        f"Published {_f(report['throughput']['published_per_s'], 1)} posts/s over "
        f"{_f(report['throughput']['publish_seconds'], 2)} s; received {_f(report['throughput']['events_per_s'], 1)}"
        " events/s (first publish to last event).",
    ]
    plots = report.get("plots") or []
    if plots:
        lines += ["", "## Plots", ""] + [f"![{p}]({p})" for p in plots]
    else:
        lines += ["", "(no plots: matplotlib is not installed — it is in the `train` extra)"]
    return "\n".join(lines) + "\n"


def _pyplot() -> Any:
    try:
        import matplotlib

        matplotlib.use("Agg")  # files only; never a display
        import matplotlib.pyplot as plt
    except ImportError:
        log.warning("matplotlib is not installed: the report has no plots")
        return None
    return plt


def _plots(report: Mapping[str, Any], result: ReplayResult, out: Path) -> list[str]:
    plt = _pyplot()
    if plt is None:
        return []
    written = []
    for section, title in (("missing_pattern", "macro F1 by missing pattern"), ("fault", "macro F1 by fault")):
        scorers = list(report["metrics"])
        keys = list(dict.fromkeys(k for s in scorers for k in report["metrics"][s][section]))
        if not keys:
            continue
        fig, ax = plt.subplots(figsize=(max(5.0, 1.1 * len(keys) + 2), 4))
        width = 0.8 / len(scorers)
        for j, scorer in enumerate(scorers):
            vals = [report["metrics"][scorer][section].get(k, {}).get("macro_f1", float("nan")) for k in keys]
            ax.bar(np.arange(len(keys)) + j * width, vals, width, label=scorer)
        ax.set_xticks(np.arange(len(keys)) + 0.4 - width / 2, keys, rotation=30, ha="right")
        ax.set_ylim(0, 1)
        ax.set_ylabel("macro F1")
        ax.set_title(title)
        ax.legend()
        fig.tight_layout()
        name = f"{section}.png"
        fig.savefig(out / name, dpi=110)
        plt.close(fig)
        written.append(name)

    first: dict[str, ReceivedEvent] = {}
    for ev in result.events:
        first.setdefault(ev.id, ev)
    publish = {p.id: p.publish_ts for p in result.posts}
    event_lat = sorted(e.latency_s for e in first.values())
    transport = sorted(e.receive_ts - publish[e.id] for e in first.values() if publish.get(e.id))
    if event_lat:
        fig, ax = plt.subplots(figsize=(6, 4))
        for values, label in ((event_lat, "event latency_s"), (transport, "publish → receive")):
            if values:
                ax.plot(values, np.linspace(0, 1, len(values), endpoint=True), label=label)
        ax.set_xscale("log")
        ax.set_xlabel("seconds")
        ax.set_ylabel("fraction of posts")
        ax.set_title("end-to-end latency (CDF)")
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        fig.savefig(out / "latency.png", dpi=110)
        plt.close(fig)
        written.append("latency.png")

    d = report["delivery"]
    outcomes = {
        "events": d["events_received_distinct"],
        **{f"dlq:{k}": v for k, v in report["dlq"]["by_reason"].items()},
        "lost": d["lost_events"],
        "missing DLQ": d["missing_dead_letters"],
        "dup copies": d["duplicate_event_copies"],
    }
    fig, ax = plt.subplots(figsize=(max(5.0, 0.7 * len(outcomes) + 2), 4))
    bars = ax.bar(list(outcomes), list(outcomes.values()), color="tab:blue")
    ax.bar_label(bars)  # small counts (lost, duplicates) matter most and would be invisible bars
    ax.set_yscale("symlog")
    ax.set_xticks(range(len(outcomes)), list(outcomes), rotation=35, ha="right")
    ax.set_ylabel("posts (symlog)")
    ax.set_title("outcomes")
    fig.tight_layout()
    fig.savefig(out / "outcomes.png", dpi=110)
    plt.close(fig)
    written.append("outcomes.png")
    return written
