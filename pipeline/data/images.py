"""Image decoding: the one way every stage decodes a file, and the checks that quarantine it."""

from __future__ import annotations

import stat
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from pipeline.errors import DatasetError


@dataclass
class ImageInfo:
    """What decoding found: the size as the models see it (after EXIF orientation), the
    number of frames (only the first is used), and the stored mode (e.g. I;16, F, CMYK)."""

    width: int
    height: int
    n_frames: int = 1
    mode: str = ""


def _to_8bit(arr: np.ndarray, mode: str) -> np.ndarray:
    """Scale a high-bit-depth or float plane to uint8 without clipping its content away.

    16-bit integers are divided by 257 (65535 -> 255); 32-bit integers within 0..65535 are
    taken as 16-bit (Pillow opens 16-bit PNGs so) and wider ones are stretched from their
    minimum to their maximum; floats within [0, 1] are multiplied by 255, within [0, 255]
    kept, and any other range stretched. Non-finite floats are refused by the caller.
    """
    a = arr.astype(np.float64)
    lo, hi = (float(a.min()), float(a.max())) if a.size else (0.0, 0.0)
    if mode == "F":
        if lo >= 0 and hi <= 1:
            a = a * 255.0
        elif lo < 0 or hi > 255:
            a = (a - lo) * (255.0 / (hi - lo)) if hi > lo else np.zeros_like(a)
    elif lo >= 0 and hi <= 255 and not mode.startswith("I;16"):
        pass
    elif lo >= 0 and hi <= 65535:
        a = a / 257.0
    else:
        a = (a - lo) * (255.0 / (hi - lo)) if hi > lo else np.zeros_like(a)
    return np.clip(np.rint(a), 0, 255).astype(np.uint8)


def _rgb(img: Image.Image) -> Image.Image:
    """The RGB picture of any Pillow mode, keeping its content (see `_to_8bit`)."""
    mode = img.mode
    if mode == "RGB":
        return img.copy()
    if mode in ("I", "F") or mode.startswith("I;16"):
        arr = np.asarray(img)
        if mode == "F" and not np.isfinite(arr).all():
            raise ValueError("float image with NaN or infinite pixels")
        return Image.fromarray(_to_8bit(arr, mode)).convert("RGB")
    if mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    if mode in ("LA", "La", "PA"):
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "RGBa"):
        # Transparent pixels shown on white, as viewers and browsers show them; converting
        # straight to RGB would expose whatever colour sits under alpha 0 (often black).
        background = Image.new("RGBA", img.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, img.convert("RGBA")).convert("RGB")
    # 1, L, P, CMYK (Pillow undoes Adobe's inverted CMYK JPEGs), YCbCr, LAB, HSV, RGBX.
    return img.convert("RGB")


def decode_image(path: str | Path, exif_transpose: bool = True) -> tuple[Image.Image, ImageInfo]:
    """Decode an image file the one way every stage sees it: the first frame, EXIF orientation
    applied (unless `exif_transpose` is false), any bit depth or mode scaled to 8-bit RGB.

    Raises:
        OSError, SyntaxError, ValueError, Image.DecompressionBombError: what Pillow raises for
            files it cannot decode (ingest turns these into quarantine reasons).
    """
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        with Image.open(path) as img:
            n_frames = int(getattr(img, "n_frames", 1) or 1)
            mode = img.mode
            img.seek(0)
            img.load()  # full decode: catches truncated data that verify() misses
            frame = ImageOps.exif_transpose(img) if exif_transpose else img
            rgb = _rgb(frame)
    return rgb, ImageInfo(rgb.width, rgb.height, n_frames, mode)


def inspect_image(
    path: Path,
    min_side: int = 1,
    max_aspect_ratio: float | None = None,
    exif_transpose: bool = True,
) -> ImageInfo | str:
    """Decode the whole image; return what was found, or the reason it cannot be used."""
    try:
        st = path.stat()
    except OSError as err:
        return f"cannot read file: {err.strerror or err}"
    if not stat.S_ISREG(st.st_mode):
        # Never opened: reading a FIFO blocks, a device such as /dev/zero never ends.
        return f"not a regular file but {_file_type(st.st_mode)}"
    if st.st_size == 0:
        return "empty file (0 bytes)"
    try:
        with open(path, "rb"):
            pass
    except OSError as err:
        return f"cannot read file: {err.strerror or err}"
    try:
        _, info = decode_image(path, exif_transpose)
    except UnidentifiedImageError:
        return "not an image (no decoder recognises the file's content)"
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
        return f"image too large to decode safely: {err}"
    except OSError as err:
        if err.errno is not None:  # the system refused the read, the data is not at fault
            return f"cannot read file: {err.strerror or err}"
        return f"truncated or corrupt image data: {err}"
    except (SyntaxError, ValueError, EOFError) as err:
        return f"truncated or corrupt image data: {err}"
    width, height = info.width, info.height
    if min(width, height) < min_side:
        return f"image is {width}x{height} px, smaller than ingest.min_side={min_side}"
    ratio = max(width, height) / max(1, min(width, height))
    if max_aspect_ratio is not None and ratio > max_aspect_ratio:
        return (
            f"image is {width}x{height} px, aspect ratio {ratio:.1f} above "
            f"ingest.max_aspect_ratio={max_aspect_ratio:g} (the models' resizers would squash "
            "its short side to a few pixels)"
        )
    return info


def _file_type(mode: int) -> str:
    """What a non-regular file is, in a user's words."""
    kinds = (
        (stat.S_ISDIR, "a directory"),
        (stat.S_ISFIFO, "a FIFO (named pipe)"),
        (stat.S_ISCHR, "a character device"),
        (stat.S_ISBLK, "a block device"),
        (stat.S_ISSOCK, "a socket"),
    )
    return next((name for test, name in kinds if test(mode)), "a special file")


def check_image(path: Path, min_side: int = 1) -> tuple[int, int] | str:
    """Decode the whole image; return (width, height), or the reason it cannot be used."""
    info = inspect_image(path, min_side)
    return info if isinstance(info, str) else (info.width, info.height)


def load_rgb(path: str | Path, exif_transpose: bool = True) -> Image.Image:
    """Open an image as 8-bit RGB exactly as ingest checked it (`decode_image`).

    Raises:
        DatasetError: the file cannot be decoded (any more), naming it and the fix.
    """
    try:
        return decode_image(path, exif_transpose)[0]
    except (
        OSError,
        SyntaxError,
        ValueError,
        EOFError,
        Image.DecompressionBombError,
        Image.DecompressionBombWarning,
    ) as err:
        reason = " ".join(str(err).split())[:200] or type(err).__name__
        raise DatasetError(
            f"cannot decode image {path}: {reason}; replace the file or rerun ingest, which "
            "quarantines it (`dvc repro` reruns it)"
        ) from err
