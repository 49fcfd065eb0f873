"""The encode stage's views decoded on the GPU (`base.decode: gpu`): nvJPEG, crops, CLIP sizing.

The decode workers only read each file's bytes; the main process decodes a whole batch at
once with `torchvision.io.decode_jpeg(..., device=<the model's>)` and cuts and sizes the views
there with the tensor versions of CLIP's PIL steps (crop, resize, centre crop). nvJPEG and the
tensor resize do not give PIL's pixels bit for bit (a few levels here and there; see
docs/benchmarks.md), so the decoder is part of the rows' key (`pipeline.rows.key.decoding_hash`)
and of the shards' attributes. CPU decoding stays the default, and is used instead (with a
log line saying why) when the device is not CUDA, when nvJPEG does not work there, or when the
encode step also needs the decoded image on the host (colour histograms, DINOv2). A file that is not a JPEG is decoded by
PIL in the worker as before, and its views join the batch; so is a JPEG whose EXIF orientation
must be applied (nvJPEG ignores it) or whose colours are not RGB or grey (CMYK).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

logger = logging.getLogger(__name__)

PIL_DECODER = "pil"
GPU_DECODER = "nvjpeg"
_JPEG_MAGIC = b"\xff\xd8\xff"
_ORIENTATION = 0x0112  # the EXIF orientation tag
# The conversions to RGB (open_clip's, and pipeline.models.clip's in a Lambda), which nvJPEG's RGB output makes redundant.
_TO_RGB = {"MaybeConvertMode", "_convert_to_rgb", "_to_rgb"}
_WORKS: dict[str, bool] = {}  # device -> whether nvJPEG decoded a test image there


def nvjpeg_works(device: str) -> bool:
    """Whether `decode_jpeg` decodes on `device` (tried once per device with a tiny JPEG)."""
    if device not in _WORKS:
        import io

        from PIL import Image
        from torchvision.io import ImageReadMode, decode_jpeg

        buffer = io.BytesIO()
        Image.new("RGB", (16, 16), (200, 30, 60)).save(buffer, format="JPEG")
        data = torch.frombuffer(bytearray(buffer.getvalue()), dtype=torch.uint8)
        try:
            decode_jpeg([data], mode=ImageReadMode.RGB, device=device)
            _WORKS[device] = True
        except (RuntimeError, ValueError) as err:
            logger.info("nvJPEG decoding does not work on %s: %s", device, err)
            _WORKS[device] = False
    return _WORKS[device]


def tensor_steps(pil_steps: Any) -> list[tuple[str, Any]] | None:
    """CLIP's PIL steps (`ClipPixels.pil_steps`) as tensor operations, or None when one has no
    tensor version: ("resize", (size, interpolation)), ("center_crop", size); the RGB
    conversion is dropped (nvJPEG gives RGB)."""
    from torchvision import transforms

    out: list[tuple[str, Any]] = []
    for step in getattr(pil_steps, "transforms", [pil_steps]):
        if isinstance(step, transforms.Resize):
            if step.max_size is not None:
                return None
            out.append(("resize", (step.size, step.interpolation)))
        elif isinstance(step, transforms.CenterCrop):
            out.append(("center_crop", list(step.size)))
        elif _TO_RGB & {
            type(step).__name__,
            getattr(step, "__name__", ""),
            getattr(getattr(step, "lambd", None), "__name__", ""),
        }:
            continue  # the conversion to RGB (the project's `_to_rgb` or open_clip's)
        else:
            return None
    return out


def choose_decoder(requested: str, device: str, *, host_image_needed: bool) -> str:
    """The decoder encode uses for `base.decode` = `requested` on `device`: GPU_DECODER only
    where it can run, else PIL_DECODER (with a log line saying why)."""
    if requested != "gpu":
        return PIL_DECODER
    reason = ""
    if not str(device).startswith("cuda"):
        reason = f"the model runs on {device}, not CUDA"
    elif host_image_needed:
        reason = "encode.color_bins or encode.dinov2 needs the decoded image on the host"
    elif not nvjpeg_works(str(device)):
        reason = f"nvJPEG does not work on {device}"
    if reason:
        logger.warning("base.decode=gpu: decoding on the CPU instead (%s)", reason)
        return PIL_DECODER
    return GPU_DECODER


@dataclass
class ReadForDevice:
    """A decode worker's part under the GPU decoder: the file's bytes when it is a JPEG that
    nvJPEG decodes to the pixels ingest checked (RGB or greyscale, and no EXIF rotation to
    apply: nvJPEG ignores EXIF orientation), else the CPU path's views (`fallback`, an
    `EncodeLoad`) of it. Items are (path, exif_transpose, boxes)."""

    fallback: Any

    def __call__(self, item: tuple[str, bool, np.ndarray]) -> dict[str, Any]:
        path, exif_transpose, boxes = item
        with open(path, "rb") as fh:
            data = fh.read()
        n_views = 1 + len(boxes)
        if data[:3] == _JPEG_MAGIC and _device_decodable(data, exif_transpose):
            raw = torch.frombuffer(bytearray(data), dtype=torch.uint8)
            return {"jpeg": raw, "boxes": np.asarray(boxes), "n": n_views}
        return {"views": self.fallback(item)["pixels"], "n": n_views}


def _device_decodable(data: bytes, exif_transpose: bool) -> bool:
    """Whether nvJPEG's RGB output is PIL's image for these bytes (headers only, no decode)."""
    import io

    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as image:
            if image.mode not in ("RGB", "L"):
                return False  # CMYK, YCCK: PIL's conversion to RGB is its own
            orientation = image.getexif().get(_ORIENTATION, 1) if exif_transpose else 1
    except (OSError, SyntaxError, ValueError):
        return False  # the CPU path raises the project's error for it
    return orientation in (None, 1)


def collate_files(samples: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return list(samples)


@dataclass
class DeviceViews:
    """The main process's part: a batch of `ReadForDevice` samples as (views, 3, H, W) uint8 on
    `device`, in item order, the image's view first then one per box (as `EncodeLoad`)."""

    crop_steps: list[tuple[str, Any]]
    crop_padding: float
    device: str
    image_steps: list[tuple[str, Any]] | None = None  # None: as the crops

    def __call__(self, samples: Sequence[dict[str, Any]]) -> torch.Tensor:
        from torchvision.io import ImageReadMode, decode_jpeg

        which = [k for k, s in enumerate(samples) if "jpeg" in s]
        images: dict[int, torch.Tensor] = {}
        if which:
            jpegs = [samples[k]["jpeg"] for k in which]
            try:
                decoded = decode_jpeg(jpegs, mode=ImageReadMode.RGB, device=self.device)
            except RuntimeError:  # one file nvJPEG refuses fails the batch: one by one
                decoded = [self._one(data) for data in jpegs]
            images.update(zip(which, decoded))
        views = []
        for k, sample in enumerate(samples):
            if k not in images:
                views.append(sample["views"].to(self.device))
                continue
            image = images[k]
            whole = apply_steps(image, self.image_steps or self.crop_steps)
            crops = [
                apply_steps(crop_tensor(image, box, self.crop_padding), self.crop_steps)
                for box in sample["boxes"]
            ]
            views.append(torch.stack([whole, *crops]))
        return torch.cat(views)

    def _one(self, data: torch.Tensor) -> torch.Tensor:
        """One file: decoded on the device alone, or by torchvision on the CPU and moved."""
        from torchvision.io import ImageReadMode, decode_jpeg

        try:
            return decode_jpeg(data, mode=ImageReadMode.RGB, device=self.device)
        except RuntimeError:
            return decode_jpeg(data, mode=ImageReadMode.RGB).to(self.device)


def crop_tensor(image: torch.Tensor, box: Sequence[float], padding: float) -> torch.Tensor:
    """`encode.crop_box` on a (3, H, W) tensor: the same integer pixel box."""
    x0, y0, x1, y1 = (float(v) for v in box)
    pw, ph = (x1 - x0) * padding, (y1 - y0) * padding
    h, w = int(image.shape[-2]), int(image.shape[-1])
    left, top = max(0, int(np.floor(x0 - pw))), max(0, int(np.floor(y0 - ph)))
    right, bottom = min(w, int(np.ceil(x1 + pw))), min(h, int(np.ceil(y1 + ph)))
    right, bottom = max(right, left + 1), max(bottom, top + 1)
    if right > w or bottom > h:  # a box at the very edge: PIL pads the one pixel with black
        image = torch.nn.functional.pad(image, (0, max(0, right - w), 0, max(0, bottom - h)))
    return image[:, top:bottom, left:right]


def apply_steps(image: torch.Tensor, steps: list[tuple[str, Any]]) -> torch.Tensor:
    """`tensor_steps` applied to a (3, H, W) uint8 tensor (resize with antialiasing, as PIL)."""
    from torchvision.transforms import functional

    for name, arg in steps:
        if name == "resize":
            size, interpolation = arg
            image = functional.resize(image, size, interpolation=interpolation, antialias=True)
        else:
            image = functional.center_crop(image, arg)
    return image.contiguous()
