"""The DVC pipeline itself, on a few sample images with the tiny preset: runs to the end, a
second `dvc repro` does nothing, and a param reruns exactly the stages it affects."""

import hashlib
import json
import os
import re
import shlex
import shutil
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from tests.helpers import ROOT, tiny_sample


def _dvc(repo: Path, *args: str, ok: bool = True, env: dict[str, str] | None = None) -> str:
    env = dict(
        os.environ,
        **(env or {}),
        PATH=f"{Path(sys.executable).parent}:{os.environ['PATH']}",
        DVC_NO_ANALYTICS="1",
        PYTHONPATH=str(ROOT),
    )
    proc = subprocess.run(
        [sys.executable, "-m", "dvc", *args],
        cwd=repo,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert (proc.returncode == 0) == ok, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout + proc.stderr


def _ran(output: str) -> list[str]:
    return re.findall(r"Running stage '([^']+)'", output)


def _set(repo: Path, section: str, key: str, value) -> None:
    params = yaml.safe_load((repo / "params.yaml").read_text())
    node = params[section]
    *parents, leaf = key.split(".")
    for part in parents:
        node = node[part]
    node[leaf] = value
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


@pytest.fixture(scope="module")
def repo(tmp_path_factory):
    repo = tmp_path_factory.mktemp("dvcrepo")
    for item in ("dvc.yaml", "params.yaml"):
        shutil.copy(ROOT / item, repo / item)
    for folder in ("pipeline", "stages"):
        shutil.copytree(ROOT / folder, repo / folder, ignore=shutil.ignore_patterns("__pycache__"))
    tiny_sample(repo / "data" / "sample", per_generator=1, n_real=14)
    subprocess.run(["git", "init", "-q"], cwd=repo, check=True)
    _dvc(repo, "init", "-q")
    shutil.copy(ROOT / ".dvc" / "config", repo / ".dvc" / "config")  # the link cache types
    shutil.copy(ROOT / ".dvcignore", repo / ".dvcignore")
    _set(repo, "models", "preset", "tiny")
    _set(repo, "ingest", "shard_size", 8)
    _set(repo, "train", "heads", ["mlp", "svm", "multitask"])
    _set(repo, "train", "mlp.epochs", 10)
    _set(repo, "evaluate", "perturbations", ["jpeg_50", "blur_1"])  # two copies, one process
    _set(repo, "evaluate", "qf_matrix", [])  # the stage then writes an empty matrix
    first = _dvc(repo, "repro")
    return repo, first


def test_repro_runs_every_stage(repo):
    path, first = repo
    ran = _ran(first)
    for stage in (
        "check",
        "listing",
        "ingest",
        "caption",
        "ground",
        "encode",
        "features",
        "train",
        "evaluate",
        "copies",
        "perturb_features@jpeg_50",
        "perturb_features@blur_1",
        "robustness@jpeg_50",
        "robustness@blur_1",
        "report",
    ):
        assert stage in ran
    metrics = json.loads((path / "metrics" / "eval.json").read_text())
    assert set(metrics) == {"mlp", "svm", "multitask"}
    assert (path / "metrics" / "eval_jpeg_50.json").exists()
    assert (path / "report" / "index.html").exists()
    shown = _dvc(path, "metrics", "show")
    assert "metrics/summary/eval/mlp.json" in shown and "tiny" in shown
    assert max(map(len, shown.splitlines())) <= 200, shown
    summary = json.loads((path / "metrics" / "summary" / "eval" / "mlp.json").read_text())
    assert summary["acc"] == round(metrics["mlp"]["overall"]["acc"], 4)


def _bytes_on_disk(*folders: Path) -> int:
    """Allocated bytes of the regular files under `folders`, each inode counted once (a shard
    hard-linked into .dvc/cache is one file on disk)."""
    seen: dict[tuple[int, int], int] = {}
    for folder in folders:
        for path in folder.rglob("*"):
            st = path.lstat()
            if stat.S_ISREG(st.st_mode):
                seen[(st.st_dev, st.st_ino)] = st.st_blocks * 512
    return sum(seen.values())


def test_outputs_are_stored_once(repo):
    """.dvc/config's link cache types: a shard and its DVC cache object are one file."""
    path = repo[0]
    alone = _bytes_on_disk(path / "cache")
    both = _bytes_on_disk(path / "cache", path / ".dvc" / "cache")
    assert both <= 1.1 * alone, (both, alone)
    shard = next((path / "cache" / "sample" / "clip").glob("shard_*.h5"))
    assert shard.stat().st_nlink == 2, shard


def test_each_model_is_loaded_once_per_extraction_step(repo):
    """The stage timings count model loads: caption, ground and encode load their model once,
    and the copies stage loads each model once for both perturbed copies (the first copy's
    steps load them, the second's reuse them)."""
    path = repo[0]

    def loads(timings: Path) -> dict[str, int]:
        return json.loads(timings.read_text())["model_loads"]

    main = path / "cache" / "sample" / "timings"
    assert loads(main / "captions.json") == {"blip2": 1}  # caption.model names the role
    assert loads(main / "objects.json") == {"grounder": 1}
    assert loads(main / "clip.json").get("clip") == 1
    copies = path / "cache" / "sample__perturbed"
    total: dict[str, int] = {}
    for name in ("jpeg_50", "blur_1"):
        for step in ("captions", "objects", "clip"):
            for role, n in loads(copies / name / "timings" / f"{step}.json").items():
                total[role] = total.get(role, 0) + n
    assert {"blip2", "grounder", "clip"} <= set(total), total
    assert all(n == 1 for n in total.values()), total


def _digests(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.glob("*.h5"))}


def test_second_repro_is_a_no_op(repo):
    # the listing stage runs at every repro (always changed); its output does not change
    assert _ran(_dvc(repo[0], "repro")) == ["listing"]


def test_a_train_param_reruns_only_training_and_scoring(repo):
    path = repo[0]
    # (not the epochs: the head kept is the best on val, which may come before either count)
    _set(path, "train", "mlp.hidden", 256)
    assert sorted(_ran(_dvc(path, "repro"))) == sorted(
        [
            "check",
            "listing",
            "train",
            "evaluate",
            "robustness@jpeg_50",
            "robustness@blur_1",
            "qf_matrix",
            "report",
        ]
    )


def test_a_feature_param_reruns_no_image_generation_nor_extraction(repo):
    path = repo[0]
    _set(path, "features", "w2", 0.0)
    assert sorted(_ran(_dvc(path, "repro"))) == sorted(
        [
            "check",
            "listing",
            "features",
            "perturb_features@jpeg_50",
            "perturb_features@blur_1",
            "train",
            "evaluate",
            "robustness@jpeg_50",
            "robustness@blur_1",
            "qf_matrix",
            "report",
        ]
    )


def test_a_batch_size_reruns_nothing(repo):
    path = repo[0]
    _set(path, "encode", "batch_size", 4)
    _set(path, "caption", "batch_size", 2)
    # the params check and the folder's listing only (seconds)
    assert _ran(_dvc(path, "repro")) == ["check", "listing"]


def test_a_misspelt_key_is_refused_before_any_stage_works(repo):
    """`dvc exp run -S ++train.mlp.hiden=…` stops at the check stage within seconds, naming the
    key and the keys allowed there; without `++`, DVC itself refuses the unknown key."""
    path = repo[0]
    subprocess.run(["git", "add", "-A"], cwd=path, check=True)
    subprocess.run(
        ["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "run"],
        cwd=path,
        check=True,
    )
    before = {p: p.stat().st_mtime for p in (path / "models").rglob("*.json")}
    start = time.monotonic()
    out = _dvc(path, "exp", "run", "-S", "++train.mlp.hiden=256", ok=False)
    assert time.monotonic() - start < 30, out
    assert _ran(out) == ["check"], out
    assert "train.mlp.hiden" in out and "hidden, epochs" in out, out
    assert {p: p.stat().st_mtime for p in (path / "models").rglob("*.json")} == before
    subprocess.run(["git", "checkout", "params.yaml"], cwd=path, check=True)  # README's undo
    out = _dvc(path, "exp", "run", "-S", "train.mlp.hiden=256", ok=False)
    assert "train.mlp.hiden" in out and _ran(out) == [], out


def test_exp_apply_brings_back_each_experiments_outputs(repo):
    """Two experiments that differ in a feature param; `dvc exp apply` to the first and back
    to the second links each one's shards again (outputs are links into .dvc/cache)."""
    path = repo[0]
    subprocess.run(["git", "add", "-A"], cwd=path, check=True)
    subprocess.run(
        ["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "before exps"],
        cwd=path,
        check=False,  # nothing to commit when the test before this one committed it all
    )
    features = path / "cache" / "sample" / "features"
    got = {}
    for name, w2 in (("first", 0.25), ("second", 0.75)):
        _dvc(path, "exp", "run", "-n", name, "-S", f"features.w2={w2}")
        got[name] = _digests(features)
    assert got["first"] != got["second"]
    for name in ("first", "second"):
        _dvc(path, "exp", "apply", name)
        assert _digests(features) == got[name], name
        # linked, not copied (class_prompts.h5 equals clip's: one object, linked twice)
        assert all(p.stat().st_nlink >= 2 for p in features.glob("*.h5"))


# The experiments table, as docs/metrics.md prints it.
EXP_SHOW = "dvc exp show --only-changed --keep '^auc\\.' --drop '.*/|models$|metrics$|params\\.yaml$|Created'"


def test_the_documented_experiments_table_fits_120_columns(repo):
    """After the two experiments above, the documented `dvc exp show` prints every experiment
    with each head's AUC and the changed param, in 120 columns and with no cell cut short."""
    path = repo[0]
    assert EXP_SHOW in (ROOT / "docs" / "metrics.md").read_text()
    heads = yaml.safe_load((path / "params.yaml").read_text())["train"]["heads"]
    out = _dvc(path, *shlex.split(EXP_SHOW)[1:], "--no-pager", env={"COLUMNS": "120"})
    lines = [line.rstrip() for line in out.splitlines() if line.strip()]
    assert max(len(line) for line in lines) <= 120, out
    assert "…" not in out, out  # rich's mark of a cell or a column cut short
    header = next(line for line in lines if "Experiment" in line).split()
    assert header[0] == "Experiment" and header[-1] == "features.w2", out
    assert sorted(header[1:-1]) == sorted(f"auc.{h}" for h in heads), out
    rows = {n: line.split() for line in lines for n in ("first", "second") if f"[{n}]" in line}
    assert rows["first"][-1] == "0.25" and rows["second"][-1] == "0.75", out
    for cells in rows.values():
        assert all(0 <= float(v) <= 1 for v in cells[-1 - len(heads) : -1]), out


@pytest.fixture
def fresh_repo(tmp_path):
    """The project with the tiny sample, set up but never run."""
    repo = tmp_path / "repo"
    repo.mkdir()
    for item in ("dvc.yaml", "params.yaml"):
        shutil.copy(ROOT / item, repo / item)
    for folder in ("pipeline", "stages"):
        shutil.copytree(ROOT / folder, repo / folder, ignore=shutil.ignore_patterns("__pycache__"))
    tiny_sample(repo / "data" / "sample", per_generator=1, n_real=2)
    subprocess.run(["git", "init", "-q"], cwd=repo, check=True)
    _dvc(repo, "init", "-q")
    shutil.copy(ROOT / ".dvc" / "config", repo / ".dvc" / "config")
    shutil.copy(ROOT / ".dvcignore", repo / ".dvcignore")
    _set(repo, "models", "preset", "tiny")
    return repo


@pytest.mark.parametrize(
    "make, why",
    [
        (os.mkfifo, "FIFO"),
        (lambda p: os.symlink("/dev/zero", p), "symlink to a character device"),
        (lambda p: os.symlink(p, p), "symlink loop"),
    ],
    ids=["fifo", "dev_zero", "symlink_loop"],
)
def test_an_entry_that_is_not_a_file_stops_repro_in_seconds(fresh_repo, make, why):
    """DVC no longer reads the folder (it hung on a FIFO or /dev/zero, and stopped with
    'unexpected error' on a loop); the listing stage names the entry and nothing is ingested."""
    make(fresh_repo / "data" / "sample" / "images" / "bad.png")
    start = time.monotonic()
    out = _dvc(fresh_repo, "repro", ok=False)
    assert time.monotonic() - start < 30, out
    lines = [line for line in out.splitlines() if "images/bad.png" in line]
    assert len(lines) == 1 and f"images/bad.png ({why}" in lines[0], out
    assert _ran(out) == ["check", "listing"], out
    assert not (fresh_repo / "cache" / "sample" / "ingest").exists()
    assert not (fresh_repo / "cache" / "sample" / "listing.jsonl").exists()
