"""DVC's own params writer round-trips every override the protocols and the docs print.

DVC rewrites params.yaml on `dvc exp run -S` (ruamel, block style, comments kept); a comment
after a flow list on the same line once made the second rewrite corrupt the file. Each case
here queues an experiment with `dvc exp run --queue` (DVC's argument parsing and params writer,
no stage runs) in a git+DVC copy of the project whose params.yaml DVC has already rewritten once
(the README's smoke run), and reads the queued params.yaml back with the project's loader.
"""

from __future__ import annotations

import copy
import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from pipeline.config import load_params, to_dict
from pipeline.protocols import list_protocols, protocol_args
from tests.helpers import ROOT

# The smoke run's overrides: DVC's first rewrite of params.yaml.
FIRST = ["models.preset=tiny", "evaluate.perturbations=[jpeg_50]"]
# Commands the docs print (besides the protocols'), each as the shell hands its -S values to DVC.
DOCS = [
    ["train.mlp.hidden=256"],
    ["features.kind=tidy"],
    ["features.w2=0.0"],
    ["base.dtype=float16"],
    ["encode.bert=true", "++train.head_kinds.multitask=bert_image"],
    [
        "encode.bert=true",
        "encode.clip_pooled=true",
        "++train.head_kinds.multitask=bert_image_pooled",
    ],
    ["train.attribution_target=family"],
    ["train.pseudo_label=true"],
    ["data.name=sd14", "data.path=/data/genimage-sd14"],
    ["base.scheduler=dask", "base.dask_address=tcp://head:8786"],
    ["evaluate.qf_matrix=[]", "evaluate.qf_heads=[]"],
    ["evaluate.perturbations=[jpeg_75, blur_1]", "train.heads=[mlp, svm]"],
]
STASH = "refs/exps/celery/stash"


def _run(repo: Path, *args: str) -> str:
    env = dict(
        os.environ,
        PATH=f"{Path(sys.executable).parent}:{os.environ['PATH']}",
        DVC_NO_ANALYTICS="1",
    )
    proc = subprocess.run(
        list(args), cwd=repo, env=env, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout


def _queue(repo: Path, overrides: list[str]) -> str:
    """params.yaml as DVC writes it for `dvc exp run -S o1 -S o2 …` (queued, not run)."""
    args = [a for o in overrides for a in ("-S", o)]
    _run(repo, sys.executable, "-m", "dvc", "exp", "run", "--queue", *args)
    return _run(repo, "git", "show", f"{STASH}:params.yaml")


def _commit(repo: Path, params_text: str) -> None:
    (repo / "params.yaml").write_text(params_text)
    _run(repo, "git", "add", "params.yaml")
    _run(repo, "git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "params")


def _expect(params: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """The params tree with the overrides applied by hand (values parsed as YAML)."""
    out = copy.deepcopy(params)
    for item in overrides:
        key, value = item.removeprefix("++").split("=", 1)
        *parents, leaf = key.split(".")
        node = out
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = yaml.safe_load(value)
    return out


def _check(repo: Path, text: str, before: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    path = repo / "check.yaml"
    path.write_text(text)
    loaded = to_dict(load_params(path))  # the project's loader: parses and validates
    expected = repo / "expected.yaml"
    expected.write_text(yaml.safe_dump(_expect(before, overrides), sort_keys=False))
    assert loaded == to_dict(load_params(expected)), text
    return loaded


def _protocol_overrides(name: str, existing: dict[str, Any]) -> list[str]:
    # `eval "dvc exp run $(misalign protocol …)"`: the shell removes the quotes
    args = shlex.split(" ".join(protocol_args(name, "/data", existing=existing)))
    assert args[::2] == ["-S"] * (len(args) // 2)
    return args[1::2]


@pytest.fixture(scope="module")
def repo(tmp_path_factory):
    """A git+DVC repo with the project's dvc.yaml and params.yaml, after the smoke run's
    rewrite of params.yaml (committed, as `dvc exp apply` + commit or a finished run leaves it)."""
    repo = tmp_path_factory.mktemp("paramsrepo")
    for item in ("dvc.yaml", "params.yaml"):
        shutil.copy(ROOT / item, repo / item)
    _run(repo, "git", "init", "-q")
    _run(repo, sys.executable, "-m", "dvc", "init", "-q")
    _commit(repo, (ROOT / "params.yaml").read_text())
    shipped = yaml.safe_load((ROOT / "params.yaml").read_text())
    first = _queue(repo, FIRST)
    assert first != (ROOT / "params.yaml").read_text()  # DVC did rewrite it
    _check(repo, first, shipped, FIRST)
    _commit(repo, first)
    return repo


@pytest.mark.parametrize("name", sorted(list_protocols()))
def test_each_protocol_after_a_first_override(repo, name):
    before = yaml.safe_load((repo / "params.yaml").read_text())
    overrides = _protocol_overrides(name, before)
    assert overrides
    _check(repo, _queue(repo, ["models.preset=tiny", *overrides]), before, overrides)


def test_the_docs_overrides_after_a_first_override(repo):
    before = yaml.safe_load((repo / "params.yaml").read_text())
    for overrides in DOCS:
        _check(repo, _queue(repo, overrides), before, overrides)


def test_protocols_one_after_another(tmp_path, repo):
    """Each protocol's params.yaml, as a finished run leaves it, is the start of the next."""
    repo = Path(shutil.copytree(repo, tmp_path / "chain"))
    for name in sorted(list_protocols()):
        before = yaml.safe_load((repo / "params.yaml").read_text())
        overrides = _protocol_overrides(name, before)
        text = _queue(repo, overrides)
        _check(repo, text, before, overrides)
        _commit(repo, text)
