"""`base.decode: gpu`: the views nvJPEG's path makes (tried here with torchvision's CPU decoder,
the same code on another device) against PIL's, the fallback off CUDA, and the rows' key."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from pipeline.config import params_from_dict
from pipeline.data.images import load_rgb
from pipeline.extract import device_decode
from pipeline.extract.device_decode import (
    DeviceViews,
    ReadForDevice,
    choose_decoder,
    collate_files,
    crop_tensor,
    tensor_steps,
)
from pipeline.extract.encode import EncodeLoad, crop_box
from pipeline.extract.loaded import loaded_model
from pipeline.rows.key import decoding_hash
from tests.helpers import SAMPLE

JPEGS = sorted(SAMPLE.glob("images/**/*.jpg"))[:12]


@pytest.fixture(scope="module")
def clip():
    p = params_from_dict({"models": {"preset": "tiny"}, "base": {"device": "cpu"}})
    return loaded_model("clip", p.models, p.base)


def _boxes(path: Path, rng: np.random.Generator) -> np.ndarray:
    w, h = Image.open(path).size
    x0, y0 = rng.uniform(0, w * 0.5, 3), rng.uniform(0, h * 0.5, 3)
    boxes = [x0, y0, x0 + rng.uniform(16, w * 0.5, 3), y0 + rng.uniform(16, h * 0.5, 3)]
    # At the corner, and past it (PIL pads the one-pixel crop with black).
    edge = [[w - 0.5, h - 0.5, w, h], [w + 2, h + 2, w + 3, h + 3]]
    return np.concatenate([np.stack(boxes, 1), edge]).astype(np.float32)


def test_crops_cut_the_same_pixels_as_pil():
    rng = np.random.default_rng(0)
    path = JPEGS[0]
    image = load_rgb(path)
    tensor = torch.from_numpy(np.array(image)).permute(2, 0, 1)
    for box in _boxes(path, rng):
        want = np.asarray(crop_box(image, box, 0.1))
        got = crop_tensor(tensor, box, 0.1).permute(1, 2, 0).numpy()
        assert got.shape == want.shape and np.array_equal(got, want)


@pytest.mark.parametrize("transform", ["resize_center_crop", "center_crop"])
def test_device_views_are_pil_views_within_a_few_levels(clip, transform):
    """The batched decode path on the CPU: same views in the same order; torchvision's
    libjpeg-turbo decode equals PIL's, the tensor resize differs by a level here and there."""
    rng = np.random.default_rng(1)
    image_pixels = clip.center_crop_pixels() if transform == "center_crop" else None
    load = EncodeLoad(clip.pixels, 0.1, image_pixels=image_pixels)
    views = DeviceViews(
        tensor_steps(clip.pixels.pil_steps),
        0.1,
        "cpu",
        tensor_steps(image_pixels.pil_steps) if image_pixels else None,
    )
    items = [(str(p), True, _boxes(p, rng)) for p in JPEGS]
    want = torch.cat([load(item)["pixels"] for item in items]).int()
    got = views(collate_files([ReadForDevice(load)(item) for item in items]))
    assert got.dtype == torch.uint8 and got.shape == want.shape
    diff = (got.int() - want).abs()
    assert diff.float().mean() < 0.5 and torch.quantile(diff[:64].float(), 0.99) <= 2
    if transform == "center_crop":  # no resize of the whole image: the decoders agree
        first = [0, *np.cumsum([1 + len(b) for _, _, b in items])[:-1]]
        assert int(diff[first].max()) == 0


def _rotated_and_cmyk(tmp_path: Path) -> list[Path]:
    image = load_rgb(JPEGS[0])
    png, rotated, cmyk = tmp_path / "x.png", tmp_path / "rotated.jpg", tmp_path / "cmyk.jpg"
    image.save(png)
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees to display: nvJPEG would not
    image.save(rotated, exif=exif)
    image.convert("CMYK").save(cmyk)
    return [png, rotated, cmyk]


def test_files_nvjpeg_would_get_wrong_take_the_cpu_path_in_the_worker(clip, tmp_path):
    """Not a JPEG, a JPEG with an EXIF rotation to apply, a CMYK JPEG: PIL's views."""
    load = EncodeLoad(clip.pixels, 0.1)
    views = DeviceViews(tensor_steps(clip.pixels.pil_steps), 0.1, "cpu")
    for path in _rotated_and_cmyk(tmp_path):
        item = (str(path), True, np.array([[2.0, 3.0, 30.0, 40.0]], np.float32))
        sample = ReadForDevice(load)(item)
        assert "jpeg" not in sample, path.name
        assert torch.equal(views([sample]), load(item)["pixels"])
    # Without EXIF transposition the rotated file's bytes go to the device decoder.
    item = (str(tmp_path / "rotated.jpg"), False, np.zeros((0, 4), np.float32))
    assert "jpeg" in ReadForDevice(load)(item)


def test_gpu_decoding_falls_back_to_the_cpu_with_a_reason(caplog):
    with caplog.at_level(logging.WARNING):
        assert choose_decoder("gpu", "cpu", host_image_needed=False) == "pil"
    assert "not CUDA" in caplog.text
    assert choose_decoder("cpu", "cuda", host_image_needed=False) == "pil"
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        assert choose_decoder("gpu", "cuda:0", host_image_needed=True) == "pil"
    assert "color_bins" in caplog.text


def test_the_decoder_is_part_of_the_row_key(monkeypatch):
    rows = {"input_hash": np.array(["a", "b"], dtype=object)}
    assert list(decoding_hash(rows)) == ["a", "b"]  # the default keeps today's keys
    other = decoding_hash(rows, "nvjpeg")
    assert len(set(other) | {"a", "b"}) == 4
    monkeypatch.setattr(device_decode, "_WORKS", {"cuda": True})
    assert choose_decoder("gpu", "cuda", host_image_needed=False) == "nvjpeg"


def test_the_encode_stage_with_device_decoding_keys_its_rows_apart(tmp_path, monkeypatch):
    """The stage's GPU-decoding path end to end (on the CPU): rows close to the PIL path's,
    under other input hashes and with the decoder in the shards' attributes."""
    from pipeline.data.ingest import run_ingest
    from pipeline.extract.caption import run_caption
    from pipeline.extract.encode import EncodeStep, run_encode
    from pipeline.extract.ground import run_ground
    from pipeline.rows import store
    from tests.helpers import write_manifest

    data = tmp_path / "data"
    data.mkdir()
    rows = []
    for i, path in enumerate(JPEGS[:6]):
        (data / path.name).write_bytes(path.read_bytes())
        rows.append({"path": path.name, "label": i % 2, "generator": "g", "caption": "a red car"})
    write_manifest(data / "manifest.csv", rows)
    p = params_from_dict(
        {
            "models": {"preset": "tiny"},
            "base": {"device": "cpu", "decode_workers": 1},
            "caption": {"source": "dataset"},
            "ground": {"box_threshold": 0.0, "text_threshold": 0.0},
        }
    )
    cache = tmp_path / "cache"
    args = {"models": p.models, "base": p.base, "dataset": "t"}
    run_ingest(data, cache / "ingest", cfg=p.ingest, base=p.base, dataset="t")
    run_caption(cache / "ingest", cache / "captions", cfg=p.caption, **args)
    run_ground(cache / "ingest", cache / "captions", cache / "objects", cfg=p.ground, **args)

    def encode(out: str) -> dict:
        run_encode(
            cache / "ingest",
            cache / "captions",
            cache / "objects",
            cache / out,
            cfg=p.encode,
            crop_padding=p.ground.crop_padding,
            **args,
        )
        (shard,) = store.list_shards(cache / out)
        return {**store.read_shard(shard), "attrs": store.read_attrs(shard)}

    pil = encode("clip_pil")
    monkeypatch.setattr(EncodeStep, "decoder", property(lambda self: "nvjpeg"))
    gpu = encode("clip_gpu")
    assert gpu["attrs"]["decoder"] == "nvjpeg" and "decoder" not in pil["attrs"]
    assert not set(gpu["input_hash"]) & set(pil["input_hash"])
    assert gpu["obj_image_emb"].shape == pil["obj_image_emb"].shape
    # The tensor resize moved some pixels by a level: the views did go through the other path.
    assert not np.array_equal(gpu["obj_image_emb"], pil["obj_image_emb"])
    for key in ("image_emb", "obj_image_emb"):
        assert np.abs(gpu[key] - pil[key]).max() < 0.05 * np.abs(pil[key]).max()
    assert np.array_equal(gpu["text_emb"], pil["text_emb"])
