"""The sources' intrinsic shapes that forced fits of resolved sources use (trap_dask.shapes), and the
extraction's measurement of them."""

from __future__ import annotations

import numpy as np
import pytest

from tests._synth import Shape, correlated_noise, gaussians, make_wcs, match
from trap_dask.extraction.extract import extract_sources, prepare_image
from trap_dask.extraction.params import ExtractionParams
from trap_dask.shapes import (
    AREA_SCATTER,
    RESOLVED_MIN_EXCESS,
    RESOLVED_MIN_SIGMA,
    SHAPE_SUMS,
    beam_cov,
    intrinsic_from_axes,
    resolved_shapes,
    set_intrinsic_shapes,
    shape_sum_increments,
    variance_across,
)
from trap_dask.sources import empty_sources

BEAM = (15.0 / 3600, 10.0 / 3600, 30.0)  # semi-axes (deg), PA (deg)


def detections(semimajor, semiminor, pa, rel_err=0.1, beam=BEAM) -> np.ndarray:
    """Blind Gaussian fits (arcsec, deg) of int_flux 1 Jy and a relative error ``rel_err``, with
    their intrinsic shapes as the extraction gives them in an image of ``beam``."""
    rows = empty_sources(len(np.atleast_1d(semimajor)))
    rows["semimajor_axis"], rows["semiminor_axis"], rows["parallactic_angle"] = semimajor, semiminor, pa
    rows["int_flux"], rows["int_flux_err"], rows["gaussian_fit"] = 1.0, rel_err, True
    set_intrinsic_shapes(rows, intrinsic_from_axes(rows, beam_cov(*beam)))
    return rows


def summed(rows: np.ndarray, beam=BEAM) -> dict[str, np.ndarray]:
    """The shape sums of one source measured by all ``rows``, in images of ``beam``."""
    return {name: np.atleast_1d(value.sum()) for name, value in shape_sum_increments(rows, beam_cov(*beam)).items()}


def test_a_resolved_detection_adds_its_shape_less_the_beam():
    # a round source of FWHM 2 x 30" convolved with a round beam of 2 x 30" is 2 x 30 sqrt(2)"
    round_beam = (30 / 3600, 30 / 3600, 0)
    one = summed(detections(30.0 * np.sqrt(2), 30.0 * np.sqrt(2), 70.0, rel_err=0.2, beam=round_beam), round_beam)
    sigma2 = (30.0 / np.sqrt(2.0 * np.log(2.0))) ** 2
    assert one["weight"][0] == pytest.approx(25.0 / sigma2**2)  # (int_flux / int_flux_err)**2 / det(beam)
    np.testing.assert_allclose([one[name][0] / one["weight"][0] for name in SHAPE_SUMS[1:]], [sigma2, 0, sigma2],
                               atol=1e-9 * sigma2)
    # an elongated one along PA 120: its major axis runs east-south-east
    long = summed(detections(40.0, 10.0, 120.0))
    shape = np.array([long[name][0] / long["weight"][0] for name in SHAPE_SUMS[1:]])
    assert shape[0] > shape[2] and shape[1] < 0  # wider east-west than north-south, tilted


def test_what_is_no_fitted_shape_adds_nothing_and_a_beam_shaped_fit_counts_as_a_point():
    rows = detections([40.0, 40.0, 40.0, 15.0, 40.0, 40.0], [20.0, 20.0, 20.0, 10.0, np.nan, 20.0], [0, 0, 0, 30, 0, 0])
    rows["is_force_fit"][0] = True  # a forced fit
    rows["gaussian_fit"][1] = False  # moments, not a fit
    rows["int_flux_err"][2] = 0.0  # no error
    rows["int_flux_err"][5] = -0.1  # a nonsensical one
    # rows[3] has the beam's shape (force_beam, a pair fit): a point, of weight (1 / 0.1)**2; rows[4] no minor axis
    added = shape_sum_increments(rows, beam_cov(*BEAM))
    np.testing.assert_allclose(added["weight"], [0, 0, 0, 100.0 / np.linalg.det(beam_cov(*BEAM)), 0, 0])
    np.testing.assert_allclose([added[name][3] for name in SHAPE_SUMS[1:]], 0.0, atol=1e-9)
    # a source fitted as a point four times as often as resolved is not resolved enough to leave the beam
    twice = detections([20.0, 15.0], [12.0, 10.0], [30.0, 30.0])
    assert resolved_shapes(summed(twice[:1]), beam_cov(*BEAM)).any()
    assert not resolved_shapes(summed(twice[[1, 1, 1, 1, 0]]), beam_cov(*BEAM)).any()


def test_a_source_is_resolved_where_its_mean_shape_is_clearly_wider_than_the_beam():
    beam = beam_cov(*BEAM)
    # 1.5 beams across in one axis, seen once with int_flux 20 times its error: resolved, with that shape
    wide = summed(detections(22.5, 10.0, 30.0, rel_err=0.05))
    np.testing.assert_allclose(resolved_shapes(wide, beam)[0], [wide[name][0] / wide["weight"][0]
                                                               for name in SHAPE_SUMS[1:]])
    # the same fit at 4 times its error is within RESOLVED_MIN_SIGMA times its scatter: the beam
    excess = 22.5 / 15.0 - 1.0
    assert excess < RESOLVED_MIN_SIGMA * AREA_SCATTER * 0.25
    assert not resolved_shapes(summed(detections(22.5, 10.0, 30.0, rel_err=0.25)), beam).any()
    # wider than the beam by less than RESOLVED_MIN_EXCESS however sure: the beam
    slightly = 15.0 * (1.0 + RESOLVED_MIN_EXCESS * 0.75)
    assert not resolved_shapes(summed(detections([slightly] * 50, [10.0] * 50, 30.0, 0.01)), beam).any()
    assert resolved_shapes(summed(detections([15.0 * 1.3] * 50, [10.0] * 50, 30.0, 0.01)), beam).any()
    # a mean shape narrower than the beam along one axis (noise) is clipped, not counted against the other
    narrow = summed(detections([15.0 * 1.1, 15.0 * 1.1], [8.0, 8.0], [30.0, 30.0], 0.01))
    assert not resolved_shapes(narrow, beam).any()
    # no detection with a shape, no weight: the beam
    assert not resolved_shapes({name: np.zeros(1) for name in SHAPE_SUMS}, beam).any()


def test_a_shape_measured_under_a_wider_beam_counts_its_own_scatter():
    """A fit under a beam 1.6 times as wide is 2.6 times as noisy in arcsec**2: a shape within 5
    times its scatter there does not count as resolved in a sharper image either, one beyond it
    counts in both."""
    wide, sharp = (24 / 3600, 16 / 3600, 30.0), (15 / 3600, 10 / 3600, 30.0)
    for area, resolved in ((1.7, False), (2.5, True)):  # excess 0.7 and 1.5 over the wide beam's, S/N 6
        fit = summed(detections(24 * np.sqrt(area), 16 * np.sqrt(area), 30.0, rel_err=1 / 6, beam=wide), wide)
        assert 0.7 < RESOLVED_MIN_SIGMA * AREA_SCATTER / 6 < 1.5
        assert resolved_shapes(fit, beam_cov(*wide)).any() == resolved
        assert resolved_shapes(fit, beam_cov(*sharp)).any() == resolved


def test_point_sources_stay_points_when_measured_often():
    """Fitted areas of points scatter by about their flux's relative error (AREA_SCATTER): a noisy
    mean of many point fits stays the beam."""
    rng = np.random.default_rng(3)
    n_points, n_fits, rel_err = 400, 10, 0.15
    scatter = AREA_SCATTER * rel_err / 2  # per axis
    major = 15.0 * (1 + scatter * rng.standard_normal((n_points, n_fits)))
    minor = 10.0 * (1 + scatter * rng.standard_normal((n_points, n_fits)))
    rows = detections(major.ravel(), minor.ravel(), 30.0, rel_err)
    source = np.repeat(np.arange(n_points), n_fits)
    sums = {name: np.bincount(source, value, n_points)
            for name, value in shape_sum_increments(rows, beam_cov(*BEAM)).items()}
    assert not resolved_shapes(sums, beam_cov(*BEAM)).any()


def test_point_sources_of_a_polar_field_have_no_intrinsic_shape():
    """Near a pole north turns across the image, and the beam, fixed in pixels, with it: the
    extraction takes the beam away in pixels, so point sources far from the centre of a 5.7 deg
    field at dec 85 have no intrinsic shape (less the beam as it lies at the centre, 32 of 49
    came out resolved)."""
    n, pix, dec = 2048, 10.0, 85.0
    beam = Shape(8.0, 4.0, 0.0)
    rng = np.random.default_rng(1)
    wcs = make_wcs(n, n, 150.0, dec, pix)
    grid = np.linspace(150, n - 150, 7)
    x, y = (a.ravel() for a in np.meshgrid(grid, grid))
    data = correlated_noise((n, n), beam, 1e-3, rng) + gaussians((n, n), x, y, np.full(len(x), 0.1), beam.cov())
    params = ExtractionParams()
    found = extract_sources(prepare_image(data.astype(np.float32), wcs, beam.beam(pix), params), params)
    index = match(x, y, found["x"], found["y"], 3.0)
    assert (index >= 0).all()
    restoring = beam.beam(pix)
    restoring_cov = beam_cov(restoring.smaj, restoring.smin, restoring.pa)
    assert not resolved_shapes(shape_sum_increments(found[index], restoring_cov), restoring_cov).any()
    pa = np.abs((found["parallactic_angle"][index] + 90.0) % 180.0 - 90.0)
    assert pa.max() > 10.0  # north did turn across the field


def test_the_variance_across_a_line():
    shape = np.array([[4.0, 0.0, 9.0], [4.0, 0.0, 9.0], [5.0, 2.0, 5.0]])  # arcsec**2 (ee, en, nn)
    east, north = np.array([0.0, 3.0, 1.0]), np.array([2.0, 0.0, 1.0])
    # across a north line is east-west (4), across an east line north-south (9); the third is
    # elongated along north-east (7 along it, 3 across)
    np.testing.assert_allclose(variance_across(shape, east, north), [4.0, 9.0, 3.0])
