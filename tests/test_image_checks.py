"""Extraction checks each image against what ingest recorded, and decode errors name the file."""

import os

import pytest

from pipeline.data.images import load_rgb
from pipeline.errors import DatasetError, one_line
from pipeline.rows.key import check_unchanged, content_id, file_stamp
from pipeline.rows.reader import read_batches
from tests.helpers import make_image


def test_a_touched_file_with_the_same_bytes_passes_and_a_changed_one_is_refused(tmp_path):
    path = make_image(tmp_path / "a.png", seed=1)
    cid, (size, mtime) = content_id(path), file_stamp(path)
    check_unchanged([str(path)], [cid], [size], [mtime])
    os.utime(path, ns=(mtime + 10**9, mtime + 10**9))  # same bytes, new mtime: re-hashed, passes
    check_unchanged([str(path)], [cid], [size], [mtime])
    make_image(path, seed=2)
    with pytest.raises(DatasetError, match=f"image {path} changed since ingest.*rerun ingest"):
        check_unchanged([str(path)], [cid], [size], [mtime])
    path.unlink()
    with pytest.raises(DatasetError, match=f"image {path} was ingested but is gone"):
        check_unchanged([str(path)], [cid], [size], [mtime])


def test_a_decode_error_names_the_file(tmp_path):
    path = make_image(tmp_path / "a.png", seed=1)
    path.write_bytes(path.read_bytes()[:60])
    with pytest.raises(DatasetError, match=f"cannot decode image {path}"):
        load_rgb(path)


def _refuse(path):
    raise DatasetError(f"cannot decode image {path}: broken")


def test_an_error_in_a_decode_worker_is_reported_on_one_line():
    with pytest.raises(DatasetError) as info:
        list(read_batches(["x.jpg"], _refuse, batch_size=1, workers=1))
    assert one_line(info.value) == "cannot decode image x.jpg: broken"
