"""The encoder cache: exact-content keys per encoder identity, LRU bound, hits and misses counted."""

from __future__ import annotations

import numpy as np

from stream.service.encode_cache import EncodeCache, content_key


def _encoder(calls: list[list[str]], contents: list[str]):  # type: ignore[no-untyped-def]
    def encode(rows: list[int]) -> np.ndarray:
        calls.append([contents[i] for i in rows])
        return np.array([[len(contents[i]), ord(contents[i][0])] for i in rows], np.float32)

    return encode


def test_repeated_content_is_encoded_once_and_served_from_the_cache() -> None:
    cache = EncodeCache(8, "v1/int8")
    calls: list[list[str]] = []
    first = ["a cat", "a dog", "a cat"]
    out = cache.encode("text", first, _encoder(calls, first), 2)
    assert calls == [["a cat", "a dog"]]  # the repeat inside the batch is encoded once
    np.testing.assert_array_equal(out[0], out[2])
    second = ["a dog", "new"]
    out2 = cache.encode("text", second, _encoder(calls, second), 2)
    assert calls[-1] == ["new"]
    np.testing.assert_array_equal(out2[0], out[1])
    stats = cache.stats("text")
    assert (stats.hits, stats.misses) == (2, 3) and stats.hit_rate == 2 / 5


def test_lru_is_bounded_per_modality_and_evicts_the_least_recent() -> None:
    cache = EncodeCache(2, "v1")
    calls: list[list[str]] = []
    for batch in (["x1"], ["x2"], ["x1"], ["x3"], ["x2"]):
        cache.encode("text", batch, _encoder(calls, batch), 2)
    # x1 was used again before x3 came, so x2 was evicted and had to be encoded again
    assert calls == [["x1"], ["x2"], ["x3"], ["x2"]]
    assert len(cache) == 2


def test_keys_separate_encoders_and_modalities_and_depend_on_exact_bytes() -> None:
    assert content_key(b"v1/int8/text", "hi") != content_key(b"v1/fp32/text", "hi")
    assert content_key(b"v1/text", "hi") != content_key(b"v1/text", "hi ")
    assert content_key(b"v1/image", b"\x89PNG") == content_key(b"v1/image", b"\x89PNG")
    cache = EncodeCache(4, "v1")
    calls: list[list[str]] = []
    cache.encode("text", ["same"], _encoder(calls, ["same"]), 2)
    cache.encode("transcript", ["same"], _encoder(calls, ["same"]), 2)
    assert len(calls) == 2
