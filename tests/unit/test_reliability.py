"""Issue 12 without a broker: dead letters that always fit, images bounded before allocation, confined paths."""

from __future__ import annotations

import asyncio
import hashlib
import io
from pathlib import Path

import msgpack
import numpy as np
import pytest
from PIL import Image

from stream.service.events import (
    DeadLetter,
    PostRejected,
    decode_dead_letter,
    decode_image,
    decode_post,
    fitted_dead_letter,
    minimal_dead_letter,
)
from stream.service.preprocess import image_to_array, shrink_for_encoder
from stream.service.settings import Settings


def _png(img: Image.Image) -> bytes:
    out = io.BytesIO()
    img.save(out, format="PNG")
    return out.getvalue()


def test_the_issue_poison_record_gets_a_dead_letter_under_the_producer_limit() -> None:
    settings = Settings()
    key, value = b"k" * 60_000, b"\xc1" + bytes(range(256)) * 3515  # 60 kB key, 900 kB of garbage
    naive = DeadLetter(value=value, reason="not_msgpack", detail="x", key=key).encode()
    assert len(key) + len(naive) > 1_000_000  # over the producer limit of the time: the record that crashed the agent
    dl = fitted_dead_letter(
        value, "not_msgpack", "neither msgpack nor JSON", key=key, topic="posts", partition=3, offset=41,
        max_bytes=settings.max_dead_letter_bytes, max_key_bytes=settings.max_dead_letter_key_bytes,
    )
    encoded = dl.encode()
    assert len(encoded) <= settings.max_dead_letter_bytes
    assert dl.key is not None and len(dl.key) + len(encoded) + 1024 < settings.max_message_bytes
    back = decode_dead_letter(encoded)
    assert back.key == f"sha256:{hashlib.sha256(key).hexdigest()}".encode()
    assert back.truncated and value.startswith(back.value) and len(back.value) > 800_000
    assert (back.topic, back.partition, back.offset, back.reason) == ("posts", 3, 41, "not_msgpack")
    assert "60000 bytes" in back.detail


def test_a_dead_letter_that_fits_is_kept_whole() -> None:
    dl = fitted_dead_letter(b"abc", "no_modality", "d", key=b"id-1", topic="t", partition=0, offset=1,
                            max_bytes=2048, max_key_bytes=1024)
    assert (dl.value, dl.key, dl.truncated) == (b"abc", b"id-1", False)


def test_the_minimal_dead_letter_keeps_where_and_why_but_no_payload() -> None:
    full = DeadLetter(value=b"x" * 500_000, reason="image_too_large", detail="d" * 5000, key=b"post-7",
                      topic="posts", partition=1, offset=9)
    small = minimal_dead_letter(full)
    assert small.value == b"" and small.truncated and len(small.encode()) < 1000
    assert (small.key, small.reason, small.topic, small.partition, small.offset) == (
        b"post-7", "image_too_large", "posts", 1, 9)
    assert hashlib.sha256(b"post-7").hexdigest() in small.detail


def test_settings_refuse_a_dead_letter_cap_over_the_message_limit() -> None:
    with pytest.raises(ValueError, match="max_dead_letter_bytes"):
        Settings(max_dead_letter_bytes=6_291_000, max_message_bytes=6_291_456)


@pytest.mark.parametrize("size", [(16, 1_562_500), (1_562_500, 16)])
def test_tall_and_wide_images_within_the_pixel_limit_are_refused_before_decoding(size: tuple[int, int]) -> None:
    data = _png(Image.new("L", size, 7))
    assert len(data) < 100_000 and size[0] * size[1] == 25_000_000
    with pytest.raises(PostRejected, match="aspect ratio") as err:
        decode_image(data, 25_000_000, max_aspect=20, max_decoded_bytes=64_000_000)
    assert err.value.reason == "image_too_large"


def test_an_rgba_bomb_is_refused_by_its_decoded_size_and_a_big_image_is_shrunk_as_decoded() -> None:
    bomb = _png(Image.new("RGBA", (5000, 5000), (1, 2, 3, 255)))
    assert len(bomb) < 200_000
    with pytest.raises(PostRejected, match="decodes to 100000000 bytes") as err:
        decode_image(bomb, 25_000_000, max_aspect=20, max_decoded_bytes=64_000_000)
    assert err.value.reason == "image_too_large"
    big = decode_image(_png(Image.new("RGBA", (4000, 3000), (1, 2, 3, 255))), 25_000_000,
                       max_aspect=20, max_decoded_bytes=64_000_000)
    assert min(big.size) < 2 * 256 and big.mode == "RGBA"  # held per post: ~0.2 MB, not 48 MB
    assert image_to_array(big).shape == (3, 224, 224)


def test_a_big_jpeg_decodes_at_reduced_scale() -> None:
    out = io.BytesIO()
    Image.new("RGB", (6000, 4000), (9, 9, 9)).save(out, format="JPEG")
    img = decode_image(out.getvalue(), 25_000_000, max_decoded_bytes=64_000_000)  # 72 MB at full scale
    assert max(img.size) <= 1024


def test_images_up_to_twice_the_target_reach_the_encoder_unchanged() -> None:
    rng = np.random.default_rng(0)
    pixels = Image.fromarray(rng.integers(0, 255, (300, 400, 4), dtype=np.uint8), "RGBA")
    data = _png(pixels)
    reopened = Image.open(io.BytesIO(data))
    np.testing.assert_array_equal(image_to_array(shrink_for_encoder(reopened)), image_to_array(pixels))


def test_a_post_with_a_tall_image_is_rejected_by_the_contract() -> None:
    raw = msgpack.packb({"id": "p", "image": _png(Image.new("L", (16, 1_562_500)))}, use_bin_type=True)
    with pytest.raises(PostRejected) as err:
        decode_post(raw, settings=Settings())
    assert err.value.reason == "image_too_large"


@pytest.mark.parametrize("bad", ["/etc/passwd", "../outside.onnx", "sub/../../outside.onnx"])
def test_manifest_paths_are_confined_to_the_model_directory(tmp_path: Path, bad: str) -> None:
    from stream.service.manifest import Manifest, ManifestError

    manifest = object.__new__(Manifest)
    object.__setattr__(manifest, "root", tmp_path)
    with pytest.raises(ManifestError, match="inside the model directory"):
        manifest.confined(bad)
    (tmp_path / "ok.onnx").write_bytes(b"")
    assert manifest.confined("ok.onnx") == tmp_path / "ok.onnx"


def test_a_symlink_out_of_the_model_directory_is_refused(tmp_path: Path) -> None:
    from stream.service.manifest import Manifest, ManifestError

    model, outside = tmp_path / "model", tmp_path / "secret.onnx"
    model.mkdir()
    outside.write_bytes(b"")
    (model / "head.onnx").symlink_to(outside)
    manifest = object.__new__(Manifest)
    object.__setattr__(manifest, "root", model)
    with pytest.raises(ManifestError, match="leads out"):
        manifest.confined("head.onnx")


def test_the_event_buffer_batches_by_count_bytes_and_wait() -> None:
    from stream.service.app import _EventBuffer

    class Msg:
        def __init__(self, n: int) -> None:
            self.value = b"x" * n

    class Ev:
        def __init__(self, n: int) -> None:
            self.message = Msg(n)

    async def scenario() -> list[list[int]]:
        buffer = _EventBuffer(capacity=8)

        async def source() -> None:
            for n in (10, 10, 10, 500, 10):
                buffer.events.append(Ev(n))  # type: ignore[arg-type]
                buffer.arrived.set()
            await asyncio.sleep(10)

        pump = asyncio.ensure_future(source())
        await asyncio.sleep(0)
        sizes = []
        for _ in range(3):
            batch = await buffer.take(max_records=2, max_wait_s=0.01, max_bytes=100, pump=pump)
            sizes.append([len(e.message.value) for e in batch])
        pump.cancel()
        return sizes

    # two per batch; 500 bytes alone over the byte budget still goes (one message at least), alone
    assert asyncio.run(scenario()) == [[10, 10], [10], [500]]
