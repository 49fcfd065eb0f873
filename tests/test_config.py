"""params.yaml is typed and closed: unknown keys and wrong types are errors that name the fix."""

import pytest
import yaml

from pipeline.config import ConfigError, load_params, params_from_dict
from pipeline.rows.key import params_hash
from tests.helpers import ROOT


def test_shipped_params_load():
    params = load_params(ROOT / "params.yaml")
    assert params.data.name == "sample"
    assert params.models.clip.id == "ViT-L-14" and params.models.clip.pretrained == "openai"
    assert params.features.w1 == 1.0 and params.features.w2 == 1.0


def test_unknown_key_lists_known_keys():
    with pytest.raises(ConfigError) as err:
        params_from_dict({"encode": {"batchsize": 4}})
    assert "encode.batchsize" in str(err.value) and "batch_size" in str(err.value)


def test_unknown_section():
    with pytest.raises(ConfigError, match="unknown key trian"):
        params_from_dict({"trian": {}})


@pytest.mark.parametrize(
    "values, fragment",
    [
        ({"encode": {"batch_size": "8"}}, "encode.batch_size must be an integer"),
        ({"ground": {"enabled": "yes"}}, "ground.enabled must be true or false"),
        ({"models": {"preset": "small"}}, "models.preset = 'small' is not one of: paper, tiny"),
        ({"ingest": {"split_fractions": [0.5, 0.5]}}, "split_fractions"),
        ({"models": {"clip": {"idd": "x"}}}, "models.clip.idd"),
    ],
)
def test_bad_values(values, fragment):
    with pytest.raises(ConfigError) as err:
        params_from_dict(values)
    assert fragment in str(err.value)


def test_file_errors_name_the_file(tmp_path):
    bad = tmp_path / "params.yaml"
    bad.write_text(yaml.safe_dump({"caption": {"sourc": "x"}}))
    with pytest.raises(ConfigError, match=str(bad)):
        load_params(bad)
    with pytest.raises(ConfigError, match="not found"):
        load_params(tmp_path / "missing.yaml")


def test_params_hash_tracks_values():
    a = params_from_dict({})
    b = params_from_dict({"features": {"w2": 0.5}})
    assert params_hash(a.features) != params_hash(b.features)
    assert params_hash(a.features) == params_hash(params_from_dict({}).features)


def test_shipped_params_equal_the_library_defaults():
    """params.yaml and the dataclass defaults must not drift apart (library users get the
    same run as `dvc repro`), except the dataset, which only the project has."""
    shipped = load_params(ROOT / "params.yaml")
    assert shipped == params_from_dict({})


def test_head_params_are_checked_at_load():
    with pytest.raises(ConfigError, match="hiden"):
        params_from_dict({"train": {"mlp": {"hiden": 3}}})


def test_check_stage_refuses_a_missing_data_path_and_a_misspelt_key(tmp_path, capsys):
    from stages import check

    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["data"]["path"] = str(tmp_path / "no_such_folder")
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(params))
    stamp = tmp_path / "params.ok"
    assert check.main(["--params", str(path), "--out", str(stamp)]) == 1
    err = capsys.readouterr().err
    assert f"data.path = '{tmp_path / 'no_such_folder'}' does not exist" in err
    params["data"]["path"] = str(ROOT / "data" / "sample")
    params["train"]["mlp"]["hiden"] = 256
    path.write_text(yaml.safe_dump(params))
    assert check.main(["--params", str(path), "--out", str(stamp)]) == 1
    assert "train.mlp.hiden" in capsys.readouterr().err and not stamp.exists()
    del params["train"]["mlp"]["hiden"]
    # The weights are checked here too, before ingest reads the data.
    params["models"]["preset"] = "paper"
    params["models"]["clip"]["path"] = str(tmp_path / "missing.pt")
    path.write_text(yaml.safe_dump(params))
    assert check.main(["--params", str(path), "--out", str(stamp)]) == 1
    assert "missing.pt" in capsys.readouterr().err and not stamp.exists()
    params["models"]["preset"] = "tiny"
    path.write_text(yaml.safe_dump(params))
    assert check.main(["--params", str(path), "--out", str(stamp)]) == 0
    assert stamp.read_text() == check.STAMP
