"""Studies on a synthetic features fixture: every cell equals fitting and scoring that pair
directly with the library; finetune starts from the saved head."""

import json

import numpy as np
import pytest

from pipeline.cli import main
from pipeline.config import ConfigError, TrainConfig
from pipeline.evaluation.calibration import apply_calibration
from pipeline.evaluation.metrics import binary_metrics, own_decision, p_generated
from pipeline.features import load_features
from pipeline.studies import STUDIES, StudyInputs, run_study
from pipeline.train import calibrate_on_val, fit_configured_head
from tests.helpers import GENERATORS, write_features

SVM = TrainConfig(heads=["svm"], svm={"C": 1.0, "C_grid": [0.1, 1.0]})
MLP = TrainConfig(heads=["mlp"], mlp={"hidden": 8, "epochs": 3}, calibration="none")


@pytest.fixture(scope="module")
def features(tmp_path_factory):
    return write_features(tmp_path_factory.mktemp("study") / "features", n=300)


def direct(features, cfg, head, train_mask, test_mask, kind="item"):
    """Fit `head` on the rows of `train_mask` (its train / val splits) and score the test rows
    of `test_mask`, as the train and evaluate stages do, without the studies package."""
    fs = load_features(features, kind)
    tr = fs.take(train_mask(fs) & (fs.split == "train"))
    va = fs.take(train_mask(fs) & (fs.split == "val"))
    te = fs.take(test_mask(fs) & (fs.split == "test"))
    model, _ = fit_configured_head(head, cfg, tr, va, kind=kind, seed=0, features_dir=features)
    cal, _ = calibrate_on_val(head, cfg, model, va)
    p = np.clip(apply_calibration(cal, p_generated(model, te.X)), 0, 1)
    return binary_metrics(te.y, p, 0.5, decision=own_decision(model, te.X))


def of(*gens):
    return lambda fs: (fs.y == 0) | np.isin(fs.generator, gens)


def same(cell, expected):
    for key, value in expected.items():
        assert cell[key] == pytest.approx(value, abs=1e-12), key


def test_train_sets_cells_equal_direct_fits(features, tmp_path):
    inputs = StudyInputs([features], SVM, head="svm")
    table, path = run_study("train_sets", inputs, tmp_path)
    assert path == tmp_path / "study_train_sets.json"
    assert json.loads(path.read_text())["cells"] == table["cells"]
    assert table["groups"] == sorted(GENERATORS)
    pairs = [(c["train"], c["test"]) for c in table["cells"]]
    assert sorted(pairs) == sorted((a, b) for a in GENERATORS for b in GENERATORS)
    for cell in table["cells"]:
        same(cell, direct(features, SVM, "svm", of(cell["train"]), of(cell["test"])))


def test_logo_cells_equal_direct_fits(features, tmp_path):
    table, _ = run_study("logo", StudyInputs([features], SVM, head="svm"), tmp_path)
    assert len(table["cells"]) == len(GENERATORS) ** 2
    for cell in table["cells"]:
        seen = [g for g in GENERATORS if g != cell["held_out"]]
        assert cell["unseen"] == (cell["test"] == cell["held_out"])
        same(cell, direct(features, SVM, "svm", of(*seen), of(cell["test"])))


def test_distances_compare_the_three_kinds(features, tmp_path):
    table, _ = run_study("distances", StudyInputs([features], SVM, head="svm"), tmp_path)
    assert {c["kind"] for c in table["cells"]} == {"item_global", "item_local", "item"}
    for cell in table["cells"]:
        if cell["test"] == "all":
            every = lambda fs: np.ones(len(fs.y), bool)  # noqa: E731
            same(cell, direct(features, SVM, "svm", every, every, kind=cell["kind"]))


def test_finetune_starts_from_the_saved_head(features, tmp_path):
    """Zero fine-tuning epochs: the fine-tuned head is the saved one, cell for cell."""
    inputs = StudyInputs(
        [features], MLP, head="mlp", options={"train": "diffB", "finetune": "ganA", "epochs": 0}
    )
    table, _ = run_study("finetune", inputs, tmp_path)
    assert len(table["cells"]) == len(GENERATORS)
    for cell in table["cells"]:
        assert (cell["train"], cell["finetune"]) == ("diffB", "ganA")
        for key in ("acc", "auc", "ap"):
            assert cell[key] == cell["before"][key]
        same(cell["before"], direct(features, MLP, "mlp", of("diffB"), of(cell["test"])))
    # Some fine-tuning moves the head away from the saved one.
    inputs.options["epochs"] = 5
    moved, _ = run_study("finetune", inputs, tmp_path)
    assert any(
        c["ap"] != c["before"]["ap"] or c["acc"] != c["before"]["acc"] for c in moved["cells"]
    )


def test_finetune_refuses_a_head_without_warm_start(features, tmp_path):
    cfg = TrainConfig(heads=["meta"])
    with pytest.raises(ConfigError, match="cannot fine-tune"):
        run_study("finetune", StudyInputs([features], cfg, head="meta"), tmp_path)


def test_study_command_writes_the_table_and_lists_the_studies(features, tmp_path, capsys):
    assert (
        main(
            [
                "study",
                "train_sets",
                "--features",
                str(features),
                "--head",
                "svm",
                "--out",
                str(tmp_path),
            ]
        )
        == 0
    )
    assert "9 cells" in capsys.readouterr().out
    assert (tmp_path / "study_train_sets.json").is_file()
    # An extracting study without the main pipeline's cache stops at once, saying so.
    assert main(["study", "clip_arch", "--cache", str(tmp_path / "nothing")]) == 1
    err = capsys.readouterr().err
    assert "no ingest shards" in err and "dvc repro" in err
    assert main(["study", "--list"]) == 0
    listed = capsys.readouterr().out
    assert all(name in listed for name in STUDIES)
    assert main(["study", "logo", "--features", str(features), "--by", "dataset"]) == 1


def test_report_has_a_section_per_study(features, tmp_path):
    from pipeline.report.build import build_report

    run_study("train_sets", StudyInputs([features], SVM, head="svm"), tmp_path / "metrics")
    run_study(
        "finetune",
        StudyInputs([features], MLP, head="mlp", options={"train": "ganA", "finetune": "diffB"}),
        tmp_path / "metrics",
    )
    missing = tmp_path / "none"
    path = build_report(
        tmp_path / "report",
        metrics_dir=tmp_path / "metrics",
        scores_dir=missing,
        features_dir=features,
        ingest_dir=missing,
        captions_dir=missing,
        objects_dir=missing,
        n_gallery=0,
    )
    html = path.read_text()
    for name in ("train_sets", "finetune"):
        assert f'id="study-{name}"' in html
        assert f"{name} study: auc per cell" in html
    assert html.count("<tr>") >= 9 + 3


def test_groups_without_train_rows_are_skipped_not_fatal(tmp_path):
    first = load_features(write_features(tmp_path / "a", n=300), "item")
    order = np.argsort([int(i[2:]) for i in first.ids])
    gen, split = first.generator[order], first.split[order].astype(str)
    split = np.where(gen == "diffC", "test", split)  # diffC: test rows only
    feats = write_features(tmp_path / "b", n=300, splits=split)
    table, _ = run_study("train_sets", StudyInputs([feats], SVM, head="svm"), tmp_path)
    assert table["train_groups"] == ["diffB", "ganA"]
    assert table["test_groups"] == sorted(GENERATORS)
    assert table["skipped"] == {"diffC": "train rows lack a class"}
    assert len(table["cells"]) == 2 * 3


def test_train_sets_by_dataset_cells_equal_direct_fits(tmp_path):
    a = write_features(tmp_path / "lsun" / "features", n=120, seed=0)
    b = write_features(tmp_path / "imagenet" / "features", n=120, seed=1)
    table, _ = run_study("train_sets", StudyInputs([a, b], SVM, head="svm", by="dataset"), tmp_path)
    assert table["groups"] == ["imagenet", "lsun"]
    folder = {"lsun": a, "imagenet": b}
    for cell in table["cells"]:
        tr = load_features(folder[cell["train"]], "item")
        te = load_features(folder[cell["test"]], "item").where("test")
        model, _ = fit_configured_head(
            "svm", SVM, tr.where("train"), tr.where("val"), kind="item", seed=0, features_dir=a
        )
        cal, _ = calibrate_on_val("svm", SVM, model, tr.where("val"))
        p = np.clip(apply_calibration(cal, p_generated(model, te.X)), 0, 1)
        same(cell, binary_metrics(te.y, p, 0.5, decision=own_decision(model, te.X)))


def test_a_rerun_refits_no_cell_and_a_head_param_refits_every_cell(features, tmp_path, monkeypatch):
    """The cell cache: the same rows and head settings refit nothing; one changed head param
    refits every cell; --refit refits all; the cached cells equal the fitted ones."""
    import pipeline.studies.base as base

    fits = []
    real_fit = base.fit_configured_head

    def counted(*args, **kwargs):
        fits.append(args[0])
        return real_fit(*args, **kwargs)

    monkeypatch.setattr(base, "fit_configured_head", counted)
    cache = tmp_path / "cache"
    inputs = StudyInputs([features], SVM, head="svm", cache_dir=cache)

    first, _ = run_study("train_sets", inputs, tmp_path / "a")
    assert len(fits) == 3 and first["cache"]["fitted"] == 3
    assert len(list((cache / "studies" / "cells").glob("*.json"))) == 3
    again, _ = run_study("train_sets", inputs, tmp_path / "b")
    assert len(fits) == 3, "a rerun with unchanged rows and head params refitted a cell"
    assert again["cache"] == {**first["cache"], "fitted": 0, "reused": 3}
    assert again["cells"] == first["cells"]
    # Another study on the same rows: its own fits, then none on its rerun.
    run_study("distances", inputs, tmp_path / "c")
    n = len(fits)
    run_study("distances", inputs, tmp_path / "c")
    assert len(fits) == n

    other = StudyInputs(
        [features],
        TrainConfig(heads=["svm"], svm={"C": 1.0, "C_grid": [0.1, 1.0, 10.0]}),
        head="svm",
        cache_dir=cache,
    )
    changed, _ = run_study("train_sets", other, tmp_path / "d")
    assert len(fits) == n + 3 and changed["cache"]["reused"] == 0
    run_study("train_sets", other, tmp_path / "d")
    assert len(fits) == n + 3
    forced = StudyInputs([features], SVM, head="svm", cache_dir=cache, refit=True)
    refit, _ = run_study("train_sets", forced, tmp_path / "e")
    assert len(fits) == n + 6 and refit["cells"] == first["cells"]


def test_a_changed_feature_row_refits_only_the_fit_that_uses_it(tmp_path):
    """One ganA train row changes: only the fit trained on ganA is made again."""
    from pipeline.rows import store

    feats = write_features(tmp_path / "data" / "features", n=300)
    inputs = StudyInputs([feats], SVM, head="svm")
    first, _ = run_study("train_sets", inputs, tmp_path)
    assert first["cache"]["folder"] == str(tmp_path / "data" / "studies" / "cells")
    shard = store.list_shards(feats)[0]
    data, attrs = store.read_shard(shard), store.read_attrs(shard)
    at = next(
        i
        for i, (g, s) in enumerate(zip(data["generator"], data["split"]))
        if g == "ganA" and s == "train"
    )
    for values in data.values():
        if values.dtype.kind == "f" and len(values) == len(data["ids"]):
            values[at] += 1.0
    attrs = {k: v for k, v in attrs.items() if k != store.CHECKSUMS}
    store.write_shard(shard, data, attrs)
    again, _ = run_study("train_sets", inputs, tmp_path)
    assert again["cache"]["fitted"] == 1 and again["cache"]["reused"] == 2
    changed = [c for c in again["cells"] if c not in first["cells"]]
    assert {c["train"] for c in changed} <= {"ganA"}
