"""The parallel reader: rows do not depend on the number of decode workers, and the encode
stage's batched, on-device path equals encoding each image and crop on its own."""

from __future__ import annotations

import os
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline.config import params_from_dict
from pipeline.data.images import load_rgb
from pipeline.evalsets import extract_dataset
from pipeline.extract.base import DecodeThen
from pipeline.extract.encode import TextMemo, crop_box, encode_texts_once
from pipeline.extract.loaded import loaded_model
from pipeline.rows import reader, store
from tests.helpers import make_image, write_manifest


def _square(path: str) -> int:
    return int(Path(path).stem.split("_")[1]) ** 2


def test_batches_keep_item_order_whatever_the_workers():
    items = [f"x_{i}.png" for i in range(23)]
    expected = [[_square(p) for p in items[i : i + 5]] for i in range(0, 23, 5)]
    for workers in (0, 2):
        assert list(reader.read_batches(items, _square, 5, workers)) == expected


def test_auto_workers_share_the_cpus(monkeypatch):
    monkeypatch.setattr(reader, "available_cpus", lambda: 16)
    assert reader.resolve_workers(-1) == 15  # one CPU stays with the main process
    assert reader.resolve_workers(-1, n_processes=4) == 3
    assert reader.resolve_workers(3, n_processes=4) == 3
    monkeypatch.setattr(reader, "available_cpus", lambda: 32)
    assert reader.resolve_workers(-1) == 31  # a 32-core GPU host is not held to 8
    monkeypatch.setattr(reader, "available_cpus", lambda: 128)
    assert reader.resolve_workers(-1) == reader.MAX_AUTO_WORKERS
    monkeypatch.setattr(reader, "available_cpus", lambda: 1)
    assert reader.resolve_workers(-1, n_processes=2) == 0


def _dataset(root: Path, n: int) -> Path:
    rows = []
    for i in range(n):
        size = (40 + 7 * (i % 5), 36 + 5 * (i % 3))
        make_image(root / f"img_{i}.png", seed=i, size=size)
        # Every third image has no caption, so the tiny BLIP-2 captions it.
        caption = "" if i % 3 == 0 else f"a red car next to a tree number {i % 4}"
        rows.append({"path": f"img_{i}.png", "label": i % 2, "generator": "g", "caption": caption})
    # A broken file and a duplicate go through ingest's parallel check as well.
    (root / "broken.png").write_bytes(b"not an image")
    rows.append({"path": "broken.png", "label": 1, "generator": "g", "caption": "x"})
    (root / "dup.png").write_bytes((root / "img_1.png").read_bytes())
    rows.append({"path": "dup.png", "label": 1, "generator": "g", "caption": "x"})
    return write_manifest(root / "manifest.csv", rows)


def _extract(data: Path, cache: Path, workers: int, base: dict | None = None, **encode: object):
    params = params_from_dict(
        {
            "models": {"preset": "tiny"},
            "ingest": {"shard_size": 5},
            "base": {"decode_workers": workers, **(base or {})},
            "caption": {"batch_size": 3},
            "ground": {"batch_size": 2, "box_threshold": 0.0, "text_threshold": 0.0},
            "encode": {"batch_size": 4, **encode},
        }
    )
    extract_dataset(data, cache, "t", params, with_features=False)
    return params


def _stage(cache: Path, stage: str) -> dict[str, np.ndarray]:
    return store.concat_rows([store.read_shard(s) for s in store.list_shards(cache / stage)])


@pytest.fixture(scope="module")
def extracted(tmp_path_factory):
    work = tmp_path_factory.mktemp("reader")
    data = _dataset(work / "data", 11).parent
    runs = {w: work / f"cache_{w}" for w in (0, 2)}
    params = {w: _extract(data, cache, w, color_bins=4) for w, cache in runs.items()}
    return data, runs, params


@pytest.mark.parametrize("stage", ["ingest", "captions", "objects", "clip"])
def test_rows_are_identical_with_0_and_2_decode_workers(extracted, stage):
    _, runs, _ = extracted
    zero, two = _stage(runs[0], stage), _stage(runs[2], stage)
    assert set(zero) == set(two)
    for key in zero:
        assert np.array_equal(zero[key], two[key]), key
    if stage == "objects":  # thresholds at 0: the crops below are really exercised
        assert len(zero["obj_boxes"]) > 5
    if stage == "ingest":
        assert len(zero["ids"]) == 11  # broken file quarantined, duplicate dropped


def test_two_dask_workers_give_the_local_loop_rows(extracted, tmp_path):
    """caption/ground/encode as Dask tasks on a 2-worker LocalCluster, each worker with its
    own decode processes and models, the class prompts encoded on a worker."""
    data, runs, _ = extracted
    cache = tmp_path / "cache"
    _extract(data, cache, 2, {"scheduler": "dask", "n_workers": 2}, color_bins=4)
    for stage in ("captions", "objects", "clip"):
        local, dask = _stage(runs[0], stage), _stage(cache, stage)
        assert set(local) == set(dask)
        for key in local:
            if stage == "clip" and local[key].dtype == np.float32:
                # Each worker has its own text memo, so strings meet other batch partners than
                # in one process: equal to float32 rounding, not bit for bit.
                np.testing.assert_allclose(local[key], dask[key], rtol=1e-5, atol=1e-6)
            else:
                assert np.array_equal(local[key], dask[key]), (stage, key)
    prompts = store.read_shard(cache / "clip" / "class_prompts.h5")
    np.testing.assert_array_equal(
        prompts["text_emb"], store.read_shard(runs[0] / "clip" / "class_prompts.h5")["text_emb"]
    )


def test_encoded_rows_equal_each_image_and_crop_encoded_alone(extracted):
    """An independent computation: every image decoded on its own, every crop cut from it and
    encoded one at a time through the public `encode_images`."""
    data, runs, params = extracted
    p = params[2]
    clip = loaded_model("clip", p.models, p.base)
    ingest, objects, out = (_stage(runs[2], s) for s in ("ingest", "objects", "clip"))
    off = objects["obj_offsets"]
    for k, rel in enumerate(ingest["path"]):
        image = load_rgb(data / rel)
        # The default encode.image_transform: UFD's centre crop, no resize (black padding
        # around these small images).
        whole = clip.center_crop_pixels()(image)[None]
        expected = clip.encode_pixels(whole).float().numpy()[0]
        np.testing.assert_allclose(out["image_emb"][k], expected, rtol=1e-4, atol=1e-5)
        for j in range(off[k], off[k + 1]):
            crop = crop_box(image, objects["obj_boxes"][j], p.ground.crop_padding)
            np.testing.assert_allclose(
                out["obj_image_emb"][j], clip.encode_images([crop])[0], rtol=1e-4, atol=1e-5
            )
        from pipeline.features import color_histograms

        np.testing.assert_allclose(out["color_hist"][k], color_histograms(image, 4))


def test_caption_and_ground_inputs_made_in_decode_workers_give_the_public_calls_outputs(
    tmp_path,
):
    """The stages feed `caption_encoded`/`ground_encoded` with what two decode workers made;
    that gives what `caption`/`ground` give on the images decoded here, an empty query
    ("." has no phrase) still no objects."""
    from pipeline.models.blip2 import Blip2Captioner, concat_encoded
    from pipeline.models.grounding import GroundingDinoGrounder

    data = _dataset(tmp_path, 7).parent
    paths = [str(data / f"img_{i}.png") for i in range(7)]
    captions = ["a red car", "a tree.", ".", "two dogs on a red sofa", "a car", " ", "a tree"]
    images = [load_rgb(p) for p in paths]
    grounder = GroundingDinoGrounder.load(preset="tiny")
    kw = {"box_threshold": 0.0, "text_threshold": 0.0, "min_box_side": 0}
    items = [(p, True, c) for p, c in zip(paths, captions)]
    load = DecodeThen(grounder.item_encoder())
    found = [
        objects
        for encoded in reader.read_batches(items, load, 3, workers=2)
        for objects in grounder.ground_encoded(encoded, **kw)
    ]
    assert found == grounder.ground(images, captions, **kw)
    assert [bool(f) for f in found] == [True, True, False, True, True, False, True]

    captioner = Blip2Captioner.load(preset="tiny")
    load = DecodeThen(captioner.item_encoder("a photo of"))
    batches = reader.read_batches([(p, True) for p in paths], load, 3, 2, concat_encoded)
    made = [captioner.caption_encoded(b, num_beams=1, max_new_tokens=4) for b in batches]
    here = [
        captioner.caption(images[s : s + 3], "a photo of", num_beams=1, max_new_tokens=4)
        for s in range(0, 7, 3)
    ]
    assert made == here and len(made) == 3


def test_text_memo_is_bounded_and_keeps_recent_strings():
    memo = TextMemo(max_items=3)
    for i in range(5):
        memo.put(f"t{i}", np.full(2, i, np.float32))
    assert len(memo) == 3 and "t0" not in memo and "t1" not in memo
    assert memo.get("t2") is not None  # t2 is now the most recent
    memo.put("t5", np.zeros(2, np.float32))
    assert "t3" not in memo and "t2" in memo


class _Counting:
    dim = 2

    def __init__(self) -> None:
        self.sent: list[str] = []

    def encode_texts(self, texts):
        self.sent += list(texts)
        return np.array([[len(t), ord(t[0])] for t in texts], np.float32)


def test_texts_evicted_from_the_memo_are_encoded_again_with_the_same_values():
    enc, memo = _Counting(), TextMemo(max_items=2)
    first = encode_texts_once(enc, ["ab", "c", "ab", "def"], 2, memo)
    np.testing.assert_array_equal(first, [[2, 97], [1, 99], [2, 97], [3, 100]])
    assert enc.sent == ["ab", "c", "def"]
    again = encode_texts_once(enc, ["def", "ab"], 2, memo)
    np.testing.assert_array_equal(again, [[3, 100], [2, 97]])
    assert enc.sent == ["ab", "c", "def", "ab"]  # "ab" had been evicted, "def" had not


def test_a_feeder_serves_consecutive_jobs_in_order_with_its_workers_kept():
    feeder = reader.Feeder(2)
    try:
        first = feeder.submit([f"x_{i}.png" for i in range(20)], _square, 64)
        second = feeder.submit([f"x_{i}.png" for i in range(20, 25)], _square, 64)
        pool = feeder._pool()
        assert list(second) == [[_square(f"x_{i}.png") for i in range(20, 25)]]
        assert list(first) == [[_square(f"x_{i}.png") for i in range(20)]]
        # One 64-image batch is still cut into chunks of 8 that both workers take.
        assert [len(c) for c in first.chunks] == [8, 8, 4] and feeder._pool() is pool
    finally:
        feeder.close()


def test_the_runner_reads_the_next_shard_before_the_current_one_goes_to_the_model(tmp_path):
    from pipeline.rows.runner import run_step

    calls: list[str] = []

    class Step:
        stage = "fake"

        def params_hash(self):
            return "p"

        def attrs(self):
            return {}

        def n_shards(self):
            return 3

        def read(self, index):
            calls.append(f"read {index}")
            return {"ids": np.array([f"s{index}"], dtype=object), "input_hash": np.array(["h"])}

        def prefetch(self, rows):
            calls.append(f"prefetch {rows['ids'][0]}")

        def compute(self, rows, timer):
            calls.append(f"compute {rows['ids'][0]}")
            return {"ids": rows["ids"], "input_hash": rows["input_hash"], "x": np.ones(1)}

    run_step(Step(), tmp_path / "out")
    assert calls == [
        "read 0", "prefetch s0", "read 1", "prefetch s1", "compute s0",
        "read 2", "prefetch s2", "compute s1", "compute s2",
    ]  # fmt: skip


def _views(path: str) -> dict:
    n = int(Path(path).stem.split("_")[1])
    return {
        "pixels": torch.full((1 + n % 3, 3, 4, 4), n, dtype=torch.uint8),
        "n": torch.tensor([n]),
    }


def _n_views(path: str) -> int:
    return 1 + int(Path(path).stem.split("_")[1]) % 3


def _cat(samples: list) -> dict:
    return {k: torch.cat([s[k] for s in samples]) for k in samples[0]}


def test_packed_batches_equal_the_collated_ones_and_outlive_the_next_batches():
    items = [f"x_{i}.png" for i in range(63)]
    pack = reader.Pack("pixels", (3, 4, 4), _n_views)
    expected = list(reader.read_batches(items, _views, 5, 0, _cat, pack=pack))
    feeder = reader.feeder(2)
    try:
        # All batches kept: a buffer is reused only once no tensor is on it any more.
        kept = list(reader.read_batches(items, _views, 5, 2, _cat, pack=pack))
        assert len(kept) == len(expected) == 13
        for got, want in zip(kept, expected):
            assert torch.equal(got["pixels"], want["pixels"]) and torch.equal(got["n"], want["n"])
        held = len(feeder._buffers.all)
        del kept, got
        for _ in range(3):  # batches dropped as they come: the buffers are reused
            for batch in reader.read_batches(items, _views, 5, 2, _cat, pack=pack):
                assert torch.equal(
                    batch["pixels"][:, 0, 0, 0],
                    batch["n"]
                    .repeat_interleave(
                        torch.tensor([_n_views(f"x_{int(n)}.png") for n in batch["n"]])
                    )
                    .to(torch.uint8),
                )
                del batch
        assert len(feeder._buffers.all) == held
    finally:
        reader.close_feeders()


def _abandon_a_feeder(conn) -> None:
    feeder = reader.Feeder(2)
    pack = reader.Pack("pixels", (3, 4, 4), _n_views)
    list(feeder.submit([f"x_{i}.png" for i in range(20)], _views, 5, _cat, pack=pack))
    workers = [p.pid for p in feeder._executor._processes.values()]
    conn.send((workers, [b.path for b in feeder._buffers.all]))
    os._exit(0)  # as a killed Dask worker: the feeder is never closed


def _running(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/status").read_text()
    except FileNotFoundError:
        return False
    return "\nState:\tZ" not in state


@pytest.mark.skipif(not Path("/proc").is_dir(), reason="reads /proc")
def test_decode_workers_end_and_remove_their_buffers_when_their_parent_is_gone():
    import multiprocessing

    context = multiprocessing.get_context("fork")
    here, there = context.Pipe()
    child = context.Process(target=_abandon_a_feeder, args=(there,))
    child.start()
    workers, buffers = here.recv()
    child.join()
    assert workers and buffers
    deadline = time.monotonic() + 10 * reader.ORPHAN_CHECK_SECONDS
    while time.monotonic() < deadline and any(_running(p) for p in workers):
        time.sleep(0.1)
    assert not any(_running(p) for p in workers)
    assert not any(Path(b).exists() for b in buffers)
