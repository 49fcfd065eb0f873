"""Shards that check themselves, end to end on the tiny preset: a flipped byte, a removed
dataset or a hand-edited caption is found and recomputed to the undamaged values."""

import shutil

import h5py
import numpy as np
import pytest

from pipeline.rows import store
from tests.helpers import extract_stages, flip_byte


def _values(folder):
    return [store.read_shard(p) for p in store.list_shards(folder)]


def _max_delta(a, b):
    worst = 0.0
    for x, y in zip(a, b, strict=True):
        assert set(x) == set(y)
        for key in x:
            if x[key].dtype == object:
                assert list(x[key]) == list(y[key]), key
            else:
                worst = max(worst, float(np.max(np.abs(x[key] - y[key]), initial=0.0)))
    return worst


@pytest.fixture
def clean(tiny_extraction):
    """The shared tiny extraction (read-only: each test damages a copy of it)."""
    return tiny_extraction.work, tiny_extraction.data, tiny_extraction.params


@pytest.mark.parametrize("damage", ["flip", "delete"])
def test_damaged_clip_shard_is_recomputed_to_the_undamaged_values(clean, tmp_path, capsys, damage):
    work, data, params = clean
    cache = tmp_path / "cache"
    shutil.copytree(work / "cache", cache)
    shard = cache / "clip" / store.shard_name(0)
    if damage == "flip":
        flip_byte(shard, "image_emb", at=5)
    else:
        with h5py.File(shard, "r+") as fh:
            del fh["image_emb"]
    assert extract_stages(cache, data, params, only=("features",)) == 1
    assert f"{shard} is damaged: dataset 'image_emb'" in capsys.readouterr().err
    assert extract_stages(cache, data, params, only=("encode", "features")) == 0
    for stage in ("clip", "features"):
        assert _max_delta(_values(work / "cache" / stage), _values(cache / stage)) == 0.0


def test_hand_edited_caption_is_detected_and_recomputed(clean, tmp_path, capsys):
    work, data, params = clean
    cache = tmp_path / "cache"
    shutil.copytree(work / "cache", cache)
    shard = cache / "captions" / store.shard_name(0)
    with h5py.File(shard, "r+") as fh:
        edited = [s.decode() for s in fh["caption"][()]]
        edited[0] = "a photo of a cat, edited by hand"
        del fh["caption"]
        fh.create_dataset("caption", data=edited, dtype=h5py.string_dtype("utf-8"))
    assert extract_stages(cache, data, params, only=("encode",)) == 1
    assert f"{shard} is damaged: dataset 'caption'" in capsys.readouterr().err
    assert extract_stages(cache, data, params, only=("caption", "ground", "encode")) == 0
    for stage in ("captions", "objects", "clip"):
        assert _max_delta(_values(work / "cache" / stage), _values(cache / stage)) == 0.0


# ------------------------------------------------------- images changed after ingest


def _error_lines(stderr):
    """stderr without the progress bars."""
    return [line for line in stderr.splitlines() if "error" in line.lower()]


def _moved_copy(work, tmp_path):
    """The clean cache and its data, copied (mtimes kept) with ingest pointed at the copy."""
    cache, data = tmp_path / "cache", tmp_path / "data"
    shutil.copytree(work / "cache", cache)
    shutil.copytree(work / "data", data)
    for shard in store.list_shards(cache / "ingest"):
        with h5py.File(shard, "r+") as fh:
            fh.attrs["data_root"] = str(data.resolve())
    first = store.read_shard(cache / "ingest" / store.shard_name(0), ["path"])["path"][0]
    return cache, data, data / first


def test_an_image_replaced_after_ingest_is_refused_naming_it(clean, tmp_path, capsys):
    from PIL import Image

    work, _, params = clean
    cache, data, image = _moved_copy(work, tmp_path)
    assert extract_stages(cache, data, params, only=("encode",)) == 0  # unchanged copies pass
    capsys.readouterr()
    Image.new("RGB", (40, 30), (200, 10, 10)).save(image, format="JPEG")
    assert extract_stages(cache, data, params, only=("encode",)) == 1
    err = _error_lines(capsys.readouterr().err)
    assert len(err) == 1 and f"image {image} changed since ingest" in err[0], err
    assert "rerun ingest" in err[0]


def test_an_image_truncated_after_ingest_names_the_file_in_one_line(clean, tmp_path, capsys):
    work, _, params = clean
    cache, data, image = _moved_copy(work, tmp_path)
    blob = image.read_bytes()
    image.write_bytes(blob[: len(blob) // 3])
    assert extract_stages(cache, data, params, only=("caption",)) == 1
    err = _error_lines(capsys.readouterr().err)
    assert len(err) == 1 and str(image) in err[0], err
