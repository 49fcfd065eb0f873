"""Messages that say what is actually wrong: the key, the line, the file type, the folder."""

import os

import pytest

from pipeline.config import load_params
from pipeline.data import images
from pipeline.data.images import inspect_image
from pipeline.data.manifest import read_manifest
from pipeline.errors import ConfigError, DatasetError
from tests.helpers import make_image, saved_head, tiny_params


def test_an_empty_model_id_names_the_role_in_the_fix(tmp_path):
    params = tiny_params(tmp_path, **{"models.blip2.id": "", "models.blip2.path": ""})
    with pytest.raises(ConfigError) as info:
        load_params(params)
    assert "models.blip2.path" in str(info.value) and "{role}" not in str(info.value)


def _manifest(tmp_path, body):
    path = tmp_path / "manifest.csv"
    path.write_text("file,label,generator\n" + body)
    return path


def test_an_empty_path_cell_is_called_empty_naming_its_line(tmp_path):
    path = _manifest(tmp_path, "a.png,real,real\n,fake,sd\n")
    with pytest.raises(DatasetError, match=f"{path}:3: the file cell is empty") as info:
        read_manifest(path)
    assert "escapes" not in str(info.value)


def test_a_row_with_too_many_cells_names_its_line(tmp_path):
    path = _manifest(tmp_path, 'a.png,real,real\n"b\n.png",real,real\nc.png,fake,sd,extra\n')
    with pytest.raises(DatasetError, match=f"{path}:5: the row has more cells"):
        read_manifest(path)


def test_special_files_are_named_by_their_type_and_never_opened(tmp_path):
    fifo = tmp_path / "pipe.png"
    os.mkfifo(fifo)  # opening it would block forever
    assert inspect_image(fifo) == "not a regular file but a FIFO (named pipe)"
    device = tmp_path / "zero.png"
    device.symlink_to("/dev/zero")  # reading it would never end
    assert inspect_image(device) == "not a regular file but a character device"
    folder = tmp_path / "folder.png"
    folder.mkdir()
    assert inspect_image(folder) == "not a regular file but a directory"


def test_an_unreadable_file_is_not_called_corrupt(tmp_path, monkeypatch):
    path = make_image(tmp_path / "a.png", seed=0)

    def denied(*args, **kwargs):
        raise PermissionError(13, "Permission denied", str(path))

    monkeypatch.setattr(images, "open", denied, raising=False)
    assert inspect_image(path) == "cannot read file: Permission denied"


def test_predict_names_the_folder_of_broken_images(tmp_path, capsys, monkeypatch):
    from pipeline import predict
    from pipeline.cli import main as cli

    head = saved_head(tmp_path, "svm")
    monkeypatch.setattr(predict, "check_settings", lambda *args: None)
    folder = tmp_path / "broken"
    folder.mkdir()
    for i in range(2):
        (folder / f"{i}.jpg").write_bytes(b"\xff\xd8\xff not really a jpeg")
    args = ["predict", "--head", str(head), "--out", str(tmp_path / "p.csv")]
    args += ["--params", tiny_params(tmp_path), "--cache", str(tmp_path / "c"), str(folder)]
    assert cli(args) == 1
    lines = [line for line in capsys.readouterr().err.splitlines() if "error" in line]
    assert len(lines) == 1 and f"no usable image in {folder}:" in lines[0], lines


def test_predict_checks_its_inputs_before_anything_else(tmp_path, capsys):
    from pipeline.cli import main as cli

    typo = tmp_path / "imgaes"
    args = ["predict", "--head", str(tmp_path / "no-head"), "--out", str(tmp_path / "p.csv")]
    args += ["--params", str(tmp_path / "no-params.yaml"), str(typo)]
    assert cli(args) == 1
    err = capsys.readouterr().err
    assert f"{typo} does not exist" in err and "no-head" not in err
