"""The extracting studies on the shipped sample with the tiny preset: `captioners` recomputes
captions and everything after them for each captioner and nothing before, `clip_arch` only the
embeddings and features; the params' own setting reuses the main pipeline's rows; each cell
equals fitting and scoring that setting's features directly; a rerun extracts and refits
nothing."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from pipeline.cli import main as cli
from pipeline.config import load_params
from pipeline.evalsets import extract_dataset
from pipeline.evaluation.calibration import apply_calibration
from pipeline.evaluation.metrics import binary_metrics, own_decision, p_generated
from pipeline.features import load_features
from pipeline.rows import store
from pipeline.studies import StudyInputs, run_study
from pipeline.train import calibrate_on_val, fit_configured_head
from tests.helpers import tiny_params, tiny_sample

STAGES = ("ingest", "captions", "objects", "clip", "features")


@pytest.fixture(scope="module")
def main_run(tmp_path_factory):
    """The main pipeline's extraction of a few sample images (tiny preset), as DVC runs it."""
    work = tmp_path_factory.mktemp("extraction_studies")
    data = tiny_sample(work / "data", per_generator=1, n_real=12)
    path = tiny_params(work, **{"data.path": str(data)})
    params = load_params(path)
    cache = work / "cache" / params.data.name
    extract_dataset(data, cache, params.data.name, params)
    return work, path, params, cache


def _stamps(cache: Path, stages=STAGES) -> dict[str, tuple[int, int]]:
    """Every file of the main pipeline's stage folders with its size and mtime."""
    return {
        str(p.relative_to(cache)): (p.stat().st_size, p.stat().st_mtime_ns)
        for stage in stages
        for p in sorted((cache / stage).rglob("*"))
        if p.is_file()
    }


def _inputs(params, cache: Path) -> StudyInputs:
    return StudyInputs(
        [cache / "features"],
        params.train,
        head="svm",
        seed=params.base.seed,
        params=params,
        cache_dir=cache,
    )


def _captions(folder: Path) -> dict[str, str]:
    out = {}
    for path in store.list_shards(folder):
        rows = store.read_shard(path, ["ids", "caption"])
        out.update(zip(map(str, rows["ids"]), map(str, rows["caption"])))
    return out


def _cells_equal_direct_fits(table, key: str, folder_of, params) -> None:
    """Every cell equals the svm fitted on that setting's train rows (calibrated on its val
    rows) and scored on the cell's test rows, without the studies package."""
    for setting in table["settings"]:
        features = folder_of(setting) / "features"
        fs = load_features(features, "item", splits=("train", "val", "test"))
        tr, va = fs.where("train"), fs.where("val")
        model, _ = fit_configured_head(
            "svm", params.train, tr, va, kind="item", seed=0, features_dir=features
        )
        cal, _ = calibrate_on_val("svm", params.train, model, va)
        cells = [c for c in table["cells"] if c[key] == setting]
        assert cells and cells[0]["test"] == "all"
        for cell in cells:
            test = fs.where("test")
            if cell["test"] != "all":
                test = test.take((test.y == 0) | (test.generator == cell["test"]))
            p = np.clip(apply_calibration(cal, p_generated(model, test.X)), 0, 1)
            expected = binary_metrics(test.y, p, 0.5, decision=own_decision(model, test.X))
            for metric, value in expected.items():
                assert cell[metric] == pytest.approx(value, abs=1e-12), (setting, cell["test"])


def test_captioners_recompute_captions_and_after_and_nothing_before(main_run, tmp_path):
    work, _, params, cache = main_run
    before = _stamps(cache)
    n = sum(len(store.read_ids(p)) for p in store.list_shards(cache / "ingest"))
    table, path = run_study("captioners", _inputs(params, cache), tmp_path)
    assert _stamps(cache) == before, "the study rewrote a file of the main pipeline"
    assert json.loads(path.read_text())["cells"] == table["cells"]
    folder = cache / "studies" / "captioners"
    ext = table["extraction"]
    assert table["settings"] == ["blip2", "blip", "llava"] == list(ext)

    # params.yaml's captioner (blip2): every row reused from the main cache, no model loaded.
    for stage in ("captions", "objects", "clip"):
        assert ext["blip2"][stage] == {"n_processed": 0, "n_reused": n, "model_loads": {}}
    main_captions = _captions(cache / "captions")
    assert _captions(folder / "blip2" / "captions") == main_captions
    for captioner in ("blip", "llava"):
        own = folder / captioner
        assert sorted(p.name for p in own.iterdir()) == [
            "captions",
            "clip",
            "features",
            "objects",
            "timings",
        ]
        captions = _captions(own / "captions")
        differ = sum(captions[i] != main_captions[i] for i in captions)
        assert differ > 0, f"tiny {captioner} wrote BLIP-2's captions"
        assert ext[captioner]["captions"]["n_processed"] == n
        assert ext[captioner]["captions"]["model_loads"] == {captioner: 1}
        # An image whose caption is unchanged keeps its objects and embeddings.
        for stage in ("objects", "clip"):
            assert ext[captioner][stage]["n_processed"] == differ
            assert ext[captioner][stage]["n_reused"] == n - differ
        assert ext[captioner]["features"]["n_processed"] == n
        for stage in ("captions", "objects", "clip"):
            timings = json.loads((own / "timings" / f"{stage}.json").read_text())
            assert timings["n_processed"] == ext[captioner][stage]["n_processed"]
        attrs = store.dataset_attrs(own / "captions")
        assert f"tiny-{captioner}" in attrs["model"]
    _cells_equal_direct_fits(table, "captioner", lambda s: folder / s, params)
    assert table["cache"]["fitted"] == 3

    # A rerun: every row reused from the study's own folders, no fit made.
    again, _ = run_study("captioners", _inputs(params, cache), tmp_path)
    for setting in again["settings"]:
        for stage in ("captions", "objects", "clip"):
            assert again["extraction"][setting][stage]["n_processed"] == 0
    assert again["cache"]["fitted"] == 0 and again["cache"]["reused"] == 3
    assert again["cells"] == table["cells"]
    assert _stamps(cache) == before

    from pipeline.report.build import build_report

    missing = tmp_path / "none"
    html = build_report(
        tmp_path / "report",
        metrics_dir=tmp_path,
        scores_dir=missing,
        features_dir=cache / "features",
        ingest_dir=missing,
        captions_dir=missing,
        objects_dir=missing,
        n_gallery=0,
    ).read_text()
    assert 'id="study-captioners"' in html and "captioners study: auc per cell" in html
    assert all(f"<td>{c}</td>" in html for c in ("blip2", "blip", "llava"))


def test_clip_arch_recomputes_only_embeddings_and_features(main_run, tmp_path, capsys):
    work, params_path, params, cache = main_run
    assert params.models.clip.id == "ViT-L-14"
    before = _stamps(cache)
    n = sum(len(store.read_ids(p)) for p in store.list_shards(cache / "ingest"))
    table, _ = run_study("clip_arch", _inputs(params, cache), tmp_path)
    assert _stamps(cache) == before, "the study rewrote a file of the main pipeline"
    folder = cache / "studies" / "clip_arch"
    ext = table["extraction"]
    assert table["settings"] == ["RN50", "ViT-B-16", "ViT-L-14"]
    # Rows and class prompts reused from the main pipeline: no CLIP loaded for them.
    assert ext["ViT-L-14"]["clip"] == {"n_processed": 0, "n_reused": n, "model_loads": {}}
    xs = {}
    for arch in table["settings"]:
        own = folder / arch
        assert sorted(p.name for p in own.iterdir()) == ["clip", "features", "timings"]
        assert set(ext[arch]) == {"clip", "features"}
        assert f"misalign-tiny-{arch}/random-seed0" in store.dataset_attrs(own / "clip")["model"]
        xs[arch] = load_features(own / "features", "image_raw").X
        if arch != "ViT-L-14":
            assert ext[arch]["clip"]["n_processed"] == n
            assert ext[arch]["clip"]["model_loads"] == {"clip": 1}
    assert not np.allclose(xs["RN50"], xs["ViT-B-16"])
    assert not np.allclose(xs["ViT-B-16"], xs["ViT-L-14"])
    _cells_equal_direct_fits(table, "arch", lambda s: folder / s, params)

    # The command: the same study, nothing extracted or fitted again.
    argv = ["study", "clip_arch", "--params", params_path, "--cache", str(work / "cache")]
    assert cli([*argv, "--head", "svm", "--out", str(tmp_path / "cli")]) == 0
    out = capsys.readouterr().out
    assert "0 fits made, 3 reused" in out and str(folder) in out
    again = json.loads((tmp_path / "cli" / "study_clip_arch.json").read_text())
    assert again["cells"] == table["cells"]
    assert all(again["extraction"][a]["clip"]["n_processed"] == 0 for a in again["settings"])
    assert _stamps(cache) == before


def test_a_missing_model_stops_the_study_before_any_work(main_run, tmp_path, monkeypatch):
    """Every setting's weights are checked first: with the paper preset and no weights, the
    captioners study stops in the check, naming every missing model once, having written
    nothing."""
    from dataclasses import replace

    from pipeline.models import WeightsMissing

    work, _, params, cache = main_run
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HOME", str(tmp_path))
    paper = replace(params, models=replace(params.models, preset="paper"))
    other = tmp_path / "cache"
    (other / "ingest").mkdir(parents=True)
    for shard in store.list_shards(cache / "ingest"):
        (other / "ingest" / shard.name).symlink_to(shard)
    inputs = StudyInputs([other / "features"], params.train, params=paper, cache_dir=other)
    with pytest.raises(WeightsMissing) as err:
        run_study("captioners", inputs, tmp_path / "metrics")
    message = str(err.value)
    for spec in (paper.models.blip2, paper.models.blip, paper.models.llava, paper.models.grounding):
        assert message.count(spec.id) >= 1, spec.id
    assert message.count(paper.models.grounding.id) == message.count(paper.models.blip.id)
    assert not (other / "studies").exists()
