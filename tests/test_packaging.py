"""A non-editable install is complete: built as a wheel and installed into a fresh virtual
environment (dependencies borrowed from this one), `misalign protocol --list` lists the
protocols, which ship inside the package."""

from __future__ import annotations

import os
import shutil
import site
import subprocess
import sys
import tomllib

from tests.helpers import ROOT


def _run(*args, **kw):
    proc = subprocess.run(args, capture_output=True, text=True, timeout=600, **kw)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    return proc.stdout


def test_a_wheel_installed_in_a_fresh_venv_lists_the_protocols(tmp_path):
    # Built from a copy: a build leaves build/ and *.egg-info behind in its source folder.
    src = tmp_path / "src"
    for item in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / item, src / item if src.exists() else _mkdir(src) / item)
    for folder in ("pipeline", "stages"):
        shutil.copytree(ROOT / folder, src / folder, ignore=shutil.ignore_patterns("__pycache__"))
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    wheels = tmp_path / "wheels"
    _run(
        sys.executable,
        "-m",
        "pip",
        "wheel",
        "--no-deps",
        "--no-build-isolation",
        "-q",
        str(src),
        "-w",
        str(wheels),
        cwd=tmp_path,
        env=env,
    )
    (wheel,) = wheels.glob("misalign-*.whl")
    venv = tmp_path / "venv"
    _run(sys.executable, "-m", "venv", str(venv), env=env)
    py = venv / "bin" / "python"
    _run(
        str(py),
        "-m",
        "pip",
        "install",
        "-q",
        "--no-deps",
        "--no-index",
        str(wheel),
        cwd=tmp_path,
        env=env,
    )
    # The installed package's dependencies (torch, h5py, ...) come from this environment, added
    # as a plain path: its .pth files (e.g. an editable install of the worktree) are not run.
    purelib = _run(
        str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])", env=env
    )
    deps = [p for p in site.getsitepackages() if p.endswith("site-packages")]
    (tmp_path / "venv_deps.pth").write_text("\n".join(deps) + "\n")
    os.replace(tmp_path / "venv_deps.pth", os.path.join(purelib.strip(), "zz_deps.pth"))
    where = _run(str(py), "-c", "import pipeline; print(pipeline.__file__)", cwd=tmp_path, env=env)
    assert where.startswith(str(venv)), where  # the installed copy, not the worktree
    out = _run(str(venv / "bin" / "misalign"), "protocol", "--list", cwd=tmp_path, env=env)
    for name in ("item", "ct2", "qf"):
        assert any(line.split()[:1] == [name] for line in out.splitlines()), out
    args = _run(
        str(venv / "bin" / "misalign"),
        "protocol",
        "item",
        "--data-root",
        "/d",
        cwd=tmp_path,
        env=env,
    )
    assert "/d/" in args


def _mkdir(path):
    path.mkdir(parents=True)
    return path


def test_requires_python_is_the_type_checked_minimum():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    minimum = project["project"]["requires-python"].removeprefix(">=")
    assert project["tool"]["mypy"]["python_version"] == minimum
    assert project["tool"]["ruff"]["target-version"] == "py" + minimum.replace(".", "")
