"""dvc.yaml lists, for every stage, exactly the project modules the stage's script imports
(directly or through other project modules, at module level or inside functions, or by name
through `importlib`), so that editing a module reruns exactly the stages whose code it is.
The lists come from tools/dvc_deps.py (`--write`); these tests run its check both ways."""

from __future__ import annotations

import shutil
from pathlib import Path

from tests.helpers import ROOT
from tools import dvc_deps


def test_dvc_yaml_code_deps_are_each_stages_import_closure():
    found = dvc_deps.problems()
    assert not found, (
        f"dvc.yaml's code deps differ from the imports (stage: missing/surplus): {found}; "
        "fix: python -m tools.dvc_deps --write"
    )


def test_a_folder_dep_or_an_unused_module_is_surplus(tmp_path):
    """A folder entry hides modules the stage never imports, so the check must see it."""
    for name in ("dvc.yaml", "pipeline", "stages"):
        copy = shutil.copytree if (ROOT / name).is_dir() else shutil.copy
        copy(ROOT / name, tmp_path / name)
    text = (tmp_path / "dvc.yaml").read_text()
    head = "      - stages/ingest.py\n"
    assert head in text
    text = text.replace(
        head, head + "      - pipeline/heads\n      - pipeline/report/build.py\n", 1
    )
    text = text.replace("      - stages/train.py\n", "", 1)
    (tmp_path / "dvc.yaml").write_text(text)
    found = dvc_deps.problems(tmp_path)
    assert found["ingest"]["surplus"] == ["pipeline/heads", "pipeline/report/build.py"]
    assert found["train"] == {"missing": ["stages/train.py"], "surplus": []}
    # --write repairs both, keeping the comments and the non-code deps.
    assert dvc_deps.main(["--write", "--root", str(tmp_path)]) == 0
    assert dvc_deps.problems(tmp_path) == {}
    fixed = (tmp_path / "dvc.yaml").read_text()
    assert [ln for ln in fixed.splitlines() if ln.lstrip().startswith("#")] == [
        ln for ln in text.splitlines() if ln.lstrip().startswith("#")
    ]
    assert fixed == (ROOT / "dvc.yaml").read_text()


def test_the_import_scan_sees_lazy_and_by_name_imports():
    encode = dvc_deps.imported_files(Path("stages/encode.py"))
    # Imported inside functions (the stage's body) and by name (models' importlib registry).
    for module in ("pipeline/models/clip.py", "pipeline/models/bert.py", "pipeline/rows/runner.py"):
        assert Path(module) in encode
    assert Path("pipeline/report/build.py") not in encode


def test_heads_and_model_wrappers_rerun_only_the_stages_that_use_them():
    """An edit of a head reruns no extraction stage; an edit of a model wrapper reruns no
    stage that trains, scores or reports (the weights check is in the model stages only)."""
    extraction = {"check", "listing", "ingest", "caption", "ground", "encode", "features"}
    extraction |= {"copies", "perturb_features", "evalset_listing", "evalset", "evalset_features"}
    scoring = {"train", "evaluate", "robustness", "score_evalset", "qf_matrix", "report"}
    want = dvc_deps.wanted()
    assert extraction | scoring == set(want)
    for name in extraction:
        assert not [d for d in want[name] if d.startswith("pipeline/heads/")], name
    for name in scoring:
        assert not [d for d in want[name] if d.startswith("pipeline/models/")], name
    grounding = "pipeline/models/grounding.py"
    assert {n for n, deps in want.items() if grounding in deps} <= extraction


def test_no_dep_names_a_path_that_does_not_exist():
    for name, (_, deps) in dvc_deps.stages().items():
        for dep in deps:
            if dvc_deps.is_code_dep(dep):
                assert (ROOT / dep).exists(), f"{name}: {dep} does not exist"
