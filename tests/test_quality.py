"""Image quality control: clipped central rms, its box extremes and the rejection reasons."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from trap_dask.image import read_image, read_meta
from trap_dask.quality import ImageStats, QualityParams, beam_problem, central_rms, check_quality, clipped_rms

DATA = Path(__file__).parent / "data"


@pytest.fixture(scope="module")
def noise() -> np.ndarray:
    """2048 x 2048 Gaussian noise of sigma 2 mJy/beam (float32)."""
    return (2e-3 * np.random.default_rng(42).standard_normal((2048, 2048))).astype(np.float32)


def test_clipped_rms_is_unbiased_for_gaussian_noise() -> None:
    values = np.random.default_rng(0).standard_normal((3, 200_000))
    assert clipped_rms(values) == pytest.approx(np.ones(3), abs=0.006)
    assert clipped_rms(values, kappa=2.5) == pytest.approx(np.ones(3), abs=0.008)


def test_clipped_rms_ignores_outliers_and_nan() -> None:
    rng = np.random.default_rng(1)
    values = rng.standard_normal((2, 100_000))
    values[0, :2000] = rng.uniform(20, 1000, 2000)  # 2 % bright "sources"
    values[1, ::3] = np.nan
    assert clipped_rms(values) == pytest.approx([1.0, 1.0], abs=0.02)
    assert np.isnan(clipped_rms(np.array([[np.nan, 1.0, np.nan]])))[0]


def test_clipped_rms_of_tiny_samples() -> None:
    rows = np.array([[1.0, 2.0, np.nan, np.nan], [1.0, 2.0, 3.0, np.nan], [5.0, 5.0, 5.0, 5.0],
                     [np.nan, 1.0, np.nan, np.nan]])
    rms = clipped_rms(rows)
    assert rms[0] > 0 and rms[1] > 0 and np.isfinite(rms[:3]).all()
    assert rms[2] == 0.0 and np.isnan(rms[3])   # constant: zero; one finite value: undefined


def test_central_rms_uses_the_central_region(noise: np.ndarray) -> None:
    data = noise.copy()
    data[768:1280, 768:1280] *= 2.0  # the central 512 x 512 is twice as noisy
    data[1000:1010, 1000:1010] += 5.0  # a bright source in the centre is clipped away
    data[:100] = np.nan
    assert central_rms(data, 4.0) == pytest.approx(4e-3, rel=0.01)
    assert central_rms(data, 1.0) < 2.5e-3


def test_good_image_is_accepted_and_stats_bracket_rms(noise: np.ndarray) -> None:
    stats, reason = check_quality(noise, QualityParams(rms_min=1e-3, rms_max=3e-3))
    assert reason is None
    assert stats.rms == pytest.approx(2e-3, rel=0.01)
    assert np.isnan(stats.rms_min) and np.isnan(stats.rms_max)  # the noise map's, made after (noise_range)


@pytest.mark.parametrize(
    ("params", "expected"),
    [
        (QualityParams(rms_max=1e-3), r"central rms 0.002 Jy/beam is above rms_max = 0.001 Jy/beam"),
        (QualityParams(rms_min=0.01), r"central rms 0.002 Jy/beam is below rms_min = 0.01 Jy/beam"),
    ],
)
def test_rms_out_of_range_is_rejected(noise: np.ndarray, params: QualityParams, expected: str) -> None:
    stats, reason = check_quality(noise, params)
    assert reason == expected
    assert stats.rms == pytest.approx(2e-3, rel=0.01)


def test_an_rms_just_above_its_limit_is_shown_apart_from_it(noise: np.ndarray) -> None:
    """Not "0.00201 Jy/beam is above rms_max = 0.00201 Jy/beam"."""
    limit = check_quality(noise)[0].rms * (1 - 1e-5)
    reason = check_quality(noise, QualityParams(rms_max=limit))[1]
    shown, told = reason.removeprefix("central rms ").removesuffix(" Jy/beam").split(" Jy/beam is above rms_max = ")
    assert float(shown) > float(told) == pytest.approx(limit, rel=1e-5)


def test_degenerate_images_are_rejected() -> None:
    stats, reason = check_quality(np.full((64, 64), np.nan, np.float32))
    assert reason == "the image has no finite pixels"
    assert np.isnan(stats.rms)
    blank_centre = np.random.default_rng(2).standard_normal((64, 64)).astype(np.float32)
    blank_centre[16:48, 16:48] = np.nan
    assert "rms is undefined" in check_quality(blank_centre)[1]
    assert check_quality(np.zeros((64, 64), np.float32))[1] == "the central rms is zero: the image is constant"


def test_real_image_quality() -> None:
    data, _ = read_image(read_meta(DATA / "GRB201006A_final_2min_srcs-t0002-image-pb_cutout.fits"))
    stats, reason = check_quality(data)
    assert reason is None
    assert isinstance(stats, ImageStats)
    # a LOFAR 2-minute snapshot: mJy/beam-level noise, well above the float32 resolution
    assert 1e-4 < stats.rms < 1.0


@pytest.mark.parametrize("scale, expected", [
    (1.0, None),
    (3600.0, 'the restoring beam (1.08e+05" x 7.2e+04" FWHM) is wider than half the image: BMAJ and BMIN are '
             "FWHM in degrees"),  # BMAJ/BMIN written in arcsec
    (np.pi / 180.0, 'the restoring beam (0.524" x 0.349" FWHM) is narrower than a pixel (5"): BMAJ and BMIN '
                    "are FWHM in degrees"),  # in radians
])
def test_a_beam_in_the_wrong_unit_is_rejected(scale: float, expected: str | None) -> None:
    """A 30" x 20" beam on 5" pixels of a 512^2 image, and the same numbers read in another unit."""
    assert beam_problem(15.0 / 3600 * scale, 10.0 / 3600 * scale, 5.0 / 3600, (512, 512)) == expected


def test_the_beams_of_the_real_images_are_accepted() -> None:
    for path in sorted(DATA.glob("*.fits")):
        if path.name != "missing_metadata.fits":
            meta = read_meta(path)
            assert beam_problem(meta.beam.smaj, meta.beam.smin, meta.pixel_scale, meta.shape) is None, path.name
