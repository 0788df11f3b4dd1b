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
    measurable,
    measure,
    widened_sys_err,
)
from trap_dask.messages import MIN_MATCHES
from trap_dask.sky import TANGENT_REACH, haversine, north_turn, shifted, unshifted, within

ARCSEC = 1 / 3600
BEAM = 30 * ARCSEC
MANY = np.full(2000, 1e9)  #: detections behind each catalogue position: exact positions


def field(n=300, seed=0):
    """Isolated catalogue positions on a 2 x 2 deg grid (6 beams apart), deg."""
    side = int(np.ceil(np.sqrt(n)))
    y, x = np.divmod(np.arange(n), side)
    dec = 30.0 + y * 6 * BEAM
    return 150.0 + x * 6 * BEAM / np.cos(np.deg2rad(dec)), dec


def to_tangent(ra, dec, ra0, dec0):
    """Gnomonic coordinates (deg) about (ra0, dec0): a TAN image's plane, in which a shifted image
    moves every position alike."""
    a, d, d0 = np.deg2rad(np.subtract(ra, ra0)), np.deg2rad(dec), np.deg2rad(dec0)
    cos_c = np.sin(d0) * np.sin(d) + np.cos(d0) * np.cos(d) * np.cos(a)
    return (np.rad2deg(np.cos(d) * np.sin(a) / cos_c),
            np.rad2deg((np.cos(d0) * np.sin(d) - np.sin(d0) * np.cos(d) * np.cos(a)) / cos_c))


def from_tangent(xi, eta, ra0, dec0):
    """Positions (deg) of gnomonic coordinates (deg) about (ra0, dec0)."""
    x, y, d0 = np.deg2rad(xi), np.deg2rad(eta), np.deg2rad(dec0)
    dec = np.arctan2(np.sin(d0) + y * np.cos(d0), np.hypot(x, np.cos(d0) - y * np.sin(d0)))
    return (ra0 + np.rad2deg(np.arctan2(x, np.cos(d0) - y * np.sin(d0)))) % 360.0, np.rad2deg(dec)


def middle(ra, dec):
    """A field's centre (ra, dec; deg), where its offsets are east and north."""
    return float(np.mean(ra)), float(np.mean(dec))


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
    result = measure(ra, dec, MANY, *detections_of(ra, dec, (1.0, -0.5), (2.0, 3.0), rng), BEAM, middle(ra, dec))
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
    result = measure(ra, dec, MANY, *detections_of(ra, dec, offset, (2.0, 3.0), rng), BEAM, middle(ra, dec))
    assert result.measured and result.n == len(ra)
    assert result.offset_ra == pytest.approx(offset[0], abs=0.3)
    assert result.offset_dec == pytest.approx(offset[1], abs=0.4)
    assert result.scatter_ra == pytest.approx(2.0, rel=0.12) and result.scatter_dec == pytest.approx(3.0, rel=0.12)


@pytest.mark.parametrize("dec0", [89.8, 90.0, -89.9])
def test_a_shifted_field_around_a_pole_is_matched_and_measured(dec0):
    """A field holding a celestial pole, shifted as a whole (a translation of the image, 1.2 and 0.5
    beams): east and north turn across it, so offsets taken east and north at each source differ
    from source to source (half of the sources matched, the scatter 11" for 2", before). In the
    tangent plane at the image's centre the shift is one offset, measured as anywhere."""
    rng = np.random.default_rng(5)
    side = 17
    y, x = np.divmod(np.arange(side * side), side)
    xi, eta = (x - side / 2) * 6 * BEAM, (y - side / 2) * 6 * BEAM  # 51' across
    centre = (150.0, dec0)
    ra, dec = from_tangent(xi, eta, *centre)
    shift = np.array([1.2, 0.5]) * BEAM
    scatter = 2.0 * ARCSEC * rng.standard_normal((2, len(xi)))
    det_ra, det_dec = from_tangent(xi + shift[0] + scatter[0], eta + shift[1] + scatter[1], *centre)
    n, fit_err = len(ra), 0.2 * ARCSEC
    result = measure(ra, dec, MANY, det_ra, det_dec, np.full(n, 50.0), np.full(n, fit_err), np.full(n, fit_err),
                     BEAM, centre=centre)
    assert result.n == n
    assert result.offset_ra == pytest.approx(shift[0] / ARCSEC, abs=0.3)
    assert result.offset_dec == pytest.approx(shift[1] / ARCSEC, abs=0.3)
    assert result.scatter_ra == pytest.approx(2.0, rel=0.15) and result.scatter_dec == pytest.approx(2.0, rel=0.15)


@pytest.mark.parametrize("centre", [(150.0, 30.0), (10.0, 89.8), (200.0, 90.0), (0.0, -89.9), (359.9, 0.0)])
def test_north_turns_as_a_tan_image_shows_it(centre):
    """The angle from north at the centre to north at a position (poles and RA 0 included) is the
    direction in which a TAN image at the centre draws the position's north."""
    rng = np.random.default_rng(2)
    ra = (centre[0] + rng.normal(0, 1, 500) / max(np.cos(np.deg2rad(centre[1])), 0.01)) % 360.0
    dec = np.clip(centre[1] + rng.normal(0, 1, 500), -89.99, 89.99)
    step = 1e-7
    xi, eta = to_tangent(ra, dec, *centre)
    up_xi, up_eta = to_tangent(ra, dec + step, *centre)
    drawn = np.arctan2(up_xi - xi, up_eta - eta)
    assert np.abs(np.angle(np.exp(1j * (north_turn(ra, centre) - drawn)))).max() < 1e-5
    assert abs(north_turn(centre[0], centre)) < 1e-9


def test_positions_far_from_the_centre_keep_their_place():
    """An all-sky image (ZEA, CAR) reaches past 90 deg from its centre, where the tangent plane maps a
    position onto its opposite: taking a 5" shift out moves every position within TANGENT_REACH by
    a few arcsec at most, and leaves those beyond where they are (a source 97 deg out once became
    its antipode and split its light curve)."""
    centre, bearing = (150.0, 30.0), np.deg2rad(np.linspace(0.0, 360.0, 7, endpoint=False))
    far = np.deg2rad(np.array([1.0, 10.0, 60.0, 79.0, 85.0, 90.0, 97.0, 150.0]))[:, None]
    d0 = np.deg2rad(centre[1])
    dec = np.arcsin(np.sin(d0) * np.cos(far) + np.cos(d0) * np.sin(far) * np.cos(bearing))
    ra = centre[0] + np.rad2deg(np.arctan2(np.sin(bearing) * np.sin(far) * np.cos(d0),
                                           np.cos(far) - np.sin(d0) * np.sin(dec)))
    ra, dec = ra.ravel() % 360.0, np.rad2deg(dec).ravel()
    moved_ra, moved_dec = unshifted(ra, dec, 5 * ARCSEC, -3 * ARCSEC, centre)
    moved = np.rad2deg(2 * np.arcsin(np.sqrt(haversine(ra, dec, moved_ra, moved_dec)))) * 3600.0
    near = np.repeat(far.ravel() < np.deg2rad(TANGENT_REACH), bearing.size)
    assert (moved[near] > 0.0).all() and moved.max() < 6.0
    assert (moved_ra[~near] == ra[~near]).all() and (moved_dec[~near] == dec[~near]).all()


@pytest.mark.parametrize("centre, size", [((150.0, 30.0), 3.0), ((10.0, -89.5), 0.4), ((359.99, 0.0), 3.0)])
def test_shifted_undoes_unshifted(centre, size):
    """Where a shifted image shows a catalogue position (forced fits) and the catalogue position of
    what it shows (detections) are inverses, to 0.05 arcsec for 20" shifts across a field, around a pole (sources
    0.1 deg from it and more) and over RA 0, also with one shift and centre per position (the
    measurements of several images)."""
    rng = np.random.default_rng(3)
    dec = centre[1] + rng.uniform(-size, size, 200)
    ra = (centre[0] + rng.uniform(-180, 180, 200) * (size < 1) + rng.uniform(-size, size, 200) * (size >= 1)) % 360.0
    east, north = rng.normal(0, 20 * ARCSEC, 200), rng.normal(0, 20 * ARCSEC, 200)
    for shift in ((east[0], north[0]), (east, north)):
        moved = shifted(ra, dec, *shift, centre)
        assert np.rad2deg(2 * np.arcsin(np.sqrt(haversine(ra, dec, *moved)))).max() > 5 * ARCSEC
        back = unshifted(*moved, *shift, (np.full(200, centre[0]), np.full(200, centre[1])))
        assert np.rad2deg(2 * np.arcsin(np.sqrt(haversine(ra, dec, *back)))).max() < 0.05 * ARCSEC
    over = shifted(np.array([10.0]), np.array([89.9999]), 0.0, 1 * ARCSEC, (10.0, 89.9))  # 0.36" from the pole
    assert -90.0 <= over[1][0] <= 90.0 and 0.0 <= over[0][0] < 360.0


def test_no_shift_is_made_up_from_unrelated_detections():
    """Detections of another field (none at a catalogue position, however shifted) give no shift
    and no measurement."""
    rng = np.random.default_rng(4)
    ra, dec = field()
    other_ra = ra.min() + rng.uniform(0, np.ptp(ra), len(ra))
    other_dec = dec.min() + rng.uniform(0, np.ptp(dec), len(dec))
    n = len(ra)
    centre = middle(ra, dec)
    assert coherent_shift(sky_tree(ra, dec), ra, dec, other_ra, other_dec, np.arange(n), BEAM, centre) is None
    result = measure(ra, dec, MANY, other_ra, other_dec, np.full(n, 50.0), np.full(n, 0.2 * ARCSEC),
                     np.full(n, 0.2 * ARCSEC), BEAM, centre)
    assert result.n < 0.05 * n


def test_the_fit_error_is_taken_out_and_faint_or_crowded_sources_do_not_count():
    rng = np.random.default_rng(1)
    ra, dec = field(1000)
    det_ra, det_dec, sig, ra_err, dec_err = detections_of(ra, dec, (0.0, 0.0), (2.0, 2.0), rng, fit_err=1.5 * ARCSEC)
    # positions scatter by 2.5", of which 1.5" are the fits' own errors: 2" are systematic
    assert measure(ra, dec, MANY, det_ra, det_dec, sig, ra_err, dec_err, BEAM, middle(ra, dec)).scatter_ra == \
        pytest.approx(2.0, rel=0.15)
    sig[: len(ra) // 2] = 5.0  # below MIN_SIGNIFICANCE
    det_ra[len(ra) // 2:] = ra[len(ra) // 2:] + 0.5 * BEAM  # a second source half a beam away
    crowded = measure(np.concatenate([ra, ra[len(ra) // 2:]]), np.concatenate([dec, dec[len(ra) // 2:] + 0.5 * BEAM]),
                      MANY, det_ra, det_dec, sig, ra_err, dec_err, BEAM, middle(ra, dec))
    assert crowded.n == 0 and not crowded.measured and np.isnan(crowded.scatter_ra)


@pytest.mark.parametrize("offset", [(1.0, -0.5), (45.0, -20.0), (60.0, 0.0)])
def test_a_catalogue_crowded_with_sources_not_seen_again_is_no_sign_of_a_shift(offset, monkeypatch):
    """Known sources that this image does not detect (one-off detections of earlier images) 2 beams
    east of 70% of the field's sources take away their isolation: few detections match confidently.
    Unshifted, those few lie at no offset, as the search would find: no search, and they measure
    the image. Shifted by 1.6 beams, or by exactly the neighbours' offset (each detection then lies
    on an unseen source, as on copies an earlier image left there), the shift is searched for and
    found."""
    from trap_dask import astrometry

    rng = np.random.default_rng(6)
    ra, dec = field()
    crowd = rng.random(len(ra)) < 0.7
    cat_ra = np.concatenate([ra, ra[crowd] + 2 * BEAM / np.cos(np.deg2rad(dec[crowd]))])
    cat_dec = np.concatenate([dec, dec[crowd]])
    searched = []
    monkeypatch.setattr(astrometry, "coherent_shift",
                        lambda *args: searched.append(1) or coherent_shift(*args))
    det = detections_of(ra, dec, offset, (2.0, 3.0), rng)
    result = measure(cat_ra, cat_dec, MANY, *det, BEAM, middle(ra, dec))
    assert bool(searched) == (np.hypot(*offset) > BEAM / ARCSEC)
    assert result.measured and result.n == np.sum(~crowd)
    assert result.offset_ra == pytest.approx(offset[0], abs=0.6)
    assert result.offset_dec == pytest.approx(offset[1], abs=0.6)
    assert result.scatter_ra == pytest.approx(2.0, rel=0.25) and result.scatter_dec == pytest.approx(3.0, rel=0.25)


@pytest.mark.parametrize("seed", range(3))
def test_a_shift_onto_a_crowd_of_unseen_sources_is_still_found(seed):
    """A 2.1-beam shift lands 60% of the field's detections among unseen known sources spread
    evenly (0.8 a beam**2): most lie within a beam of one, at offsets pointing every way (their
    median near zero), none by an isolated one. The search still runs and measures the shift from
    the isolated rest (a review found it lost when the test was the median of those offsets)."""
    rng = np.random.default_rng(seed)
    ra, dec = field(196)
    south, north = dec.min() - 3 * BEAM, dec.min() + 0.6 * np.ptp(dec)
    west, east = ra.min() - 3 * BEAM, ra.max() + 3 * BEAM
    area = (east - west) * np.cos(np.deg2rad(dec.mean())) * (north - south) / BEAM**2
    m = rng.poisson(0.8 * area)
    cat_ra = np.concatenate([ra, rng.uniform(west, east, m)])
    cat_dec = np.concatenate([dec, rng.uniform(south, north, m)])
    result = measure(cat_ra, cat_dec, MANY, *detections_of(ra, dec, (60.0, 20.0), (2.0, 2.0), rng), BEAM,
                     middle(ra, dec))
    assert result.measured and result.n >= 0.25 * len(ra)
    assert result.offset_ra == pytest.approx(60.0, abs=0.8) and result.offset_dec == pytest.approx(20.0, abs=0.8)


def test_the_catalogue_positions_own_scatter_is_taken_out():
    rng = np.random.default_rng(2)
    ra, dec = field(1000)
    n = 3  # catalogue positions averaged over 3 epochs: they scatter by sigma / sqrt(3) too
    ra_c, dec_c = ra + 2.0 * ARCSEC * rng.standard_normal(len(ra)) / np.sqrt(n) / np.cos(np.deg2rad(dec)), \
        dec + 2.0 * ARCSEC * rng.standard_normal(len(ra)) / np.sqrt(n)
    result = measure(ra_c, dec_c, np.full(len(ra), n), *detections_of(ra, dec, (0, 0), (2.0, 2.0), rng), BEAM,
                     middle(ra, dec))
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


def test_set_errors_are_widened_to_the_scatter_the_data_show_per_axis():
    history = ScatterHistory().add(Astrometry(100, 0.0, 0.0, 6.0, 0.5))
    assert widened_sys_err((1.0, 1.0), ScatterHistory(), Astrometry()) == (1.0, 1.0)
    assert widened_sys_err((1.0, 5.0), ScatterHistory(), Astrometry(), unmeasured=3.0) == (3.0, 5.0)
    assert widened_sys_err((1.0, 1.0), history, Astrometry(), unmeasured=9.0) == pytest.approx((6.0, 1.0))
    assert widened_sys_err((1.0, 1.0), history, Astrometry(50, 0, 0, 2.0, 4.0)) == pytest.approx((6.0, 4.0))
    assert widened_sys_err((10.0, 10.0), history, Astrometry(50, 0, 0, 2.0, 4.0)) == (10.0, 10.0)


def test_a_field_is_measurable_with_enough_bright_isolated_sources():
    ra, dec = field(MIN_MATCHES)
    bright = np.full(len(ra), 50.0)
    centre = (float(np.mean(ra)), float(np.mean(dec)))
    assert measurable(ra, dec, bright, BEAM, centre)
    assert not measurable(ra[1:], dec[1:], bright[1:], BEAM, centre)
    assert not measurable(ra, dec, np.full(len(ra), 5.0), BEAM, centre)  # too faint to match confidently
    pairs = np.concatenate([ra, ra]), np.concatenate([dec, dec + 0.5 * BEAM])  # none isolated
    assert not measurable(*pairs, np.tile(bright, 2), BEAM, centre)


def test_history_is_rebuilt_from_the_images_table():
    history = ScatterHistory.from_images([None, 100, 50, 2], [None, 2.0, 4.0, None], [None, 1.0, 1.0, None])
    assert history.n == 150
    assert history.rms() == pytest.approx((np.sqrt((100 * 4 + 50 * 16) / 150), 1.0))


@pytest.mark.parametrize("centre", [(150.0, 30.0), (0.5, -60.0), (10.0, 89.5)])
@pytest.mark.parametrize("radius", [0.3, 2.0, 45.0, 179.0, 180.0, np.nan])
def test_within_a_radius_is_the_great_circle_distance(centre, radius):
    """``within`` (its cut by declination first) picks what the great-circle distance picks, across
    RA 0/360 and around a pole; a radius of 180 deg or not a number takes the whole sky."""
    rng = np.random.default_rng(0)
    ra, dec = rng.uniform(0, 360, 20000), np.rad2deg(np.arcsin(rng.uniform(-1, 1, 20000)))
    distance = 2 * np.rad2deg(np.arcsin(np.sqrt(haversine(ra, dec, *centre))))
    expected = distance <= radius if radius < 180 else np.ones(len(ra), bool)
    assert within(ra, dec, centre, radius).tolist() == expected.tolist()


def test_a_shift_found_on_a_lattice_does_not_depend_on_what_else_the_catalogue_holds():
    """On a regular grid every lattice offset gathers a cluster of the same size: the search takes
    the first in the order of the catalogue's rows, so the whole catalogue (rows in any order) and
    the sources around the image (RunningCatalogue.neighbourhood) find the same shift."""
    from trap_dask.association import sky_tree
    from trap_dask.astrometry import REACH, measure

    beam, centre = 1 / 60.0, (180.0, 0.0)
    x = np.arange(-1.5, 1.5 + 1e-9, 4 * beam)
    cat_ra, cat_dec = (a.ravel() for a in np.meshgrid(centre[0] + x, x))
    inside = np.hypot(cat_ra - centre[0], cat_dec) < 0.3
    det_ra, det_dec = cat_ra[inside] + 1.5 * beam, cat_dec[inside] + 0.3 * beam
    n = len(det_ra)
    rng = np.random.default_rng(3)
    for _ in range(4):
        order = rng.permutation(len(cat_ra))
        ra, dec, count = cat_ra[order], cat_dec[order], np.full(len(order), 5.0)
        near = np.flatnonzero(within(ra, dec, centre, 0.3 + REACH * beam))
        found = [measure(ra[r], dec[r], count[r], det_ra, det_dec, np.full(n, 50.0), np.full(n, 1e-5),
                         np.full(n, 1e-5), beam, centre, sky_tree(ra[r], dec[r]))
                 for r in (np.arange(len(ra)), near)]
        assert found[0].measured and (found[0].offset_ra, found[0].offset_dec) == (found[1].offset_ra,
                                                                                   found[1].offset_dec)
