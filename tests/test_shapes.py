"""The sources' intrinsic shapes that forced fits of resolved sources use (trap_dask.shapes)."""

from __future__ import annotations

import numpy as np

from trap_dask.shapes import AREA_SCATTER, SHAPE_SUMS, beam_cov, resolved_shapes, shape_sum_increments
from trap_dask.sources import empty_sources

BEAM = (15.0 / 3600, 10.0 / 3600, 30.0)  # semi-axes (deg), PA (deg)


def detections(semimajor, semiminor, pa, rel_err=0.1) -> np.ndarray:
    """Blind Gaussian fits (arcsec, deg) of int_flux 1 Jy and a relative error ``rel_err``."""
    rows = empty_sources(len(np.atleast_1d(semimajor)))
    rows["semimajor_axis"], rows["semiminor_axis"], rows["parallactic_angle"] = semimajor, semiminor, pa
    rows["int_flux"], rows["int_flux_err"], rows["gaussian_fit"] = 1.0, rel_err, True
    return rows


def summed(rows: np.ndarray, beam: np.ndarray) -> dict[str, np.ndarray]:
    """The shape sums of one source measured by all ``rows``."""
    return {name: np.atleast_1d(value.sum()) for name, value in shape_sum_increments(rows, beam).items()}


def test_a_resolved_detection_adds_its_shape_less_the_beam():
    beam = beam_cov(*BEAM)
    # a round source of FWHM 2 x 30" convolved with a round beam of 2 x 30" is 2 x 30 sqrt(2)"
    round_beam = beam_cov(30.0 / 3600, 30.0 / 3600, 0.0)
    one = summed(detections(30.0 * np.sqrt(2), 30.0 * np.sqrt(2), 70.0, rel_err=0.2), round_beam)
    sigma2 = (30.0 / np.sqrt(2.0 * np.log(2.0))) ** 2
    assert one["weight"][0] == np.float64(25.0)
    np.testing.assert_allclose([one["ee"][0] / 25, one["en"][0] / 25, one["nn"][0] / 25], [sigma2, 0, sigma2],
                               atol=1e-9 * sigma2)
    # an elongated one along PA 120: its major axis runs east-south-east
    long = summed(detections(40.0, 10.0, 120.0), beam)
    shape = np.array([long[name][0] / long["weight"][0] for name in SHAPE_SUMS[1:]])
    assert shape[0] > shape[2] and shape[1] < 0  # wider east-west than north-south, tilted


def test_what_is_no_fitted_shape_adds_nothing_and_a_beam_shaped_fit_counts_as_a_point():
    beam = beam_cov(*BEAM)
    rows = detections([40.0, 40.0, 40.0, 15.0, 40.0], [20.0, 20.0, 20.0, 10.0, np.nan], [0.0, 0.0, 0.0, 30.0, 0.0])
    rows["is_force_fit"][0] = True  # a forced fit
    rows["gaussian_fit"][1] = False  # moments, not a fit
    rows["int_flux_err"][2] = 0.0  # no error
    # rows[3] has the beam's shape (force_beam, a pair fit): a point, of weight (1 / 0.1)**2; rows[4] no minor axis
    added = shape_sum_increments(rows, beam)
    assert added["weight"].tolist() == [0.0, 0.0, 0.0, 100.0, 0.0]
    np.testing.assert_allclose([added[name][3] for name in SHAPE_SUMS[1:]], 0.0, atol=1e-9)
    # a source fitted as a point as often as resolved is not resolved enough to leave the beam
    twice = detections([20.0, 15.0], [12.0, 10.0], [30.0, 30.0])
    assert resolved_shapes(summed(twice[:1], beam), beam).any()
    assert not resolved_shapes(summed(twice[[1, 1, 1, 1, 0]], beam), beam).any()


def test_point_sources_keep_the_beam_and_resolved_ones_get_their_shape():
    """Fitted areas of points scatter by about their flux's relative error (AREA_SCATTER); a noisy
    mean of point fits stays the beam, a source clearly wider gets its mean shape."""
    rng = np.random.default_rng(3)
    beam = beam_cov(*BEAM)
    n_points, n_fits, rel_err = 400, 10, 0.15
    scatter = AREA_SCATTER * rel_err / 2  # per axis
    major = 15.0 * (1 + scatter * rng.standard_normal((n_points, n_fits)))
    minor = 10.0 * (1 + scatter * rng.standard_normal((n_points, n_fits)))
    sums = {name: np.zeros(n_points) for name in SHAPE_SUMS}
    for i in range(n_points):
        for name, value in summed(detections(major[i], minor[i], 30.0, rel_err), beam).items():
            sums[name][i] = value[0]
    assert (resolved_shapes(sums, beam) == 0).all(axis=1).mean() >= 0.99
    # 1.5 beams across in one axis, seen once at 10 sigma: resolved, with that shape
    wide = summed(detections(22.5, 10.0, 30.0), beam)
    shape = resolved_shapes(wide, beam)[0]
    np.testing.assert_allclose(shape, [wide[name][0] / wide["weight"][0] for name in SHAPE_SUMS[1:]])
    # 5% wider in area is within the scatter of one 10-sigma fit, and below RESOLVED_MIN_EXCESS however sure
    slightly = detections(15.0 * 1.05, 10.0, 30.0)
    assert not resolved_shapes(summed(slightly, beam), beam).any()
    assert not resolved_shapes(summed(detections([15.75] * 50, [10.0] * 50, 30.0, 0.01), beam), beam).any()
    # no detection with a shape, no weight: the beam
    assert not resolved_shapes({name: np.zeros(1) for name in SHAPE_SUMS}, beam).any()
