"""Per-generator blocks as UniversalFakeDetect and ITEM score them: each test folder on its
own real and fake images, and the unweighted mean over folders."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import accuracy_score, average_precision_score

from pipeline.config import BaseConfig, EvaluateConfig, FeaturesConfig, IngestConfig, TrainConfig
from pipeline.data.ingest import run_ingest
from pipeline.evaluation.evaluate import run_evaluate
from pipeline.evaluation.metrics import Scores, evaluate_scores
from pipeline.features import run_features
from pipeline.rows import store
from pipeline.train import train_heads
from tests.helpers import make_image


def ufd_calculate_acc(y_true, y_pred, thres):
    """UniversalFakeDetect's validate.py, verbatim in substance."""
    r_acc = accuracy_score(y_true[y_true == 0], y_pred[y_true == 0] > thres)
    f_acc = accuracy_score(y_true[y_true == 1], y_pred[y_true == 1] > thres)
    acc = accuracy_score(y_true, y_pred > thres)
    return r_acc, f_acc, acc


def _cnndetection(root, n=20):
    seed = 0
    for folder in ("biggan", "stylegan"):
        for cls in ("0_real", "1_fake"):
            for k in range(n):
                make_image(root / folder / cls / f"{k}.png", seed, (20, 18))
                seed += 1
    return root


def _fake_encode(ingest_dir, clip_dir, d=8):
    """Encode-stage shards aligned with the ingest shards: a label signal that differs per
    folder (so the folders' blocks differ), noise, no grounded objects."""
    rng = np.random.default_rng(0)
    for path in store.list_shards(ingest_dir):
        rows = store.read_shard(path, ["ids", "label", "subset"])
        n = len(rows["ids"])
        strength = np.where(rows["subset"] == "biggan", 3.0, 0.5)
        image = rng.normal(0, 1, (n, d))
        image[:, 0] += strength * (2 * rows["label"] - 1)
        store.write_shard(
            clip_dir / path.name,
            {
                "ids": rows["ids"],
                "image_emb": image.astype(np.float32),
                "text_emb": rng.normal(0, 1, (n, d)).astype(np.float32) - 1.0,
                "obj_offsets": np.zeros(n + 1, np.int64),
                "obj_image_emb": np.zeros((0, d), np.float32),
                "obj_text_emb": np.zeros((0, d), np.float32),
            },
            {"stage": "clip"},
        )


def test_cnndetection_blocks_equal_ufd_on_each_folder(tmp_path):
    root = _cnndetection(tmp_path / "data")
    cache = tmp_path / "cache"
    run_ingest(
        root,
        cache / "ingest",
        cfg=IngestConfig(),
        base=BaseConfig(),
        dataset="cnn",
        layout="cnndetection",
    )
    manifest = pd.read_csv(cache / "ingest" / "manifest.csv", keep_default_na=False)
    assert set(manifest["subset"]) == {"biggan", "stylegan"}
    assert set(manifest.loc[manifest.label == 0, "generator"]) == {"real"}
    # Every folder keeps real and generated test images of its own.
    test = manifest[manifest.split == "test"]
    assert test.groupby(["subset", "label"]).size().min() >= 2

    _fake_encode(cache / "ingest", cache / "clip")
    run_features(cache / "ingest", cache / "clip", cache / "features", FeaturesConfig(), "cnn")
    train_heads(
        cache / "features",
        tmp_path / "models",
        cfg=TrainConfig(heads=["mlp", "svm"]),
        kind="item",
        seed=0,
    )
    run_evaluate(
        cache / "features",
        tmp_path / "models",
        tmp_path / "eval.json",
        cache / "scores",
        tmp_path / "plots",
        cfg=EvaluateConfig(),
    )
    written = json.loads((tmp_path / "eval.json").read_text())
    for head in ("mlp", "svm"):
        scores = pd.read_csv(cache / "scores" / f"{head}.csv", keep_default_na=False)
        assert len(scores) == len(test)
        blocks = written[head]["per_generator"]
        assert set(blocks) == {"biggan", "stylegan"}
        for folder, block in blocks.items():
            own = scores[scores.subset == folder]
            y, p = own["label"].to_numpy(), own["p_generated"].to_numpy()
            r_acc, f_acc, acc = ufd_calculate_acc(y, p, 0.5)
            assert block["reals"] == "own"
            assert block["n"] == len(own) and block["n_real"] == int((y == 0).sum())
            assert block["acc"] == pytest.approx(acc, abs=1e-6)
            assert block["r_acc"] == pytest.approx(r_acc, abs=1e-6)
            assert block["f_acc"] == pytest.approx(f_acc, abs=1e-6)
            assert block["ap"] == pytest.approx(average_precision_score(y, p), abs=1e-6)
        mean = written[head]["mean"]
        assert mean["n_blocks"] == 2
        for key in ("acc", "ap", "r_acc", "f_acc"):
            assert mean[key] == pytest.approx(np.mean([b[key] for b in blocks.values()]), abs=2e-6)
    # The folders really are scored apart: their blocks differ.
    blocks = written["mlp"]["per_generator"]
    assert blocks["biggan"]["ap"] > blocks["stylegan"]["ap"], blocks


def test_shared_reals_score_every_real_and_say_so():
    # A manifest without subsets (or Synthbuster's separate real folder): reals are shared.
    label = np.array([0, 0, 0, 1, 1, 1, 1])
    p = np.array([0.1, 0.6, 0.2, 0.9, 0.4, 0.8, 0.7])
    gen = np.array(["real", "real", "real", "a", "a", "b", "b"])
    for subset in (None, np.array(["raise"] * 3 + ["a", "a", "b", "b"])):
        out = evaluate_scores(Scores(list("abcdefg"), label, gen, ["test"] * 7, p, subset=subset))
        for g in ("a", "b"):
            block = out["per_generator"][g]
            assert block["reals"] == "all" and block["n_real"] == 3 and block["n"] == 5
    # Mixed: folder "a" has its own reals, folder "b" has none, so "b" falls back to all.
    subset = np.array(["a", "a", "x", "a", "a", "b", "b"])
    out = evaluate_scores(Scores(list("abcdefg"), label, gen, ["test"] * 7, p, subset=subset))
    assert out["per_generator"]["a"]["reals"] == "own"
    assert out["per_generator"]["a"]["n_real"] == 2
    assert out["per_generator"]["b"]["reals"] == "all"
    assert out["per_generator"]["b"]["n_real"] == 3
    assert out["mean"]["acc"] == pytest.approx(
        (out["per_generator"]["a"]["acc"] + out["per_generator"]["b"]["acc"]) / 2
    )


def test_dataset_captions_on_the_sample_are_flagged_as_a_shortcut(tmp_path, caplog):
    """dataset_else_blip2 on the shipped sample: human COCO captions for most real photos,
    prompts or model captions for generated images. The caption stage counts it per class and
    warns loudly."""
    import logging

    import yaml

    from stages import caption, ingest
    from tests.helpers import ROOT, tiny_sample

    data = tiny_sample(tmp_path / "data", per_generator=1, n_real=14)
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    assert params["caption"]["source"] == "blip2"  # the default has no shortcut
    params["models"]["preset"] = "tiny"
    params["caption"]["source"] = "dataset_else_blip2"
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    common = ["--params", str(tmp_path / "params.yaml"), "--name", "s"]
    c = tmp_path / "cache"
    assert ingest.main(["--data", str(data), "--out", f"{c}/ingest", *common]) == 0
    with caplog.at_level(logging.INFO):
        assert caption.main(["--ingest", f"{c}/ingest", "--out", f"{c}/captions", *common]) == 0
    provenance = json.loads((c / "captions" / "provenance.json").read_text())
    assert provenance["class_correlated"] and provenance["max_gap"] > 0.1
    assert provenance["real"]["dataset"] > provenance["real"].get("tiny-blip2", 0)
    assert provenance["generated"].get("tiny-blip2", 0) > 0
    warning = [r.getMessage() for r in caplog.records if "CAPTION SHORTCUT" in r.getMessage()]
    # Readable counts and a two-decimal gap, not dict and float reprs.
    gap = f"largest share gap {provenance['max_gap']:.2f} > "
    assert len(warning) == 1 and gap in warning[0] and "{" not in warning[0], warning
    assert f"real: dataset {provenance['real']['dataset']}" in warning[0]
