"""Per-phrase duplicate boxes removed as GLIP's post-processing does, `n_objects` as a
feature, and an image without grounded objects end to end (issue 19, item 11)."""

from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision

from pipeline.config import BaseConfig, GroundConfig, ModelsConfig, load_params
from pipeline.evalsets import extract_dataset
from pipeline.extract import ground as ground_step
from pipeline.extract.boxes import phrase_nms
from pipeline.features import load_features
from pipeline.models.grounding import GroundedObject
from pipeline.rows import store
from pipeline.rows.runner import Timer
from tests.helpers import ROOT, make_image, write_manifest


@dataclass(frozen=True)
class _Obj:
    box: tuple[float, float, float, float]
    phrase: str
    score: float


def test_phrase_nms_equals_torchvision_batched_nms():
    rng = np.random.default_rng(0)
    for trial in range(30):
        n = int(rng.integers(2, 40))
        xy = rng.uniform(0, 60, (n, 2))
        wh = rng.uniform(5, 40, (n, 2))
        boxes = np.concatenate([xy, xy + wh], axis=1)
        scores = rng.permutation(n) / n + 0.01  # distinct scores
        phrases = rng.choice(["a cat", "a dog", "grass"], n)
        objects = [_Obj(tuple(b), str(p), float(s)) for b, p, s in zip(boxes, phrases, scores)]
        iou = float(rng.choice([0.3, 0.5, 0.6, 0.8]))
        got = {objects.index(o) for o in phrase_nms(objects, iou)}
        codes = torch.as_tensor(np.unique(phrases, return_inverse=True)[1])
        keep = torchvision.ops.batched_nms(
            torch.as_tensor(boxes), torch.as_tensor(scores), codes, iou
        )
        assert got == set(keep.tolist()), (trial, iou)
    # Kept objects stay in their given order; iou 1 keeps everything.
    assert phrase_nms(objects, 1.0) == objects
    kept = phrase_nms(objects, 0.5)
    assert kept == [o for o in objects if o in kept]


def test_shifted_copies_of_one_phrase_keep_only_boxes_that_overlap_little():
    # What the base grounder did on one phrase: shifted copies overlapping up to IoU 0.56.
    objects = [
        _Obj((10.0 + 4 * k, 10.0, 60.0 + 4 * k, 60.0), "a red bus", 0.9 - 0.01 * k)
        for k in range(10)
    ]
    objects.append(_Obj((12.0, 10.0, 62.0, 60.0), "the street", 0.5))
    kept = phrase_nms(objects, 0.6)
    assert [o for o in kept if o.phrase == "a red bus"] == objects[
        0:10:4
    ]  # IoU 0.85, 0.72, 0.61 to the kept
    # Other phrases are never suppressed by it.
    assert objects[-1] in kept


class _DuplicatingGrounder:
    """Stands in for the grounder's post-processed output: per image, `n` copies of one box of
    one phrase, nearly identical, and one box of another phrase."""

    device = "cpu"

    def item_encoder(self):
        return lambda image, caption: {"caption": caption}

    def ground_encoded(self, encoded, *, max_objects, **_):
        out = []
        for _item in encoded:
            objs = [
                GroundedObject((10.0, 10.0, 50.0 + k, 50.0), "a cat", 0.9 - 0.01 * k)
                for k in range(12)
            ]
            objs.append(GroundedObject((60.0, 60.0, 90.0, 90.0), "a dog", 0.3))
            out.append(objs[:max_objects])
        return out


def test_the_ground_step_suppresses_after_the_grounder_and_then_keeps_max_objects(
    tmp_path, monkeypatch
):
    monkeypatch.setattr(ground_step, "loaded_model", lambda *a, **k: _DuplicatingGrounder())
    image = make_image(tmp_path / "a.png", 1, (96, 96))
    rows = {
        "ids": np.array(["a"], dtype=object),
        "path": np.array([str(image)], dtype=object),
        "exif_transpose": np.array([True]),
        "caption": np.array(["a cat and a dog"], dtype=object),
        "input_hash": np.array(["h"], dtype=object),
    }
    base = BaseConfig(decode_workers=0, device="cpu")

    def objects(**cfg):
        step = ground_step.GroundStep(
            tmp_path, tmp_path, GroundConfig(**cfg), ModelsConfig(), base, "t"
        )
        out = step.compute(rows, Timer())
        return list(out["obj_phrase"])

    # 12 near-identical cats: one is kept, and the dog, below them all, still makes the cut.
    assert objects(max_objects=10) == ["a cat", "a dog"]
    assert objects(max_objects=10, nms_iou=1.0) == ["a cat"] * 10
    assert objects(max_objects=0) == []


def _params(tmp: Path, **overrides):
    import yaml

    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["models"]["preset"] = "tiny"
    params["caption"]["source"] = "dataset"
    # Every box of the tiny random grounder passes, so the captioned images get objects.
    params["ground"].update(box_threshold=0.0, text_threshold=0.0, min_box_side=0)
    for dotted, value in overrides.items():
        section, key = dotted.split(".")
        params[section][key] = value
    path = tmp / "params.yaml"
    path.write_text(yaml.safe_dump(params))
    return load_params(path)


def test_an_image_without_grounded_objects_gets_the_documented_d_local(tmp_path):
    """A caption with nothing to ground ("." gives no query) through ground, encode and
    features: D_local is zeros (features.empty_local: zeros) or D_global (global), D_local of
    the other images is the mean over their objects from the encode shards, and n_objects is
    0 there, in the shards and in the kind item_n_objects."""
    rows = []
    for k, caption in enumerate([".", "a cat on a mat", "two dogs on grass", "a red car"]):
        make_image(tmp_path / "data" / f"{k}.png", k, (80, 64))
        rows.append(
            {"path": f"{k}.png", "label": k % 2, "generator": "g", "caption": caption,
             "split": "train"}
        )  # fmt: skip
    data = write_manifest(tmp_path / "data" / "manifest.csv", rows)
    params = _params(tmp_path)
    features_dir = extract_dataset(data, tmp_path / "cache", "t", params)
    clip = store.read_shard(store.list_shards(tmp_path / "cache" / "clip")[0])
    feats = store.read_shard(store.list_shards(features_dir)[0])
    counts = np.diff(clip["obj_offsets"])
    assert counts[0] == 0 and (counts[1:] > 0).all(), counts
    assert list(feats["n_objects"]) == list(counts)

    def unit(x):
        return x / np.linalg.norm(x, axis=-1, keepdims=True)

    d_global = unit(clip["image_emb"]) - unit(clip["text_emb"])
    diff = unit(clip["obj_image_emb"]) - unit(clip["obj_text_emb"])
    np.testing.assert_array_equal(feats["D_local"][0], 0.0)
    np.testing.assert_allclose(feats["D"][0], d_global[0], atol=1e-6)
    for i in range(1, 4):
        a, b = clip["obj_offsets"][i], clip["obj_offsets"][i + 1]
        np.testing.assert_allclose(feats["D_local"][i], diff[a:b].mean(0), atol=1e-6)
    fs = load_features(features_dir, "item_n_objects")
    assert fs.X.shape[1] == feats["D"].shape[1] + 1
    np.testing.assert_array_equal(fs.X[:, -1], counts)

    # empty_local: global -> an image without objects has D_local = D_global (D = 2 D_global).
    from pipeline.features import run_features

    cache = tmp_path / "cache"
    glob = replace(params.features, empty_local="global")
    run_features(cache / "ingest", cache / "clip", cache / "features_g", glob, "t")
    g = store.read_shard(store.list_shards(cache / "features_g")[0])
    np.testing.assert_allclose(g["D_local"][0], d_global[0], atol=1e-6)
    np.testing.assert_allclose(g["D"][0], 2 * d_global[0], atol=1e-6)
    np.testing.assert_array_equal(g["D_local"][1:], feats["D_local"][1:])


@pytest.mark.parametrize("kind", ["item_n_objects", "tidy_n_objects"])
def test_n_objects_kinds_are_known(kind):
    from pipeline.feature_kinds import KINDS

    assert KINDS[kind][-1] == "n_objects"
