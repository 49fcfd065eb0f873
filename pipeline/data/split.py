"""Splits: near-duplicate caption groups and the seeded train/val/test split that keeps them whole."""

from __future__ import annotations

import hashlib
import logging
import math
import re
from collections import Counter, defaultdict
from collections.abc import Sequence

import numpy as np

from pipeline.config import IngestConfig
from pipeline.data.manifest import SPLITS, Record

logger = logging.getLogger(__name__)
# The split settings' one home is IngestConfig.
_DEFAULTS = IngestConfig()


def caption_words(text: str) -> frozenset[str]:
    """The words of a caption or prompt for near-duplicate grouping: lowercase runs of letters
    and digits (punctuation, case and word order do not count)."""
    return frozenset(re.findall(r"[a-z0-9]+", text.lower()))


# Containment groups a prompt with a longer variant of it only when the shorter one has at least
# this many words: "a dog" is contained in every dog prompt, and would chain them all together.
MIN_CONTAINED_WORDS = 4


def word_weights(sets: Sequence[frozenset[str]]) -> dict[str, float]:
    """Weight of each word by its rarity across the distinct word sets: log((N + 1) / df), with
    N distinct sets and df the number holding the word. A template's words ("a photo of a")
    weigh almost nothing, so the class word decides; counting distinct sets keeps a prompt used
    for many images from making its own words look common."""
    distinct = set(sets)
    df = Counter(w for s in distinct for w in s)
    n = len(distinct)
    return {w: math.log((n + 1) / k) for w, k in df.items()}


def _similar(
    a: frozenset[str],
    b: frozenset[str],
    weights: dict[str, float],
    threshold: float,
    containment: float,
) -> bool:
    """Rarity-weighted Jaccard >= `threshold`, or the lighter set's weight lying at least
    `containment` inside the other (suffix variants; see MIN_CONTAINED_WORDS)."""
    shared = sum(weights[w] for w in a & b)
    wa = sum(weights[w] for w in a)
    wb = sum(weights[w] for w in b)
    if shared >= threshold * (wa + wb - shared) - 1e-12:
        return True
    small = a if (wa, len(a)) <= (wb, len(b)) else b
    return len(small) >= MIN_CONTAINED_WORDS and shared >= containment * min(wa, wb) - 1e-12


def near_duplicate_groups(
    texts: Sequence[str], threshold: float, *, containment: float = _DEFAULTS.caption_containment
) -> list[int]:
    """Cluster texts whose word sets (`caption_words`) are near-duplicates, transitively;
    returns a cluster id per text (the same clusters whatever the order of `texts`).

    Words are weighted by rarity across the texts (`word_weights`). Two texts are one cluster
    when their weighted Jaccard sum(w, A ∩ B) / sum(w, A ∪ B) is at least `threshold`, or when
    the lighter one, of at least MIN_CONTAINED_WORDS words, lies at least `containment` (by
    weight) inside the other: "a red fox in the snow" and "a red fox in the snow, by greg
    rutkowski, octane render, 4k" are one cluster, while "a photo of a cat" and "a photo of a
    dog" are not (their shared template words are common, hence light). Identical word sets are
    always one cluster; `threshold=1` and `containment=1` group identical sets and contained
    variants only. Candidates are found by prefix filtering: words ordered heaviest first, two
    similar sets share a word among the first words of the lighter set that weigh more than
    (1 - min(threshold, containment)) of it, so the cost stays near linear for texts that share
    few rare words.
    """
    if not 0.0 < threshold <= 1.0:
        raise ValueError(f"caption similarity threshold must be in (0, 1], got {threshold}")
    if not 0.0 < containment <= 1.0:
        raise ValueError(f"caption containment must be in (0, 1], got {containment}")
    sets = [caption_words(t) for t in texts]
    # Cluster the distinct sets, in a fixed order, then map every text to its set's cluster.
    distinct = sorted({s for s in sets if s}, key=lambda s: sorted(s))
    weights = word_weights(distinct)
    slack = 1.0 - min(threshold, containment)
    parent = list(range(len(distinct)))

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    index: dict[str, list[int]] = defaultdict(list)
    for i, words in enumerate(distinct):
        for w in words:
            index[w].append(i)
    for i, words in enumerate(distinct):
        ordered = sorted(words, key=lambda w: (-weights[w], w))
        total = sum(weights[w] for w in ordered)
        candidates: set[int] = set()
        covered = 0.0
        for w in ordered:
            candidates.update(index[w])
            covered += weights[w]
            if covered > slack * total + 1e-12:
                break
        for j in candidates:
            if j != i and find(i) != find(j):
                if _similar(words, distinct[j], weights, threshold, containment):
                    parent[find(i)] = find(j)
    cluster_of = {s: find(i) for i, s in enumerate(distinct)}
    # Texts without words are clusters of their own.
    return [cluster_of[s] if s else len(distinct) + k for k, s in enumerate(sets)]


def _group_keys(
    items: Sequence[Record], caption_similarity: float, caption_containment: float
) -> list[str]:
    """The split group of each record: its `group`, else its cluster of near-duplicate
    captions/prompts (`near_duplicate_groups`), else the file itself."""
    captioned = [i for i, r in enumerate(items) if not r.group and caption_words(r.caption)]
    clusters = near_duplicate_groups(
        [items[i].caption for i in captioned],
        caption_similarity,
        containment=caption_containment,
    )
    keys = [("group:" + it.group) if it.group else ("path:" + it.path) for it in items]
    # A cluster is named by its smallest normalised caption: readable, and the same whatever
    # the order of the rows (the name seeds where the group goes).
    names: dict[int, str] = {}
    for i, cluster in zip(captioned, clusters):
        name = " ".join(items[i].caption.lower().split())
        names[cluster] = min(names.get(cluster, name), name)
    for i, cluster in zip(captioned, clusters):
        # Images made from the same (or a near-identical) prompt, or paired with the same
        # caption, are near-duplicates in content: they must not straddle a split.
        keys[i] = "caption:" + names[cluster]
    return keys


def _stable_unit(seed: int, key: str) -> float:
    digest = hashlib.sha256(f"{seed}:{key}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def assign_splits(
    items: Sequence[Record],
    fractions: Sequence[float],
    seed: int,
    caption_similarity: float = _DEFAULTS.caption_similarity,
    *,
    caption_containment: float = _DEFAULTS.caption_containment,
) -> list[str]:
    """Seeded train/val/test split that keeps each group on one side and each generator (of
    each subset) spread over the splits in proportion to `fractions`; the same split whatever
    the order of `items`.

    Groups come from the `group` column, else the caption/prompt together with its
    near-duplicates (`near_duplicate_groups` at `caption_similarity` and
    `caption_containment`), else the file itself. Each group is assigned as a whole to the
    split with the largest unfilled quota of its main generator; quotas are rounded by seeded
    largest remainder, so a generator with a single image lands in train, val or test with
    probabilities `fractions`. A group holding more of a generator's images than the smallest
    fraction is logged as a warning: the split cannot follow `fractions` for that generator.
    """
    groups: dict[str, list[int]] = defaultdict(list)
    for i, key in enumerate(_group_keys(items, caption_similarity, caption_containment)):
        groups[key].append(i)
    by_generator: dict[str, list[str]] = defaultdict(list)
    for key, members in groups.items():
        # Per subset too, so that each test folder keeps real and generated images of its own.
        main = Counter(f"{items[i].subset}/{items[i].generator}" for i in members)
        # Ties go to the smallest name, not to whichever row came first.
        by_generator[min(main, key=lambda g: (-main[g], g))].append(key)
    _warn_large_groups(items, groups, min(f for f in fractions if f > 0))
    out = [""] * len(items)
    for generator, keys in sorted(by_generator.items()):
        keys.sort(key=lambda k: (_stable_unit(seed, k), k))
        n = sum(len(groups[k]) for k in keys)
        quota = np.floor(np.asarray(fractions) * n)
        remainder = np.asarray(fractions) * n - quota
        for _ in range(int(n - quota.sum())):
            # Seeded draw weighted by what is left, so rounding favours no split.
            u = _stable_unit(seed, f"{generator}:{quota.sum()}")
            j = int(np.searchsorted(np.cumsum(remainder / remainder.sum()), u, side="right"))
            j = min(j, len(SPLITS) - 1)
            quota[j] += 1
            remainder[j] = 0.0
        for key in keys:
            j = int(np.argmax(quota))
            quota[j] -= len(groups[key])
            for i in groups[key]:
                out[i] = SPLITS[j]
    return out


def carve_val(
    items: Sequence[Record],
    share: float,
    seed: int,
    caption_similarity: float = _DEFAULTS.caption_similarity,
    *,
    caption_containment: float = _DEFAULTS.caption_containment,
) -> list[str]:
    """The splits of `items` with `share` of each generator's (of each subset's) train rows
    moved to val, seeded and keeping groups whole as `assign_splits` does; the splits as they
    are when some row is already in val, or `share` is 0."""
    splits = [r.split for r in items]
    train = [i for i, s in enumerate(splits) if s == "train"]
    if share <= 0 or "val" in splits or not train:
        return splits
    carved = assign_splits(
        [items[i] for i in train],
        [1.0 - share, share, 0.0],
        seed,
        caption_similarity,
        caption_containment=caption_containment,
    )
    for i, split in zip(train, carved):
        splits[i] = split
    return splits


# Generators with fewer images than this are not warned about: a handful of images cannot be
# spread in proportion anyway.
_MIN_IMAGES_TO_WARN = 10


def _warn_large_groups(items: Sequence[Record], groups: dict[str, list[int]], share: float) -> None:
    """Warn, per generator (of each subset), when one split group holds more than `share` of
    its images: whole groups then push the generator's images into fewer splits."""
    sizes: Counter[str] = Counter(f"{r.subset}/{r.generator}" for r in items)
    largest: dict[str, tuple[int, str]] = {}
    for key, members in groups.items():
        for generator, k in Counter(
            f"{items[i].subset}/{items[i].generator}" for i in members
        ).items():
            if k > largest.get(generator, (0, ""))[0]:
                largest[generator] = (k, key)
    for generator, (k, key) in sorted(largest.items()):
        n = sizes[generator]
        if n >= _MIN_IMAGES_TO_WARN and k > share * n:
            logger.warning(
                "split: one group holds %d of the %d images of %s (%s); it goes to one split "
                "whole, so this generator cannot be spread as ingest.split_fractions asks. "
                "Check the manifest's group column, or raise ingest.caption_similarity / "
                "ingest.caption_containment if the captions are not near-duplicates",
                k,
                n,
                generator.lstrip("/"),
                key[:80],
            )
