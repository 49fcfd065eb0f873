"""Shared pytest setup: every test runs offline and single-threaded enough for 2 cores, and
every test is in exactly one tier.

Tiers (markers, set here; `pytest -q` runs them all, as CI does):

- `fast`: no model load, no DVC, no browser, no stage subprocess that loads a model; the whole
  tier runs in under 2 minutes. `pytest -q -m fast` while developing.
- `integration`: the tiny models, extraction stages, the row cache over real steps.
- `system`: the project as a user runs it: `dvc repro`, a wheel install, a headless browser,
  the whole tiny pipeline end to end, kill -9 of running stages.

A test's tier is the marker written on it, else its entry in `_TEST_TIER`, else the heaviest
of its file's (`_FILE_TIER`, `fast` when absent) and those of the fixtures it uses, directly or
through other fixtures (`_FIXTURE_TIER`). A fast test that loads a model or starts DVC, a
browser or a model stage fails, naming the tier it belongs to.

`tiny_extraction` is the one tiny extraction of the shipped sample shared by the whole run.
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import NamedTuple

import pytest

from tests.helpers import extract_stages, pipeline_params, tiny_sample

# A hub miss costs 20-50 s of retries; tests never download anything.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("DVC_NO_ANALYTICS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

TIERS = ("fast", "integration", "system")

_FILE_TIER = {
    "test_dvc.py": "system",
    "test_e2e.py": "system",
    "test_packaging.py": "system",
    "test_plots_render.py": "system",
    "test_plots_offline.py": "system",
    "test_cache_key.py": "integration",
    "test_captioners.py": "integration",
    "test_clip.py": "integration",
    "test_device_decode.py": "integration",
    "test_extraction_studies.py": "integration",
    "test_gpu_check.py": "integration",
    "test_models_hf.py": "integration",
    "test_protocol_eval.py": "integration",
    "test_reader.py": "integration",
}

# Tests (by function name, parameters left out) whose tier is not their file's.
_TEST_TIER = {
    "test_reliability.py::test_kill_9_then_resume_equals_an_uninterrupted_run": "system",
    "test_reliability.py::test_refused_clip_checkpoints": "integration",
    "test_reliability.py::test_odd_files_are_used_intact_or_quarantined_with_a_reason": "integration",
    # Heads trained to convergence on synthetic data: no model, but minutes of CPU together.
    "test_heads.py::test_linear_gaussians_reach_bayes": "integration",
    "test_heads.py::test_xor_reaches_bayes": "integration",
    "test_report.py::test_report_renders_offline_in_headless_chromium": "system",
    "test_report.py::test_browser_check_catches_broken_pages": "system",
    "test_report.py::test_gallery_lists_objects_by_misalignment_in_a_browser": "system",
    "test_ground_nms.py::test_an_image_without_grounded_objects_gets_the_documented_d_local": (
        "integration"
    ),
}

# Fixtures that load the tiny models or run extraction steps (test_models_hf, test_cache_key,
# test_reader, the shared `tiny_extraction`), or train a head to convergence: a test using one
# is at least an integration test.
_FIXTURE_TIER = dict.fromkeys(
    (
        "captioner",
        "grounder",
        "tiny_dir",
        "small",
        "extracted",
        "fitted_multitask",
        "tiny_extraction",
    ),
    "integration",
)


def tier_of(item: pytest.Item) -> str:
    filename = item.path.name
    name = getattr(item, "originalname", None) or item.name.split("[")[0]
    if f"{filename}::{name}" in _TEST_TIER:
        return _TEST_TIER[f"{filename}::{name}"]
    tiers = [_FILE_TIER.get(filename, "fast")]
    tiers += [_FIXTURE_TIER[f] for f in getattr(item, "fixturenames", ()) if f in _FIXTURE_TIER]
    return max(tiers, key=TIERS.index)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        marked = {m.name for m in item.iter_markers() if m.name in TIERS}
        if not marked:  # a tier marker written on the test itself wins
            item.add_marker(getattr(pytest.mark, tier_of(item)))
        elif len(marked) > 1:
            raise pytest.UsageError(f"{item.nodeid} is marked {sorted(marked)}; give it one tier")


# Commands a fast test must not start: they load models, run DVC or a browser.
_HEAVY_COMMANDS = ("dvc", "chromium", "chromium-browser", "google-chrome")
_HEAVY_MODULES = ("stages.caption", "stages.ground", "stages.encode", "stages.evalset")
_HEAVY_MODULES += ("stages.copies",)  # tests.kill_probe is as heavy as the stage it runs


def _heavy(args: object) -> str | None:
    argv = [str(a) for a in args] if isinstance(args, (list, tuple)) else [str(args)]
    if argv and os.path.basename(argv[0]) in _HEAVY_COMMANDS:
        return argv[0]
    return next((a for a in argv if a in _HEAVY_MODULES), None)


@pytest.fixture(autouse=True)
def _fast_tier_stays_fast(
    request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch
) -> Iterator[None]:
    """In the fast tier, loading a model or starting DVC, a browser or a model stage fails."""
    if request.node.get_closest_marker("fast") is None:
        yield
        return
    from pipeline.models.clip import ClipEncoder
    from pipeline.models.hf import HFWrapper

    where = request.node.nodeid

    def refuse(what: str) -> None:
        pytest.fail(f"{where} is in the fast tier but {what}; list it in tests/conftest.py")

    def no_load(cls: type, *args: object, **kwargs: object) -> None:
        refuse(f"loads a model ({cls.__name__})")

    monkeypatch.setattr(HFWrapper, "load", classmethod(no_load))
    monkeypatch.setattr(ClipEncoder, "load", classmethod(no_load))
    popen_init = subprocess.Popen.__init__

    def checked_init(self: subprocess.Popen, args: object, *rest: object, **kw: object) -> None:
        if (heavy := _heavy(args)) is not None:
            refuse(f"starts {heavy}")
        popen_init(self, args, *rest, **kw)  # type: ignore[arg-type]

    monkeypatch.setattr(subprocess.Popen, "__init__", checked_init)
    yield


class TinyExtraction(NamedTuple):
    """`work/data` (the images and manifest), `work/cache/<stage dir>`, the params file."""

    work: Path
    data: Path
    params: str
    cache: Path


def _listing(folder: Path) -> dict[str, tuple[int, int]]:
    return {
        str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns)
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


@pytest.fixture(scope="session")
def tiny_extraction(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TinyExtraction]:
    """The shipped sample's 14 first real photos and one image per generator through ingest,
    caption, ground, encode and features with the tiny preset, once per test run.

    Read-only: a test that changes the images, the cache or the params works on a copy
    (`shutil.copytree`). A change left in it fails the run at its end, naming the files.
    """
    work = tmp_path_factory.mktemp("tiny_extraction")
    data = tiny_sample(work / "data", per_generator=1, n_real=14)
    params = pipeline_params(work)
    assert extract_stages(work / "cache", data, params) == 0
    before = _listing(work)
    yield TinyExtraction(work, data, params, work / "cache")
    after = _listing(work)
    changed = sorted(k for k in before.keys() | after.keys() if before.get(k) != after.get(k))
    assert not changed, f"tests changed the shared tiny_extraction (copy it first): {changed}"
