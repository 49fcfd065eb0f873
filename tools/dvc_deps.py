"""dvc.yaml's code deps, derived from what each stage's script really imports.

Each stage's deps list, besides its data, params and upstream outputs, exactly the project
files (`pipeline/`, `stages/`) that its `python -m stages.<x>` command can import: directly or
through other project modules, at module level or inside functions, or by literal name through
`importlib.import_module`. Parent packages count (importing `pipeline.models.clip` runs
`pipeline/__init__.py` and `pipeline/models/__init__.py`). No folder entry: a folder would hide
modules the stage never imports, and an edit of one of those would rerun the stage for nothing.

    python -m tools.dvc_deps --check   # exit 1 listing each stage's missing and surplus deps
    python -m tools.dvc_deps --write   # rewrite the code deps in dvc.yaml, comments kept

Rerun `--write` after moving, adding or removing a module, or changing what a stage imports;
tests/test_dvc_deps.py runs the check.
"""

from __future__ import annotations

import argparse
import ast
import functools
import re
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
PROJECT = ("pipeline", "stages")
_MODULE_NAME = re.compile(r"^(pipeline|stages)(\.[A-Za-z_]\w*)+$")
_SCRIPT = re.compile(r"python -m (stages\.\w+)")


def module_file(name: str, root: Path = ROOT) -> Path | None:
    """The file of a project module or package, relative to `root`; None when there is none."""
    base = root / Path(*name.split("."))
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate.relative_to(root)
    return None


def _imported_names(path: Path, root: Path) -> frozenset[str]:
    """Project module names `path` imports anywhere in its body (dotted, absolute)."""
    file = root / path
    return _names_in(file, path, file.stat().st_mtime_ns)


@functools.cache
def _names_in(file: Path, path: Path, mtime_ns: int) -> frozenset[str]:
    tree = ast.parse(file.read_text(), filename=str(path))
    package = list(path.parts[:-1])
    names: set[str] = set()
    by_name = False
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
            by_name |= any(alias.name == "importlib" for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - node.level + 1]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            by_name |= module == "importlib"
            names.add(module)
            # `from pipeline import store` imports the submodule pipeline.store.
            names.update(f"{module}.{alias.name}" for alias in node.names)
    if by_name:  # importlib.import_module("pipeline.models.clip"): a literal module name
        names.update(
            node.value
            for node in ast.walk(tree)
            if isinstance(node, ast.Constant)
            and isinstance(node.value, str)
            and _MODULE_NAME.match(node.value)
        )
    return frozenset(n for n in names if n.split(".")[0] in PROJECT)


def imported_files(script: Path, root: Path = ROOT) -> set[Path]:
    """Every project file that running `script` can import, transitively, `script` included."""
    seen: set[Path] = set()
    todo = [script]
    while todo:
        path = todo.pop()
        if path in seen:
            continue
        seen.add(path)
        for name in _imported_names(path, root):
            parts = name.split(".")
            for k in range(1, len(parts) + 1):
                found = module_file(".".join(parts[:k]), root)
                if found is not None and found not in seen:
                    todo.append(found)
    return seen


def is_code_dep(dep: str) -> bool:
    return dep.split("/")[0] in PROJECT


def stages(root: Path = ROOT) -> dict[str, tuple[Path, list[str]]]:
    """Stage name -> (the script its command runs, its declared deps as written)."""
    out = {}
    for name, spec in yaml.safe_load((root / "dvc.yaml").read_text())["stages"].items():
        body = spec.get("do", spec)
        match = _SCRIPT.search(body["cmd"])
        if match is None:
            raise SystemExit(f"dvc.yaml: stage {name} does not run `python -m stages.<x>`")
        script = module_file(match.group(1), root)
        if script is None:
            raise SystemExit(f"dvc.yaml: stage {name} runs {match.group(1)}, which does not exist")
        out[name] = (script, [str(d) for d in body.get("deps", [])])
    return out


def wanted(root: Path = ROOT) -> dict[str, list[str]]:
    """Stage name -> the code deps it should list, sorted (stages/ first, then pipeline/)."""
    return {
        name: sorted(
            (p.as_posix() for p in imported_files(script, root)),
            key=lambda d: (not d.startswith("stages/"), d),
        )
        for name, (script, _) in stages(root).items()
    }


def problems(root: Path = ROOT) -> dict[str, dict[str, list[str]]]:
    """Stage name -> {"missing": [...], "surplus": [...]} for every stage whose code deps are
    not exactly its import closure; a folder entry is surplus (it stands for files, some of
    which may not be imported, and is never what `--write` produces)."""
    found = {}
    want = wanted(root)
    for name, (_, deps) in stages(root).items():
        code = {d.rstrip("/") for d in deps if is_code_dep(d)}
        missing = sorted(set(want[name]) - code)
        surplus = sorted(code - set(want[name]))
        if missing or surplus:
            found[name] = {"missing": missing, "surplus": surplus}
    return found


_STAGE = re.compile(r"^  ([A-Za-z_][\w-]*):\s*(#.*)?$")
_DEPS = re.compile(r"^(\s+)deps:\s*(#.*)?$")
_ITEM = re.compile(r"^(\s+)- (.*?)\s*(#.*)?$")


def rewrite(text: str, want: dict[str, list[str]]) -> str:
    """`text` (dvc.yaml) with each stage's code deps replaced by `want[stage]`, placed after
    its other deps; comments, the other deps and everything else are kept as written."""
    lines = text.splitlines(keepends=True)
    out: list[str] = []
    stage = None
    i = 0
    while i < len(lines):
        line = lines[i]
        if m := _STAGE.match(line):
            stage = m.group(1)
        out.append(line)
        i += 1
        d = _DEPS.match(line)
        if not d or stage not in want:
            continue
        indent = None
        while i < len(lines):
            item = _ITEM.match(lines[i])
            blank_or_comment = not lines[i].strip() or lines[i].lstrip().startswith("#")
            if item and len(item.group(1)) > len(d.group(1)):
                indent = item.group(1)
                if not is_code_dep(item.group(2).strip("'\"")):
                    out.append(lines[i])
            elif not (blank_or_comment and i + 1 < len(lines) and _ITEM.match(lines[i + 1])):
                break
            else:
                out.append(lines[i])
            i += 1
        indent = indent or d.group(1) + "  "
        out.extend(f"{indent}- {dep}\n" for dep in want[stage])
    return "".join(out)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    mode = ap.add_mutually_exclusive_group(required=True)
    mode.add_argument("--check", action="store_true", help="list missing and surplus deps")
    mode.add_argument("--write", action="store_true", help="rewrite dvc.yaml's code deps")
    ap.add_argument("--root", type=Path, default=ROOT, help="repository root (default: this one)")
    args = ap.parse_args(argv)
    root = args.root.resolve()
    if args.write:
        path = root / "dvc.yaml"
        new = rewrite(path.read_text(), wanted(root))
        path.write_text(new)
        left = problems(root)
        if left:  # a stage whose deps block the rewriter could not find
            print(f"dvc.yaml still differs after --write: {left}", file=sys.stderr)
            return 1
        print(f"wrote the code deps of {len(wanted(root))} stages into {path}")
        return 0
    found = problems(root)
    for name, diff in found.items():
        for kind, deps in diff.items():
            if deps:
                print(f"{name}: {kind}: {', '.join(deps)}")
    if found:
        print("fix: python -m tools.dvc_deps --write", file=sys.stderr)
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main())
