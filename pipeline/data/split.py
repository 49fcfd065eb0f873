"""Splits: near-duplicate caption groups and the seeded train/val/test split that keeps them whole."""

from __future__ import annotations

import hashlib
import math
import re
from collections import Counter, defaultdict
from collections.abc import Sequence

import numpy as np

from pipeline.data.manifest import SPLITS, Record


def caption_words(text: str) -> frozenset[str]:
    """The words of a caption or prompt for near-duplicate grouping: lowercase runs of letters
    and digits (punctuation, case and word order do not count)."""
    return frozenset(re.findall(r"[a-z0-9]+", text.lower()))


def near_duplicate_groups(texts: Sequence[str], threshold: float) -> list[int]:
    """Cluster texts whose word sets (`caption_words`) have a Jaccard similarity
    |A ∩ B| / |A ∪ B| of at least `threshold`, transitively; returns a cluster id per text.

    Prompt variants such as "evening sunset scenery blue sky nature, glass bottle with a galaxy
    in it" and "... glass bottle with a fizzy ice cold freezing rainbow liquid in it" (Jaccard
    0.63) are one cluster at the default 0.5; `threshold=1` groups identical word sets only.
    All pairs are found with prefix filtering (words ordered rarest first: two sets with
    Jaccard >= t share a word among the first |A| - ceil(t·|A|) + 1 of each), so the cost stays
    near linear for captions that share few words.
    """
    if not 0.0 < threshold <= 1.0:
        raise ValueError(f"caption similarity threshold must be in (0, 1], got {threshold}")
    sets = [caption_words(t) for t in texts]
    freq = Counter(w for s in sets for w in s)
    parent = list(range(len(sets)))

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    index: dict[str, list[int]] = defaultdict(list)
    for i, words in enumerate(sets):
        if not words:
            continue
        ordered = sorted(words, key=lambda w: (freq[w], w))
        prefix = len(ordered) - math.ceil(threshold * len(ordered) - 1e-9) + 1
        candidates: set[int] = set()
        for w in ordered[:prefix]:
            candidates.update(index[w])
            index[w].append(i)
        for j in candidates:
            if find(i) != find(j) and len(words & sets[j]) >= threshold * len(words | sets[j]):
                parent[find(i)] = find(j)
    return [find(i) for i in range(len(sets))]


def _group_keys(items: Sequence[Record], caption_similarity: float) -> list[str]:
    """The split group of each record: its `group`, else its cluster of near-duplicate
    captions/prompts (`near_duplicate_groups`), else the file itself."""
    captioned = [i for i, r in enumerate(items) if not r.group and caption_words(r.caption)]
    clusters = near_duplicate_groups([items[i].caption for i in captioned], caption_similarity)
    # A cluster is named by its first caption, normalised, so keys stay readable and stable.
    names: dict[int, str] = {}
    keys = []
    for item in items:
        if item.group:
            keys.append("group:" + item.group)
        else:
            keys.append("path:" + item.path)
    for i, cluster in zip(captioned, clusters):
        # Images made from the same (or a near-identical) prompt, or paired with the same
        # caption, are near-duplicates in content: they must not straddle a split.
        names.setdefault(cluster, " ".join(items[i].caption.lower().split()))
        keys[i] = "caption:" + names[cluster]
    return keys


def _stable_unit(seed: int, key: str) -> float:
    digest = hashlib.sha256(f"{seed}:{key}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def assign_splits(
    items: Sequence[Record],
    fractions: Sequence[float],
    seed: int,
    caption_similarity: float = 0.5,
) -> list[str]:
    """Seeded train/val/test split that keeps each group on one side and each generator (of
    each subset) spread over the splits in proportion to `fractions`.

    Groups come from the `group` column, else the caption/prompt together with its
    near-duplicates (word-set Jaccard >= `caption_similarity`, see `near_duplicate_groups`),
    else the file itself. Each
    group is assigned as a whole to the split with the largest unfilled quota of its main
    generator; quotas are rounded by seeded largest remainder, so a generator with a single
    image lands in train, val or test with probabilities `fractions`.
    """
    groups: dict[str, list[int]] = defaultdict(list)
    for i, key in enumerate(_group_keys(items, caption_similarity)):
        groups[key].append(i)
    by_generator: dict[str, list[str]] = defaultdict(list)
    for key, members in groups.items():
        # Per subset too, so that each test folder keeps real and generated images of its own.
        main = Counter(f"{items[i].subset}/{items[i].generator}" for i in members)
        by_generator[main.most_common(1)[0][0]].append(key)
    out = [""] * len(items)
    for generator, keys in sorted(by_generator.items()):
        keys.sort(key=lambda k: _stable_unit(seed, k))
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
