"""Ingest: manifests and folder layouts, content ids, quarantine, duplicates, group-aware split."""

import csv
import hashlib
import shutil
from collections import Counter

import numpy as np
import pytest

from pipeline.config import BaseConfig, IngestConfig
from pipeline.data.ingest import run_ingest
from pipeline.data.layouts import resolve_dataset
from pipeline.data.manifest import Record, read_manifest
from pipeline.data.split import assign_splits, caption_words, near_duplicate_groups
from pipeline.errors import DatasetError
from pipeline.rows.store import list_shards, read_shard
from tests.helpers import SAMPLE, make_image, write_manifest


def _broken_files(root):
    (root / "images").mkdir(parents=True, exist_ok=True)
    (root / "images" / "empty.jpg").write_bytes(b"")
    good = make_image(root / "images" / "full.jpg", 99, (120, 90))
    data = good.read_bytes()
    (root / "images" / "truncated.jpg").write_bytes(data[: len(data) // 2])
    (root / "images" / "text.png").write_text("this is not a picture\n")
    good.unlink()
    return ["images/empty.jpg", "images/truncated.jpg", "images/text.png"]


def test_quarantine_reasons_and_run_completes(tmp_path):
    rows = []
    for i in range(6):
        make_image(tmp_path / "images" / f"ok{i}.png", i)
        rows.append({"path": f"images/ok{i}.png", "label": i % 2, "generator": "g1"})
    broken = _broken_files(tmp_path)
    rows += [{"path": p, "label": 1, "generator": "g1"} for p in broken]
    write_manifest(tmp_path / "manifest.csv", rows)
    out = tmp_path / "cache" / "ingest"
    result = run_ingest(
        tmp_path, out, cfg=IngestConfig(shard_size=4), base=BaseConfig(), dataset="t"
    )
    assert len(result.items) == 6
    with (out / "quarantine.csv").open() as fh:
        reasons = {r["path"]: r["reason"] for r in csv.DictReader(fh)}
    assert set(reasons) == set(broken)
    assert "empty file" in reasons["images/empty.jpg"]
    assert "truncated" in reasons["images/truncated.jpg"]
    assert "not an image" in reasons["images/text.png"]
    assert len(list_shards(out)) == 2


def test_ids_are_sha256_and_duplicates_kept_once(tmp_path):
    a = make_image(tmp_path / "a.png", 1)
    shutil.copy(a, tmp_path / "a_copy.png")
    make_image(tmp_path / "b.png", 2)
    write_manifest(
        tmp_path / "m.csv",
        [
            {"path": "a.png", "label": "real", "generator": ""},
            {"path": "a_copy.png", "label": "real", "generator": ""},
            {"path": "b.png", "label": "fake", "generator": "sdxl"},
        ],
    )
    out = tmp_path / "out"
    result = run_ingest(tmp_path / "m.csv", out, cfg=IngestConfig(), base=BaseConfig(), dataset="t")
    assert result.duplicates == [("a_copy.png", "a.png")]
    shard = read_shard(list_shards(out)[0])
    assert list(shard["ids"]) == [
        hashlib.sha256((tmp_path / n).read_bytes()).hexdigest() for n in ("a.png", "b.png")
    ]
    assert list(shard["generator"]) == ["real", "sdxl"]
    assert list(shard["label"]) == [0, 1]


def test_manifest_paths_may_not_escape_root(tmp_path):
    make_image(tmp_path / "outside.png", 0)
    (tmp_path / "ds").mkdir()
    write_manifest(
        tmp_path / "ds" / "manifest.csv",
        [{"path": "../outside.png", "label": 0, "generator": "real"}],
    )
    with pytest.raises(DatasetError, match="escapes the dataset root"):
        resolve_dataset(tmp_path / "ds")


def test_bad_label_and_missing_columns(tmp_path):
    write_manifest(tmp_path / "m.csv", [{"path": "x.png", "label": "maybe"}])
    with pytest.raises(DatasetError, match="label 'maybe'"):
        read_manifest(tmp_path / "m.csv")
    write_manifest(tmp_path / "n.csv", [{"file_name": "x.png"}])
    with pytest.raises(DatasetError, match="needs columns"):
        read_manifest(tmp_path / "n.csv")


def test_folder_layout(tmp_path):
    for gen in ("progan", "stylegan"):
        for cls in ("car", "cat"):
            make_image(tmp_path / gen / cls / "0_real" / "r.png", hash((gen, cls, 0)) % 1000)
            make_image(tmp_path / gen / cls / "1_fake" / "f.png", hash((gen, cls, 1)) % 1000)
    make_image(tmp_path / "dalle" / "1_fake" / "x.png", 7)
    root, records = resolve_dataset(tmp_path)
    got = Counter((r.label, r.generator) for r in records)
    assert got == {(0, "real"): 4, (1, "progan"): 2, (1, "stylegan"): 2, (1, "dalle"): 1}


def test_split_keeps_groups_together_and_is_seeded():
    records = []
    for g in range(40):
        for k in range(3):  # three images of one prompt
            records.append(Record(f"{g}_{k}.png", 1, f"gen{g % 4}", caption=f"prompt {g}"))
    for r in range(60):
        records.append(Record(f"real{r}.png", 0, "real", caption=f"photo {r}"))
    splits = assign_splits(records, [0.6, 0.2, 0.2], seed=3)
    by_caption = {}
    for rec, split in zip(records, splits):
        by_caption.setdefault(rec.caption, set()).add(split)
    assert all(len(s) == 1 for s in by_caption.values())
    counts = Counter(splits)
    assert abs(counts["train"] / len(records) - 0.6) < 0.08
    assert counts["test"] > 0 and counts["val"] > 0
    assert splits == assign_splits(records, [0.6, 0.2, 0.2], seed=3)
    assert splits != assign_splits(records, [0.6, 0.2, 0.2], seed=4)


def test_shipped_sample_ingests_cleanly(tmp_path):
    result = run_ingest(
        SAMPLE, tmp_path / "ingest", cfg=IngestConfig(), base=BaseConfig(), dataset="sample"
    )
    assert len(result.items) == 110 and not result.quarantined
    with (SAMPLE / "manifest.csv").open() as fh:
        expected = {r["file"]: r["sha256"] for r in csv.DictReader(fh)}
    assert {it.path: it.id for it in result.items} == expected
    assert {it.split for it in result.items} == {"train", "val", "test"}


GALAXY = "evening sunset scenery blue sky nature, glass bottle with a galaxy in it"
FIZZY = (
    "evening sunset scenery blue sky nature, glass bottle with a fizzy ice cold freezing "
    "rainbow liquid in it"
)
FOX = (
    "beautiful landscape scenery glass bottle with a galaxy inside cute fennec fox snow HDR sunset"
)


def test_near_duplicate_prompts_are_one_group():

    a, b, c = (caption_words(t) for t in (GALAXY, FIZZY, FOX))
    assert len(a & b) / len(a | b) == pytest.approx(12 / 19)
    assert len(a & c) / len(a | c) == pytest.approx(7 / 21)
    groups = near_duplicate_groups([GALAXY, FIZZY, FOX, "A CAT on a mat.", "a cat on a mat"], 0.5)
    assert groups[0] == groups[1] and groups[2] != groups[0] and groups[3] == groups[4]
    exact = near_duplicate_groups([GALAXY, FIZZY, FOX], 1.0, containment=1.0)
    assert len(set(exact)) == 3


def test_near_duplicate_groups_equal_brute_force():
    """Prefix filtering finds every pair a brute-force all-pairs comparison of the
    rarity-weighted Jaccard and containment (computed here from their definitions) finds."""

    rng = np.random.default_rng(0)
    vocab = [f"w{i}" for i in range(60)]
    texts = [" ".join(rng.choice(vocab, rng.integers(1, 9))) for _ in range(300)]
    sets = [caption_words(x) for x in texts]
    distinct = set(sets)
    df = Counter(w for s in distinct for w in s)
    weight = {w: np.log((len(distinct) + 1) / k) for w, k in df.items()}

    def mass(words):
        return sum(weight[w] for w in words)

    for t, c in ((0.4, 0.9), (0.5, 0.8), (0.75, 0.6), (1.0, 1.0)):
        parent = list(range(len(texts)))

        def find(i, parent=parent):
            while parent[i] != i:
                i = parent[i]
            return i

        for i in range(len(sets)):
            for j in range(i):
                a, b = sets[i], sets[j]
                shared = mass(a & b)
                lighter = min((mass(a), len(a)), (mass(b), len(b)))
                if (
                    a == b
                    or shared >= t * mass(a | b) - 1e-12
                    or (lighter[1] >= 4 and shared >= c * lighter[0] - 1e-12)
                ):
                    parent[find(i)] = find(j)
        expected = [find(i) for i in range(len(texts))]
        got = near_duplicate_groups(texts, t, containment=c)

        def same(labels):
            return {(i, j) for i in range(300) for j in range(i) if labels[i] == labels[j]}

        assert same(got) == same(expected), (t, c)
        assert 1 < len(set(got)) < len(distinct), (t, c)  # the test compares something


def test_split_keeps_prompt_variants_together(tmp_path):
    rows = []
    for k, prompt in enumerate([GALAXY, FIZZY, GALAXY] + [f"scene number {i}" for i in range(30)]):
        make_image(tmp_path / f"{k}.png", k, (20, 20))
        rows.append({"path": f"{k}.png", "label": 1, "generator": f"g{k % 3}", "caption": prompt})
    records = read_manifest(write_manifest(tmp_path / "manifest.csv", rows))
    for seed in range(5):
        splits = assign_splits(records, [0.6, 0.2, 0.2], seed)
        assert splits[0] == splits[1] == splits[2]
    splits = [
        assign_splits(records, [0.6, 0.2, 0.2], s, 1.0, caption_containment=1.0) for s in range(10)
    ]
    assert any(s[0] != s[1] for s in splits)  # exact grouping lets the variants split
