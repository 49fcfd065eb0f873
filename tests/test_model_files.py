"""Malformed numbers in saved heads and weights files: one-line `ModelFileError`s, checked
against the sizes of the arrays actually in the file before anything is allocated."""

import json
import struct
import time

import pytest

from pipeline.errors import ModelFileError
from pipeline.weight_files import check_safetensors
from tests.helpers import make_image, saved_head, tiny_params


def _edit_header(path, change):
    """Rewrite a safetensors file's JSON header in place (the data bytes stay)."""
    blob = path.read_bytes()
    (n,) = struct.unpack("<Q", blob[:8])
    header = json.loads(blob[8 : 8 + n])
    change(header)
    text = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(text)) + text + blob[8 + n :])


def _tensors(header):
    return [v for k, v in header.items() if k != "__metadata__"]


def _n_features(text):
    """head.json with n_features_in_ given as the literal JSON `text`."""

    def change(directory):
        meta = (directory / "head.json").read_text()
        n = json.loads(meta)["fitted"]["n_features_in_"]
        meta = meta.replace(f'"n_features_in_": {n}', f'"n_features_in_": {text}', 1)
        assert text in meta
        (directory / "head.json").write_text(meta)

    return change


TAMPERS = {
    "offsets-as-strings": lambda d: _edit_header(
        d / "weights.safetensors",
        lambda h: [t.update(data_offsets=[str(x) for x in t["data_offsets"]]) for t in _tensors(h)],
    ),
    "shape-beyond-bytes": lambda d: _edit_header(
        d / "weights.safetensors",
        lambda h: _tensors(h)[0].update(shape=[10**9, 10**9]),
    ),
    "header-5000-digits": lambda d: (
        _edit_header(
            d / "weights.safetensors",
            lambda h: h.update(__metadata__={"x": "1"}),
        )
        or (d / "weights.safetensors").write_bytes(
            (d / "weights.safetensors").read_bytes().replace(b'"1"', b"1" * 5000, 1)
        )
    ),
    "n-features-5000-digits": _n_features("9" * 5000),
    "n-features-1e400": _n_features("1e400"),
    "n-features-1e12": _n_features("1e12"),
    "n-features-10**12": _n_features(str(10**12)),
    "n-features-1e9": _n_features("1000000000"),
    "n-features-string": _n_features('"6"'),
}


@pytest.mark.parametrize("head_name", ["svm", "mlp"])
@pytest.mark.parametrize("tamper", list(TAMPERS))
def test_malformed_numbers_are_one_line_naming_the_file(tmp_path, capsys, tamper, head_name):
    from pipeline.cli import main as cli

    directory = saved_head(tmp_path, head_name)
    TAMPERS[tamper](directory)
    image = make_image(tmp_path / "x.png", 0)
    args = ["predict", "--head", str(directory), "--out", str(tmp_path / "p.csv")]
    args += ["--params", tiny_params(tmp_path), "--cache", str(tmp_path / "c"), str(image)]
    start = time.perf_counter()
    code = cli(args)
    err = capsys.readouterr().err
    assert code == 1, err
    assert time.perf_counter() - start < 30
    lines = [line for line in err.splitlines() if "error" in line]
    assert len(lines) == 1 and str(directory) in lines[0] and len(lines[0]) < 800, err
    assert "Traceback" not in err


def test_a_good_safetensors_file_passes(tmp_path):
    check_safetensors(saved_head(tmp_path, "mlp") / "weights.safetensors")


def test_a_header_length_beyond_any_weights_file_is_refused(tmp_path):
    path = tmp_path / "w.safetensors"
    path.write_bytes(struct.pack("<Q", 2**63) + b"{}")
    with pytest.raises(ModelFileError, match="truncated"):
        check_safetensors(path)
