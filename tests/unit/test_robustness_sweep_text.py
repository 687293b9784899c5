"""The sweep's text-fault cells: the per-cell numbers, majority share, paired bootstrap and tables (no broker)."""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path

import pytest

from models.experiments.robustness_sweep import (
    Prediction,
    majority_share,
    paired_bootstrap,
    parse_args,
    parse_rate_list,
    parse_text_kinds,
    regenerate_command,
    scorer_summary,
    text_cell,
    text_cell_name,
    text_corrupted_ids,
    text_fault_tables,
    text_faults,
    write_text_faults,
)
from stream.service.events import LABELS
from stream.tools.replay_results import PublishedPost, ReceivedEvent, ReplayResult

TRUE = ["negative", "neutral", "positive", "negative", "neutral", "positive", "negative", "negative"]
CORRUPTED = {"p0", "p1", "p2", "p3"}


def _result(served: Sequence[str], *, run_id: str = "r1", kind: str = "typos", rate: float = 0.6) -> ReplayResult:
    """Eight labelled posts, p0–p3 with corrupted text, served predictions ``served`` (one event each)."""
    posts = [
        PublishedPost(
            id=f"{run_id}:p{i}",
            original_id=f"p{i}",
            label=label,
            present=("text", "image", "transcript"),
            corrupted=("text",) if f"p{i}" in CORRUPTED else (),
            corruption_kinds=(f"text:{kind}",) if f"p{i}" in CORRUPTED else (),
        )
        for i, label in enumerate(TRUE)
    ]
    events = [
        ReceivedEvent(
            id=f"{run_id}:p{i}",
            label=label,
            probs=(float(label == LABELS[0]), float(label == LABELS[1]), float(label == LABELS[2])),
            present=("text", "image", "transcript"),
            recovered=(),
            recovery="fsrf",
            model="m",
            latency_s=0.1,
            receive_ts=0.0,
        )
        for i, label in enumerate(served)
    ]
    faults = text_faults(kind, rate, seed=0).to_dict()
    return ReplayResult(
        run_id=run_id, recording="x.srec", header={}, options={"faults": faults}, topics={}, posts=posts, events=events
    )


def _preds(labels: Sequence[str], prefix: str = "") -> list[Prediction]:
    return [(f"{prefix}p{i}", label, None) for i, label in enumerate(labels)]


def test_text_faults_corrupt_text_only_with_one_kind() -> None:
    faults = text_faults("delete", 0.3, seed=4)
    assert dict(faults.corrupt) == {"text": 0.3}
    assert not faults.drop
    assert faults.text_corruption == ("delete",)
    assert faults.seed == 4
    assert text_cell_name("delete", 0.3) == "text-delete-0.3"


def test_parsers() -> None:
    assert parse_rate_list("0.3, 0.6") == [0.3, 0.6]
    assert parse_rate_list("") == []
    with pytest.raises(ValueError):
        parse_rate_list("1.5")
    assert parse_text_kinds("mask,typos,mask") == ["mask", "typos"]
    with pytest.raises(ValueError):
        parse_text_kinds("mask,shout")
    with pytest.raises(ValueError):
        parse_text_kinds("")


def test_options_and_regenerate_command(tmp_path: Path) -> None:
    args = parse_args(["--skip-drops", "--text-corrupt-rates", "0.6", "--posts", "200", "--out", str(tmp_path)])
    assert args.skip_drops and args.text_corrupt_rates == "0.6"
    assert parse_args([]).text_kinds == "mask,delete,truncate,typos"
    assert parse_args([]).text_corrupt_rates == "0.3,0.6"
    cmd = regenerate_command(args, ["mask", "typos"])
    assert cmd.startswith("python -m models.experiments.robustness_sweep --posts 200 --seed 0 --skip-drops")
    assert "--text-corrupt-rates 0.6 --text-kinds mask,typos" in cmd
    assert f"--out {tmp_path}" in cmd and "--data-dir" not in cmd


def test_majority_share() -> None:
    assert majority_share(["neutral", "neutral", "negative"]) == {
        "majority_label": "neutral",
        "majority_share": pytest.approx(2 / 3),
    }
    # a tie goes to the first label in LABELS order, whatever the order of the predictions
    assert majority_share(["positive", "negative"])["majority_label"] == "negative"
    empty = majority_share([])
    assert empty["majority_label"] is None and math.isnan(empty["majority_share"])


def test_corrupted_ids_skip_invalid_and_unlabelled_posts() -> None:
    result = _result(TRUE)
    result.posts[0] = PublishedPost(
        id="r1:p0", original_id="p0", label="negative", present=(), corrupted=("text",), expected="field_too_long"
    )
    result.posts[1] = PublishedPost(id="r1:p1", original_id="p1", label=None, present=("text",), corrupted=("text",))
    assert text_corrupted_ids(result) == {"p2", "p3"}


def test_scorer_summary_restricted_to_ids() -> None:
    result = _result(TRUE)
    preds = {f"p{i}": "negative" for i in range(8)}
    m = scorer_summary(result.posts, preds, only={"p0", "p3"})
    assert m["n"] == 2 and m["accuracy"] == 1.0 and m["majority_share"] == 1.0
    everything = scorer_summary(result.posts, preds)
    assert everything["n"] == 8 and everything["accuracy"] == pytest.approx(4 / 8)
    assert everything["majority_label"] == "negative"


def test_text_cell_numbers() -> None:
    # served: right everywhere; zero-fill: collapses to negative on the corrupted posts; text only: right
    # on the untouched posts only, neutral on the corrupted ones.
    collapsed = ["negative"] * 4 + TRUE[4:]
    neutral = ["neutral"] * 4 + TRUE[4:]
    result = _result(TRUE)
    baselines = {"late_zero": _preds(collapsed, "r1:"), "text_only": _preds(neutral)}
    clean = _result(TRUE, run_id="c0")
    clean_baselines = {"late_zero": _preds(TRUE), "text_only": _preds(TRUE)}
    cell = text_cell(result, baselines, (clean, clean_baselines), n_boot=200, seed=0, text_absent=["p1", "p6"])

    assert cell["kind"] == "typos" and cell["rate"] == 0.6
    assert cell["n_corrupted"] == 4 and cell["n_text_blank"] == 1  # p6 is not corrupted
    assert cell["lost_events"] == 0 and cell["published"] == 8
    cor = cell["corrupted"]
    assert cor["served"]["n"] == 4 and cor["served"]["macro_f1"] == 1.0
    assert cor["late_zero"]["majority_label"] == "negative" and cor["late_zero"]["majority_share"] == 1.0
    assert cor["text_only"]["majority_label"] == "neutral" and cor["text_only"]["majority_share"] == 1.0
    assert cor["served"]["majority_share"] == 0.5  # p0, p3 negative of four
    assert cell["true_majority"] == {"majority_label": "negative", "majority_share": 0.5}
    assert cell["all"]["served"]["n"] == 8 and cell["all"]["late_zero"]["accuracy"] == pytest.approx(6 / 8)
    # the clean reference: the same scorers on the same (corrupted) posts of the clean run
    assert set(cell["clean"]) == {"served", "late_zero", "text_only"}
    assert all(m["n"] == 4 and m["macro_f1"] == 1.0 for m in cell["clean"].values())
    assert cell["clean_run_id"] == "c0"
    # bootstrap on the corrupted posts only: served beats both; the interval lies above 0
    pb = cell["paired_bootstrap"]
    assert set(pb) == {"served-late_zero", "served-text_only"}
    for d in pb.values():
        assert d["n"] == 4
        lo, hi = d["macro_f1"]["ci95"]
        assert lo <= d["macro_f1"]["diff"] <= hi
        assert d["macro_f1"]["diff"] > 0.5


def test_paired_bootstrap_only_and_empty() -> None:
    result = _result(TRUE)
    same = {"late_zero": _preds(TRUE)}
    full = paired_bootstrap(result, same, [("served", "late_zero")], n_boot=50, seed=0)
    assert full["served-late_zero"]["n"] == 8
    assert full["served-late_zero"]["macro_f1"] == {"diff": 0.0, "ci95": [0.0, 0.0]}
    part = paired_bootstrap(result, same, [("served", "late_zero")], n_boot=50, seed=0, only={"p0", "p5"})
    assert part["served-late_zero"]["n"] == 2
    none = paired_bootstrap(result, same, [("served", "late_zero")], n_boot=50, seed=0, only=set())
    assert none["served-late_zero"]["n"] == 0 and math.isnan(none["served-late_zero"]["macro_f1"]["diff"])


def test_lost_served_event_is_counted_and_not_scored() -> None:
    result = _result(TRUE[:7])  # p7 never came back
    cell = text_cell(result, {"late_zero": _preds(TRUE)}, None, n_boot=20, seed=0)
    assert cell["lost_events"] == 1
    assert cell["all"]["served"]["n"] == 7 and cell["all"]["late_zero"]["n"] == 8
    assert cell["clean"] == {}
    assert set(cell["paired_bootstrap"]) == {"served-late_zero"}


def test_tables_and_files(tmp_path: Path) -> None:
    cells = []
    for kind in ("mask", "truncate"):
        result = _result(TRUE, kind=kind)
        baselines = {"late_zero": _preds(["negative"] * 8), "text_only": _preds(TRUE)}
        clean = (_result(TRUE, run_id="c0"), {"late_zero": _preds(TRUE), "text_only": _preds(TRUE)})
        cells.append(text_cell(result, baselines, clean, n_boot=50, seed=0, text_absent=["p2"]))
    table = "\n".join(text_fault_tables(cells))
    assert "### Text corrupted in a fraction 0.6 of the posts" in table
    rows = [line for line in table.splitlines() if line.startswith("| mask |") or line.startswith("| truncate |")]
    assert len(rows) == 4  # a corrupted-posts row and an all-posts row per kind
    assert "| mask | 4 | 1.000 (1.000) |" in table
    assert "1.00 (neg)" in table  # the zero-fill head's collapse shows as its majority share
    assert "1 corrupted text(s) left blank" in table

    info = {
        "command": "python -m models.experiments.robustness_sweep --posts 8 --skip-drops",
        "date": "2026-01-01 00:00 UTC",
        "n": 8,
        "seed": 0,
        "run_s": {"clean": 1.0, "text-mask-0.6": 2.0},
        "reused": False,
        "load": 1.0,
        "model_dir": "m",
        "model_version": "v",
        "recovery": "fsrf",
        "late_zero": "lz",
        "text_only": "to",
        "clean_run": "c0",
        "clean_source": "clean",
        "work_dir": "w",
        "data_manifest": {"seed": 0, "pairing": {"p_image": 0.5, "p_transcript": 0.5}},
    }
    md = tmp_path / "robustness" / "text-faults.md"
    write_text_faults(md, info, cells)
    text = md.read_text()
    assert "synthetic" in text and "docs/data.md" in text
    assert "python -m models.experiments.robustness_sweep --posts 8 --skip-drops" in text
    payload = json.loads(md.with_suffix(".json").read_text())  # strict JSON: NaN written as null
    assert payload["synthetic_pairing"] is True and payload["pairing"]["p_image"] == 0.5
    assert [c["kind"] for c in payload["cells"]] == ["mask", "truncate"]
    assert "data_manifest" not in payload
