"""Behaviour of the heads: shapes, queue semantics, quality, loss switches, recovery, training, ONNX parity.

Everything runs on synthetic features; nothing here reads the feature cache.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from models.common import FEATURE_DIMS, MODALITIES, TrainBatch, View, masked_softmax
from models.drf import DRF, DRFConfig, FeatureQueue, QualityEstimator
from models.fsrf import FSRF, FSRFConfig
from models.head import ServingHead, ServingHeadConfig, load_serving_head
from models.train import (
    DRF_PARTS,
    FSRF_PARTS,
    MODELS,
    FeatureStats,
    TrainDisruption,
    apply_ablation,
    build_model,
    default_config,
    disrupt,
    disrupt_with_target,
    quality_target_kinds,
    refit_quality,
    synthetic_table,
    train_model,
)

torch.set_num_threads(1)
B = 16


def _features(batch: int = B, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    text, image, transcript = (torch.randn(batch, FEATURE_DIMS[m], generator=gen) for m in MODALITIES)
    return text, image, transcript


def _present(batch: int = B) -> torch.Tensor:
    patterns = torch.tensor([[1, 1, 1], [1, 0, 1], [1, 1, 0], [0, 1, 1], [1, 0, 0], [0, 0, 1]], dtype=torch.float32)
    return patterns[torch.arange(batch) % len(patterns)]


def _batch(seed: int = 0) -> TrainBatch:
    text, image, transcript = _features(seed=seed)
    complete = torch.ones(B, 3)
    stats = FeatureStats(
        tuple(torch.zeros(FEATURE_DIMS[m]) for m in MODALITIES),  # type: ignore[arg-type]
        tuple(torch.ones(FEATURE_DIMS[m]) for m in MODALITIES),  # type: ignore[arg-type]
    )
    gen = torch.Generator().manual_seed(seed)
    cfg = TrainDisruption(ratio=1.0)
    feats = (text, image, transcript)
    return TrainBatch(
        view=disrupt(feats, complete, cfg, stats, gen),
        view_b=disrupt(feats, complete, cfg, stats, gen),
        clean=View(text, image, transcript, complete),
        label=torch.arange(B) % 3,
    )


def _loss(model: torch.nn.Module, batch: TrainBatch) -> tuple[float, set[str]]:
    torch.manual_seed(0)
    model.eval()  # no dropout: the same batch gives the same loss
    out = model.compute_loss(batch)  # type: ignore[operator]
    return float(out.total.detach()), set(out.terms)


def _fill_queue(queue: FeatureQueue, seed: int = 1) -> None:
    gen = torch.Generator().manual_seed(seed)
    for m in range(3):
        queue.enqueue(m, torch.randn(queue.length, queue.features.shape[-1], generator=gen) * 0.5 + 0.3 * m)


# -- the DRF feature queue ---------------------------------------------------------------------


def test_queue_evicts_the_oldest_rows_first() -> None:
    queue = FeatureQueue(n_modalities=3, length=4, dim=2)
    rows = torch.arange(12, dtype=torch.float32).reshape(6, 2)
    queue.enqueue(0, rows[:3])
    assert queue.snapshot(0).tolist() == rows[:3].tolist()
    queue.enqueue(0, rows[3:])  # 6 rows pushed into 4 slots: rows 0 and 1 are gone
    assert queue.snapshot(0).tolist() == rows[2:].tolist()
    assert int(queue.count[0]) == 4
    assert queue.snapshot(1).shape == (0, 2)  # other modalities untouched


def test_queue_batch_larger_than_queue_keeps_its_last_rows() -> None:
    queue = FeatureQueue(n_modalities=1, length=3, dim=1)
    queue.enqueue(0, torch.arange(7, dtype=torch.float32).unsqueeze(-1))
    assert queue.snapshot(0).squeeze(-1).tolist() == [4.0, 5.0, 6.0]


def test_queue_moments_are_those_of_the_held_rows() -> None:
    queue = FeatureQueue(n_modalities=3, length=50, dim=4)
    data = torch.randn(80, 4)
    queue.enqueue(2, data)
    mean, var = queue.moments()
    held = data[-50:].numpy()
    np.testing.assert_allclose(mean[2].numpy(), held.mean(0), atol=1e-5)
    np.testing.assert_allclose(var[2].numpy(), held.var(0), atol=1e-5)
    # an empty queue reads as a standard normal, so quality is defined from the first step
    assert mean[0].abs().sum() == 0 and torch.all(var[0] == 1)


def test_queue_enqueue_detaches_from_the_graph() -> None:
    queue = FeatureQueue(1, 8, 3)
    x = torch.randn(4, 3, requires_grad=True)
    queue.enqueue(0, x * 2)
    assert not queue.features.requires_grad


# -- quality -----------------------------------------------------------------------------------


def test_quality_drops_for_features_far_from_the_queue_distribution() -> None:
    estimator = QualityEstimator(DRFConfig(use_modality_prior=False))
    mean, var = torch.zeros(3, 8), torch.ones(3, 8)
    typical = torch.randn(64, 3, 8) * 0.8
    shifted = typical.clone()
    shifted[:, 1] += 4.0  # the image modality is out of distribution
    quality, weights = estimator(shifted, torch.ones(64, 3), mean, var)
    assert quality[:, 0].mean() > 0.9 and quality[:, 1].mean() < 0.01
    assert torch.all(weights[:, 1] < weights[:, 0])
    torch.testing.assert_close(weights.sum(-1), torch.ones(64))


def test_quality_is_reported_even_when_the_fusion_ignores_it() -> None:
    estimator = QualityEstimator(DRFConfig(use_quality=False, use_modality_prior=False))
    h = torch.zeros(4, 3, 8)
    h[:, 2] += 4.0
    quality, weights = estimator(h, torch.ones(4, 3), torch.zeros(3, 8), torch.ones(3, 8))
    assert torch.all(quality[:, 2] < 0.01) and torch.all(quality[:, 0] == 1)
    torch.testing.assert_close(weights, torch.full((4, 3), 1 / 3))


def test_missing_modalities_get_zero_weight_without_recovery() -> None:
    weights = masked_softmax(torch.zeros(2, 3), torch.tensor([[1.0, 0.0, 1.0], [0.0, 0.0, 1.0]]))
    torch.testing.assert_close(weights, torch.tensor([[0.5, 0.0, 0.5], [0.0, 0.0, 1.0]]))


# -- loss switches -----------------------------------------------------------------------------


@pytest.mark.parametrize("part", DRF_PARTS)
def test_each_drf_switch_changes_the_loss(part: str) -> None:
    batch = _batch()
    torch.manual_seed(0)
    full = DRF(DRFConfig())
    _fill_queue(full.queue)
    with torch.no_grad():
        full.quality.prior.copy_(torch.tensor([1.0, -0.5, 0.2]))
    cfg = DRFConfig()
    apply_ablation("drf", cfg, part)
    ablated = DRF(cfg)
    ablated.load_state_dict(full.state_dict())
    (loss_full, terms_full), (loss_ablated, terms_ablated) = _loss(full, batch), _loss(ablated, batch)
    assert loss_full != pytest.approx(loss_ablated, rel=1e-6, abs=1e-7)
    if part in ("sample_loss", "dist_loss"):
        assert f"drf_{part.removesuffix('_loss')}" in terms_full - terms_ablated


@pytest.mark.parametrize("part", FSRF_PARTS)
def test_each_fsrf_switch_changes_the_loss(part: str) -> None:
    batch = _batch()
    torch.manual_seed(0)
    full = FSRF(FSRFConfig())
    cfg = FSRFConfig()
    apply_ablation("fsrf", cfg, part)
    ablated = FSRF(cfg)
    ablated.load_state_dict(full.state_dict())
    (loss_full, terms_full), (loss_ablated, terms_ablated) = _loss(full, batch), _loss(ablated, batch)
    assert loss_full != pytest.approx(loss_ablated, rel=1e-6, abs=1e-7)
    assert len(terms_ablated) < len(terms_full) or part == "recovery"


@pytest.mark.parametrize("part", sorted(set(DRF_PARTS) | set(FSRF_PARTS)))
def test_each_serving_head_switch_changes_the_loss(part: str) -> None:
    batch = _batch()
    torch.manual_seed(0)
    full = ServingHead(ServingHeadConfig())
    _fill_queue(full.queue)
    with torch.no_grad():
        full.quality.prior.copy_(torch.tensor([1.0, -0.5, 0.2]))
    cfg = ServingHeadConfig()
    apply_ablation("serving", cfg, part)
    ablated = ServingHead(cfg)
    ablated.load_state_dict(full.state_dict())
    assert _loss(full, batch)[0] != pytest.approx(_loss(ablated, batch)[0], rel=1e-6, abs=1e-7)


def test_training_step_fills_the_queue_with_clean_features_only_in_training() -> None:
    head = ServingHead(ServingHeadConfig(queue_len=64))
    batch = _batch()
    head.eval()
    head.compute_loss(batch)
    assert int(head.queue.count.sum()) == 0
    head.train()
    head.compute_loss(batch)
    assert head.queue.count.tolist() == [B, B, B]


# -- the serving head --------------------------------------------------------------------------


def _serving_inputs(head: ServingHead, batch: int = B) -> tuple[torch.Tensor, ...]:
    text, image, transcript = _features(batch)
    present = _present(batch)
    text, image, transcript = (x * present[:, i : i + 1] for i, x in enumerate((text, image, transcript)))
    return text, image, transcript, present, torch.zeros(3, head.d), torch.ones(3, head.d)


@pytest.mark.parametrize("recovery", ["fsrf", "drf"])
def test_serving_head_outputs_follow_the_contract(recovery: str) -> None:
    head = ServingHead(ServingHeadConfig(recovery=recovery)).eval()
    inputs = _serving_inputs(head)
    probs, quality, projected = head(*inputs)
    present = inputs[3]
    assert probs.shape == (B, 3) and quality.shape == (B, 3) and projected.shape == (B, 3, head.d)
    torch.testing.assert_close(probs.sum(-1), torch.ones(B))
    assert torch.all(quality[present == 0] == 0) and torch.all(quality[present == 1] > 0)
    # missing modalities are recovered, not left at zero
    assert torch.all(projected[present == 0].abs().sum(-1) > 0)


@pytest.mark.parametrize("recovery", ["fsrf", "drf"])
def test_serving_head_ignores_the_features_of_missing_modalities(recovery: str) -> None:
    head = ServingHead(ServingHeadConfig(recovery=recovery)).eval()
    inputs = list(_serving_inputs(head))
    present = inputs[3]
    garbage = [x + 100.0 * (1 - present[:, i : i + 1]) for i, x in enumerate(inputs[:3])]
    for a, b in zip(head(*inputs), head(*garbage, *inputs[3:]), strict=True):
        torch.testing.assert_close(a, b)


def test_quality_input_changes_the_fusion_weights() -> None:
    head = ServingHead().eval()
    inputs = _serving_inputs(head)
    shifted_mean = torch.zeros(3, head.d)
    shifted_mean[1] += 5.0  # the image queue sits elsewhere: present images become low quality
    probs_a, quality_a, _ = head(*inputs)
    probs_b, quality_b, _ = head(*inputs[:4], shifted_mean, inputs[5])
    has_image = inputs[3][:, 1] == 1
    assert torch.all(quality_b[has_image, 1] < quality_a[has_image, 1])
    assert not torch.allclose(probs_a, probs_b)


@pytest.mark.parametrize(
    ("recovery", "quality"),
    [("fsrf", "distance"), ("drf", "distance"), ("fsrf", "learned"), ("fsrf", "learned+raw")],
)
def test_serving_head_exports_to_onnx_with_a_dynamic_batch(recovery: str, quality: str, tmp_path: Path) -> None:
    ort = pytest.importorskip("onnxruntime")
    torch.manual_seed(0)
    drf = DRFConfig(quality="learned", quality_raw="all") if quality == "learned+raw" else DRFConfig(quality=quality)
    head = ServingHead(ServingHeadConfig(recovery=recovery, drf=drf))
    if quality.startswith("learned"):  # a detector with non-trivial weights and running statistics
        head.train()
        with torch.no_grad():
            head.quality.weight.normal_(0.0, 0.3)
            for weight in head.quality.raw_weight:  # the raw encoder outputs as a second input
                weight.normal_(0.0, 0.1)
            head(*_serving_inputs(head, 64))
    head.eval()
    names = ["text", "image", "transcript", "present", "queue_mean", "queue_var"]
    batch = torch.export.Dim("batch", min=1, max=4096)
    dynamic = {n: ({0: batch} if i < 4 else None) for i, n in enumerate(names)}
    path = tmp_path / "head.onnx"
    torch.onnx.export(
        head, _serving_inputs(head, 4), str(path), dynamo=True, dynamic_shapes=dynamic,
        input_names=names, output_names=["probs", "quality", "projected"],
    )  # fmt: skip
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    for size in (1, 7):  # neither is the export batch
        inputs = _serving_inputs(head, size)
        inputs = (*inputs[:4], torch.randn(3, head.d) * 0.1, torch.rand(3, head.d) + 0.5)
        got = session.run(None, {n: x.numpy() for n, x in zip(names, inputs, strict=True)})
        with torch.no_grad():
            want = head(*inputs)
        for g, w in zip(got, want, strict=True):
            np.testing.assert_allclose(g, w.numpy(), rtol=1e-4, atol=1e-5)


# -- baselines ---------------------------------------------------------------------------------


def test_text_only_ignores_image_and_transcript() -> None:
    model = build_model("text_only").eval()
    text, image, transcript = _features()
    present = torch.ones(B, 3)
    torch.testing.assert_close(model(text, image, transcript, present), model(text, image * 3, -transcript, present))


def test_early_fusion_modality_dropout_keeps_at_least_one_modality() -> None:
    model = build_model("early_dropout", dataclasses.replace(default_config("early_dropout"), modality_dropout=0.9))
    present = _present(600)
    kept = model.drop_modalities(present)  # type: ignore[operator]
    assert torch.all(kept <= present) and torch.all(kept.sum(-1) >= 1)
    assert kept.sum(-1).mean() < 1.2  # most samples are down to the one modality always kept


# -- training ----------------------------------------------------------------------------------


def test_training_disruption_discards_and_corrupts_but_keeps_one_modality() -> None:
    table = synthetic_table(2000, seed=0)
    feats = tuple(torch.from_numpy(x) for x in table.features)
    available = torch.from_numpy(table.available)
    view = disrupt(feats, available, TrainDisruption(ratio=0.5), FeatureStats.of(table), torch.Generator())
    assert torch.all(view.present.sum(-1) >= 1)
    discarded = (view.present == 0).any(-1).float().mean()
    changed = torch.stack([(a != b).any(-1) for a, b in zip(view.features, feats, strict=True)], -1)
    corrupted = (changed & (view.present == 1)).any(-1).float().mean()
    assert 0.15 < discarded < 0.4 and 0.15 < corrupted < 0.4  # half the samples, each C or D


@pytest.mark.parametrize("name", sorted(MODELS))
def test_training_on_separable_synthetic_data_beats_chance(name: str) -> None:
    train = synthetic_table(1500, seed=1, signal=(0.6, 0.4, 0.4))
    val = synthetic_table(400, seed=2, signal=(0.6, 0.4, 0.4))
    result = train_model(name, None, train, val, epochs=3, patience=3, progress=False)
    assert result.metrics["val_clean"]["macro_f1"] > 0.6
    assert result.metrics["epochs_run"] >= 1


def test_train_command_writes_the_model_dir_layout(tmp_path: Path) -> None:
    from models import train

    parser = argparse.ArgumentParser()
    train.add_arguments(parser)
    out = tmp_path / "serving"
    args = parser.parse_args(
        ["--model", "serving", "--out", str(out), "--synthetic", "600", "--epochs", "1", "--no-progress",
         "--recovery", "drf", "--ablate", "orth", "--set", "drf.quality_tau=2.0"]
    )  # fmt: skip
    assert train.run(args) == 0
    config: dict[str, Any] = json.loads((out / "config.json").read_text())
    assert config["model"] == "serving" and config["config"]["recovery"] == "drf"
    assert config["config"]["fsrf"]["use_orth"] is False and config["config"]["drf"]["quality_tau"] == 2.0
    queue = np.load(out / "queue.npz")
    assert sorted(queue.files) == sorted(MODALITIES)
    for m in MODALITIES:
        assert queue[m].dtype == np.float32 and queue[m].ndim == 2 and queue[m].shape[1] == config["d"]
        assert 0 < queue[m].shape[0] <= config["config"]["queue_len"]
    metrics = json.loads((out / "metrics.json").read_text())
    assert {"val_clean", "val_disrupted", "train_seconds"} <= set(metrics)
    head = load_serving_head(out, recovery="fsrf")
    assert head.recovery == "fsrf" and int(head.queue.count[0]) == queue["text"].shape[0]


def _table_with_bank(n: int = 600) -> tuple[Any, torch.Tensor]:
    """A synthetic table whose text has two cached "faults": constant rows 7.0 and -7.0, unlike any clean row."""
    table = synthetic_table(n, seed=0)
    bank = np.stack([np.full((n, FEATURE_DIMS["text"]), 7.0, np.float32),
                     np.full((n, FEATURE_DIMS["text"]), -7.0, np.float32)])
    table = dataclasses.replace(table, corrupted={"text": bank},
                                corrupted_variants={"text": ["corrupt_text", "corrupt_text_typos"]})
    return table, bank


def test_training_disruption_substitutes_cached_corrupted_rows() -> None:
    table, _ = _table_with_bank()
    feats = tuple(torch.from_numpy(x) for x in table.features)
    available = torch.from_numpy(table.available)
    stats = FeatureStats.of(table)
    cfg = TrainDisruption(ratio=1.0, p_discard=0.0, p_second=0.0)
    view = disrupt(feats, available, cfg, stats, torch.Generator().manual_seed(0), table.corrupted_bank())
    text_hit = (view.text != feats[0]).any(-1)
    assert 0.2 < text_hit.float().mean() < 0.45  # one random modality of three per sample
    hit_rows = view.text[text_hit]
    is_a, is_b = (hit_rows == 7.0).all(-1), (hit_rows == -7.0).all(-1)
    assert torch.all(is_a | is_b)  # every corrupted text row is a cached one, no feature noise
    assert 0.35 < is_a.float().mean() < 0.65  # a kind drawn uniformly per sample
    # image and transcript have no cached variants: they fall back to feature noise
    image_hit = (view.image != feats[1]).any(-1)
    assert image_hit.any() and not torch.any((view.image[image_hit] == 7.0).all(-1))

    # noise mode ignores the bank and reproduces the views of a run without one
    noise = dataclasses.replace(cfg, corruption="noise")
    a = disrupt(feats, available, noise, stats, torch.Generator().manual_seed(0), table.corrupted_bank())
    b = disrupt(feats, available, noise, stats, torch.Generator().manual_seed(0))
    for x, y in zip(a.features, b.features, strict=True):
        assert torch.equal(x, y)
    assert not torch.any((a.text == 7.0).all(-1) | (a.text == -7.0).all(-1))
    # p_noise=1: every cell gets noise even where real rows exist
    mixed = dataclasses.replace(cfg, p_noise=1.0)
    c = disrupt(feats, available, mixed, stats, torch.Generator().manual_seed(0), table.corrupted_bank())
    assert not torch.any((c.text == 7.0).all(-1) | (c.text == -7.0).all(-1))
    with pytest.raises(ValueError):
        TrainDisruption(corruption="images")


def test_feature_table_rows_keep_the_corrupted_bank_aligned() -> None:
    table, bank = _table_with_bank(50)
    bank[1, 7] = 3.0
    table.corrupted["text"] = bank
    sub = table.rows(np.array([7, 9]))
    assert sub.corrupted["text"].shape == (2, 2, FEATURE_DIMS["text"])
    assert (sub.corrupted["text"][1, 0] == 3.0).all() and (sub.corrupted["text"][1, 1] == -7.0).all()
    batch = table.corrupted_bank(np.array([7]))
    assert batch[1] is None and batch[2] is None and batch[0] is not None and batch[0].shape == (2, 1, 384)


def test_training_with_real_corruption_records_its_sources() -> None:
    train, _ = _table_with_bank(600)
    val, _ = _table_with_bank(200)
    result = train_model("late_zero", None, train, val, epochs=1, patience=1, progress=False)
    assert result.metrics["corruption"]["train"]["text"] == ["corrupt_text", "corrupt_text_typos"]
    assert result.metrics["corruption"]["val"]["image"] == "feature noise"
    noise = train_model("late_zero", None, train, val, epochs=1, patience=1, progress=False,
                        disruption=TrainDisruption(corruption="noise"))
    assert noise.metrics["corruption"]["train"]["text"] == "feature noise"
    # the validation "disrupted" score sees the cached rows, so it differs from the noise-disrupted one
    assert result.metrics["val_disrupted"] != noise.metrics["val_disrupted"] or \
        result.metrics["val_clean"] != noise.metrics["val_clean"]


# -- the learned quality -------------------------------------------------------------------------


def _table_with_realistic_bank(n: int = 600) -> Any:
    """Text with two cached faults: the papers' masking (held out of the quality target) and a realistic kind."""
    table, _ = _table_with_bank(n)
    return dataclasses.replace(table, corrupted_variants={"text": ["corrupt_text", "corrupt_text_delete"]})


def test_disrupt_with_target_marks_clean_and_realistically_corrupted_cells() -> None:
    table = _table_with_realistic_bank()
    feats = tuple(torch.from_numpy(x) for x in table.features)
    available = torch.from_numpy(table.available)
    stats = FeatureStats.of(table)
    cfg = TrainDisruption(ratio=1.0, p_discard=0.3, p_second=0.5)
    kinds = quality_target_kinds(table)
    assert kinds[1] is None and kinds[2] is None and kinds[0] is not None
    assert kinds[0].tolist() == [False, True]
    view, target = disrupt_with_target(feats, available, cfg, stats, torch.Generator().manual_seed(0),
                                       table.corrupted_bank(), kinds)
    same = disrupt(feats, available, cfg, stats, torch.Generator().manual_seed(0), table.corrupted_bank())
    for x, y in zip(view.features, same.features, strict=True):
        assert torch.equal(x, y)  # the same draws, the same view
    same_rows = [(v == f).all(-1) for v, f in zip(view.features, feats, strict=True)]
    untouched = torch.stack(same_rows, 1) & (view.present > 0)
    assert torch.all(target[untouched] == 1.0)
    assert torch.all(torch.isnan(target[view.present == 0]))  # missing: no target
    masked = (view.text == 7.0).all(-1)  # the papers' [MASK] kind: held out
    deleted = (view.text == -7.0).all(-1)
    assert masked.any() and deleted.any()
    assert torch.all(torch.isnan(target[masked, 0])) and torch.all(target[deleted, 0] == 0.0)
    noised = (view.present[:, 1] > 0) & ~(view.image == feats[1]).all(-1)  # feature noise: no target
    assert noised.any() and torch.all(torch.isnan(target[noised, 1]))


def test_learned_quality_ranks_corrupted_inputs_below_clean_ones() -> None:
    train = _table_with_realistic_bank(800)
    cfg = ServingHeadConfig(drf=DRFConfig(quality="learned"))
    result = train_model("serving", cfg, train, train.rows(np.arange(300)), epochs=3, patience=3, progress=False)
    head = result.model.eval()
    assert "loss_quality" in result.metrics["history"][0]
    text, image, transcript = (torch.from_numpy(x[:300]) for x in train.features)
    present = torch.ones(300, 3)
    mean, var = head.queue.moments()
    with torch.no_grad():
        clean = head(text, image, transcript, present, mean, var)[1][:, 0]
        broken = head(torch.full_like(text, -7.0), image, transcript, present, mean, var)[1][:, 0]
    assert float((clean[:, None] > broken[None, :]).float().mean()) > 0.95  # AUROC of the fitted kind


def test_a_config_written_before_the_learned_quality_loads_as_distance(tmp_path: Path) -> None:
    head = ServingHead()
    cfg = dataclasses.asdict(head.cfg)
    del cfg["drf"]["quality"], cfg["drf"]["quality_loss_weight"]
    (tmp_path / "config.json").write_text(json.dumps({"model": "serving", "config": cfg}))
    torch.save(head.state_dict(), tmp_path / "head.pt")
    assert load_serving_head(tmp_path).quality.mode == "distance"
    with pytest.raises(ValueError, match="quality must be one of"):
        QualityEstimator(DRFConfig(quality="knn"))


def test_refit_quality_fits_the_detector_on_the_trained_head_and_exports_unchanged(tmp_path: Path) -> None:
    ort = pytest.importorskip("onnxruntime")
    train = _table_with_realistic_bank(800)
    val = train.rows(np.arange(300))
    cfg = ServingHeadConfig(drf=DRFConfig(quality="learned", quality_refit=True))
    result = train_model("serving", cfg, train, val, epochs=1, patience=1, progress=False)
    fit = result.metrics["quality_refit"]
    assert set(fit) == {"text"} and fit["text"]["kinds"] == ["corrupt_text_delete"]  # never the masking
    assert fit["text"]["val_auroc"] > 0.95 and fit["text"]["C"] in (0.01, 0.1, 1.0, 10.0)
    head = result.model.eval()
    names = ["text", "image", "transcript", "present", "queue_mean", "queue_var"]
    text, image, transcript = (torch.from_numpy(x[:64]) for x in train.features)
    mean, var = head.queue.moments()
    inputs = (torch.full_like(text, -7.0), image, transcript, torch.ones(64, 3), mean, var)
    with torch.no_grad():
        want = head(*inputs)
        clean = head(text, image, transcript, torch.ones(64, 3), mean, var)[1][:, 0]
    assert float((clean[:, None] > want[1][None, :, 0]).float().mean()) > 0.95
    path = tmp_path / "head.onnx"
    batch = torch.export.Dim("batch", min=1, max=4096)
    dynamic = {n: ({0: batch} if i < 4 else None) for i, n in enumerate(names)}
    torch.onnx.export(head, inputs, str(path), dynamo=True, dynamic_shapes=dynamic, input_names=names,
                      output_names=["probs", "quality", "projected"])
    got = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(
        None, {n: x.numpy() for n, x in zip(names, inputs, strict=True)})
    for g, w in zip(got, want, strict=True):
        np.testing.assert_allclose(g, w.numpy(), rtol=1e-4, atol=1e-5)
    off = train_model("serving", ServingHeadConfig(drf=DRFConfig(quality="learned")), train, val, epochs=1,
                      patience=1, progress=False)
    assert "quality_refit" not in off.metrics


def test_a_recovered_modality_is_judged_without_a_raw_input_it_does_not_have() -> None:
    """The raw part of the detector reads the encoder output a row came from: a missing modality has none."""
    torch.manual_seed(0)
    head = ServingHead(ServingHeadConfig(drf=DRFConfig(quality="learned", quality_raw="all"))).eval()
    with torch.no_grad():
        for weight in head.quality.raw_weight:
            weight.normal_(0.0, 0.3)
    text, image, transcript, present, mean, var = _serving_inputs(head, 32)
    present[:, 0], present[:, 1] = 1.0, 0.0  # text present, image missing (recovered, weighted in the fusion)
    image = torch.zeros_like(image)
    with torch.no_grad():
        before = head(text, image, transcript, present, mean, var)[0]
        head.quality.raw_weight[1].normal_(0.0, 0.3)  # the missing image's raw weights do not matter
        assert torch.allclose(head(text, image, transcript, present, mean, var)[0], before)
        head.quality.raw_weight[0].normal_(0.0, 0.3)  # the present text's do
        assert not torch.allclose(head(text, image, transcript, present, mean, var)[0], before)


def _table_with_three_text_faults(n: int = 800) -> Any:
    """Text with the papers' masking and three realistic kinds, each a different damage of the clean row."""
    table = synthetic_table(n, seed=0)
    x = table.features[0]
    rng = np.random.default_rng(1)
    bank = np.stack([np.full_like(x, 7.0), x + rng.normal(0.0, 2.0, x.shape), 0.3 * x, np.roll(x, 5, axis=1)])
    # a near-constant column, as real encoder outputs have: its float noise must not become a signal
    x[:, 0] = 0.5 + 1e-9 * rng.normal(size=n)
    bank[1:, :, 0] = 0.5 + 1e-9 * rng.normal(size=(3, n))
    names = ["corrupt_text", "corrupt_text_delete", "corrupt_text_truncate", "corrupt_text_typos"]
    return dataclasses.replace(table, corrupted={"text": bank.astype(np.float32)}, corrupted_variants={"text": names})


def test_views_draw_from_the_asked_kinds_and_the_refit_chooses_its_inputs_on_held_out_kinds() -> None:
    train = _table_with_three_text_faults()
    val = train.rows(np.arange(300))
    cfg = ServingHeadConfig(drf=DRFConfig(quality="learned", quality_refit=True, quality_raw="auto"))
    result = train_model("serving", cfg, train, val, epochs=1, patience=1, progress=False,
                         disruption=TrainDisruption(kinds="text:delete"))
    assert result.metrics["corruption"]["train"]["text"] == ["corrupt_text", "corrupt_text_delete"]  # views
    fit = result.metrics["quality_refit"]["text"]
    realistic = ["corrupt_text_delete", "corrupt_text_truncate", "corrupt_text_typos"]
    assert fit["kinds"] == realistic  # the refit: every cached realistic kind, never the masking
    held = fit["held_out_val_auroc"]
    names = {0.0: "stats", 0.25: "blend 0.25", 0.5: "blend 0.5", 0.75: "blend 0.75", 1.0: "raw"}
    assert set(held) == set(names.values())  # the raw-reading detector's share of the blend, 0 to 1
    assert all(sorted(scores) == realistic for scores in held.values())
    worst = {name: min(scores.values()) for name, scores in held.items()}
    assert worst[names[fit["raw_share"]]] == max(worst.values())  # the best worst held-out kind wins
    quality = result.model.quality
    assert bool(quality.raw_weight[0].abs().sum() > 0) == fit["raw"] == (fit["raw_share"] > 0)
    assert set(result.metrics["quality_refit"]) == {"text"}  # image and transcript have no faults to fit on
    for use_raw in (True, False):  # either input set can be forced (models/experiments/quality_inputs.py)
        assert refit_quality(result.model, train, val, use_raw=use_raw)["text"]["raw"] is use_raw
        assert bool(quality.raw_weight[0].abs().sum() > 0) is use_raw
    # the head computes the fitted blend exactly: its own logit ranks the val rows as the fit reported
    from sklearn.metrics import roc_auc_score

    from models.train import _detector_rows

    fit = refit_quality(result.model, train, val, use_raw=0.5)["text"]
    rows = _detector_rows(result.model, val, 0, [1, 2, 3], 6000, seed=0)
    mean, var = result.model.queue.moments()
    n = len(rows.kind)
    with torch.no_grad():
        logit = quality.detector_logit(rows.h, mean, var, [rows.raw, torch.zeros(n, 1280), torch.zeros(n, 384)])
    got = roc_auc_score(rows.target, logit[:, 0].double().numpy(), sample_weight=rows.weights())
    assert abs(got - fit["val_auroc"]) < 1e-3
    with pytest.raises(ValueError, match="unknown corruption kind"):
        TrainDisruption(kinds="text:smudge")


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("drf.quality=knn", "quality must be one of"),
        ("drf.quality_refit=true", "needs quality=learned"),
        ("drf.quality_raw=all", "needs quality=learned"),
        ("drf.quality_raw=sometimes", "quality_raw must be one of"),
        ("drf.no_such_field=1", "unknown config field"),
    ],
)
def test_a_config_the_head_refuses_is_a_one_line_error_before_any_data_loads(override: str, message: str) -> None:
    from models.train import make_config

    with pytest.raises(SystemExit, match=message):
        make_config("serving", (), (override,), None)
    assert make_config("serving", (), ("drf.quality=learned", "drf.quality_refit=true"), None).drf.quality_refit


def test_a_training_disruption_it_cannot_honour_is_a_one_line_error(monkeypatch: pytest.MonkeyPatch) -> None:
    import models.train as train_module

    args = argparse.Namespace(train_corruption="real", p_noise=0.0, train_corruption_kinds="text:smudge")
    with pytest.raises(SystemExit, match="unknown corruption kind 'text:smudge'"):
        train_module.make_disruption(args)
    with pytest.raises(SystemExit, match=r"p_noise must be in \[0, 1\]"):
        train_module.make_disruption(
            argparse.Namespace(train_corruption="real", p_noise=3.0, train_corruption_kinds="")
        )
    # a kind asked for that the cache does not hold stops training instead of silently falling back
    table = _table_with_realistic_bank(64)  # text: corrupt_text, corrupt_text_delete
    monkeypatch.setattr(train_module, "attach_corrupted", lambda t, *_: table)
    disruption = TrainDisruption(corruption="real", kinds="text:delete,text:typos")
    with pytest.raises(SystemExit, match="split 'train' has no cached corrupt_text_typos"):
        train_module.load_corrupted(disruption, table, table, Path("unused"), ("train", "val"))
    ok = TrainDisruption(corruption="real", kinds="text:delete")
    assert train_module.load_corrupted(ok, table, table, Path("unused"), ("train", "val"))[0] is table
