"""The int8 gate the export writes into the manifest: parity and the measured macro-F1 cost, both needed."""

from __future__ import annotations

from typing import Any

from export.parity import INT8_MAX_MACRO_F1_DROP, int8_gate


def _report(passed: bool = True, deltas: tuple[float, float] | None = (0.0001, -0.002)) -> dict[str, Any]:
    report: dict[str, Any] = {
        "encoders": {"text_encoder_int8": {"passed": passed, "cosine_mean": 0.991 if passed else 0.957}},
        "int8_accuracy": None,
    }
    if deltas is not None:
        report["int8_accuracy"] = {
            "posts": 3000,
            "speedup_int8": 2.4,
            "metrics": {
                k: {"delta_macro_f1_int8_minus_fp32": d, "delta_macro_f1_ci95": [d - 0.006, d + 0.006]}
                for k, d in zip(("all_available", "text_only"), deltas, strict=True)
            },
        }
    return report


def test_gate_passes_with_parity_and_a_small_measured_cost() -> None:
    gate = int8_gate(_report())
    assert gate is not None and gate["passed"] and gate["accuracy_measured"]
    assert gate["delta_macro_f1"] == {"all_available": 0.0001, "text_only": -0.002}
    assert "Δ macro-F1 +0.0001" in gate["reason"]


def test_gate_fails_on_parity_on_a_large_cost_and_when_the_cost_was_not_measured() -> None:
    bad_parity = int8_gate(_report(passed=False))
    assert bad_parity is not None and not bad_parity["passed"] and "cosine" in bad_parity["reason"]
    too_costly = int8_gate(_report(deltas=(0.0, -(INT8_MAX_MACRO_F1_DROP + 0.001))))
    assert too_costly is not None and not too_costly["passed"] and "drops by" in too_costly["reason"]
    unmeasured = int8_gate(_report(deltas=None))
    assert unmeasured is not None and not unmeasured["passed"] and "not measured" in unmeasured["reason"]
    assert int8_gate({"encoders": {}, "int8_accuracy": None}) is None  # no int8 encoder exported
