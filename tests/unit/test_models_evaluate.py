"""The evaluation protocol on synthetic features: conditions become the right views, results are written."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from models.common import MODALITIES
from models.disruptions import Condition, protocol_grid
from models.evaluate import EvalData, condition_view, evaluate_run, markdown_report, plot_results, quality_auroc
from models.train import synthetic_table, train_model

torch.set_num_threads(1)


def _data(with_corrupt: bool = True) -> EvalData:
    clean = synthetic_table(600, seed=3)
    corrupt = {m: clean.features[i] * 0.1 + 5.0 for i, m in enumerate(MODALITIES)} if with_corrupt else {}
    rates = {"rate_text_0.5": clean.rows(np.arange(200))}
    return EvalData(clean, corrupt, rates)


def _by_name(name: str) -> Condition:
    return next(c for c in protocol_grid() if c.name == name)


def test_fixed_discard_removes_that_modality_from_every_post() -> None:
    built = condition_view(_data(), _by_name("fixed_D_image"), seed=0)
    assert built is not None
    view, _ = built
    assert torch.all(view.present[:, 1] == 0) and torch.all(view.present[:, [0, 2]] == 1)
    assert torch.all(view.image == 0)


def test_fixed_corruption_uses_the_real_corrupted_features() -> None:
    data = _data()
    built = condition_view(data, _by_name("fixed_C_transcript"), seed=0)
    assert built is not None
    view, _ = built
    np.testing.assert_allclose(view.transcript.numpy(), data.corrupt["transcript"])
    np.testing.assert_allclose(view.text.numpy(), data.clean.features[0])


def test_random_ratio_disrupts_about_that_share_of_posts_and_keeps_one_modality() -> None:
    data = _data()
    view, _ = condition_view(data, _by_name("random_C+D_0.6"), seed=1)  # type: ignore[misc]
    discarded = (view.present == 0).any(-1)
    corrupted = (
        torch.stack([(view.features[i] != torch.from_numpy(data.clean.features[i])).any(-1) for i in range(3)], -1).any(
            -1
        )
        & ~discarded
    )
    share = float((discarded | corrupted).float().mean())
    assert 0.5 < share < 0.7
    assert torch.all(view.present.sum(-1) >= 1)


def test_condition_without_its_corrupted_variant_is_skipped() -> None:
    data = _data(with_corrupt=False)
    assert condition_view(data, _by_name("fixed_C_text"), seed=0) is None
    assert condition_view(data, _by_name("fixed_D_text"), seed=0) is not None
    assert condition_view(data, _by_name("rate_text_0.5"), seed=0) is not None
    assert condition_view(data, _by_name("rate_image_0.5"), seed=0) is None


@pytest.mark.parametrize("name", ["subset_text", "subset_image+transcript"])
def test_subset_condition_keeps_exactly_those_modalities(name: str) -> None:
    view, _ = condition_view(_data(), _by_name(name), seed=0)  # type: ignore[misc]
    kept = name.removeprefix("subset_").split("+")
    expected = torch.tensor([1.0 if m in kept else 0.0 for m in MODALITIES])
    assert torch.all(view.present == expected)


def test_evaluation_writes_tables_and_plots(tmp_path: Path) -> None:
    data = _data()
    train, val = synthetic_table(800, seed=1), synthetic_table(200, seed=2)
    model = train_model("late_zero", None, train, val, epochs=1, progress=False).model
    per_seed = {s: evaluate_run(model, data, s) for s in (0, 1)}
    assert per_seed[0]["clean"]["macro_f1"] > 0.6
    assert per_seed[0]["clean"] == per_seed[1]["clean"]  # clean does not depend on the disruption seed
    from models.evaluate import _aggregate

    results = {
        "split": "random",
        "test_split": "test",
        "seeds": [0, 1],
        "aggregate": {"late_zero": _aggregate(per_seed)},
        "train_seconds": {"late_zero": {"mean": 1.0, "std": 0.0, "epochs": 1.0}},
        "skipped": [],
    }
    text = markdown_report(results)
    assert "| random_C+D_0.6 |" in text and "| rate_text_0.5 |" in text
    paths = plot_results(results, tmp_path)
    assert paths and all(p.stat().st_size > 1000 for p in paths)


def test_fault_conditions_use_their_own_variant_and_report_the_majority_share() -> None:
    data = _data()
    typos = data.clean.features[0] * 0.0 - 3.0
    data.faults["corrupt_text_typos"] = typos
    built = condition_view(data, _by_name("fixed_C_text_typos"), seed=0)
    assert built is not None
    np.testing.assert_allclose(built[0].text.numpy(), typos)
    np.testing.assert_allclose(built[0].image.numpy(), data.clean.features[1])
    assert condition_view(data, _by_name("fixed_C_text_delete"), seed=0) is None  # not in the cache: skipped
    model = train_model("text_only", None, data.clean, data.clean, epochs=1, patience=1, progress=False).model
    out = evaluate_run(model, data, seed=0)
    assert "fixed_C_text_typos" in out and "fixed_C_text_delete" not in out
    # every typo'd text is the same constant row, so text-only gives one class to every post
    assert out["fixed_C_text_typos"]["majority_share"] == 1.0
    assert 1 / 3 <= out["clean"]["majority_share"] < 0.6


def test_fault_training_comparison_puts_both_trainings_side_by_side() -> None:
    from models.experiments.fault_training import comparison_markdown

    def results(share: float) -> dict[str, object]:
        cells = {"clean": {"weighted_f1": 0.7, "macro_f1": 0.6, "majority_share": 0.4},
                 "fixed_C_text_typos": {"weighted_f1": 0.5, "macro_f1": 0.45, "majority_share": share}}
        return {"n_test": 10, "per_seed": {"late_zero": {"0": cells}}, "skipped": ["fixed_C_image_crop"]}

    md = comparison_markdown(results(0.9), results(0.5))
    rows = [line for line in md.splitlines() if line.startswith("| late_zero |")]
    assert [r.split(" | ")[1] for r in rows[:2]] == ["noise", "real"]
    share_table = md.split("**share of the majority predicted class**")[1].split("**")[0]
    assert "| late_zero | noise | 40.0 | — | — | — | — | 90.0 |" in share_table
    assert "| late_zero | real | 40.0 | — | — | — | — | 50.0 |" in share_table
    assert "corrupt_image_crop" in md


def test_quality_auroc_per_fault_kind_for_heads_with_a_quality() -> None:
    data = _data()
    data.faults["corrupt_text_typos"] = data.clean.features[0] * 0.0 - 3.0
    data.faults["corrupt_text_delete"] = data.clean.features[0].copy()  # a "fault" that changes nothing
    train, val = synthetic_table(800, seed=1), synthetic_table(200, seed=2)
    drf = train_model("drf", None, train, val, epochs=1, progress=False).model
    out = quality_auroc(drf, data)
    assert set(out) == {"text:mask", "text:delete", "text:typos", "image:mask", "transcript:mask"}
    assert all(0.0 <= v <= 1.0 for v in out.values())
    assert out["text:delete"] == 0.5  # identical inputs: the quality cannot tell them apart
    assert out["text:typos"] != 0.5
    late = train_model("late_zero", None, train, val, epochs=1, progress=False).model
    assert quality_auroc(late, data) == {}  # no quality, no row
    results = {"split": "random", "test_split": "test", "seeds": [0], "aggregate": {}, "skipped": [],
               "quality_auroc": {"drf": {0: out}}}
    text = markdown_report(results)
    assert "## Quality AUROC" in text and "| drf |" in text and "text:typos" in text
