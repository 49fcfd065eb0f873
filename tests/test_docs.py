"""The README and docs/ point only at what the project ships: every relative link resolves
(file and heading), every project path named in backticks exists, the README stays short and
holds CI's own test command, and CITATION.cff agrees with pyproject.toml."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import pytest
import yaml

from tests.helpers import ROOT

DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
# Folders and files the project ships; a backticked path starting with one of them must exist.
SHIPPED = ("pipeline/", "stages/", "tests/", "bench/", "plots_template/", "data/sample/", "docs/")
SHIPPED_FILES = ("dvc.yaml", "params.yaml", "pyproject.toml", "LICENSE", "CITATION.cff")
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")
CODE = re.compile(r"`([^`\s]+)`")


def _slug(heading: str) -> str:
    """The anchor GitHub gives a heading."""
    text = heading.strip().lower().replace("`", "")
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def _anchors(path: Path) -> set[str]:
    seen: dict[str, int] = {}
    out = set()
    in_code = False
    for line in path.read_text().splitlines():
        if line.startswith("```"):
            in_code = not in_code
        if in_code or not line.startswith("#"):
            continue
        slug = _slug(line.lstrip("#"))
        n = seen.get(slug, 0)
        seen[slug] = n + 1
        out.add(slug if n == 0 else f"{slug}-{n}")
    return out


def _prose(path: Path) -> str:
    """The file without its indented code blocks (commands and outputs, not references)."""
    return "\n".join(line for line in path.read_text().splitlines() if not line.startswith("    "))


def test_docs_folder_exists():
    names = {p.name for p in DOCS}
    assert {"install.md", "benchmarks.md", "protocols.md", "hdf5-schema.md"} <= names


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: p.name)
def test_every_relative_link_resolves_to_a_file_and_heading(doc):
    bad = []
    for target in LINK.findall(doc.read_text()):
        if re.match(r"[a-z]+://", target):
            continue
        file_part, _, anchor = target.partition("#")
        dest = (doc.parent / file_part).resolve() if file_part else doc
        if not dest.exists():
            bad.append(f"{target}: no such file")
        elif anchor and anchor not in _anchors(dest):
            bad.append(f"{target}: no heading #{anchor} in {dest.name}")
    assert not bad, f"{doc.name}: {bad}"


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: p.name)
def test_every_project_path_named_exists(doc):
    missing = []
    for token in CODE.findall(_prose(doc)):
        if "<" in token or "*" in token:
            continue  # a pattern such as models/<head>/, not one file
        if token.startswith(SHIPPED) or token in SHIPPED_FILES:
            if not (ROOT / token.rstrip("/")).exists():
                missing.append(token)
    assert not missing, f"{doc.name} names paths the project does not have: {missing}"


def test_readme_is_short_and_holds_ci_test_command():
    readme = (ROOT / "README.md").read_text()
    assert len(readme.splitlines()) <= 220
    ci_command = (ROOT / ".ci" / "run").read_text().strip().splitlines()[-1]
    assert f"    {ci_command}\n" in readme, "the README's test command is not .ci/run's"
    assert "pip install -e . && misalign weights fetch && dvc repro" in readme
    assert "pytest -q -m fast" in readme
    assert not re.search(r"\bseeds? 0\d\d", readme), "name the papers, not the seed files"


def test_citation_agrees_with_pyproject():
    cff = yaml.safe_load((ROOT / "CITATION.cff").read_text())
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert cff["cff-version"] == "1.2.0"
    assert cff["title"] == project["name"]
    assert cff["version"] == project["version"]
    assert cff["license"] == project["license"]["text"]
    assert "MIT License" in (ROOT / "LICENSE").read_text()
    titles = [ref["title"] for ref in cff["references"]]
    assert any("Hierarchical Image-Text Misalignment" in t for t in titles)
