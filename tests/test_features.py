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
            out["tidy_global"][i], np.abs(clip["image_emb"][i] - clip["text_emb"][i]), rtol=1e-6
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


def _write_shards(root, clip, n):
    meta = {
        "ids": np.array([f"im{i}" for i in range(n)], dtype=object),
        "label": np.array([i % 2 for i in range(n)], np.int8),
        "generator": np.array(["real" if i % 2 == 0 else "g" for i in range(n)], dtype=object),
        "split": np.array(["train"] * n, dtype=object),
        "family": np.array(["real" if i % 2 == 0 else "g" for i in range(n)], dtype=object),
        "subset": np.array([""] * n, dtype=object),
    }
    store.write_shard(root / "ingest" / store.shard_name(0), meta, {})
    store.write_shard(root / "clip" / store.shard_name(0), {"ids": meta["ids"], **clip}, {})


@pytest.mark.parametrize("empty_local", ["zeros", "global"])
def test_tidy_is_tidys_global_plus_local_distance_from_the_shards(tmp_path, empty_local):
    """TIDY's eqs. 3-6 by hand, row by row, from the encode shard as written: D_g = |I - T|,
    D_l = mean over the image's objects of |I_i - T_i| (raw embeddings), D = w1 D_g + w2 D_l;
    the global-only ablation is kind tidy_global."""
    from pipeline.features import run_features

    counts = (3, 0, 1, 2, 5)
    _write_shards(tmp_path, _clip(seed=7, counts=counts), len(counts))
    cfg = FeaturesConfig(kind="tidy", w1=0.6, w2=1.7, empty_local=empty_local)
    run_features(tmp_path / "ingest", tmp_path / "clip", tmp_path / "features", cfg, "t")
    got = load_features(tmp_path / "features", "tidy").X
    got_global = load_features(tmp_path / "features", "tidy_global").X
    shard = store.read_shard(tmp_path / "clip" / store.shard_name(0))
    off = shard["obj_offsets"]
    for i in range(len(counts)):
        img = shard["image_emb"][i].astype(np.float64)
        txt = shard["text_emb"][i].astype(np.float64)
        d_g = [abs(a - b) for a, b in zip(img, txt)]
        objs = list(range(off[i], off[i + 1]))
        d_l = [0.0] * len(d_g) if empty_local == "zeros" else d_g
        if objs:
            d_l = [
                sum(
                    abs(float(shard["obj_image_emb"][j][k]) - float(shard["obj_text_emb"][j][k]))
                    for j in objs
                )
                / len(objs)
                for k in range(len(d_g))
            ]
        expected = [0.6 * g + 1.7 * loc for g, loc in zip(d_g, d_l)]
        np.testing.assert_allclose(got[i], expected, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(got_global[i], d_g, rtol=1e-6)
    # The local term really counts: with objects, tidy is not the global ablation scaled.
    assert not np.allclose(got[0], 0.6 * got_global[0], atol=1e-3)


def test_image_raw_is_the_unnormalised_clip_image_embedding():
    clip = _clip()
    out = compute_features(clip, FeaturesConfig())
    np.testing.assert_array_equal(out["image_raw"], clip["image_emb"])
    assert KINDS["image_raw"] == ("image_raw",) and KINDS["tidy_global"] == ("tidy_global",)
