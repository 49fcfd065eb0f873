"""Balanced subsets: at most N images per folder and class, drawn as UniversalFakeDetect does.

UniversalFakeDetect's `validate.py` scores each test folder on at most `max_sample` (1,000)
real and 1,000 generated images: it seeds Python's `random` with 0, shuffles the folder's list
of real files, then its list of generated files, and keeps the first `max_sample` of each.
`balanced_subset` makes the same draw from each folder's files listed in sorted path order
(UFD lists them in the file system's own order, which differs between machines): with that
order, the same seed picks the same images. Unlike UFD, a class with fewer images than the cap
is kept whole (UFD then falls back to 100 per class and fails when a class has fewer).
"""

from __future__ import annotations

import logging
import random
from collections import defaultdict
from collections.abc import Sequence

from pipeline.data.manifest import Record

logger = logging.getLogger(__name__)


def _folder(record: Record) -> str:
    # A folder is a split (GenImage's train and val are drawn apart) and a subset; generated
    # images of several generators sharing a subset (a manifest) are drawn per generator.
    return f"{record.split}/{record.subset}"


def balanced_subset(records: Sequence[Record], max_per_class: int, seed: int) -> list[Record]:
    """The records kept when each folder (split and `subset`) keeps at most `max_per_class`
    real images and, per generator, at most `max_per_class` generated ones; 0 keeps all.

    Within a folder, `random.Random(seed)` shuffles the real files' paths (sorted), then each
    generator's generated files' paths (generators in sorted order), and the first
    `max_per_class` of each list are kept, as UFD's `validate.py` does for its one generator
    per folder. The result keeps the records' order and does not depend on it.
    """
    if max_per_class <= 0:
        return list(records)
    lists: dict[str, dict[tuple[int, str], list[str]]] = defaultdict(lambda: defaultdict(list))
    for r in records:
        lists[_folder(r)][r.label, "" if r.label == 0 else r.generator].append(r.path)
    kept: set[tuple[str, str]] = set()
    dropped = 0
    for folder, classes in lists.items():
        rng = random.Random(seed)
        for key in sorted(classes):
            paths = sorted(classes[key])
            rng.shuffle(paths)
            kept.update((folder, p) for p in paths[:max_per_class])
            dropped += max(0, len(paths) - max_per_class)
    out = [r for r in records if (_folder(r), r.path) in kept]
    if dropped:
        logger.info(
            "kept at most %d images per folder and class (seeded, as UniversalFakeDetect): "
            "%d of %d images",
            max_per_class,
            len(out),
            len(records),
        )
    return out
