"""Protocol presets turn into `dvc exp run -S` arguments that params.yaml accepts."""

import shlex

import pytest
import yaml

from pipeline.config import ConfigError, params_from_dict
from pipeline.protocols import list_protocols, protocol_args
from tests.helpers import ROOT


def _has(tree, dotted):
    for part in dotted.split("."):
        if not isinstance(tree, dict) or part not in tree:
            return False
        tree = tree[part]
    return True


def _apply(args):
    """Apply `++key=value` overrides the way DVC does, to the shipped params.yaml."""
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    for flag, item in zip(args[::2], args[1::2]):
        assert flag == "-S"
        key, value = shlex.split(item)[0].split("=", 1)
        # DVC refuses a plain -S for a key params.yaml lacks; ++ is only for new keys
        assert _has(params, key.removeprefix("++")) == (not key.startswith("++")), key
        key = key.removeprefix("++")
        *parents, leaf = key.split(".")
        node = params
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = yaml.safe_load(value)
    return params


@pytest.mark.parametrize("name", ["item", "tidy", "ct2", "qf"])
def test_every_protocol_yields_valid_params(name):
    assert name in list_protocols()
    params = params_from_dict(_apply(protocol_args(name, "/data")))
    if name == "qf":
        assert params.evaluate.qf_matrix == [40, 65, 90] and params.features.kind == "image"
    if name == "item":
        assert params.evaluate.datasets == {"ufd_test": "/data/UniversalFakeDetect/test"}
    if name == "tidy":
        assert params.features.kind == "tidy" and params.caption.source == "blip2"
        # TIDY's main table uses its global + local distance: the objects must be grounded.
        assert params.ground.enabled and params.features.w1 == params.features.w2 == 1.0
    if name == "ct2":
        assert params.train.head_kinds["multitask"] == "bert_image_pooled" and params.encode.bert
        assert params.encode.clip_pooled and params.models.clip.id == "ViT-B-32"


def test_protocol_errors():
    with pytest.raises(ConfigError, match="known protocols"):
        protocol_args("nope")
    with pytest.raises(ConfigError, match="--data-root"):
        protocol_args("item")


def test_existing_keys_get_a_plain_set_and_new_keys_plus_plus():
    args = protocol_args("item", "/data")
    assert "data.layout=cnndetection" in args and "++data.layout=cnndetection" not in args
    assert "++evaluate.datasets.ufd_test=/data/UniversalFakeDetect/test" in args
