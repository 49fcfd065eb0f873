"""End to end on a copy of a few shipped images with the tiny preset: every stage, the shard
contract, metrics, and incremental reruns."""

import csv
import hashlib
import json
import shutil
import time

import numpy as np
import pytest
import yaml
from PIL import Image

from pipeline.rows import store
from stages import caption, encode, evaluate, features, ingest, train
from tests.helpers import ROOT, extract_stages, pipeline_params, tiny_sample


def _train_evaluate(work, cache, params):
    """train and evaluate on `cache/features`, into `work` (models, metrics, plots, scores)."""
    features_dir = f"{cache}/features"
    assert (
        train.main(["--params", params, "--features", features_dir, "--out", f"{work}/models"]) == 0
    )
    evaluate_args = [
        *("--params", params, "--features", features_dir, "--heads", f"{work}/models"),
        *("--metrics", f"{work}/metrics/eval.json", "--scores", f"{work}/scores"),
        *("--plots", f"{work}/plots"),
    ]
    assert evaluate.main(evaluate_args) == 0


def _run_all(work, data, params):
    """Every stage on `data`, the extraction into `work/cache`; returns the cache."""
    cache = work / "cache"
    assert extract_stages(cache, data, params) == 0
    _train_evaluate(work, cache, params)
    return cache


def _all(directory, keys=None):
    return store.concat_rows([store.read_shard(p, keys) for p in store.list_shards(directory)])


@pytest.fixture(scope="module")
def run(tiny_extraction, tmp_path_factory):
    """The shared tiny extraction, and heads trained and evaluated on it in a folder of this
    module's (`work`: models, metrics, plots, scores)."""
    work = tmp_path_factory.mktemp("e2e")
    data, params, cache = tiny_extraction.data, tiny_extraction.params, tiny_extraction.cache
    _train_evaluate(work, cache, params)
    return work, data, params, cache


def test_shards_follow_the_contract(run):
    work, data, _, cache = run
    manifest = {r["file"]: r for r in csv.DictReader((data / "manifest.csv").open())}
    ing = _all(cache / "ingest")
    for rel, cid in zip(ing["path"], ing["ids"]):
        assert hashlib.sha256((data / rel).read_bytes()).hexdigest() == cid
    assert len(ing["ids"]) == len(manifest)
    for stage in ("captions", "objects", "clip", "features"):
        store.check_aligned(cache / stage, cache / "ingest")
        attrs = store.read_attrs(store.list_shards(cache / stage)[0])
        assert attrs["schema_version"] == 1 and attrs["preset"] == "tiny" and attrs["params_hash"]
    caps = _all(cache / "captions")
    assert all(c.strip() for c in caps["caption"])
    # caption.source: blip2 (the default) captions every image with the model, as ITEM does.
    assert set(caps["caption_source"]) == {"tiny-blip2"}
    provenance = json.loads((cache / "captions" / "provenance.json").read_text())
    n_real = sum(r["generator"] == "real" for r in manifest.values())
    assert provenance["real"] == {"tiny-blip2": n_real}
    assert provenance["generated"] == {"tiny-blip2": len(manifest) - n_real}
    assert not provenance["class_correlated"]
    metrics = json.loads((work / "metrics" / "eval.json").read_text())
    for block in metrics.values():
        assert block["caption_provenance"]["class_correlated"] is False
        assert set(block["caption_provenance"]["real"]) == {"tiny-blip2"}


def test_objects_are_well_formed(run):
    _, data, _, cache = run
    ing = _all(cache / "ingest")
    objs = _all(cache / "objects")
    off = objs["obj_offsets"]
    assert off[0] == 0 and np.all(np.diff(off) >= 0) and off[-1] == len(objs["obj_boxes"])
    assert off[-1] > 0
    for i in range(len(ing["ids"])):
        boxes = objs["obj_boxes"][off[i] : off[i + 1]]
        w, h = Image.open(data / ing["path"][i]).size
        assert np.all(boxes[:, 0] >= 0) and np.all(boxes[:, 2] <= w)
        assert np.all(boxes[:, 1] >= 0) and np.all(boxes[:, 3] <= h)
        assert np.all(boxes[:, 0] <= boxes[:, 2]) and np.all(boxes[:, 1] <= boxes[:, 3])


def test_features_equal_recomputation_from_stored_embeddings(run):
    cache = run[3]
    clip, feats = _all(cache / "clip"), _all(cache / "features")

    def unit(x):
        return x / np.linalg.norm(x, axis=-1, keepdims=True)

    np.testing.assert_allclose(
        feats["D_global"], unit(clip["image_emb"]) - unit(clip["text_emb"]), atol=1e-6
    )
    off = clip["obj_offsets"]
    local = np.stack(
        [
            (unit(clip["obj_image_emb"][a:b]) - unit(clip["obj_text_emb"][a:b])).mean(0)
            if b > a
            else np.zeros(clip["image_emb"].shape[1])
            for a, b in zip(off[:-1], off[1:])
        ]
    )
    np.testing.assert_allclose(feats["D_local"], local, atol=1e-6)
    np.testing.assert_allclose(feats["D"], feats["D_global"] + feats["D_local"], atol=1e-6)
    assert list(feats["n_objects"]) == list(np.diff(off))
    # per-object explanations: 1 - cos(crop, phrase) of every grounded object, ragged alike
    np.testing.assert_array_equal(feats["obj_offsets"], off)
    cosine = np.array(
        [
            float(np.dot(a, b) / (np.linalg.norm(a) * np.linalg.norm(b)))
            for a, b in zip(clip["obj_image_emb"], clip["obj_text_emb"])
        ]
    )
    assert len(feats["obj_misalign"]) == off[-1] > 0
    np.testing.assert_allclose(feats["obj_misalign"], 1.0 - cosine, atol=1e-5)


def test_metrics_cover_every_head_and_test_generator(run):
    work, _, _, cache = run
    metrics = json.loads((work / "metrics" / "eval.json").read_text())
    configured = yaml.safe_load((ROOT / "params.yaml").read_text())["train"]["heads"]
    assert set(metrics) == set(configured) and {"mlp", "svm", "multitask"} <= set(metrics)
    for key in ("f1", "f1_macro", "f1_weighted"):  # CT2's metrics for the multi-task head
        assert 0.0 <= metrics["multitask"]["overall"][key] <= 1.0
    feats = _all(cache / "features", ["ids", "label", "generator", "split"])
    test_gens = {
        g
        for g, s, y in zip(feats["generator"], feats["split"], feats["label"])
        if s == "test" and y == 1
    }
    n_test = int(np.sum(feats["split"] == "test"))
    for head in metrics.values():
        assert set(head["per_generator"]) == test_gens
        assert head["overall"]["n"] == n_test
        for key in ("acc", "r_acc", "f_acc", "ap", "auc"):
            assert 0.0 <= head["overall"][key] <= 1.0
    rows = list(csv.DictReader((work / "scores" / "mlp.csv").open()))
    assert len(rows) == n_test and {r["split"] for r in rows} == {"test"}
    assert (work / "plots" / "roc" / "mlp.csv").exists()


def test_new_images_are_the_only_work_of_a_rerun(run, tmp_path):
    work, data, params, cache = run
    data2, cache2 = tmp_path / "data", tmp_path / "cache"
    shutil.copytree(data, data2)
    shutil.copytree(cache, cache2)
    rows = list(csv.DictReader((data2 / "manifest.csv").open()))
    src = list(csv.DictReader((ROOT / "data" / "sample" / "manifest.csv").open()))
    have = {r["file"] for r in rows}
    new = [r for r in src if r["file"] not in have][:3]
    for r in new:
        (data2 / r["file"]).write_bytes((ROOT / "data" / "sample" / r["file"]).read_bytes())
    with (data2 / "manifest.csv").open("w", newline="") as fh:
        writer = csv.DictWriter(fh, list(rows[0]))
        writer.writeheader()
        writer.writerows(rows + new)
    before = {s: _all(cache2 / s) for s in ("captions", "objects", "clip")}
    _run_all(tmp_path, data2, params)
    for stage in ("captions", "objects", "clip"):
        timings = json.loads((cache2 / "timings" / f"{stage}.json").read_text())
        assert timings["n_processed"] == 3, stage
        after = _all(cache2 / stage)
        where = {cid: i for i, cid in enumerate(after["ids"])}
        old = store.take_rows(after, [where[c] for c in before[stage]["ids"]])
        for key, value in before[stage].items():
            np.testing.assert_array_equal(old[key], value)


def test_broken_files_are_quarantined_and_the_run_completes(tiny_extraction, tmp_path):
    # The shared extraction's images and rows, copied: only the broken files are new.
    data = tmp_path / "data"
    shutil.copytree(tiny_extraction.data, data)
    shutil.copytree(tiny_extraction.cache, tmp_path / "cache")
    rows = list(csv.DictReader((data / "manifest.csv").open()))
    (data / "images" / "zero.jpg").write_bytes(b"")
    jpg = next(r["file"] for r in rows if r["file"].endswith(".jpg"))
    blob = (data / jpg).read_bytes()
    (data / "images" / "cut.jpg").write_bytes(blob[: len(blob) // 3])
    (data / "images" / "notes.png").write_text("not an image")
    extra = [
        dict(rows[-1], file=f"images/{n}", sha256="") for n in ("zero.jpg", "cut.jpg", "notes.png")
    ]
    with (data / "manifest.csv").open("w", newline="") as fh:
        writer = csv.DictWriter(fh, list(rows[0]))
        writer.writeheader()
        writer.writerows(rows + extra)
    cache = _run_all(tmp_path, data, tiny_extraction.params)
    reasons = {
        r["path"]: r["reason"] for r in csv.DictReader((cache / "ingest" / "quarantine.csv").open())
    }
    assert set(reasons) == {"images/zero.jpg", "images/cut.jpg", "images/notes.png"}
    assert "empty" in reasons["images/zero.jpg"] and "truncated" in reasons["images/cut.jpg"]
    assert "not an image" in reasons["images/notes.png"]
    assert (tmp_path / "metrics" / "eval.json").exists()


def test_user_errors_exit_1_with_a_message(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    bad = tmp_path / "params.yaml"
    bad.write_text(yaml.safe_dump({"encode": {"batchsize": 2}}))
    assert ingest.main(["--params", str(bad), "--data", "x", "--out", "y", "--name", "t"]) == 1
    assert "encode.batchsize" in capsys.readouterr().err
    params = pipeline_params(tmp_path, **{"models.preset": "paper"})
    data = tiny_sample(tmp_path / "data", per_generator=1, n_real=4)
    assert (
        ingest.main(
            ["--params", params, "--data", str(data), "--out", f"{tmp_path}/i", "--name", "t"]
        )
        == 0
    )
    common = ["--params", params, "--ingest", f"{tmp_path}/i", "--name", "t"]
    start = time.perf_counter()
    assert caption.main([*common, "--out", f"{tmp_path}/captions"]) == 1
    assert time.perf_counter() - start < 30
    err = capsys.readouterr().err
    for name in ("ViT-L-14/openai", "Salesforce/blip2-opt-2.7b", "grounding-dino-base"):
        assert name in err
    assert "models.preset=tiny" in err
    assert not store.list_shards(tmp_path / "captions")
    args = [*common, "--captions", "c", "--objects", "o", "--out", f"{tmp_path}/clip"]
    assert encode.main(args) == 1
    assert "ViT-L-14/openai" in capsys.readouterr().err
    assert not store.list_shards(tmp_path / "clip")


def test_predict_writes_the_documented_columns_and_reuses_the_cache(run, tmp_path, capsys, caplog):
    from pipeline.cli import main as cli

    work, data, params, _ = run
    images = sorted((data / "images").iterdir())[:3]
    out, cache = tmp_path / "pred.csv", tmp_path / "pcache"
    args = [
        "predict",
        "--head",
        str(work / "models" / "multitask"),
        "--out",
        str(out),
        "--params",
        params,
        "--cache",
        str(cache),
        *map(str, images),
    ]
    assert cli(args) == 0
    rows = list(csv.DictReader(out.open()))
    assert list(rows[0]) == [
        "path",
        "id",
        "p_generated",
        "decision",
        "generator",
        "caption",
        "top_object",
        "top_object_misalign",
        "preset",
        "models",
        "head",
    ]
    # the most misaligned object, recomputed from the predict cache's embeddings and phrases
    clip, objs = _all(cache / "clip"), _all(cache / "objects")
    top = {}
    for i, cid in enumerate(clip["ids"]):
        a, b = clip["obj_offsets"][i], clip["obj_offsets"][i + 1]
        if b == a:
            top[str(cid)] = ("", "")
            continue
        x, t = clip["obj_image_emb"][a:b], clip["obj_text_emb"][a:b]
        cos = (x * t).sum(1) / (np.linalg.norm(x, axis=1) * np.linalg.norm(t, axis=1))
        k = int(np.argmax(1.0 - cos))
        top[str(cid)] = (str(objs["obj_phrase"][a + k]), 1.0 - cos[k])
    assert any(phrase for phrase, _ in top.values())
    for r in rows:
        phrase, score = top[r["id"]]
        assert r["top_object"] == phrase
        if phrase:
            assert abs(float(r["top_object_misalign"]) - score) < 1e-4
        else:
            assert r["top_object_misalign"] == ""
    assert {r["preset"] for r in rows} == {"tiny"}
    assert "clip=tiny-clip" in rows[0]["models"] and rows[0]["head"].endswith("multitask")
    assert "RANDOM models" in caplog.text  # a tiny head says so when it predicts
    assert [r["path"] for r in rows] == [str(p) for p in images]
    for r, p in zip(rows, images):
        assert r["id"] == hashlib.sha256(p.read_bytes()).hexdigest()
        assert 0.0 <= float(r["p_generated"]) <= 1.0 and r["decision"] in ("real", "generated")
        assert r["caption"]
        # multitask: a generator is named exactly when the head attributes the image to one
        assert r["generator"] != "real"
    assert cli(args) == 0  # second time: everything comes from the cache
    timings = json.loads((cache / "timings" / "clip.json").read_text())
    assert timings["n_processed"] == 0 and timings["n_reused"] == 3
    assert (
        cli(
            [
                "predict",
                "--head",
                str(work / "models" / "mlp"),
                "--out",
                str(out),
                "--params",
                params,
                str(tmp_path / "nope.png"),
            ]
        )
        == 1
    )
    assert "does not exist" in capsys.readouterr().err
    misspelt = [*args[:2], str(work / "models" / "mlpp"), *args[3:]]
    assert cli(misspelt) == 1
    err = capsys.readouterr().err
    assert "not a trained head" in err and str(work / "models" / "mlp") in err


def test_every_output_names_the_preset_and_the_models(run):
    work, _, _, cache = run
    metrics = json.loads((work / "metrics" / "eval.json").read_text())
    for head, block in metrics.items():
        assert block["preset"] == "tiny", head
        assert block["models"]["clip"] == "tiny-clip"
        assert block["models"]["captioner"] == "tiny-blip2"  # the sample lacks some captions
        for name in ("train.json", "head.json"):
            record = json.loads((work / "models" / head / name).read_text())
            record = record.get("provenance", record)
            assert record["preset"] == "tiny" and record["models"] == block["models"]
        rows = list(csv.DictReader((work / "scores" / f"{head}.csv").open()))
        assert {r["preset"] for r in rows} == {"tiny"}
        assert {r["models"] for r in rows} == {
            ";".join(f"{k}={v}" for k, v in sorted(block["models"].items()))
        }


def test_info_describes_shards(run, capsys):
    from pipeline.cli import main as cli

    cache = run[3]
    assert cli(["info", str(cache / "clip")]) == 0
    out = capsys.readouterr().out
    for word in ("schema_version", "image_emb", "obj_offsets", "preset = tiny", "shards"):
        assert word in out
    assert cli(["info", str(cache / "nope")]) == 1
    err = capsys.readouterr().err
    assert f"{cache / 'nope'} does not exist" in err and "stage folder" in err


def test_optional_encoders_give_their_feature_kinds(run, tmp_path):
    """BERT caption features (CT2), DINOv2 and colour histograms (seed 003) as feature kinds."""
    from pipeline.features import load_features

    work, _, _, cache = run
    params = pipeline_params(
        tmp_path,
        **{
            "encode.bert": True,
            "encode.dinov2": True,
            "encode.color_bins": 8,
            "encode.clip_pooled": True,
        },
    )
    common = ["--params", params, "--name", "t"]
    assert (
        encode.main(
            [
                "--ingest",
                f"{cache}/ingest",
                "--captions",
                f"{cache}/captions",
                "--objects",
                f"{cache}/objects",
                "--out",
                f"{tmp_path}/clip",
            ]
            + common
        )
        == 0
    )
    assert (
        features.main(
            [
                "--ingest",
                f"{cache}/ingest",
                "--clip",
                f"{tmp_path}/clip",
                "--out",
                f"{tmp_path}/features",
            ]
            + common
        )
        == 0
    )
    n = len(_all(cache / "ingest", ["ids"])["ids"])
    image = load_features(tmp_path / "features", "image").X
    for kind in (
        "bert_image",
        "dinov2",
        "color",
        "image_color",
        "image_dinov2",
        "image_pooled",
        "bert_image_pooled",
    ):
        X = load_features(tmp_path / "features", kind).X
        assert X.shape[0] == n and np.isfinite(X).all(), kind
    color = load_features(tmp_path / "features", "color").X
    assert color.shape[1] == 9 * 8
    np.testing.assert_allclose(color.reshape(n, 9, 8).sum(-1), 1.0, atol=1e-5)
    np.testing.assert_allclose(
        load_features(tmp_path / "features", "image_color").X[:, : image.shape[1]], image
    )


def test_predict_refuses_features_made_otherwise_than_the_heads(run, tmp_path, capsys):
    from pipeline.cli import main as cli

    work, data, _, _ = run
    info = json.loads((work / "models" / "mlp" / "train.json").read_text())
    assert info["feature_settings"]["provenance"]["clip"]["dtype"] == "float32"
    other = pipeline_params(tmp_path, **{"base.dtype": "bfloat16"})
    image = sorted((data / "images").iterdir())[0]
    args = ["predict", "--head", str(work / "models" / "mlp"), "--out", str(tmp_path / "p.csv")]
    args += ["--params", other, "--cache", str(tmp_path / "pcache"), str(image)]
    assert cli(args) == 1
    err = capsys.readouterr().err
    assert "clip.dtype: trained with 'float32', these features 'bfloat16'" in err
    assert "captions.dtype" in err and "objects.dtype" in err
    assert not (tmp_path / "p.csv").exists()
    # Refused from the params, before any image was ingested or any model run.
    assert not (tmp_path / "pcache").exists()


def test_planned_settings_are_what_extraction_records(run):
    """The settings predict checks before extracting are those the extraction then records
    (the trained head's features were made by the run's own params)."""
    from pipeline.config import load_params
    from pipeline.evalsets import planned_settings

    work, _, params, _ = run
    info = json.loads((work / "models" / "mlp" / "train.json").read_text())
    assert planned_settings(load_params(params)) == info["feature_settings"]
