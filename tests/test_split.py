"""Split groups that templates and style suffixes do not fool, and a split independent of row
order (issue 19, item 6)."""

import logging
import random
from collections import Counter

from pipeline.data.layouts import resolve_dataset
from pipeline.data.manifest import Record
from pipeline.data.split import assign_splits, near_duplicate_groups
from tests.helpers import SAMPLE

CLASSES = [
    "cat", "dog", "horse", "car", "boat", "chair", "bird", "train", "sheep", "bottle",
    "tree", "house", "bridge", "clock", "lamp",
]  # fmt: skip
STYLE = [
    "by greg rutkowski", "octane render", "4k", "8k", "trending on artstation",
    "highly detailed", "unreal engine", "sharp focus", "cinematic lighting", "digital art",
    "concept art", "volumetric light",
]  # fmt: skip
SCENES = [
    "an old lighthouse on a rocky cliff at dawn",
    "a red fox sleeping in fresh snow",
    "a wooden cabin beside a frozen mountain lake",
    "a street market in the rain with paper lanterns",
]


def _templated() -> list[Record]:
    """Three generators, each with two images of "a photo of a {class}" for fifteen classes."""
    return [
        Record(f"{g}/{c}_{k}.png", 1, g, caption=f"a photo of a {c}")
        for g in ("sd14", "midjourney", "glide")
        for c in CLASSES
        for k in range(2)
    ]


def _suffixed() -> list[Record]:
    """Each scene prompted plain and with three long, different style suffixes, among unrelated
    prompts that carry the same style words."""
    rng = random.Random(0)
    records = []
    for s, scene in enumerate(SCENES):
        records.append(Record(f"scene{s}_0.png", 1, "sdxl", caption=scene))
        for k in range(1, 4):
            suffix = ", ".join(rng.sample(STYLE, 7))
            records.append(Record(f"scene{s}_{k}.png", 1, "sdxl", caption=f"{scene}, {suffix}"))
    for i in range(24):
        subject = f"portrait of subject number{i} holding item{i}"
        records.append(
            Record(f"other{i}.png", 1, "sdxl", caption=f"{subject}, {', '.join(STYLE[:5])}")
        )
    return records


def test_templated_prompts_spread_every_generator_over_the_splits(caplog):
    records = _templated()
    for seed in range(3):
        with caplog.at_level(logging.WARNING, logger="pipeline.data.split"):
            splits = assign_splits(records, [0.6, 0.2, 0.2], seed)
        for generator in ("sd14", "midjourney", "glide"):
            counts = Counter(s for r, s in zip(records, splits) if r.generator == generator)
            assert set(counts) == {"train", "val", "test"}, (generator, counts)
            assert 12 <= counts["train"] <= 24, (generator, counts)
        # One class is one prompt: its images stay on one side.
        by_class: dict[str, set[str]] = {}
        for r, s in zip(records, splits):
            by_class.setdefault(r.caption, set()).add(s)
        assert all(len(v) == 1 for v in by_class.values())
    assert "one group holds" not in caplog.text


def test_one_prompt_for_a_whole_generator_warns(caplog):
    records = _templated() + [
        Record(f"dalle/{k}.png", 1, "dalle", caption="a photo of a teapot") for k in range(20)
    ]
    with caplog.at_level(logging.WARNING, logger="pipeline.data.split"):
        splits = assign_splits(records, [0.6, 0.2, 0.2], 0)
    assert len({s for r, s in zip(records, splits) if r.generator == "dalle"}) == 1
    assert "one group holds 20 of the 20 images of dalle" in caplog.text
    assert "sd14" not in caplog.text


def test_long_suffix_variants_share_a_group():
    records = _suffixed()
    clusters = near_duplicate_groups([r.caption for r in records], 0.5)
    families = [clusters[4 * s : 4 * s + 4] for s in range(len(SCENES))]
    assert all(len(set(f)) == 1 for f in families), families
    assert len({f[0] for f in families}) == len(SCENES)  # scenes are not merged together
    others = clusters[4 * len(SCENES) :]
    assert len(set(others)) == len(others)  # shared style words alone do not group prompts
    for seed in range(5):
        splits = assign_splits(records, [0.6, 0.2, 0.2], seed)
        for s in range(len(SCENES)):
            assert len(set(splits[4 * s : 4 * s + 4])) == 1, (seed, s)


def test_shuffled_manifest_gives_the_same_split():
    _, sample = resolve_dataset(SAMPLE)
    records = sample + _templated() + _suffixed()
    # The sample's real COCO captions and 25 generators, a templated and a suffixed set.
    for seed in (0, 1):
        expected = dict(
            zip((r.path for r in records), assign_splits(records, [0.6, 0.2, 0.2], seed))
        )
        for shuffle in range(3):
            rows = records[:]
            random.Random(shuffle).shuffle(rows)
            got = dict(zip((r.path for r in rows), assign_splits(rows, [0.6, 0.2, 0.2], seed)))
            moved = [p for p in expected if got[p] != expected[p]]
            assert not moved, (seed, shuffle, moved[:5])
