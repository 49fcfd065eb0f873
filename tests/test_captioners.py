"""BLIP and LLaVA captioners: the tiny presets, the caption step per `caption.model`, the rows of
each captioner kept apart in the key and in provenance."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipeline.config import Params, params_from_dict, to_dict
from pipeline.data.ingest import run_ingest
from pipeline.extract.caption import run_caption
from pipeline.models import WeightsMissing, check_weights
from pipeline.models.blip import BlipCaptioner
from pipeline.models.llava import ITEM_PROMPT, LlavaCaptioner
from pipeline.provenance import models_text, run_provenance
from pipeline.rows import store
from pipeline.rows.runner import retained_dir
from tests.helpers import make_image, write_manifest

IMAGES = [Image.fromarray(np.full((40, 52, 3), v, dtype=np.uint8)) for v in (10, 120, 250)]


def _params(captioner: str, **caption: object) -> Params:
    values = to_dict(Params())
    values["models"]["preset"] = "tiny"
    values["ingest"]["shard_size"] = 3
    values["caption"].update({"model": captioner, "num_beams": 1, "max_new_tokens": 6, **caption})
    return params_from_dict(values)


@pytest.mark.parametrize("cls", [BlipCaptioner, LlavaCaptioner])
def test_tiny_captioner_is_saved_and_loaded_like_real_weights(cls, tmp_path):
    tiny = cls.load(preset="tiny")
    captions = tiny.caption(IMAGES, num_beams=2, max_new_tokens=6)
    assert len(captions) == 3 and all(c and c == c.strip() for c in captions)
    tiny.save_pretrained(tmp_path / "saved")
    again = cls.load(model_id="some/captioner", path=tmp_path / "saved")
    assert again.weights_id.startswith("some/captioner@sha256:")
    assert again.caption(IMAGES, num_beams=2, max_new_tokens=6) == captions


def test_llava_asks_items_question_in_a_user_turn():
    llava = LlavaCaptioner.load(preset="tiny")
    encoded = llava.item_encoder()(IMAGES[0])
    text = llava.processor.tokenizer.decode(encoded["input_ids"][0])
    assert ITEM_PROMPT in text and text.rstrip().endswith("ASSISTANT:")
    # the image placeholder is expanded to one token per patch (16 for 32 px, patch 8)
    image_id = llava.model.config.image_token_index
    assert int((encoded["input_ids"] == image_id).sum()) == 16


def test_blip_returns_only_the_text_after_a_prompt():
    blip = BlipCaptioner.load(preset="tiny")
    prompted = blip.caption(IMAGES, prompt="a photo of", num_beams=1, max_new_tokens=4)
    plain = blip.caption(IMAGES, num_beams=1, max_new_tokens=4)
    assert all(not c.startswith("a photo of") for c in prompted) and prompted != plain


def test_missing_weights_name_the_chosen_captioner(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    params = _params("llava")
    models = params.models.__class__(**{**params.models.__dict__, "preset": "paper"})
    with pytest.raises(WeightsMissing) as err:
        check_weights(models, ["llava"])
    assert "llava-hf/llava-1.5-7b-hf" in str(err.value) and "models.llava.path" in str(err.value)


def _captions(cache: Path) -> dict[str, tuple[str, str]]:
    rows = store.concat_rows([store.read_shard(p) for p in store.list_shards(cache / "captions")])
    return {
        str(i): (str(c), str(s))
        for i, c, s in zip(rows["ids"], rows["caption"], rows["caption_source"])
    }


def test_caption_model_switches_the_rows_and_switching_back_reuses_them(tmp_path):
    data = tmp_path / "data"
    rows = [
        {"path": f"im{i}.png", "label": "real" if i % 2 else "generated", "caption": ""}
        for i in range(5)
    ]
    for i in range(5):
        make_image(data / f"im{i}.png", seed=i)
    write_manifest(data / "manifest.csv", rows)
    cache = tmp_path / "cache"
    base = _params("blip2")
    run_ingest(data, cache / "ingest", cfg=base.ingest, base=base.base, dataset="t")

    def caption(captioner: str) -> dict[str, object]:
        p = _params(captioner)
        return run_caption(
            cache / "ingest",
            cache / "captions",
            cfg=p.caption,
            models=p.models,
            base=p.base,
            dataset="t",
        )

    first = caption("blip2")
    assert first["n_processed"] == 5
    made: dict[str, dict[str, tuple[str, str]]] = {"blip2": _captions(cache)}
    for captioner in ("blip", "llava"):
        timings = caption(captioner)
        assert timings["n_processed"] == 5 and timings["n_reused"] == 0
        made[captioner] = _captions(cache)
        attrs = store.dataset_attrs(cache / "captions")
        assert f"tiny-{captioner}@seed0" in str(attrs["model"])
        assert {s for _, s in made[captioner].values()} == {f"tiny-{captioner}"}
    # each captioner wrote its own captions for the same images
    assert made["blip2"].keys() == made["blip"].keys() == made["llava"].keys()
    for other in ("blip", "llava"):
        assert all(made[other][i][0] != made["blip2"][i][0] for i in made["blip2"])
    # back to BLIP-2: every row comes from the kept BLIP-2 shards, none is recomputed
    back = caption("blip2")
    assert back["n_processed"] == 0 and back["n_reused"] == 5
    assert _captions(cache) == made["blip2"]
    kept = sorted(p.name for p in retained_dir(cache / "captions").iterdir())
    assert len(kept) == 2  # BLIP's and LLaVA's rows, kept for their own switch back
    assert caption("blip")["n_reused"] == 5


@pytest.mark.parametrize("captioner", ["blip", "llava"])
def test_provenance_names_the_captioner_that_ran(captioner):
    record = run_provenance(_params(captioner))
    assert record["models"]["captioner"] == f"tiny-{captioner}"
    assert f"captioner=tiny-{captioner}" in models_text(record)
    real = to_dict(_params(captioner))
    real["models"]["preset"] = "paper"
    text = models_text(run_provenance(params_from_dict(real)))
    assert f"captioner={getattr(params_from_dict(real).models, captioner).id}" in text


def test_the_captioner_is_in_the_caption_rows_key():
    from pipeline.extract.caption import CaptionStep

    hashes = {
        c: CaptionStep(Path("i"), p.caption, p.models, p.base, "t").params_hash()
        for c, p in ((c, _params(c)) for c in ("blip2", "blip", "llava"))
    }
    assert len(set(hashes.values())) == 3
    # with the dataset's captions no captioner runs: the choice does not change the rows
    dataset = {
        CaptionStep(Path("i"), p.caption, p.models, p.base, "t").params_hash()
        for p in (_params(c, source="dataset") for c in ("blip2", "llava"))
    }
    assert len(dataset) == 1
    assert json.dumps(hashes)  # plain strings


def test_a_head_trained_on_one_captioners_features_refuses_anothers():
    from pipeline.evalsets import planned_settings
    from pipeline.features import settings_differences

    blip2, llava = planned_settings(_params("blip2")), planned_settings(_params("llava"))
    assert "tiny-llava@seed0" in llava["provenance"]["captions"]["model"]
    diffs = settings_differences(blip2, llava)
    assert any(d.startswith("captions.model: trained with 'tiny-blip2@") for d in diffs)
