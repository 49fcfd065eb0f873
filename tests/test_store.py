"""HDF5 shards: schema attributes, atomic writes, string round trip, ragged row selection."""

import time

import numpy as np
import pytest

from pipeline.rows import store
from tests.helpers import flip_byte


def _shard(n=3, objs=(2, 0, 1)):
    rng = np.random.default_rng(0)
    m = sum(objs)
    return {
        "ids": np.array([f"id{i}" for i in range(n)], dtype=object),
        "caption": np.array(["a cat", "ünïcode", ""], dtype=object)[:n],
        "image_emb": rng.normal(size=(n, 4)).astype(np.float32),
        "obj_offsets": np.concatenate([[0], np.cumsum(objs)]).astype(np.int64),
        "obj_phrase": np.array([f"p{j}" for j in range(m)], dtype=object),
        "obj_boxes": rng.uniform(size=(m, 4)).astype(np.float32),
    }


def test_round_trip_and_attrs(tmp_path):
    path = tmp_path / store.shard_name(0)
    data = _shard()
    store.write_shard(path, data, {"stage": "clip", "dataset": "d", "params_hash": "abc"})
    attrs = store.read_attrs(path)
    assert attrs["schema_version"] == 1 and attrs["stage"] == "clip"
    for key in ("package_version", "params_hash"):
        assert key in attrs
    back = store.read_shard(path)
    assert list(back["caption"]) == ["a cat", "ünïcode", ""]
    np.testing.assert_array_equal(back["image_emb"], data["image_emb"])
    only = store.read_shard(path, ["ids"])
    assert set(only) == {"ids"}
    assert [p.name for p in store.list_shards(tmp_path)] == ["shard_00000.h5"]


def test_the_same_rows_write_the_same_bytes(tmp_path):
    """No wall-clock time in a shard: DVC sees a recomputed shard as unchanged."""
    first, second = tmp_path / "a.h5", tmp_path / "b.h5"
    store.write_shard(first, _shard(), {"stage": "clip", "params_hash": "abc"})
    time.sleep(1.1)  # a timestamp kept in seconds would differ now
    store.write_shard(second, _shard(), {"stage": "clip", "params_hash": "abc"})
    assert first.read_bytes() == second.read_bytes()
    assert not any("utc" in key or "time" in key for key in store.read_attrs(first))


def test_failed_write_leaves_nothing(tmp_path):
    path = tmp_path / store.shard_name(0)
    store.write_shard(path, {"ids": _shard()["ids"]}, {})
    before = path.read_bytes()
    with pytest.raises(store.ShardError):
        store.write_shard(path, {**_shard(), "obj_offsets": np.array([0, 5, 1, 3])}, {})
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == [path.name]


def test_take_and_concat_rows_keep_objects_with_their_image():
    data = _shard()
    part = store.take_rows(data, [2, 0])
    assert list(part["ids"]) == ["id2", "id0"]
    assert list(part["obj_offsets"]) == [0, 1, 3]
    assert list(part["obj_phrase"]) == ["p2", "p0", "p1"]
    whole = store.concat_rows([store.take_rows(data, [0]), store.take_rows(data, [1, 2])])
    for key in data:
        np.testing.assert_array_equal(whole[key], data[key])


def test_unreadable_shard_names_the_fix(tmp_path):
    path = tmp_path / store.shard_name(0)
    path.write_bytes(b"not hdf5")
    with pytest.raises(store.ShardError, match="delete it and rerun"):
        store.read_shard(path)


@pytest.mark.parametrize("case", ["missing", "not-hdf5", "empty-folder", "damaged-in-folder"])
def test_info_on_a_bad_path_is_one_line_naming_the_path_and_the_fix(tmp_path, capsys, case):
    from pipeline.cli import main as cli

    folder = tmp_path / "clip"
    folder.mkdir()
    named, fix = {
        "missing": (tmp_path / "nope", "give a shard file"),
        "not-hdf5": (tmp_path / "notes.txt", "give a shard file"),
        "empty-folder": (folder, "give a shard file"),
        "damaged-in-folder": (folder / store.shard_name(0), "delete it and rerun"),
    }[case]
    if case in ("not-hdf5", "damaged-in-folder"):
        named.write_bytes(b"not hdf5")
    target = folder if case == "damaged-in-folder" else named
    assert cli(["info", str(target)]) == 1
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and err.startswith("misalign info: error: "), err
    assert str(named) in err and fix in err
    if case in ("not-hdf5", "damaged-in-folder"):
        assert "not an HDF5 file" in err


def test_info_keeps_the_traceback_of_an_error_that_is_a_bug(tmp_path, monkeypatch):
    """Only the project's own errors become one-line messages; an OSError from a bug
    propagates with its traceback."""
    from pipeline.cli import main as cli

    path = tmp_path / store.shard_name(0)
    store.write_shard(path, {"ids": _shard()["ids"]}, {})

    def broken(*args, **kwargs):
        raise OSError("a bug deep in the reader")

    monkeypatch.setattr(store, "open_shard", broken)
    with pytest.raises(OSError, match="a bug deep in the reader"):
        cli(["info", str(path)])


# ------------------------------------------------------------------ shards that check themselves


def test_same_rows_give_the_same_checksums(tmp_path):
    a, b = tmp_path / "a.h5", tmp_path / "b.h5"
    store.write_shard(a, _shard(), {"stage": "clip"})
    store.write_shard(b, _shard(), {"stage": "clip"})
    assert store.read_attrs(a)["checksums"] == store.read_attrs(b)["checksums"]
    assert store.has_checksums(a)
    store.verify_shard(a)


def test_a_flipped_byte_is_found_naming_shard_dataset_and_fix(tmp_path):
    path = tmp_path / store.shard_name(0)
    store.write_shard(path, _shard(), {"stage": "clip"})
    flip_byte(path, "image_emb", at=3)
    store.read_shard(path, ["ids", "caption"])  # the untouched datasets still read
    with pytest.raises(store.ShardError, match=r"shard_00000.h5 is damaged: dataset 'image_emb'"):
        store.read_shard(path, ["image_emb"])
    with pytest.raises(store.ShardError, match="rerun the stage that writes it"):
        store.verify_shard(path)


def test_a_removed_dataset_is_a_shard_error_not_a_key_error(tmp_path):
    import h5py

    path = tmp_path / store.shard_name(0)
    store.write_shard(path, _shard(), {"stage": "clip"})
    with h5py.File(path, "r+") as fh:
        del fh["image_emb"]
    with pytest.raises(store.ShardError, match="dataset 'image_emb' was removed"):
        store.read_shard(path)
    with pytest.raises(store.ShardError, match="dataset 'image_emb' was removed"):
        store.read_shard(path, ["image_emb"])


def test_a_caption_rewritten_by_hand_is_detected(tmp_path):
    import h5py

    path = tmp_path / store.shard_name(0)
    store.write_shard(path, _shard(), {"stage": "captions"})
    with h5py.File(path, "r+") as fh:
        del fh["caption"]
        fh.create_dataset(
            "caption", data=["a dog", "ünïcode", ""], dtype=h5py.string_dtype("utf-8")
        )
    with pytest.raises(store.ShardError, match="dataset 'caption' differs from what was written"):
        store.read_shard(path, ["caption"])


def test_a_truncated_shard_is_a_shard_error(tmp_path):
    path = tmp_path / store.shard_name(0)
    store.write_shard(path, _shard(), {"stage": "clip"})
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(store.ShardError, match="shard_00000.h5"):
        store.read_shard(path)
