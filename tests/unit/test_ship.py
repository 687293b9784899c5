"""The shipped head: its files match its card, its encoders are the installed ones, and `train` reproduces."""

from __future__ import annotations

import argparse
import hashlib
import json
from pathlib import Path

import pytest

from export.onnx_export import SHIPPED_MODEL_DIR, EncoderMismatch, check_encoders, current_feature_key
from export.ship import MODEL_FILES, card_markdown


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_the_shipped_head_is_what_its_card_says_and_fits_the_installed_encoders() -> None:
    card = json.loads((SHIPPED_MODEL_DIR / "card.json").read_text())
    for name in MODEL_FILES:
        assert _sha(SHIPPED_MODEL_DIR / name) == card["files_sha256"][name], name
    assert card["head_pt_sha256"] == card["files_sha256"]["head.pt"]
    config = json.loads((SHIPPED_MODEL_DIR / "config.json").read_text())
    assert config["model"] == "serving" and config["data_meta"]["feature_key"] == card["feature_key"]
    # the pinned encoder packages give the features the head was trained on (export would refuse otherwise)
    assert check_encoders(config, SHIPPED_MODEL_DIR) == current_feature_key() == card["feature_key"]
    assert card["data"]["synthetic_pairing"] is True and card["data"]["counts"]["train"] > 20_000  # full, no sample
    assert {"clean", "fixed_D_text"} <= set(card["test_metrics"])
    assert card_markdown(card) == (SHIPPED_MODEL_DIR / "MODEL_CARD.md").read_text()  # the card is its source


def test_export_refuses_a_head_trained_on_other_encoders() -> None:
    meta = {"data_meta": {"feature_key": "minilm-000000000000_mnv2-000000000000_v1"}}
    with pytest.raises(EncoderMismatch, match="installed encoders are"):
        check_encoders(meta, Path("some-head"))
    assert check_encoders({"data_meta": {}}, Path("old-head")) == current_feature_key()  # not recorded: allowed


def test_train_reproduces_a_head_byte_for_byte(tmp_path: Path) -> None:
    from models import train

    digests = []
    for run in ("a", "b"):
        parser = argparse.ArgumentParser()
        train.add_arguments(parser)
        out = tmp_path / run
        args = parser.parse_args(["--model", "serving", "--out", str(out), "--synthetic", "600", "--epochs", "2",
                                  "--seed", "0", "--no-progress"])
        assert train.run(args) == 0
        digests.append((_sha(out / "head.pt"), _sha(out / "queue.npz")))
    assert digests[0] == digests[1]
