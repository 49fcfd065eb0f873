"""OS errors a user can fix while writing outputs, and Ctrl-C: one line, the path, the fix."""

import errno
import os
import time

import pytest

from pipeline.errors import OutputError, output_error
from pipeline.rows import atomic, store
from stages import ingest
from tests.helpers import make_image, tiny_params, write_manifest


def _ingest(tmp_path):
    data = tmp_path / "data"
    rows = []
    for i, generator in enumerate(["real", "real", "sd", "sd"]):
        make_image(data / f"{i}.png", seed=i)
        label = "real" if generator == "real" else "fake"
        rows.append({"file": f"{i}.png", "label": label, "generator": generator})
    write_manifest(data / "manifest.csv", rows)
    params = tiny_params(tmp_path)
    out = tmp_path / "out"
    return out, ["--params", params, "--data", str(data), "--out", str(out), "--name", "t"]


def _error_lines(text):
    """stderr's lines without the progress bars."""
    return [line for line in text.splitlines() if line.strip() and "%|" not in line]


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EACCES, errno.EROFS])
def test_a_write_failing_with_a_fixable_os_error_is_one_line_naming_the_file(
    tmp_path, monkeypatch, capsys, code
):
    out, argv = _ingest(tmp_path)
    real_replace = os.replace

    def failing_replace(src, dst):
        if str(dst).endswith(".h5"):
            raise OSError(code, os.strerror(code), str(src))
        return real_replace(src, dst)

    monkeypatch.setattr(atomic.os, "replace", failing_replace)
    assert ingest.main(argv) == 1
    lines = _error_lines(capsys.readouterr().err)
    assert len(lines) == 1, lines
    assert f"cannot write {out / store.shard_name(0)}: {os.strerror(code)}" in lines[0]
    assert "rerun" in lines[0] and "Traceback" not in lines[0]
    assert not [p for p in out.iterdir() if p.suffix == ".tmp"]  # nothing half-written left


def test_disk_full_inside_hdf5_is_one_line(tmp_path, monkeypatch, capsys):
    """h5py reports a full disk as OSError errno 28 from inside its own write."""
    out, argv = _ingest(tmp_path)
    real_file = store.h5py.File

    def full(path, mode="r", *args, **kwargs):
        if mode == "w":
            raise OSError(errno.ENOSPC, "Can't synchronously write data (file write failed)")
        return real_file(path, mode, *args, **kwargs)

    monkeypatch.setattr(store.h5py, "File", full)
    assert ingest.main(argv) == 1
    lines = _error_lines(capsys.readouterr().err)
    assert len(lines) == 1 and "No space left on device" in lines[0], lines
    assert str(out / store.shard_name(0)) in lines[0]


def test_other_os_errors_stay_bugs():
    assert output_error(OSError(errno.EBADF, "Bad file descriptor")) is None
    made = output_error(PermissionError(errno.EACCES, "Permission denied", "/x/y.h5"))
    assert isinstance(made, OutputError) and "cannot write /x/y.h5" in str(made)


def test_ctrl_c_is_one_line_with_status_130(tmp_path, monkeypatch, capsys):
    from pipeline.data import ingest as data_ingest

    out, argv = _ingest(tmp_path)

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(data_ingest, "assign_splits", interrupted)
    assert ingest.main(argv) == 130
    assert _error_lines(capsys.readouterr().err) == ["stage ingest interrupted; rerun to resume"]


def test_ctrl_c_on_a_running_stage_and_its_workers_is_one_line(tmp_path):
    """SIGINT to the whole process group, as a terminal's Ctrl-C sends it, mid-ingest."""
    import signal
    import subprocess
    import sys

    from tests.helpers import ROOT

    data = tmp_path / "data"
    rows = []
    for i in range(400):
        make_image(data / f"{i}.png", seed=i, size=(192, 192))
        rows.append({"file": f"{i}.png", "label": "real", "generator": "real"})
    write_manifest(data / "manifest.csv", rows)
    # Stopped by tests/kill_probe.py once the decode workers have handed over their first
    # batch, the others still being inspected: a point of the work, which no load can move.
    marker = tmp_path / "at_work"
    cmd = [sys.executable, "-m", "tests.kill_probe", str(tmp_path / "counts.json"), str(marker)]
    cmd += ["batch", "1", "stages.ingest", "--params", tiny_params(tmp_path)]
    cmd += ["--data", str(data), "--out", str(tmp_path / "out"), "--name", "t"]
    err = tmp_path / "stderr.txt"
    with err.open("w") as sink:
        proc = subprocess.Popen(
            cmd,
            cwd=ROOT,
            stderr=sink,
            text=True,
            start_new_session=True,
            env=dict(os.environ, PYTHONPATH=str(ROOT)),
            # As started from a terminal: a shell without job control starts its background
            # commands (pytest among them) with SIGINT ignored, which a child would inherit.
            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
        )
        while not marker.exists():
            assert proc.poll() is None, err.read_text()  # it must not end before the stop
            time.sleep(0.05)
        os.killpg(proc.pid, signal.SIGINT)
        proc.wait(timeout=60)
    lines = _error_lines(err.read_text())
    assert proc.returncode == 130, lines
    assert lines[-1] == "stage ingest interrupted; rerun to resume"
    assert not any("Traceback" in line for line in lines), lines
