"""Feature formulas against an independent per-row computation; the user-facing reader."""

import numpy as np
import pytest

from pipeline.config import FeaturesConfig
from pipeline.features import KINDS, compute_features, load_features
from pipeline.rows import store


def _clip(seed=0, counts=(3, 0, 1, 2), d=8):
    rng = np.random.default_rng(seed)
    n, m = len(counts), sum(counts)
    # Raw encoder outputs: not normalised, with a common offset (as CLIP's are).
    return {
        "image_emb": rng.normal(2.0, 3.0, (n, d)).astype(np.float32),
        "text_emb": rng.normal(-1.0, 0.5, (n, d)).astype(np.float32),
        "obj_offsets": np.concatenate([[0], np.cumsum(counts)]).astype(np.int64),
        "obj_image_emb": rng.normal(1.0, 2.0, (m, d)).astype(np.float32),
        "obj_text_emb": rng.normal(0.0, 1.0, (m, d)).astype(np.float32),
    }


def _unit(v):
    return v / np.sqrt(np.sum(v.astype(np.float64) ** 2))


@pytest.mark.parametrize("empty_local", ["zeros", "global"])
def test_item_formulas_match_row_by_row(empty_local):
    clip = _clip()
    cfg = FeaturesConfig(w1=0.7, w2=1.3, empty_local=empty_local)
    out = compute_features(clip, cfg)
    off = clip["obj_offsets"]
    for i in range(len(off) - 1):
        dg = _unit(clip["image_emb"][i]) - _unit(clip["text_emb"][i])
        objs = range(off[i], off[i + 1])
        if len(objs):
            dl = np.mean(
                [_unit(clip["obj_image_emb"][j]) - _unit(clip["obj_text_emb"][j]) for j in objs],
                axis=0,
            )
        else:
            dl = np.zeros_like(dg) if empty_local == "zeros" else dg
        np.testing.assert_allclose(out["D_global"][i], dg, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(out["D_local"][i], dl, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(out["D"][i], 0.7 * dg + 1.3 * dl, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(
            out["tidy"][i], np.abs(clip["image_emb"][i] - clip["text_emb"][i]), rtol=1e-6
        )
    assert list(out["n_objects"]) == [3, 0, 1, 2]
    assert np.isfinite(out["D_local"]).all()


def test_load_features_reads_kind_and_metadata(tmp_path):
    clip = _clip(counts=(1, 2, 0, 1))
    feats = compute_features(clip, FeaturesConfig())
    meta = {
        "ids": np.array(list("abcd"), dtype=object),
        "label": np.array([0, 1, 1, 0], np.int8),
        "generator": np.array(["real", "g1", "g2", "real"], dtype=object),
        "split": np.array(["train", "train", "test", "val"], dtype=object),
        "family": np.array(["real", "f", "f", "real"], dtype=object),
        "subset": np.array(["a", "a", "b", "b"], dtype=object),
    }
    store.write_shard(tmp_path / store.shard_name(0), {**meta, **feats}, {})
    fs = load_features(tmp_path, "image_text")
    assert fs.X.shape == (4, 16)
    np.testing.assert_allclose(fs.X[:, :8], feats["image"])
    np.testing.assert_allclose(fs.X[:, 8:], feats["text"])
    train = load_features(tmp_path, "item", splits=("train",))
    assert list(train.ids) == ["a", "b"] and list(train.y) == [0, 1]
    assert list(train.subset) == ["a", "a"]
    np.testing.assert_allclose(train.X, feats["D"][:2])
    with pytest.raises(ValueError, match="unknown feature kind"):
        load_features(tmp_path, "nope")
    assert "item" in KINDS and "tidy" in KINDS
