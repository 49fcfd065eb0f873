"""Ingest: manifests and folder layouts, content ids, quarantine, duplicates, group-aware split."""

import csv
import hashlib
import shutil
from collections import Counter

import pytest

from pipeline import data as datamod
from pipeline.config import BaseConfig, IngestConfig
from pipeline.extract import run_ingest
from pipeline.store import list_shards, read_shard
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
    result = run_ingest(tmp_path, out, IngestConfig(shard_size=4), BaseConfig(), "t")
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
    result = run_ingest(tmp_path / "m.csv", out, IngestConfig(), BaseConfig(), "t")
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
    with pytest.raises(datamod.DatasetError, match="escapes the dataset root"):
        datamod.resolve_dataset(tmp_path / "ds")


def test_bad_label_and_missing_columns(tmp_path):
    write_manifest(tmp_path / "m.csv", [{"path": "x.png", "label": "maybe"}])
    with pytest.raises(datamod.DatasetError, match="label 'maybe'"):
        datamod.read_manifest(tmp_path / "m.csv")
    write_manifest(tmp_path / "n.csv", [{"file_name": "x.png"}])
    with pytest.raises(datamod.DatasetError, match="needs columns"):
        datamod.read_manifest(tmp_path / "n.csv")


def test_folder_layout(tmp_path):
    for gen in ("progan", "stylegan"):
        for cls in ("car", "cat"):
            make_image(tmp_path / gen / cls / "0_real" / "r.png", hash((gen, cls, 0)) % 1000)
            make_image(tmp_path / gen / cls / "1_fake" / "f.png", hash((gen, cls, 1)) % 1000)
    make_image(tmp_path / "dalle" / "1_fake" / "x.png", 7)
    root, records = datamod.resolve_dataset(tmp_path)
    got = Counter((r.label, r.generator) for r in records)
    assert got == {(0, "real"): 4, (1, "progan"): 2, (1, "stylegan"): 2, (1, "dalle"): 1}


def test_split_keeps_groups_together_and_is_seeded():
    records = []
    for g in range(40):
        for k in range(3):  # three images of one prompt
            records.append(datamod.Record(f"{g}_{k}.png", 1, f"gen{g % 4}", caption=f"prompt {g}"))
    for r in range(60):
        records.append(datamod.Record(f"real{r}.png", 0, "real", caption=f"photo {r}"))
    splits = datamod.assign_splits(records, [0.6, 0.2, 0.2], seed=3)
    by_caption = {}
    for rec, split in zip(records, splits):
        by_caption.setdefault(rec.caption, set()).add(split)
    assert all(len(s) == 1 for s in by_caption.values())
    counts = Counter(splits)
    assert abs(counts["train"] / len(records) - 0.6) < 0.08
    assert counts["test"] > 0 and counts["val"] > 0
    assert splits == datamod.assign_splits(records, [0.6, 0.2, 0.2], seed=3)
    assert splits != datamod.assign_splits(records, [0.6, 0.2, 0.2], seed=4)


def test_shipped_sample_ingests_cleanly(tmp_path):
    result = run_ingest(SAMPLE, tmp_path / "ingest", IngestConfig(), BaseConfig(), "sample")
    assert len(result.items) == 110 and not result.quarantined
    with (SAMPLE / "manifest.csv").open() as fh:
        expected = {r["file"]: r["sha256"] for r in csv.DictReader(fh)}
    assert {it.path: it.id for it in result.items} == expected
    assert {it.split for it in result.items} == {"train", "val", "test"}
