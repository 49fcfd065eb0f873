"""UniversalFakeDetect's released linear probe as a head (issue 19): its scores are
σ(x·wᵀ + b) on the raw CLIP image embeddings, recomputed here by hand from the shards and a
state dict saved the way UFD saves it; anything but a plain Linear(768, 1) state dict is
refused without running pickled code."""

from __future__ import annotations

import json
import pickle

import numpy as np
import pytest
import torch

from pipeline.config import EvaluateConfig, FeaturesConfig, TrainConfig
from pipeline.errors import ConfigError, ModelFileError
from pipeline.evaluation.evaluate import run_evaluate
from pipeline.evaluation.metrics import Scores, p_generated
from pipeline.features import load_features, run_features
from pipeline.heads import UFDProbeHead, load_head, make_head, save_head
from pipeline.rows import store
from pipeline.train import head_kind, train_heads

D = 768


def _shards(root, n=60, seed=0):
    """Ingest and encode shards: raw CLIP-like image embeddings (an offset, norms near 20,
    as ViT-L/14's), labels 0/1, train/val/test splits."""
    rng = np.random.default_rng(seed)
    label = np.tile([0, 1], n // 2)
    ids = np.array([f"im{i:03d}" for i in range(n)], dtype=object)
    meta = {
        "ids": ids,
        "label": label.astype(np.int8),
        "generator": np.where(label == 0, "real", "progan").astype(object),
        "split": np.array(["train", "val", "test"], dtype=object)[np.arange(n) % 3],
        "family": np.where(label == 0, "real", "gan").astype(object),
        "subset": np.array([""] * n, dtype=object),
    }
    image = rng.normal(0.1, 0.7, (n, D)).astype(np.float32)
    clip = {
        "ids": ids,
        "image_emb": image,
        "text_emb": rng.normal(0.0, 0.4, (n, D)).astype(np.float32),
        "obj_offsets": np.zeros(n + 1, np.int64),
        "obj_image_emb": np.zeros((0, D), np.float32),
        "obj_text_emb": np.zeros((0, D), np.float32),
    }
    store.write_shard(root / "ingest" / store.shard_name(0), meta, {})
    store.write_shard(root / "clip" / store.shard_name(0), clip, {})
    run_features(root / "ingest", root / "clip", root / "features", FeaturesConfig(), "t")
    return root / "features"


def _probe(path, seed=0):
    torch.manual_seed(seed)
    linear = torch.nn.Linear(D, 1)
    torch.save(linear.state_dict(), path)  # as UFD writes fc_weights.pth
    return path


def _by_hand(clip_shard, probe_path):
    state = torch.load(probe_path, weights_only=True)
    w = state["weight"].double().numpy()
    b = state["bias"].double().numpy()
    x = store.read_shard(clip_shard)["image_emb"].astype(np.float64)  # raw: no normalisation
    return 1.0 / (1.0 + np.exp(-(x @ w.T + b)[:, 0]))


def test_scores_equal_sigmoid_of_the_probe_on_raw_clip_embeddings(tmp_path):
    features = _shards(tmp_path)
    probe = _probe(tmp_path / "fc_weights.pth")
    fs = load_features(features, "image_raw")
    head = UFDProbeHead(weights=str(probe)).fit(fs.X, fs.y)
    expected = _by_hand(tmp_path / "clip" / store.shard_name(0), probe)
    np.testing.assert_allclose(p_generated(head, fs.X), expected, rtol=1e-12, atol=1e-15)
    np.testing.assert_allclose(head.predict_proba(fs.X)[:, 1], expected, rtol=1e-12)
    # The normalised `image` kind would score otherwise: the raw embedding is what UFD feeds.
    other = p_generated(head, load_features(features, "image").X)
    assert np.max(np.abs(other - expected)) > 1e-3
    # Saved without pickle, loaded back, same scores.
    save_head(head, tmp_path / "saved")
    again = load_head(tmp_path / "saved")
    np.testing.assert_array_equal(p_generated(again, fs.X), p_generated(head, fs.X))
    assert again.weights_sha256_ == head.weights_sha256_


def test_train_and_evaluate_use_it_through_the_registry(tmp_path):
    features = _shards(tmp_path)
    probe = _probe(tmp_path / "fc_weights.pth", seed=1)
    cfg = TrainConfig(heads=["ufd_probe"], ufd_probe={"weights": str(probe)})
    assert head_kind(cfg, "ufd_probe", "item") == "image_raw"  # whatever features.kind is
    train_heads(features, tmp_path / "models", cfg=cfg, kind="item", seed=0)
    info = json.loads((tmp_path / "models" / "ufd_probe" / "train.json").read_text())
    assert info["kind"] == "image_raw"
    assert info["calibration"] == {"method": "none", "a": 1.0, "b": 0.0}  # UFD's own scores
    run_evaluate(
        features,
        tmp_path / "models",
        tmp_path / "eval.json",
        tmp_path / "scores",
        tmp_path / "plots",
        cfg=EvaluateConfig(),
    )
    scores = Scores.from_csv(tmp_path / "scores" / "ufd_probe.csv")
    hand = _by_hand(tmp_path / "clip" / store.shard_name(0), probe)
    rows = [int(i[2:]) for i in scores.ids]
    np.testing.assert_allclose(scores.p_generated, hand[rows], rtol=1e-12)
    bad = TrainConfig(heads=["ufd_probe"], head_kinds={"ufd_probe": "image"})
    with pytest.raises(ConfigError, match="reads only the features kind 'image_raw'"):
        head_kind(bad, "ufd_probe", "item")


class _Payload:
    """A pickle that would create a file if its code ran."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_anything_but_a_plain_linear_768_state_dict_is_refused(tmp_path):
    X, y = np.random.default_rng(0).normal(size=(10, D)), np.tile([0, 1], 5)
    cases = {}
    torch.save(torch.nn.Linear(D, 1), tmp_path / "module.pth")  # the module, pickled whole
    cases["module.pth"] = "not a plain state dict"
    marker = tmp_path / "ran"
    with open(tmp_path / "payload.pth", "wb") as f:
        pickle.dump({"weight": torch.zeros(1, D), "bias": _Payload(marker)}, f)
    cases["payload.pth"] = "not a plain state dict"
    torch.save(torch.nn.Linear(512, 1).state_dict(), tmp_path / "narrow.pth")
    cases["narrow.pth"] = r"has shape \(1, 512\)"
    torch.save({"fc.weight": torch.zeros(1, D), "fc.bias": torch.zeros(1)}, tmp_path / "keys.pth")
    cases["keys.pth"] = "not the state dict of a Linear"
    torch.save([torch.zeros(1, D), torch.zeros(1)], tmp_path / "list.pth")
    cases["list.pth"] = "holds list"
    (tmp_path / "text.pth").write_text("not a checkpoint")
    cases["text.pth"] = "not a plain state dict"
    cases["missing.pth"] = "do not exist"
    for name, message in cases.items():
        with pytest.raises(ModelFileError, match=message) as err:
            make_head("ufd_probe", {"weights": str(tmp_path / name)}).fit(X, y)
        assert "\n" not in str(err.value)  # one line
    assert not marker.exists()  # the payload's code never ran
    with pytest.raises(ConfigError, match="weights is empty"):
        UFDProbeHead().fit(X, y)
