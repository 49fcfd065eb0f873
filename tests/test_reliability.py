"""Bad input gets a clear answer, never a crash, a blank image or lost data.

A hostile user's tour: the param-range table (each bad value refused in seconds, naming the
key, with no output touched), odd and broken files, tampered model files, internal bugs that
keep their traceback, and kill -9 during the extraction stages.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from tests.helpers import ROOT

# ------------------------------------------------------------------------- param-range table

# (dotted key, bad value): each must be refused by the params check with a message naming
# the key. The first ones are those of issue 12; the rest widen the net.
BAD_PARAMS = [
    ("caption.batch_size", -1),
    ("caption.batch_size", 0),
    ("ground.batch_size", -1),
    ("encode.batch_size", -1),
    ("encode.batch_size", 0),
    ("ingest.shard_size", -2),
    ("ingest.shard_size", 0),
    ("features.w1", float("nan")),
    ("features.w2", float("inf")),
    ("ingest.split_fractions", [1.5, -0.25, -0.25]),
    ("ingest.split_fractions", [0.5, 0.3, 0.3]),
    ("ingest.split_fractions", [0.0, 0.5, 0.5]),
    ("ground.max_objects", -1),
    ("train.mlp.epochs", "50"),
    ("train.mlp.epochs", 0),
    ("train.mlp.lr", -0.1),
    ("train.mlp.hidden", 2.5),
    ("train.svm.C", 0),
    ("train.multitask.epochs", True),
    ("train.tip_adapter.finetune", "yes"),
    ("train.meta.base_heads", []),
    ("train.meta.base_heads", ["mlp", "nope"]),
    ("data.name", "../../../outside"),
    ("data.name", "a/b"),
    ("data.name", ".hidden"),
    ("data.name", ""),
    ("base.seed", -1),
    ("base.n_workers", 0),
    ("ingest.min_side", 0),
    ("ingest.max_aspect_ratio", 0.5),
    ("caption.num_beams", 0),
    ("caption.max_new_tokens", -5),
    ("ground.box_threshold", 1.5),
    ("ground.text_threshold", -0.1),
    ("ground.crop_padding", -0.5),
    ("encode.batch_size", True),
    ("encode.batch_size", "16"),
    ("encode.color_bins", -3),
    ("encode.phrase_template", "a photo of {x}"),
    ("encode.phrase_template", "no placeholder"),
    ("encode.class_prompts", ["only one"]),
    ("train.pseudo_threshold", 1.2),
    ("train.pseudo_pool", "train"),
    ("train.heads", []),
    ("train.heads", ["mlp", "mlp"]),
    ("evaluate.threshold", 2.0),
    ("evaluate.qf_matrix", [0, 50]),
    ("evaluate.perturbations", ["jpeg_900"]),
    ("evaluate.datasets", {"../x": "data/x"}),
]


def _with(params: dict, key: str, value) -> dict:
    node = params
    *parents, leaf = key.split(".")
    for part in parents:
        node = node.setdefault(part, {})
    node[leaf] = value
    return params


def _tree_state(folder: Path) -> dict[str, tuple[int, str]]:
    return {
        str(p.relative_to(folder)): (
            p.stat().st_mtime_ns,
            hashlib.sha256(p.read_bytes()).hexdigest(),
        )
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


@pytest.fixture
def outputs(tmp_path):
    """Existing outputs of every extraction stage, as a run would have left them."""
    out = tmp_path / "cache" / "sample"
    for stage in ("ingest", "captions", "objects", "clip"):
        for k in range(3):
            shard = out / stage / f"shard_{k:05d}.h5"
            shard.parent.mkdir(parents=True, exist_ok=True)
            shard.write_bytes(os.urandom(64))
    (out / "ingest" / "manifest.csv").write_text("path,label\n")
    return out


@pytest.mark.parametrize("key, value", BAD_PARAMS, ids=[f"{k}={v!r}" for k, v in BAD_PARAMS])
def test_bad_param_refused_fast_naming_the_key(tmp_path, outputs, key, value, capsys):
    from stages import caption, encode, ingest

    params = _with(yaml.safe_load((ROOT / "params.yaml").read_text()), key, value)
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(params))
    before = _tree_state(outputs)
    runs = [
        lambda: ingest.main(
            [
                "--params",
                str(path),
                "--data",
                str(ROOT / "data" / "sample"),
                "--out",
                str(outputs / "ingest"),
                "--name",
                "sample",
            ]
        ),
        lambda: caption.main(
            [
                "--params",
                str(path),
                "--ingest",
                str(outputs / "ingest"),
                "--out",
                str(outputs / "captions"),
                "--name",
                "sample",
            ]
        ),
        lambda: encode.main(
            [
                "--params",
                str(path),
                "--ingest",
                str(outputs / "ingest"),
                "--captions",
                str(outputs / "captions"),
                "--objects",
                str(outputs / "objects"),
                "--out",
                str(outputs / "clip"),
                "--name",
                "sample",
            ]
        ),
    ]
    for run in runs:
        start = time.perf_counter()
        assert run() == 1
        assert time.perf_counter() - start < 5
        err = capsys.readouterr().err
        shown = key.split(".")[0] if key == "evaluate.datasets" else key
        assert shown in err, err
        assert "Traceback" not in err
    assert _tree_state(outputs) == before


def test_range_table_covers_every_numeric_param():
    """A numeric param added later without a range rule would slip past check_ranges."""
    import dataclasses
    import typing

    from pipeline import config

    def numeric_keys(cls, prefix=""):
        for f in dataclasses.fields(cls):
            hint = typing.get_type_hints(cls)[f.name]
            key = f"{prefix}{f.name}"
            if dataclasses.is_dataclass(hint):
                yield from numeric_keys(hint, key + ".")
            elif hint in (int, float):
                yield key

    missing = [k for k in numeric_keys(config.Params) if k not in config._RANGES]
    assert not missing


def test_head_ranges_accept_the_heads_own_defaults():
    import inspect

    from pipeline import config
    from pipeline.heads import HEADS

    for name, cls in HEADS.items():
        for p in inspect.signature(cls.__init__).parameters.values():
            rule = config._HEAD_RANGES.get(p.name)
            if rule is not None:
                assert rule.ok(p.default), (name, p.name, p.default)


def test_params_check_imports_nothing_heavy_and_is_fast(tmp_path):
    """A typo is reported before torch, transformers or open_clip are even imported."""
    params = _with(yaml.safe_load((ROOT / "params.yaml").read_text()), "ingest.shard_size", -2)
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(params))
    code = (
        "import sys, time; t = time.perf_counter()\n"
        "from pipeline.errors import ConfigError\n"
        "import stages.ingest, stages.caption, stages.ground, stages.encode, stages.train\n"
        "from pipeline.config import load_params\n"
        "try:\n"
        f"    load_params({str(path)!r})\n"
        "except ConfigError as err:\n"
        "    print('refused:', err)\n"
        "heavy = [m for m in ('torch', 'transformers', 'open_clip', 'sklearn', 'h5py') "
        "if m in sys.modules]\n"
        "print('heavy:', heavy, 'seconds:', time.perf_counter() - t)\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        env=dict(os.environ, PYTHONPATH=str(ROOT)),
    )
    assert "refused: " in proc.stdout and "ingest.shard_size = -2" in proc.stdout, proc.stderr
    assert "heavy: []" in proc.stdout, proc.stdout
    # The whole valid-params check (registries included) stays clear of the model libraries.
    code = (
        "import sys\nfrom pipeline.config import load_params\n"
        f"load_params({str(ROOT / 'params.yaml')!r})\n"
        "print([m for m in ('torch', 'transformers', 'open_clip') if m in sys.modules])\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        env=dict(os.environ, PYTHONPATH=str(ROOT)),
    )
    assert proc.stdout.strip() == "[]", proc.stdout + proc.stderr


# ------------------------------------------------------------------ user errors versus bugs


def _tiny_params(tmp: Path, **overrides) -> str:
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["models"]["preset"] = "tiny"
    params["ingest"]["shard_size"] = 8
    for dotted, value in overrides.items():
        _with(params, dotted, value)
    path = tmp / "params.yaml"
    path.write_text(yaml.safe_dump(params))
    return str(path)


def test_an_internal_bug_keeps_its_traceback(tmp_path, monkeypatch):
    """A ValueError from deep code is a bug, not bad input: it is not turned into a message."""
    from pipeline import data as datamod
    from stages import ingest

    def broken(*args, **kwargs):
        raise ValueError("a bug deep in the library")

    monkeypatch.setattr(datamod, "assign_splits", broken)
    from tests.helpers import tiny_sample

    data = tiny_sample(tmp_path / "data", per_generator=1, n_real=2)
    params = _tiny_params(tmp_path)
    with pytest.raises(ValueError, match="a bug deep in the library"):
        ingest.main(
            ["--params", params, "--data", str(data), "--out", str(tmp_path / "i"), "--name", "t"]
        )


def test_user_errors_are_one_line_with_exit_1(tmp_path):
    """Run as DVC does (a process): one line on stderr, exit status 1, no traceback."""
    params = _tiny_params(tmp_path)
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "stages.ingest",
            "--params",
            params,
            "--data",
            str(tmp_path / "missing"),
            "--out",
            str(tmp_path / "i"),
            "--name",
            "t",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        env=dict(os.environ, PYTHONPATH=str(ROOT)),
    )
    assert proc.returncode == 1
    errors = [line for line in proc.stderr.splitlines() if "error" in line.lower()]
    assert len(errors) == 1 and "does not exist" in errors[0], proc.stderr
    assert "Traceback" not in proc.stderr


def test_read_only_output_folder_is_a_clear_error(tmp_path, capsys):
    from stages import ingest

    from tests.helpers import tiny_sample

    data = tiny_sample(tmp_path / "data", per_generator=1, n_real=2)
    out = tmp_path / "ro"
    out.mkdir()
    out.chmod(0o500)
    # root ignores permission bits; the immutable attribute stops root too.
    immutable = os.geteuid() == 0
    if immutable and subprocess.run(["chattr", "+i", str(out)], capture_output=True).returncode:
        pytest.skip("running as root without chattr: a read-only folder cannot be made")
    try:
        code = ingest.main(
            [
                "--params",
                _tiny_params(tmp_path),
                "--data",
                str(data),
                "--out",
                str(out / "ingest"),
                "--name",
                "t",
            ]
        )
    finally:
        if immutable:
            subprocess.run(["chattr", "-i", str(out)], check=True)
        out.chmod(0o700)
    assert code == 1
    err = capsys.readouterr().err
    assert "cannot write to the output folder" in err and str(out) in err
