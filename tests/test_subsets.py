"""Balanced, seeded subsets per folder and class, as UniversalFakeDetect's validate.py draws
them (issue 19, item 2)."""

import csv
import os
import random
from pathlib import Path

import yaml

import pipeline.evalsets
from pipeline.config import BaseConfig, IngestConfig
from pipeline.data.ingest import run_ingest
from stages import evalset
from tests.helpers import ROOT, make_image


def _ufd_read_path(folder: Path, max_sample: int, seed: int) -> set[str]:
    """UFD's `RealFakeDataset.read_path` in wang2020 mode after its `set_seed()`, written here
    from its definition: list the folder's files whose path holds 0_real / 1_fake, seed
    Python's random, shuffle the real list, then the fake list, keep the first max_sample of
    each. UFD lists files in os.walk's order, which is the file system's; sorted here (the
    order `balanced_subset` shuffles), so that both start from the same list."""

    def listing(must_contain: str) -> list[str]:
        out = []
        for r, _, files in os.walk(folder):
            for f in files:
                if f.split(".")[1] in ("png", "jpg", "JPEG", "jpeg", "bmp"):
                    if must_contain in os.path.join(r, f):
                        out.append(os.path.join(r, f))
        return sorted(out)

    real_list, fake_list = listing("0_real"), listing("1_fake")
    assert max_sample <= len(real_list) and max_sample <= len(fake_list)
    random.seed(seed)
    random.shuffle(real_list)
    random.shuffle(fake_list)
    return set(real_list[:max_sample]) | set(fake_list[:max_sample])


def _ufd_test(root: Path) -> Path:
    """Two UFD test folders: progan with object classes, 3 real : 1 fake; guided, 1 : 3."""
    seed = iter(range(1000))
    for cls in ("airplane", "cat"):
        for k in range(12):
            make_image(root / "progan" / cls / "0_real" / f"r{k:02d}.png", next(seed), (24, 20))
        for k in range(4):
            make_image(root / "progan" / cls / "1_fake" / f"f{k:02d}.png", next(seed), (24, 20))
    for k in range(8):
        make_image(root / "guided" / "0_real" / f"r{k:02d}.png", next(seed), (24, 20))
    for k in range(24):
        make_image(root / "guided" / "1_fake" / f"f{k:02d}.png", next(seed), (24, 20))
    return root


def _params(tmp: Path, max_per_class: int) -> str:
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["models"]["preset"] = "tiny"
    params["evaluate"]["max_per_class"] = max_per_class
    path = tmp / "params.yaml"
    path.write_text(yaml.safe_dump(params))
    return str(path)


def _ingested(cache: Path, root: Path) -> set[str]:
    with (cache / "ingest" / "manifest.csv").open() as fh:
        return {str(root / r["path"]) for r in csv.DictReader(fh)}


def test_an_evaluation_set_is_drawn_as_ufd_validate_draws_it(tmp_path, monkeypatch):
    root = _ufd_test(tmp_path / "test")
    # Only the draw is under test here: the model stages after ingest are not run.
    monkeypatch.setattr(pipeline.evalsets, "extract_ingested", lambda cache, *a, **k: cache)
    cache = tmp_path / "cache" / "ufd_test"
    args = ["--params", _params(tmp_path, 6), "--data", str(root), "--cache", str(cache)]
    assert evalset.main([*args, "--evaluation-set"]) == 0
    got = _ingested(cache, root)
    # UFD's validate.py seeds every folder with 0 (set_seed); base.seed is 0 here too.
    expected = _ufd_read_path(root / "progan", 6, 0) | _ufd_read_path(root / "guided", 6, 0)
    assert got == expected
    assert len(got) == 24
    # Another seed draws other images; a perturbed copy (no --evaluation-set) keeps them all.
    assert _ufd_read_path(root / "progan", 6, 1) != _ufd_read_path(root / "progan", 6, 0)
    assert evalset.main(args) == 0
    assert len(_ingested(cache, root)) == 64


def test_ingest_max_per_class_draws_each_class_and_folder_seeded(tmp_path):
    root = _ufd_test(tmp_path / "test")
    kept = []
    for seed in (0, 0, 5):
        out = tmp_path / f"ingest{len(kept)}"
        result = run_ingest(
            root, out, cfg=IngestConfig(max_per_class=5), base=BaseConfig(seed=seed), dataset="u"
        )
        kept.append({it.path for it in result.items})
        counts = {}
        for it in result.items:
            key = (it.subset, it.label)
            counts[key] = counts.get(key, 0) + 1
        assert counts == {("progan", 0): 5, ("progan", 1): 5, ("guided", 0): 5, ("guided", 1): 5}
    assert kept[0] == kept[1] and kept[0] != kept[2]
