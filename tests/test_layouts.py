"""Standard dataset layouts: GenImage, Synthbuster, CT2/Defactify CSVs; detection and override."""

import csv
from collections import Counter

import pytest

from pipeline.config import BaseConfig, IngestConfig
from pipeline.data.ingest import run_ingest
from pipeline.data.layouts import LAYOUTS, detect_layout, resolve_dataset
from pipeline.data.split import assign_splits
from pipeline.errors import DatasetError
from pipeline.rows.store import list_shards, read_shard
from tests.helpers import make_image, write_manifest

_seed = iter(range(10_000))


def _img(path):
    return make_image(path, next(_seed), (24, 20))


def _genimage(root):
    """Two generators, one with GenImage's extra subset folder, 2 images per split and class."""
    for gen, subset in (("sdv4", "imagenet_ai_0419_sdv4"), ("midjourney", None)):
        base = root / gen / subset if subset else root / gen
        for split in ("train", "val"):
            for cls in ("ai", "nature"):
                for k in range(2):
                    _img(base / split / cls / f"{cls}_{k}.png")
    (root / "sdv4" / "imagenet_ai_0419_sdv4" / "train" / "ai" / "notes.txt").write_text("meta")
    (root / "sdv4" / "imagenet_ai_0419_sdv4" / "train" / "ai" / ".DS_Store").write_bytes(b"x")
    (root / "midjourney" / "val" / "ai" / "bad.bin").write_bytes(b"not an image")
    return root


def _synthbuster(root, real="RAISE"):
    for gen in ("dalle3", "midjourney-v5"):
        for k in range(2):
            _img(root / gen / f"{k}.png")
    for k in range(3):
        _img(root / real / "sub" / f"r{k}.png")
    (root / "dalle3" / "prompts.csv").write_text("a,b\n")
    (root / "README.md").write_text("synthbuster")
    return root


def _ct2(root, name="pairs.csv", rows=3):
    out = []
    for i in range(rows):
        row = {"id": f"q{i}", "caption": f"caption {i}", "coco_image": f"real/{i}.png"}
        # Not generators: free text, and URLs that look like image paths.
        row["licence"] = "CC BY 4.0"
        row["coco_url"] = f"http://images.cocodataset.org/val2017/{i}.jpg"
        for gen in ("sd21", "sdxl", "dalle"):
            row[f"{gen}_image"] = f"{gen}/{i}.png"
        out.append(row)
    out[-1]["dalle_image"] = ""  # a missing generation is skipped, not an error
    for row in out:
        for value in row.values():
            if value.endswith(".png") and "://" not in value:
                _img(root / value)
    return write_manifest(root / name, out)


def test_genimage_auto_and_explicit(tmp_path):
    root = _genimage(tmp_path / "genimage")
    for layout in ("auto", "genimage"):
        got_root, records = resolve_dataset(root, layout)
        assert got_root == root
        assert Counter((r.label, r.generator, r.split) for r in records) == {
            (1, "sdv4", "train"): 2,
            (1, "sdv4", "test"): 2,
            (1, "midjourney", "train"): 2,
            (1, "midjourney", "test"): 3,  # bad.bin is recorded, to be quarantined
            (0, "real", "train"): 4,
            (0, "real", "test"): 4,
        }
    assert detect_layout(root) == "genimage"
    assert {r.family for r in records} == {"sdv4", "midjourney"}
    paths = {r.path for r in records}
    assert "sdv4/imagenet_ai_0419_sdv4/val/nature/nature_1.png" in paths
    assert not any(p.endswith((".txt", ".DS_Store")) for p in paths)


def test_genimage_without_generator_folder_names_the_fix(tmp_path):
    _img(tmp_path / "sdv4" / "train" / "ai" / "a.png")
    with pytest.raises(DatasetError, match="no generator folder above it.*Point data.path"):
        resolve_dataset(tmp_path / "sdv4")


@pytest.mark.parametrize("real", ["RAISE", "real", "Nature", "0_real", "real_images"])
def test_synthbuster_auto_and_explicit(tmp_path, real):
    root = _synthbuster(tmp_path / "sb", real)
    for layout in ("auto", "synthbuster"):
        _, records = resolve_dataset(root, layout)
        assert Counter((r.label, r.generator) for r in records) == {
            (0, "real"): 3,
            (1, "dalle3"): 2,
            (1, "midjourney-v5"): 2,
        }
        assert {r.split for r in records} == {""}
    assert {r.family for r in records if r.label == 0} == {real}
    assert f"{real}/sub/r0.png" in {r.path for r in records}


def test_synthbuster_without_real_folder_is_rejected(tmp_path):
    for gen in ("a", "b"):
        _img(tmp_path / gen / "x.png")
    with pytest.raises(DatasetError, match="has no real folder.*'raise'"):
        resolve_dataset(tmp_path, "synthbuster")


@pytest.mark.parametrize("where", ["file", "folder"])
def test_ct2_rows_expand_into_grouped_records(tmp_path, where):
    csv_path = _ct2(tmp_path, "manifest.csv" if where == "folder" else "pairs.csv")
    target = tmp_path if where == "folder" else csv_path
    assert detect_layout(target) == "ct2"
    for layout in ("auto", "ct2"):
        root, records = resolve_dataset(target, layout)
        assert root == tmp_path
        assert len(records) == 3 * 4 - 1
        assert Counter((r.label, r.generator) for r in records) == {
            (0, "real"): 3,
            (1, "sd21"): 3,
            (1, "sdxl"): 3,
            (1, "dalle"): 2,
        }
        by_group = {}
        for r in records:
            by_group.setdefault(r.group, []).append(r)
        assert set(by_group) == {"q0", "q1", "q2"}
        for members in by_group.values():
            assert len({m.caption for m in members}) == 1
            assert [m.label for m in members if m.path.startswith("real/")] == [0]
        assert next(r for r in records if r.path == "real/1.png").caption == "caption 1"


def test_ct2_groups_by_row_index_and_split_keeps_rows_together(tmp_path):
    rows = []
    for i in range(12):
        row = {"prompt": f"p{i}", "real": f"r/{i}.png", "sd3": f"g/{i}.png", "mj": f"m/{i}.jpg"}
        rows.append(row)
    write_manifest(tmp_path / "ct2.csv", rows)
    _, records = resolve_dataset(tmp_path / "ct2.csv")
    assert {r.group for r in records} == {str(i) for i in range(12)}
    splits = assign_splits(records, [0.5, 0.25, 0.25], seed=0)
    by_group = {}
    for r, s in zip(records, splits):
        by_group.setdefault(r.group, set()).add(s)
    assert all(len(s) == 1 for s in by_group.values())
    assert len(set(splits)) > 1


def test_ct2_paths_may_not_escape_root(tmp_path):
    _img(tmp_path / "outside.png")
    (tmp_path / "ds").mkdir()
    write_manifest(
        tmp_path / "ds" / "pairs.csv",
        [{"caption": "c", "real": "../outside.png", "sdxl": "x.png"}],
    )
    with pytest.raises(DatasetError, match="escapes the dataset root"):
        resolve_dataset(tmp_path / "ds" / "pairs.csv")


def test_csv_that_is_neither_manifest_nor_ct2(tmp_path):
    write_manifest(tmp_path / "m.csv", [{"file_name": "x.png", "caption": "c"}])
    with pytest.raises(DatasetError, match="neither a manifest.*nor a CT2-style CSV"):
        resolve_dataset(tmp_path / "m.csv")


def test_unrecognised_folder_lists_layouts(tmp_path):
    for name in ("cats", "dogs"):
        _img(tmp_path / name / "a.png")
    with pytest.raises(DatasetError, match="cannot recognise") as err:
        resolve_dataset(tmp_path)
    for layout in LAYOUTS[1:]:
        assert layout in str(err.value)
    assert "cats" in str(err.value)


def test_ambiguous_folder_and_explicit_override(tmp_path):
    _img(tmp_path / "progan" / "1_fake" / "f.png")
    _img(tmp_path / "progan" / "0_real" / "r.png")
    _img(tmp_path / "sdv4" / "train" / "ai" / "a.png")
    with pytest.raises(DatasetError, match="ambiguous.*genimage and cnndetection"):
        resolve_dataset(tmp_path)
    _, records = resolve_dataset(tmp_path, "cnndetection")
    assert {(r.path, r.label) for r in records} == {
        ("progan/0_real/r.png", 0),
        ("progan/1_fake/f.png", 1),
    }
    _, records = resolve_dataset(tmp_path, "genimage")
    assert [(r.generator, r.split) for r in records] == [("sdv4", "train")]


def test_label_folders_straight_under_root_name_the_fix(tmp_path):
    _img(tmp_path / "progan" / "0_real" / "r.png")
    _img(tmp_path / "progan" / "1_fake" / "f.png")
    # Not a synthbuster dataset with a generator called "1_fake": the cnndetection message.
    with pytest.raises(DatasetError, match="no generator folder above it") as err:
        resolve_dataset(tmp_path / "progan")
    assert str(tmp_path.resolve()) in str(err.value)


def test_layout_argument_is_checked(tmp_path):
    csv_path = _ct2(tmp_path)
    with pytest.raises(DatasetError, match="'imagefolder' is not one of"):
        resolve_dataset(tmp_path, "imagefolder")
    with pytest.raises(DatasetError, match="reads a folder but data.path .* is a file"):
        resolve_dataset(csv_path, "genimage")
    with pytest.raises(DatasetError, match="has no manifest.csv"):
        resolve_dataset(tmp_path, "ct2")


def test_manifest_folder_still_wins_and_cnndetection_still_detected(tmp_path):
    _img(tmp_path / "progan" / "1_fake" / "f.png")
    _img(tmp_path / "progan" / "0_real" / "r.png")
    (tmp_path / "progan" / "1_fake" / "labels.json").write_text("{}")
    assert detect_layout(tmp_path) == "cnndetection"
    _, records = resolve_dataset(tmp_path)
    assert len(records) == 2  # labels.json is metadata
    write_manifest(tmp_path / "manifest.csv", [{"path": "progan/1_fake/f.png", "label": 1}])
    assert detect_layout(tmp_path) == "manifest"
    assert len(resolve_dataset(tmp_path)[1]) == 1
    assert len(resolve_dataset(tmp_path, "cnndetection")[1]) == 2


def test_genimage_ingest_writes_official_splits(tmp_path):
    root = _genimage(tmp_path / "genimage")
    out = tmp_path / "ingest"
    cfg = IngestConfig(shard_size=8, val_from_train=0.0)
    result = run_ingest(root, out, cfg=cfg, base=BaseConfig(), dataset="t")
    with (out / "quarantine.csv").open() as fh:
        assert [r["path"] for r in csv.DictReader(fh)] == ["midjourney/val/ai/bad.bin"]
    rows = Counter()
    for shard in list_shards(out):
        data = read_shard(shard)
        for path, split, label in zip(data["path"], data["split"], data["label"]):
            assert split == ("train" if "/train/" in path else "test")
            rows[split, int(label)] += 1
    assert rows == {("train", 0): 4, ("train", 1): 4, ("test", 0): 4, ("test", 1): 4}
    assert len(result.items) == 16


def test_genimage_run_has_a_seeded_val_carved_from_each_generators_train(tmp_path):
    root = tmp_path / "genimage"
    for gen in ("sdv4", "midjourney"):
        for split, n in (("train", 20), ("val", 4)):
            for cls in ("ai", "nature"):
                for k in range(n):
                    _img(root / gen / split / cls / f"{cls}_{k}.png")
    runs = []
    for out in ("a", "b"):
        result = run_ingest(
            root, tmp_path / out, cfg=IngestConfig(), base=BaseConfig(), dataset="g"
        )
        runs.append({it.path: it.split for it in result.items})
    assert runs[0] == runs[1]  # seeded
    got = Counter()
    for path, split in runs[0].items():
        gen, official, cls = path.split("/")[:3]
        # GenImage's val stays our test; val comes from its train only.
        assert (split == "test") == (official == "val"), path
        got[gen, cls, split] += 1
    for gen in ("sdv4", "midjourney"):
        for cls in ("ai", "nature"):
            # ingest.val_from_train = 0.1 of each generator's (and its reals') 20 train images
            assert got[gen, cls, "val"] == 2, (gen, cls, got)
            assert got[gen, cls, "train"] == 18


def test_cnndetection_train_layout_names_the_generator_not_the_class(tmp_path):
    root = tmp_path / "CNNDetection" / "progan_train"
    for cls in ("airplane", "cat", "tvmonitor"):
        for k in range(2):
            _img(root / cls / "0_real" / f"r{k}.png")
            _img(root / cls / "1_fake" / f"f{k}.png")
    assert detect_layout(root) == "cnndetection"
    _, records = resolve_dataset(root)
    assert Counter(r.generator for r in records) == {"real": 6, "progan": 6}
    assert {r.subset for r in records} == {"progan"}
    assert Counter(r.family for r in records) == {"airplane": 4, "cat": 4, "tvmonitor": 4}
    # Every class of the one generator is spread over the splits, not a class per split.
    result = run_ingest(
        root, tmp_path / "ingest", cfg=IngestConfig(), base=BaseConfig(), dataset="progan"
    )
    shard = read_shard(list_shards(tmp_path / "ingest")[0])
    assert set(shard["generator"]) == {"real", "progan"}
    assert len({it.split for it in result.items}) == 3


def test_cnndetection_test_layout_keeps_generators_and_their_classes(tmp_path):
    for gen, classes in (("progan", ("airplane", "cat")), ("stylegan", ("bedroom",))):
        for cls in classes:
            _img(tmp_path / gen / cls / "0_real" / "r.png")
            _img(tmp_path / gen / cls / "1_fake" / "f.png")
    _img(tmp_path / "dalle" / "0_real" / "r.png")
    _img(tmp_path / "dalle" / "1_fake" / "f.png")
    _, records = resolve_dataset(tmp_path)
    fakes = {(r.generator, r.family, r.subset) for r in records if r.label == 1}
    assert fakes == {
        ("progan", "airplane", "progan"),
        ("progan", "cat", "progan"),
        ("stylegan", "bedroom", "stylegan"),
        ("dalle", "dalle", "dalle"),
    }
    # A folder of one generator's classes, pointed at directly, is that generator.
    _, records = resolve_dataset(tmp_path / "stylegan")
    assert {r.generator for r in records if r.label == 1} == {"stylegan"}
