"""A bounded LRU of encoder outputs, keyed by a hash of the exact content: don't encode the same thing twice.

Social streams repeat themselves (reposted memes and emoji images, retweeted texts). :class:`EncodeCache`
keeps, per modality, the last ``entries`` embeddings keyed by the BLAKE2b digest of the exact bytes (images)
or UTF-8 text (texts, transcripts). The key also carries the *encoder identity* (model version, text
encoder variant, modality), so a cache never mixes embeddings of two graphs; a worker builds one cache per
scorer, so a new model version starts empty. Equal content gives the embedding the encoder computed the
first time; the ONNX encoders are deterministic per input *up to batch padding* (fp32 differences of
~1e-7, see docs/export.md), which is what the equality test allows.

Not thread-safe: one scorer's executor thread uses it (the worker scores batches one at a time).
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np

__all__ = ["CacheStats", "EncodeCache", "content_key"]


def content_key(identity: bytes, content: bytes | str) -> bytes:
    """16-byte BLAKE2b digest of the encoder ``identity`` (length-prefixed) and the exact content (str as UTF-8)."""
    h = hashlib.blake2b(len(identity).to_bytes(4, "big") + identity, digest_size=16)
    h.update(content.encode("utf-8") if isinstance(content, str) else content)
    return h.digest()


@dataclass
class CacheStats:
    """Lookups that hit and missed since the cache was built (the metrics export the deltas)."""

    hits: int = 0
    misses: int = 0

    @property
    def hit_rate(self) -> float:
        looked = self.hits + self.misses
        return self.hits / looked if looked else 0.0


@dataclass
class _Lru:
    capacity: int
    rows: OrderedDict[bytes, np.ndarray] = field(default_factory=OrderedDict)
    stats: CacheStats = field(default_factory=CacheStats)


class EncodeCache:
    """Per-modality LRU of ``entries`` embeddings each; :meth:`encode` wraps an encoder function."""

    def __init__(self, entries: int, identity: str) -> None:
        if entries < 1:
            raise ValueError("an EncodeCache needs at least one entry per modality")
        self.entries = entries
        self.identity = identity
        self._lru: dict[str, _Lru] = {}
        self._ident: dict[str, bytes] = {}

    def stats(self, modality: str) -> CacheStats:
        return self._lru.setdefault(modality, _Lru(self.entries)).stats

    def __len__(self) -> int:
        return sum(len(lru.rows) for lru in self._lru.values())

    def encode(
        self,
        modality: str,
        contents: Sequence[bytes | str],
        encoder: Callable[[list[int]], np.ndarray],
        dim: int,
    ) -> np.ndarray:
        """``[n, dim]`` embeddings of ``contents``: cached rows copied, the rest from ``encoder(indices)``.

        ``encoder`` gets the indices (into ``contents``) still to encode, first occurrence of each distinct
        content only, and returns their ``[k, dim]`` embeddings in that order.
        """
        lru = self._lru.setdefault(modality, _Lru(self.entries))
        ident = self._ident.setdefault(modality, f"{self.identity}/{modality}".encode())
        out = np.empty((len(contents), dim), np.float32)
        keys = [content_key(ident, c) for c in contents]
        todo: dict[bytes, list[int]] = {}
        for i, key in enumerate(keys):
            row = lru.rows.get(key)
            if row is not None:
                lru.rows.move_to_end(key)
                out[i] = row
                lru.stats.hits += 1
            elif key in todo:  # repeated within this batch: encoded once, so it counts as a hit
                todo[key].append(i)
                lru.stats.hits += 1
            else:
                todo[key] = [i]
                lru.stats.misses += 1
        if todo:
            first = [rows[0] for rows in todo.values()]
            fresh = encoder(first)
            for (key, rows), vec in zip(todo.items(), fresh, strict=True):
                out[rows] = vec
                lru.rows[key] = np.array(vec, np.float32)  # own copy: `fresh` may be a view of a batch
            while len(lru.rows) > lru.capacity:
                lru.rows.popitem(last=False)
        return out
