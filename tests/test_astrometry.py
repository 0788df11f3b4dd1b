"""Astrometric scatter measured from confident associations, and the automatic systematic error."""

import numpy as np
import pytest

from trap_dask.association import sky_tree
from trap_dask.astrometry import (
    AUTO_FLOOR,
    AUTO_UNMEASURED,
    Astrometry,
    ScatterHistory,
    automatic_sys_err,
    coherent_shift,
    measure,
)

ARCSEC = 1 / 3600
BEAM = 30 * ARCSEC
MANY = np.full(2000, 1e9)  #: detections behind each catalogue position: exact positions


def field(n=300, seed=0):
    """Isolated catalogue positions on a 2 x 2 deg grid (6 beams apart), deg."""
    side = int(np.ceil(np.sqrt(n)))
    y, x = np.divmod(np.arange(n), side)
    dec = 30.0 + y * 6 * BEAM
    return 150.0 + x * 6 * BEAM / np.cos(np.deg2rad(dec)), dec


def detections_of(ra, dec, offset, scatter, rng, significance=50.0, fit_err=0.2 * ARCSEC):
    """The catalogue seen again: a coherent offset, independent scatter (arcsec, east/north) and
    the fit error (deg) of each position."""
    noise = np.hypot(scatter, fit_err / ARCSEC)
    dx = (offset[0] + noise[0] * rng.standard_normal(len(ra))) * ARCSEC
    dy = (offset[1] + noise[1] * rng.standard_normal(len(ra))) * ARCSEC
    cos_dec = np.cos(np.deg2rad(dec))
    n = len(ra)
    return ra + dx / cos_dec, dec + dy, np.full(n, significance), np.full(n, fit_err) / cos_dec, np.full(n, fit_err)


def test_measures_the_offset_and_the_scatter_of_isolated_bright_sources():
    rng = np.random.default_rng(0)
    ra, dec = field()
    result = measure(ra, dec, MANY, *detections_of(ra, dec, (1.0, -0.5), (2.0, 3.0), rng), BEAM)
    assert result.measured and result.n == len(ra)
    assert result.offset_ra == pytest.approx(1.0, abs=0.25) and result.offset_dec == pytest.approx(-0.5, abs=0.35)
    assert result.scatter_ra == pytest.approx(2.0, rel=0.12) and result.scatter_dec == pytest.approx(3.0, rel=0.12)


@pytest.mark.parametrize("offset", [(28.5, 0.0), (45.0, -20.0), (-10.0, 70.0), (60.0, 60.0), (-120.0, 70.0)])
def test_a_shift_of_about_a_beam_or_more_is_found_and_measured(offset):
    """Shifted by about a beam (0.95 here), the match radius cuts off the far side of the offsets:
    the matches are made again around their median. By more than a beam (1.6-4.6), few detections
    lie within a beam of their source: the shift is found as the densest cluster of the pairs'
    offsets. Either is measured as a small shift is."""
    rng = np.random.default_rng(3)
    ra, dec = field()
    result = measure(ra, dec, MANY, *detections_of(ra, dec, offset, (2.0, 3.0), rng), BEAM)
    assert result.measured and result.n == len(ra)
    assert result.offset_ra == pytest.approx(offset[0], abs=0.3)
    assert result.offset_dec == pytest.approx(offset[1], abs=0.4)
    assert result.scatter_ra == pytest.approx(2.0, rel=0.12) and result.scatter_dec == pytest.approx(3.0, rel=0.12)


def test_no_shift_is_made_up_from_unrelated_detections():
    """Detections of another field (none at a catalogue position, however shifted) give no shift
    and no measurement."""
    rng = np.random.default_rng(4)
    ra, dec = field()
    other_ra = ra.min() + rng.uniform(0, np.ptp(ra), len(ra))
    other_dec = dec.min() + rng.uniform(0, np.ptp(dec), len(dec))
    n = len(ra)
    assert coherent_shift(sky_tree(ra, dec), ra, dec, other_ra, other_dec, np.arange(n), BEAM) is None
    result = measure(ra, dec, MANY, other_ra, other_dec, np.full(n, 50.0), np.full(n, 0.2 * ARCSEC),
                     np.full(n, 0.2 * ARCSEC), BEAM)
    assert result.n < 0.05 * n


def test_the_fit_error_is_taken_out_and_faint_or_crowded_sources_do_not_count():
    rng = np.random.default_rng(1)
    ra, dec = field(1000)
    det_ra, det_dec, sig, ra_err, dec_err = detections_of(ra, dec, (0.0, 0.0), (2.0, 2.0), rng, fit_err=1.5 * ARCSEC)
    # positions scatter by 2.5", of which 1.5" are the fits' own errors: 2" are systematic
    assert measure(ra, dec, MANY, det_ra, det_dec, sig, ra_err, dec_err, BEAM).scatter_ra == pytest.approx(
        2.0, rel=0.15)
    sig[: len(ra) // 2] = 5.0  # below MIN_SIGNIFICANCE
    det_ra[len(ra) // 2:] = ra[len(ra) // 2:] + 0.5 * BEAM  # a second source half a beam away
    crowded = measure(np.concatenate([ra, ra[len(ra) // 2:]]), np.concatenate([dec, dec[len(ra) // 2:] + 0.5 * BEAM]),
                      MANY, det_ra, det_dec, sig, ra_err, dec_err, BEAM)
    assert crowded.n == 0 and not crowded.measured and np.isnan(crowded.scatter_ra)


def test_the_catalogue_positions_own_scatter_is_taken_out():
    rng = np.random.default_rng(2)
    ra, dec = field(1000)
    n = 3  # catalogue positions averaged over 3 epochs: they scatter by sigma / sqrt(3) too
    ra_c, dec_c = ra + 2.0 * ARCSEC * rng.standard_normal(len(ra)) / np.sqrt(n) / np.cos(np.deg2rad(dec)), \
        dec + 2.0 * ARCSEC * rng.standard_normal(len(ra)) / np.sqrt(n)
    result = measure(ra_c, dec_c, np.full(len(ra), n), *detections_of(ra, dec, (0, 0), (2.0, 2.0), rng), BEAM)
    assert result.scatter_ra == pytest.approx(2.0, rel=0.1) and result.scatter_dec == pytest.approx(2.0, rel=0.1)


def test_automatic_sys_err_follows_the_running_scatter_and_a_worse_image():
    beam_arcsec = BEAM / ARCSEC
    nothing = ScatterHistory()
    assert automatic_sys_err(nothing, Astrometry(), BEAM) == (pytest.approx(AUTO_UNMEASURED * beam_arcsec),) * 2
    history = nothing.add(Astrometry(100, 0.0, 0.0, 2.0, 1.0)).add(Astrometry(100, 0.0, 0.0, 2.0, 1.0))
    assert history.rms() == pytest.approx((2.0, 1.0))
    assert automatic_sys_err(history, Astrometry(3, 0, 0, 9.0, 9.0), BEAM) == pytest.approx((2.0, 1.0))  # too few
    assert automatic_sys_err(history, Astrometry(50, 0, 0, 3.0, 0.5), BEAM) == pytest.approx((3.0, 1.0))
    tiny = nothing.add(Astrometry(100, 0, 0, 0.01, 0.01))
    assert automatic_sys_err(tiny, Astrometry(), BEAM) == pytest.approx((AUTO_FLOOR * beam_arcsec,) * 2)


def test_history_is_rebuilt_from_the_images_table():
    history = ScatterHistory.from_images([None, 100, 50, 2], [None, 2.0, 4.0, None], [None, 1.0, 1.0, None])
    assert history.n == 150
    assert history.rms() == pytest.approx((np.sqrt((100 * 4 + 50 * 16) / 150), 1.0))
