"""Outputs are replaced by rename, never edited in place: DVC's cache (`cache.type =
hardlink,symlink` in .dvc/config) shares each output's inode, and an in-place edit would change
the cached object of every experiment that holds it."""

import ast
import os
from pathlib import Path

import numpy as np

from pipeline.rows import store
from pipeline.rows.atomic import write_text
from tests.helpers import ROOT


def _hardlink_as_dvc_does(path: Path, cache: Path) -> None:
    os.link(path, cache)
    os.chmod(cache, 0o444)  # DVC protects its cache files (and so the linked output)


def test_rewriting_a_hardlinked_shard_leaves_the_cached_object_intact(tmp_path):
    shard, cached = tmp_path / "out" / "shard_00000.h5", tmp_path / "cache_object"
    store.write_shard(shard, {"ids": np.array(["a", "b"])}, {"stage": "t"})
    _hardlink_as_dvc_does(shard, cached)
    before = cached.read_bytes()
    store.write_shard(shard, {"ids": np.array(["c"])}, {"stage": "t"})
    assert cached.read_bytes() == before
    assert list(store.read_ids(shard)) == ["c"]
    assert not os.path.samefile(shard, cached)


def test_rewriting_a_hardlinked_text_output_leaves_the_cached_object_intact(tmp_path):
    out, cached = tmp_path / "metrics.json", tmp_path / "cache_object"
    write_text(out, "old\n")
    _hardlink_as_dvc_does(out, cached)
    write_text(out, "new\n")
    assert cached.read_text() == "old\n" and out.read_text() == "new\n"


def _mode(call: ast.Call, position: int) -> str | None:
    """The mode argument of an open-like call, when it is a literal."""
    args = list(call.args[position : position + 1])
    args += [k.value for k in call.keywords if k.arg == "mode"]
    for arg in args:
        if isinstance(arg, ast.Constant) and isinstance(arg.value, str):
            return arg.value
    return None


def test_no_project_code_opens_a_file_to_append_or_update():
    """h5py.File(path, "a"/"r+") or open(path, "a"/"r+") would edit a linked output in place."""
    offenders = []
    for path in [*(ROOT / "pipeline").rglob("*.py"), *(ROOT / "stages").rglob("*.py")]:
        for node in ast.walk(ast.parse(path.read_text())):
            if not isinstance(node, ast.Call):
                continue
            name = ast.unparse(node.func)
            if name.endswith(("h5py.File", "open")):
                position = 0 if name.endswith(".open") else 1  # Path.open(mode)
                mode = _mode(node, position) or ""
                if "a" in mode or "+" in mode:
                    offenders.append(f"{path.relative_to(ROOT)}:{node.lineno} {name} {mode!r}")
    assert not offenders, offenders
