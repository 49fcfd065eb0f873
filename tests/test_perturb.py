"""Tests for pipeline.perturb: determinism, noise level, blur and JPEG severity, names."""

import itertools

import numpy as np
import pytest
from PIL import Image

from pipeline.perturb import (
    KINDS,
    PERTURBATIONS,
    parse_perturbation,
    perturb,
    perturbation_name,
)


def flat(value: int, size: tuple[int, int] = (256, 256)) -> Image.Image:
    return Image.new("RGB", size, (value, value, value))


def textured(size: tuple[int, int] = (96, 64), seed: int = 0) -> Image.Image:
    """A smooth gradient with sinusoids and fine noise: something for blur and JPEG to remove."""
    rng = np.random.default_rng(seed)
    h, w = size[1], size[0]
    y, x = np.mgrid[0:h, 0:w]
    base = 128 + 60 * np.sin(x / 5.0)[..., None] * np.cos(y / 7.0)[..., None]
    base = base + np.array([0, 20, -20]) + rng.normal(0, 15, (h, w, 3))
    return Image.fromarray(np.clip(base, 0, 255).astype(np.uint8))


def as_float(image: Image.Image) -> np.ndarray:
    return np.asarray(image, dtype=np.float64)


def high_frequency_energy(image: Image.Image) -> float:
    a = as_float(image)
    return float(np.mean(np.diff(a, axis=0) ** 2) + np.mean(np.diff(a, axis=1) ** 2))


@pytest.mark.parametrize("name", sorted(PERTURBATIONS))
def test_same_seed_same_bytes_and_size_mode_preserved(name):
    kind, severity = PERTURBATIONS[name]
    image = textured(size=(37, 23))  # odd sizes, not multiples of the JPEG block
    first = perturb(image, kind, severity, seed=7, key="abc")
    second = perturb(image, kind, severity, seed=7, key="abc")
    assert first.tobytes() == second.tobytes()
    assert first.size == image.size
    assert first.mode == "RGB"
    assert first.tobytes() != image.tobytes()


def test_noise_depends_on_seed_and_key_not_on_call_order():
    image = flat(128, (32, 32))
    base = perturb(image, "noise", 0.01, seed=1, key="a").tobytes()
    assert perturb(image, "noise", 0.01, seed=2, key="a").tobytes() != base
    assert perturb(image, "noise", 0.01, seed=1, key="b").tobytes() != base
    perturb(image, "noise", 0.01, seed=1, key="b")  # other images in between change nothing
    assert perturb(image, "noise", 0.01, seed=1, key="a").tobytes() == base
    # Without a key the pixels are the key: reproducible, and different images differ.
    assert (
        perturb(image, "noise", 0.01, seed=1).tobytes()
        == perturb(image, "noise", 0.01, seed=1).tobytes()
    )
    other = flat(127, (32, 32))
    diff_same = as_float(perturb(image, "noise", 0.01, seed=1)) - 128
    diff_other = as_float(perturb(other, "noise", 0.01, seed=1)) - 127
    assert not np.array_equal(diff_same, diff_other)


@pytest.mark.parametrize(("sigma", "low", "high"), [(0.005, 0.97, 1.05), (0.01, 0.98, 1.03)])
def test_noise_std_matches_sigma_on_flat_grey(sigma, low, high):
    out = as_float(perturb(flat(128), "noise", sigma, seed=0, key="grey")) / 255.0
    noise = out - 128 / 255.0
    # 8-bit rounding adds a little variance (1/12 of a step squared) to the drawn noise.
    assert low * sigma < noise.std() < high * sigma
    assert abs(noise.mean()) < 0.05 * sigma


def test_weakest_noise_is_partly_absorbed_by_8bit_rounding_as_documented():
    out = as_float(perturb(flat(128), "noise", 0.001, seed=0, key="grey"))
    changed = np.mean(out != 128)
    assert 0.03 < changed < 0.07  # |N(0, 0.255 steps)| > 0.5 step about 5% of the time
    assert 0.0008 < (out / 255.0).std() < 0.00095


def test_noise_is_clipped_not_wrapped():
    white = as_float(perturb(flat(255, (64, 64)), "noise", 0.01, seed=0, key="w"))
    black = as_float(perturb(flat(0, (64, 64)), "noise", 0.01, seed=0, key="b"))
    assert white.min() > 230
    assert black.max() < 25
    assert 0.4 < np.mean(white == 255) < 0.6  # the upper half of the noise is clipped
    assert 0.4 < np.mean(black == 0) < 0.6


def test_zero_severity_is_identity_for_noise_and_blur():
    image = textured()
    for kind in ("noise", "blur"):
        assert perturb(image, kind, 0, seed=0, key="k").tobytes() == image.tobytes()


def test_blur_removes_more_high_frequency_energy_as_sigma_grows():
    image = textured()
    energies = [high_frequency_energy(image)]
    energies += [
        high_frequency_energy(perturb(image, "blur", s, seed=0, key="k")) for s in (1, 2, 3)
    ]
    assert all(a > b for a, b in itertools.pairwise(energies)), energies
    assert energies[1] < 0.5 * energies[0]
    blurred = as_float(perturb(image, "blur", 3, seed=0))
    assert abs(blurred.mean() - as_float(image).mean()) < 1.0  # blur keeps brightness
    flat_grey = flat(77, (20, 20))
    assert perturb(flat_grey, "blur", 2, seed=0).tobytes() == flat_grey.tobytes()


def test_jpeg_error_grows_as_quality_drops():
    image = textured(size=(128, 96))
    original = as_float(image)
    errors = [
        float(np.mean((as_float(perturb(image, "jpeg", q, seed=0)) - original) ** 2))
        for q in (90, 75, 65, 50, 40, 25)
    ]
    assert all(a < b for a, b in itertools.pairwise(errors)), errors
    assert errors[0] > 0


def test_input_image_is_not_modified_and_other_modes_become_rgb():
    image = textured()
    before = image.tobytes()
    for kind, severity in PERTURBATIONS.values():
        perturb(image, kind, severity, seed=0, key="k")
    assert image.tobytes() == before
    for mode in ("L", "RGBA", "P"):
        out = perturb(image.convert(mode), "jpeg", 75, seed=0)
        assert out.mode == "RGB"
        assert out.size == image.size


def test_registry_holds_the_paper_settings_and_names_round_trip():
    expected = {
        "noise_0.001": ("noise", 0.001),
        "noise_0.005": ("noise", 0.005),
        "noise_0.01": ("noise", 0.01),
        "blur_1": ("blur", 1.0),
        "blur_2": ("blur", 2.0),
        "blur_3": ("blur", 3.0),
        **{f"jpeg_{q}": ("jpeg", q) for q in (75, 50, 25, 90, 65, 40)},
    }
    assert expected == PERTURBATIONS
    for name, value in PERTURBATIONS.items():
        assert parse_perturbation(name) == value
    assert parse_perturbation("jpeg_60") == ("jpeg", 60)
    assert isinstance(parse_perturbation("jpeg_60")[1], int)


@pytest.mark.parametrize(
    ("name", "message"),
    [
        ("gamma_2", "kind one of noise, blur, jpeg"),
        ("jpeg", "expected '<kind>_<severity>'"),
        ("jpeg_high", "'high', which is not a number"),
        ("jpeg_0", "integer in 1..100"),
        ("jpeg_101", "integer in 1..100"),
        ("jpeg_75.5", "integer in 1..100"),
        ("noise_-0.1", "finite number >= 0"),
        ("blur_inf", "finite number >= 0"),
    ],
)
def test_parse_rejects_bad_names_with_the_fix(name, message):
    with pytest.raises(ValueError, match=message):
        parse_perturbation(name)


def test_perturb_rejects_unknown_kind_and_bad_seed():
    image = flat(10, (8, 8))
    with pytest.raises(ValueError, match="'sharpen'; valid kinds: noise, blur, jpeg"):
        perturb(image, "sharpen", 1, seed=0)
    with pytest.raises(ValueError, match="seed must be a non-negative integer"):
        perturb(image, "noise", 0.01, seed=-1)
    with pytest.raises(ValueError, match="jpeg severity"):
        perturb(image, "jpeg", 0, seed=0)
    assert KINDS == ("noise", "blur", "jpeg")


def test_registry_names_are_canonical():
    for name, (kind, severity) in PERTURBATIONS.items():
        assert perturbation_name(kind, severity) == name
    assert perturbation_name("noise", 0.0010) == "noise_0.001"
    assert perturbation_name("jpeg", 75.0) == "jpeg_75"
