"""`misalign weights check / fetch`: what the params need, where it was looked for, and fast,
named failures offline (no test touches the network)."""

import time
from pathlib import Path

import pytest

from pipeline.config import Params, params_from_dict, to_dict


def _params(**models):
    values = to_dict(Params())
    values["models"].update(models)
    return params_from_dict(values)


@pytest.fixture
def empty_caches(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HOME", str(tmp_path / "home"))  # ~/.cache/clip
    return tmp_path


def test_check_lists_each_needed_model_as_missing_with_where_it_looked(empty_caches, capsys):
    from pipeline.cli import main as cli

    params = empty_caches / "params.yaml"
    params.write_text((Path(__file__).parents[1] / "params.yaml").read_text())
    assert cli(["weights", "check", "--params", str(params)]) == 1
    out = capsys.readouterr()
    lines = out.out.splitlines()
    assert [line.split()[:3] for line in lines] == [
        ["MISSING", "clip", "ViT-L-14/openai"],
        ["MISSING", "blip2", "Salesforce/blip2-opt-2.7b"],
        ["MISSING", "grounder", "IDEA-Research/grounding-dino-base"],
    ]
    assert str(empty_caches / "hub") in lines[1] and "timm/vit_large_patch14_clip_224" in lines[0]
    assert "dvc exp run -S models.preset=tiny" in out.err


@pytest.mark.parametrize(
    ("captioner", "model_id"),
    [("blip", "Salesforce/blip-image-captioning-large"), ("llava", "llava-hf/llava-1.5-7b-hf")],
)
def test_check_names_the_chosen_captioner(empty_caches, captioner, model_id):
    from pipeline import weights

    values = to_dict(Params())
    values["caption"]["model"] = captioner
    statuses = weights.check(params_from_dict(values))
    assert [(s.role, s.model, s.present) for s in statuses][1] == (captioner, model_id, False)
    assert "blip2" not in {s.role for s in statuses}


def test_check_finds_a_cached_model(empty_caches):
    from pipeline import weights

    snap = empty_caches / "hub" / "models--Salesforce--blip2-opt-2.7b" / "snapshots" / "abc123"
    snap.mkdir(parents=True)
    (snap / "config.json").write_text("{}")
    (snap.parents[1] / "refs").mkdir()
    (snap.parents[1] / "refs" / "main").write_text("abc123")
    found = {s.role: s for s in weights.check(_params())}
    assert found["blip2"].present and "abc123" in found["blip2"].where
    assert not found["clip"].present and not found["grounder"].present


def test_fetch_offline_fails_at_once_with_the_reason(empty_caches, monkeypatch):
    from pipeline import weights

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    start = time.monotonic()
    with pytest.raises(weights.WeightsFetchError, match="HF_HUB_OFFLINE=1 is set") as err:
        weights.fetch(_params())
    assert time.monotonic() - start < 30
    assert "`dvc exp run -S models.preset=tiny`" in str(err.value)  # the offline way


def test_fetch_offline_command_names_the_tiny_preset(empty_caches, monkeypatch, capsys):
    """`misalign weights fetch` offline says, like `weights check`, how to run without weights."""
    from pipeline.cli import main as cli

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    params = empty_caches / "params.yaml"
    params.write_text((Path(__file__).parents[1] / "params.yaml").read_text())
    assert cli(["weights", "fetch", "--params", str(params)]) == 1
    err = capsys.readouterr().err
    assert "HF_HUB_OFFLINE=1" in err and "dvc exp run -S models.preset=tiny" in err
    assert len(err.strip().splitlines()) == 1


def test_fetch_with_an_unreachable_hub_fails_in_seconds(empty_caches, monkeypatch):
    from huggingface_hub import constants

    from pipeline import weights

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")  # closed local port
    start = time.monotonic()
    with pytest.raises(weights.WeightsFetchError, match="cannot reach http://127.0.0.1:9") as err:
        weights.fetch(_params(), timeout=5)
    assert time.monotonic() - start < 30
    assert "models.preset=tiny" in str(err.value)


def test_snapshot_skips_pickles_only_when_the_repo_has_safetensors(monkeypatch):
    import huggingface_hub

    from pipeline import weights

    seen = {}
    repos = {"a/both": ["model.safetensors", "pytorch_model.bin"], "a/bin": ["pytorch_model.bin"]}
    monkeypatch.setattr(
        huggingface_hub.HfApi, "list_repo_files", lambda self, repo: repos[repo], raising=True
    )
    monkeypatch.setattr(
        huggingface_hub,
        "snapshot_download",
        lambda repo, ignore_patterns, etag_timeout: seen.setdefault(repo, ignore_patterns),
    )
    weights._hf_snapshot("a/both", 5)
    weights._hf_snapshot("a/bin", 5)
    assert "*.bin" in seen["a/both"] and "*.bin" not in seen["a/bin"]
    assert "*.h5" in seen["a/bin"]  # never TensorFlow / Flax copies


def test_open_clip_hub_tags_with_a_file_name_resolve_as_open_clip_does():
    import open_clip

    from pipeline.models.clip import _preprocess_kwargs, hub_files

    cfg = open_clip.get_pretrained_cfg("ViTamin-XL-384", "datacomp1b")
    assert cfg["hf_hub"] == "jienengchen/ViTamin-XL-384px/pytorch_model.bin"
    assert hub_files(cfg) == (
        "jienengchen/ViTamin-XL-384px",
        ["pytorch_model.safetensors", "pytorch_model.bin"],
    )
    openai = open_clip.get_pretrained_cfg("ViT-L-14", "openai")
    assert hub_files(openai) == (
        "timm/vit_large_patch14_clip_224.openai",
        ["open_clip_model.safetensors", "open_clip_pytorch_model.bin"],
    )
    # A tag whose preprocessing is not OpenAI's keeps its own mean/std, as open_clip applies it.
    tags = [(m, t) for m, t in open_clip.list_pretrained()]
    other = next(
        open_clip.get_pretrained_cfg(m, t)
        for m, t in tags
        if tuple(open_clip.get_pretrained_cfg(m, t).get("mean", open_clip.OPENAI_DATASET_MEAN))
        != open_clip.OPENAI_DATASET_MEAN
    )
    kwargs = _preprocess_kwargs(other)
    assert kwargs["image_mean"] == tuple(other["mean"])
    assert kwargs["image_std"] == tuple(other["std"])
