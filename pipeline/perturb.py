"""Image perturbations for robustness studies: Gaussian noise, Gaussian blur, JPEG compression."""

from __future__ import annotations

import hashlib
import io
import logging
import math

import numpy as np
from PIL import Image

from pipeline.errors import ConfigError, shown

logger = logging.getLogger(__name__)

#: Perturbation kinds understood by :func:`perturb`.
KINDS = ("noise", "blur", "jpeg")

#: JPEG chroma subsampling, fixed so results do not depend on Pillow's default. 4:2:0 is what
#: Pillow and OpenCV write by default, hence what images met in the wild mostly carry.
JPEG_SUBSAMPLING = "4:2:0"


def perturbation_name(kind: str, severity: float) -> str:
    """Canonical name of a perturbation, e.g. ``noise_0.005``, ``blur_2``, ``jpeg_75``."""
    severity = _check_severity(kind, severity)
    return f"{kind}_{severity:g}"


#: Named perturbations of the studies this project reproduces: ITEM (seed 002) uses Gaussian
#: noise with sigma 0.001/0.005/0.01 on the [0, 1] pixel scale, Gaussian blur with sigma 1/2/3
#: pixels and JPEG quality 75/50/25; the AID challenge (seed 003) used JPEG quality 90/65/40.
PERTURBATIONS: dict[str, tuple[str, float]] = {
    "noise_0.001": ("noise", 0.001),
    "noise_0.005": ("noise", 0.005),
    "noise_0.01": ("noise", 0.01),
    "blur_1": ("blur", 1.0),
    "blur_2": ("blur", 2.0),
    "blur_3": ("blur", 3.0),
    "jpeg_75": ("jpeg", 75),
    "jpeg_50": ("jpeg", 50),
    "jpeg_25": ("jpeg", 25),
    "jpeg_90": ("jpeg", 90),
    "jpeg_65": ("jpeg", 65),
    "jpeg_40": ("jpeg", 40),
}


def parse_perturbation(name: str) -> tuple[str, float]:
    """Split a name like ``jpeg_75`` into ``("jpeg", 75)``, validating kind and severity.

    Any severity valid for the kind is accepted, not only those in :data:`PERTURBATIONS`, so a
    sweep can use e.g. ``jpeg_60``. JPEG severities come back as ``int`` (the quality).

    Raises:
        ValueError: naming the valid kinds and their severity ranges.
    """
    kind, sep, value = name.partition("_")
    if not sep or kind not in KINDS:
        raise ConfigError(
            f"unknown perturbation {shown(name)}; expected '<kind>_<severity>' with kind one of "
            f"{', '.join(KINDS)}, e.g. {', '.join(PERTURBATIONS)}"
        )
    try:
        severity = float(value)
    except ValueError:
        raise ConfigError(
            f"perturbation {shown(name)} has severity {shown(value)}, which is not a number; "
            f"e.g. {kind}_{_example(kind)}"
        ) from None
    return kind, _check_severity(kind, severity)


def perturb(
    image: Image.Image, kind: str, severity: float, seed: int, key: str | None = None
) -> Image.Image:
    """Return a perturbed RGB copy of ``image``, of the same size; ``image`` is not modified.

    - ``noise``: adds Gaussian noise of standard deviation ``severity`` on the [0, 1] pixel
      scale, clips to [0, 1] and rounds to 8 bits. Rounding absorbs part of very weak noise:
      at sigma 0.001 (a quarter of one 8-bit step) only about 5% of pixel values change and
      the measured standard deviation is about 0.0009.
    - ``blur``: Gaussian filter of standard deviation ``severity`` pixels on each channel
      (``scipy.ndimage.gaussian_filter``, reflect borders, as in the CNNDetection robustness
      code); 0 returns the image unchanged.
    - ``jpeg``: encodes in memory at quality ``severity`` (1-100, 4:2:0 chroma) and decodes.

    Non-RGB inputs (L, RGBA, P, ...) are first converted with ``image.convert("RGB")``.

    Args:
        image: the image to perturb.
        kind: one of :data:`KINDS`.
        severity: noise sigma, blur sigma or JPEG quality, as above.
        seed: run-level seed (``base.seed``); non-negative.
        key: a stable per-image key, ideally its content id. Noise is drawn from
            ``(seed, key)``, so each image gets its own noise, identical on every run and
            independent of the order images are processed in; the noise pattern of one image
            is the same at every sigma, only scaled. Without a key, a hash of the pixels is
            used. Blur and JPEG are deterministic and ignore ``seed`` and ``key``.
    """
    if kind not in KINDS:
        raise ConfigError(
            f"unknown perturbation kind {shown(kind)}; valid kinds: {', '.join(KINDS)}"
        )
    severity = _check_severity(kind, severity)
    if isinstance(seed, bool) or not isinstance(seed, int | np.integer) or seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {shown(seed)}")
    rgb = image.convert("RGB")
    if kind == "jpeg":
        return _jpeg(rgb, int(severity))
    pixels = np.asarray(rgb, dtype=np.float64)
    if kind == "noise":
        rng = np.random.default_rng(np.random.SeedSequence([int(seed), _key_entropy(rgb, key)]))
        # Draw on the [0, 1] scale so that severity is the sigma reported by the papers.
        noisy = pixels / 255.0 + severity * rng.standard_normal(pixels.shape)
        out = np.clip(noisy, 0.0, 1.0) * 255.0
    else:
        if severity == 0:
            return rgb.copy()
        from scipy.ndimage import gaussian_filter  # here: config checks names via this module

        out = gaussian_filter(pixels, sigma=(severity, severity, 0.0), mode="reflect")
    return Image.fromarray(np.clip(np.rint(out), 0, 255).astype(np.uint8))


def _jpeg(rgb: Image.Image, quality: int) -> Image.Image:
    buffer = io.BytesIO()
    rgb.save(buffer, format="JPEG", quality=quality, subsampling=JPEG_SUBSAMPLING)
    buffer.seek(0)
    with Image.open(buffer) as decoded:
        return decoded.convert("RGB")


def _key_entropy(rgb: Image.Image, key: str | None) -> int:
    if key is None:
        digest = hashlib.sha256(f"{rgb.size}".encode() + rgb.tobytes())
    else:
        digest = hashlib.sha256(key.encode("utf-8"))
    return int.from_bytes(digest.digest()[:16], "little")


def _check_severity(kind: str, severity: float) -> float:
    if kind not in KINDS:
        raise ConfigError(
            f"unknown perturbation kind {shown(kind)}; valid kinds: {', '.join(KINDS)}"
        )
    try:
        value = float(severity)
    except (TypeError, ValueError):
        raise ConfigError(f"{kind} severity must be a number, got {shown(severity)}") from None
    if kind == "jpeg":
        if not value.is_integer() or not 1 <= value <= 100:
            raise ConfigError(
                f"jpeg severity is the quality, an integer in 1..100; got {shown(severity)} "
                "(e.g. jpeg_75)"
            )
        return int(value)
    if not math.isfinite(value) or value < 0:
        raise ConfigError(
            f"{kind} severity is a standard deviation, a finite number >= 0; got {shown(severity)} "
            f"(e.g. {kind}_{_example(kind)})"
        )
    return value


def _example(kind: str) -> str:
    return {"noise": "0.005", "blur": "2", "jpeg": "75"}[kind]
