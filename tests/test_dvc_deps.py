"""dvc.yaml lists, for every stage, each project module the stage's script imports (directly
or through other project modules, at module level or inside functions, or by name through
`importlib`), so that editing a module reruns exactly the stages whose code it is."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import yaml

from tests.helpers import ROOT

_PROJECT = ("pipeline", "stages")
_MODULE_NAME = re.compile(r"^(pipeline|stages)(\.[A-Za-z_]\w*)+$")


def module_file(name: str) -> Path | None:
    """The file of a project module or package, relative to the repository root."""
    base = ROOT / Path(*name.split("."))
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate.relative_to(ROOT)
    return None


def _imported_names(path: Path) -> set[str]:
    tree = ast.parse((ROOT / path).read_text(), filename=str(path))
    package = ".".join(path.with_suffix("").parts[:-1])
    if path.name == "__init__.py":
        package = ".".join(path.parts[:-1])
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                parts = package.split(".")
                parts = parts[: len(parts) - node.level + 1]
                module = ".".join(parts + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            names.add(module)
            # `from pipeline.rows import store` imports the submodule pipeline.rows.store.
            names.update(f"{module}.{alias.name}" for alias in node.names)
        elif isinstance(node, ast.Constant) and isinstance(node.value, str):
            if _MODULE_NAME.match(node.value):  # importlib.import_module("pipeline.models.x")
                names.add(node.value)
    return {n for n in names if n.split(".")[0] in _PROJECT}


def imported_files(script: Path) -> set[Path]:
    """Every project file that running `script` can import, transitively (parent packages
    included: importing pipeline.models.clip runs pipeline/__init__.py and
    pipeline/models/__init__.py)."""
    seen: set[Path] = set()
    todo = [script]
    while todo:
        path = todo.pop()
        if path in seen:
            continue
        seen.add(path)
        for name in _imported_names(path):
            parts = name.split(".")
            for k in range(1, len(parts) + 1):
                found = module_file(".".join(parts[:k]))
                if found is not None and found not in seen:
                    todo.append(found)
    return seen


def stage_scripts() -> dict[str, tuple[Path, list[str]]]:
    """Stage name -> (its script, its declared deps)."""
    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    out = {}
    for name, spec in stages.items():
        body = spec.get("do", spec)
        match = re.search(r"python -m (stages\.\w+)", body["cmd"])
        assert match, f"stage {name} does not run a stages/ script"
        script = module_file(match.group(1))
        assert script is not None, match.group(1)
        out[name] = (script, [str(d) for d in body.get("deps", [])])
    return out


def _covered(path: Path, deps: list[str]) -> bool:
    text = path.as_posix()
    return any(text == d.rstrip("/") or text.startswith(d.rstrip("/") + "/") for d in deps)


def test_every_imported_project_module_is_a_dvc_dep():
    missing = {
        name: sorted(p.as_posix() for p in imported_files(script) if not _covered(p, deps))
        for name, (script, deps) in stage_scripts().items()
    }
    missing = {k: v for k, v in missing.items() if v}
    assert not missing, f"dvc.yaml lacks these deps (stage: modules it imports): {missing}"


def test_no_stage_lists_a_module_it_does_not_import():
    """Extra module deps rerun a stage for edits that cannot change its outputs (an edit of
    the heads used to rerun every extraction stage)."""
    extra = {}
    for name, (script, deps) in stage_scripts().items():
        imported = imported_files(script)
        modules = [d for d in deps if d.endswith(".py") and d.startswith(("pipeline/", "stages/"))]
        if unused := sorted(d for d in modules if Path(d) not in imported):
            extra[name] = unused
    assert not extra, f"dvc.yaml lists modules these stages never import: {extra}"


def test_the_import_scan_sees_lazy_and_by_name_imports():
    encode = imported_files(Path("stages/encode.py"))
    # Imported inside functions (the key's weights_identity) and by name (models' importlib
    # registry).
    for module in ("pipeline/models/clip.py", "pipeline/models/bert.py", "pipeline/rows/runner.py"):
        assert Path(module) in encode
    assert Path("pipeline/report/__init__.py") not in encode


def test_no_dep_names_a_module_that_does_not_exist():
    for name, (_, deps) in stage_scripts().items():
        for dep in deps:
            if dep.startswith(_PROJECT):
                assert (ROOT / dep).exists(), f"{name}: {dep} does not exist"
