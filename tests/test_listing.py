"""The dataset listing that ingest depends on instead of DVC hashing the folder: same folder,
same bytes; a changed file, a new one, a touched one change it; entries that are not files are
refused in one line naming each, and nothing is written."""

import json
import os
import socket
from pathlib import Path

import pytest

from pipeline.data.listing import list_dataset, write_listing
from pipeline.errors import DatasetError
from tests.helpers import make_image, tiny_sample


def _folder(tmp_path: Path) -> Path:
    root = tmp_path / "data"
    make_image(root / "real" / "a.png", 0)
    make_image(root / "fake" / "b.png", 1)
    return root


def test_listing_is_byte_identical_while_the_folder_is_unchanged(tmp_path):
    root = _folder(tmp_path)
    first, second = tmp_path / "l1", tmp_path / "l2"
    assert write_listing(root, first) == 2
    write_listing(root, second)
    assert first.read_bytes() == second.read_bytes()
    rows = [json.loads(line) for line in first.read_text().splitlines()[1:]]
    assert [r[0] for r in rows] == ["fake/b.png", "real/a.png"]
    assert rows[1][1] == (root / "real" / "a.png").stat().st_size
    assert rows[1][3] == "file"


def test_listing_changes_with_an_added_touched_or_linked_file(tmp_path):
    root = _folder(tmp_path)
    before = list_dataset(root)
    make_image(root / "real" / "c.png", 2)
    added = list_dataset(root)
    assert len(added) == 3
    os.utime(root / "real" / "a.png", ns=(1, 1))
    assert list_dataset(root) != added
    os.symlink(root / "real" / "a.png", root / "fake" / "link.png")
    assert ("fake/link.png", (root / "real" / "a.png").stat().st_size, 1, "link") in (
        list_dataset(root)
    )
    assert before != added


def _bad(root: Path, kind: str) -> str:
    name = {"fifo": "pipe.png", "zero": "zero.png", "urandom": "rand.png", "loop": "loop.png"}
    name |= {"dangling": "gone.png", "socket": "sock", "dirloop": "up"}
    target = root / "real" / name[kind]
    if kind == "fifo":
        os.mkfifo(target)
    elif kind == "zero":
        os.symlink("/dev/zero", target)
    elif kind == "urandom":
        os.symlink("/dev/urandom", target)
    elif kind == "loop":
        os.symlink(target, target)
    elif kind == "dangling":
        os.symlink(root / "nowhere.png", target)
    elif kind == "dirloop":
        os.symlink(root, target)
    else:
        sock = socket.socket(socket.AF_UNIX)
        sock.bind(str(target))
        sock.close()
    return f"real/{name[kind]}"


@pytest.mark.parametrize(
    "kind, why",
    [
        ("fifo", "FIFO"),
        ("zero", "symlink to a character device"),
        ("urandom", "symlink to a character device"),
        ("loop", "symlink loop"),
        ("dangling", "dangling link"),
        ("socket", "socket"),
        ("dirloop", "symlink loop"),
    ],
)
def test_an_entry_that_is_not_a_file_is_refused_naming_it(tmp_path, kind, why):
    root = _folder(tmp_path)
    rel = _bad(root, kind)
    out = tmp_path / "listing.jsonl"
    with pytest.raises(DatasetError) as err:
        write_listing(root, out)
    message = str(err.value)
    assert f"{rel} ({why}" in message and "\n" not in message
    assert not out.exists()


def test_every_refused_entry_is_named_in_one_line(tmp_path):
    root = _folder(tmp_path)
    names = [_bad(root, kind) for kind in ("fifo", "zero", "loop")]
    with pytest.raises(DatasetError) as err:
        list_dataset(root)
    assert all(name in str(err.value) for name in names)


def test_a_manifest_csv_lists_the_files_it_names(tmp_path):
    root = tiny_sample(tmp_path / "sample", per_generator=1, n_real=2)
    os.mkfifo(root / "unnamed_pipe.png")  # not named by the CSV: not read, not refused
    paths = [e[0] for e in list_dataset(root / "manifest.csv")]
    named = [p.relative_to(root).as_posix() for p in (root / "images").iterdir()]
    assert paths == sorted(["manifest.csv", *named])
    os.mkfifo(root / "images" / "named_pipe.png")
    with (root / "manifest.csv").open("a") as fh:
        fh.write("images/named_pipe.png,real,real\n")
    with pytest.raises(DatasetError, match=r"images/named_pipe.png \(FIFO\)"):
        list_dataset(root / "manifest.csv")
