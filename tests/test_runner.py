"""The shard runner: reuse by id, interrupted runs finish to the same result, timings."""

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest

from pipeline.rows import runner, store
from pipeline.rows.key import row_hash
from pipeline.rows.runner import PARTIAL, run_step, timings_path


@dataclass
class Doubler:
    """A model-free step: output row = 2 × input value; counts the rows it computes."""

    shards: list
    fail_on: int | None = None
    version: str = "v1"
    stage: str = "double"
    computed: list = field(default_factory=list)

    def n_shards(self):
        return len(self.shards)

    def params_hash(self):
        return self.version

    def attrs(self):
        return {"stage": self.stage, "model": "none", "preset": "", "dataset": "t"}

    def read(self, index):
        ids, values = self.shards[index]
        return {
            "ids": np.array(ids, dtype=object),
            "value": np.array(values, dtype=np.float32),
            "input_hash": np.array([row_hash(float(v)) for v in values], dtype=object),
        }

    def compute(self, rows, timer):
        if self.fail_on is not None and self.fail_on in set(rows["ids"]):
            raise KeyboardInterrupt("simulated interruption")
        self.computed.extend(rows["ids"])
        with timer("model"):
            return {"ids": rows["ids"], "input_hash": rows["input_hash"], "out": rows["value"] * 2}


SHARDS = [(["a", "b"], [1, 2]), (["c", "d"], [3, 4]), (["e"], [5])]


def _read_all(directory):
    return [store.read_shard(p) for p in store.list_shards(directory)]


def test_interrupted_run_resumes_to_the_uninterrupted_result(tmp_path):
    clean = tmp_path / "clean"
    run_step(Doubler(SHARDS), clean)

    out = tmp_path / "out"
    with pytest.raises(KeyboardInterrupt):
        run_step(Doubler(SHARDS, fail_on="c"), out)
    # Nothing half-written: only the finished shard, in .partial, and no temp files.
    assert [p.name for p in (out / PARTIAL).iterdir()] == ["shard_00000.h5"]
    assert store.list_shards(out) == []

    resumed = Doubler(SHARDS)
    timings = run_step(resumed, out)
    assert resumed.computed == ["c", "d", "e"]
    assert timings["n_processed"] == 3 and timings["n_reused"] == 2
    assert not (out / PARTIAL).exists()
    for a, b in zip(_read_all(clean), _read_all(out)):
        assert list(a["ids"]) == list(b["ids"])
        np.testing.assert_array_equal(a["out"], b["out"])
    assert json.loads(timings_path(out).read_text())["n_processed"] == 3
    assert not (out / "timings.json").exists()  # beside the outputs, never among them


def test_rerun_computes_only_new_or_changed_rows(tmp_path):
    run_step(Doubler(SHARDS), tmp_path)
    grown = [(["a", "b"], [1, 2]), (["c", "d"], [3, 40]), (["e", "f"], [5, 6])]
    step = Doubler(grown)
    timings = run_step(step, tmp_path)
    assert step.computed == ["d", "f"]  # d's input changed, f is new
    assert timings["n_reused"] == 4
    assert [list(s["out"]) for s in _read_all(tmp_path)] == [[2, 4], [6, 80], [10, 12]]


def test_a_cached_shard_rows_are_reused_from_is_read_whole_once(tmp_path, monkeypatch):
    """Planning reads (and verifies) the cached shard; finishing uses those rows, not a reread."""
    run_step(Doubler(SHARDS), tmp_path)
    whole_reads = []
    read_shard = store.read_shard

    def counting(path, keys=None, **kwargs):
        if keys is None:
            whole_reads.append(Path(path).name)
        return read_shard(path, keys, **kwargs)

    monkeypatch.setattr(store, "read_shard", counting)
    grown = [(["a", "b"], [1, 2]), (["c", "d"], [3, 40]), (["e", "f"], [5, 6])]
    step = Doubler(grown)
    run_step(step, tmp_path)
    assert step.computed == ["d", "f"]
    # Shard 0 is read whole to confirm it is unchanged; shards 1 and 2 give rows to the new
    # shards of their index, and are read whole once each, when planned.
    assert sorted(whole_reads) == ["shard_00000.h5", "shard_00001.h5", "shard_00002.h5"]
    assert [list(s["out"]) for s in _read_all(tmp_path)] == [[2, 4], [6, 80], [10, 12]]


def test_a_cached_shard_damaged_after_planning_does_not_reach_the_new_shard(tmp_path):
    """The reused rows were verified when planned: damage on disk afterwards changes nothing."""
    from tests.helpers import flip_byte

    run_step(Doubler(SHARDS), tmp_path)
    grown = [(["a", "b"], [1, 2]), (["c", "d"], [3, 40]), (["e"], [5])]
    cached = tmp_path / store.shard_name(1)
    reuse = runner.reuse_index([tmp_path], "v1")
    step = Doubler(grown)
    plan = runner._plan(step, 1, str(tmp_path), reuse, runner.Timer())
    assert plan.todo == [1] and len(plan.reused) == 1
    flip_byte(cached, "out", at=0)
    report = runner._finish(step, plan)
    assert (report.n_processed, report.n_reused) == (1, 1)
    built = store.read_shard(tmp_path / PARTIAL / store.shard_name(1))
    assert list(built["ids"]) == ["c", "d"] and list(built["out"]) == [6, 80]


def test_changed_params_recompute_everything_and_drop_stale_shards(tmp_path):
    run_step(Doubler(SHARDS), tmp_path)
    step = Doubler(SHARDS[:2], version="v2")
    run_step(step, tmp_path)
    assert step.computed == ["a", "b", "c", "d"]
    assert len(store.list_shards(tmp_path)) == 2
    assert store.read_attrs(store.list_shards(tmp_path)[0])["params_hash"] == "v2"


def test_dask_scheduler_gives_the_local_result(tmp_path):
    """Shards as Dask tasks (a LocalCluster of 2 processes): same shards as the local loop."""
    local, dist = tmp_path / "local", tmp_path / "dask"
    run_step(Doubler(SHARDS), local)
    timings = run_step(Doubler(SHARDS), dist, scheduler="dask", n_workers=2)
    assert timings["scheduler"] == "dask" and timings["n_processed"] == 5
    for a, b in zip(_read_all(local), _read_all(dist), strict=True):
        assert list(a["ids"]) == list(b["ids"])
        np.testing.assert_array_equal(a["out"], b["out"])


def test_rerun_with_nothing_new_leaves_shards_untouched(tmp_path):
    """DVC hashes the output folder: an unchanged rerun must not rewrite any shard."""
    run_step(Doubler(SHARDS), tmp_path)
    before = {p.name: p.read_bytes() for p in store.list_shards(tmp_path)}
    step = Doubler(SHARDS)
    run_step(step, tmp_path)
    assert step.computed == []
    assert {p.name: p.read_bytes() for p in store.list_shards(tmp_path)} == before


class Batched(Doubler):
    """Reports each row as a batch done, as the extraction steps do after each model call."""

    def compute(self, rows, timer):
        out = super().compute(rows, timer)
        for _ in rows["ids"]:
            timer.advance(1)
        return out


def test_the_stage_bar_counts_images_as_each_batch_finishes(tmp_path, monkeypatch):
    bars, updates = [], []

    class Bar:
        def __init__(self, total=None, desc=None, unit=None, **kwargs):
            bars.append((desc, unit))

        def update(self, n):
            updates.append(n)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return None

    monkeypatch.setattr(runner, "progress", Bar)
    run_step(Batched(SHARDS), tmp_path)
    assert bars == [("double", "img")] and updates == [1, 1, 1, 1, 1]  # per batch, not shard
    bars.clear(), updates.clear()
    grown = [*SHARDS[:2], (["e", "f"], [5, 6])]
    run_step(Batched(grown), tmp_path)
    # Reused rows count when their shard is done; the new row as soon as it is computed.
    assert bars == [("double", "img")] and updates == [2, 2, 1, 1]
    bars.clear(), updates.clear()
    run_step(Doubler(grown, version="v2"), tmp_path)  # a step that reports no batches
    assert updates == [2, 2, 2]


def test_a_stage_run_twice_writes_byte_identical_shards(tmp_path):
    """The ingest stage computed twice over the same images, a second apart, writes the same
    bytes (no wall-clock time in any file of the output), so DVC sees an unchanged output."""
    import time

    import yaml

    from stages import ingest
    from tests.helpers import ROOT, make_image, write_manifest

    data = tmp_path / "data"
    rows = [{"path": f"img{i}.png", "label": i % 2, "generator": "g"} for i in range(4)]
    for i in range(4):
        make_image(data / f"img{i}.png", i)
    write_manifest(data / "manifest.csv", rows)
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["models"]["preset"] = "tiny"
    params["ingest"]["shard_size"] = 2
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    outs = [tmp_path / "first" / "ingest", tmp_path / "second" / "ingest"]
    for k, out in enumerate(outs):
        if k:
            time.sleep(1.1)  # a time kept to the second would now differ
        args = ["--params", str(tmp_path / "params.yaml"), "--data", str(data), "--out", str(out)]
        assert ingest.main([*args, "--name", "t"]) == 0
    first, second = (sorted(p.name for p in out.iterdir()) for out in outs)
    assert first == second and {"shard_00000.h5", "shard_00001.h5"} <= set(first)
    for name in first:  # the shards and every other file of the output
        assert (outs[0] / name).read_bytes() == (outs[1] / name).read_bytes(), name


@pytest.mark.parametrize("damage", ["flip", "delete"])
def test_a_damaged_shard_is_recomputed_to_the_undamaged_values(tmp_path, damage):
    import h5py

    from tests.helpers import flip_byte

    clean = tmp_path / "clean"
    run_step(Doubler(SHARDS), clean)
    out = tmp_path / "out"
    run_step(Doubler(SHARDS), out)
    shard = out / store.shard_name(1)
    if damage == "flip":
        flip_byte(shard, "out", at=2)
    else:
        with h5py.File(shard, "r+") as fh:
            del fh["out"]
    step = Doubler(SHARDS)
    run_step(step, out)
    assert step.computed == ["c", "d"]  # only the damaged shard's rows
    for a, b in zip(_read_all(clean), _read_all(out), strict=True):
        assert set(a) == set(b)
        for key in a:
            np.testing.assert_array_equal(a[key], b[key])
    store.verify_shard(shard)


def test_a_shard_without_checksums_is_rewritten_once_reusing_its_rows(tmp_path):
    import h5py

    run_step(Doubler(SHARDS), tmp_path)
    shard = tmp_path / store.shard_name(0)
    with h5py.File(shard, "r+") as fh:
        del fh.attrs["checksums"]
    step = Doubler(SHARDS)
    run_step(step, tmp_path)
    assert step.computed == [] and store.has_checksums(shard)
