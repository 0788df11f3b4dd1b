"""The running catalogue on hand-made detections: ids, parents, forced fits, light curves."""

from dataclasses import replace
from datetime import datetime, timedelta

import numpy as np
import pytest

from trap_dask.catalogue import ForcedMeasurements, ImageContext, RunningCatalogue
from trap_dask.sources import add_uncertainties, empty_sources

ARCSEC = 1 / 3600


def detections(ra, dec, flux, err=0.01):
    s = empty_sources(len(ra))
    s["ra"], s["dec"] = ra, dec
    s["ra_fit_err"] = s["dec_fit_err"] = 1 * ARCSEC
    s["peak_flux"] = s["int_flux"] = flux
    s["peak_flux_err"] = s["int_flux_err"] = err
    s["error_radius"] = 1.0
    return add_uncertainties(s, 5.0, 5.0)


def forced_at(ra, dec, flux, err=0.01):
    s = detections(ra, dec, flux, err)
    s["is_force_fit"] = True
    return s


def context(im_id, band=1, rms=0.001):
    return ImageContext(im_id, band, datetime(2020, 1, 1) + timedelta(hours=im_id), 150.0, 30.0, 1.0, rms, rms)


def step(cat, im_id, det, forced_flux=None, band=1, rms=0.001):
    plan = cat.plan(context(im_id, band, rms), det)
    request = plan.forced_request(cat)
    flux = np.full(len(request.ra), 0.0) if forced_flux is None else forced_flux
    update = cat.update(plan, ForcedMeasurements(forced_at(request.ra, request.dec, flux)))
    return cat.apply(update, plan.image), update


#: the catalogue as TraP 1.x runs it (Config's defaults switch these on), which the cases below spell out
TRAP1 = dict(optimal_association=False, fit_blends=False, backfill=False, link_radius=0.0, merge_duplicates=False,
             duplicate_reach=0.0)


@pytest.fixture
def catalogue():
    # ids from 1 here so the literal ids below read as counts; a new catalogue counts from 0
    return RunningCatalogue(de_ruiter_r_max=5.68, max_nr_consecutive_force_fits=2, detection_threshold=8.0,
                            **TRAP1, next_xtrsrc=1, next_src_id=1)


def test_ids_count_from_zero_and_id_zero_is_a_parent():
    cat = RunningCatalogue(de_ruiter_r_max=5.68, max_nr_consecutive_force_fits=2, detection_threshold=8.0, **TRAP1)
    det = detections(np.array([150.0, 150.2]), np.array([30.0, 30.0]), [1.0, 1.0])
    cat, first = step(cat, 0, det)
    assert first.ids["id"].tolist() == [0, 1] and first.ids["src_id"].tolist() == [0, 1]
    cat, update = step(cat, 1, det[1:])                    # source 0 missing: forced fit, parent id 0
    forced = update.measurements["is_force_fit"]
    assert update.ids["src_id"][forced].tolist() == [0] and update.ids["parent"][forced].tolist() == [0]


def test_steady_sources_keep_their_ids_and_chain_parents(catalogue):
    ra, dec = np.array([150.0, 150.1, 149.9]), np.array([30.0, 30.05, 29.95])
    cat, first = step(catalogue, 1, detections(ra, dec, [1.0, 2.0, 3.0]))
    assert first.ids["src_id"].tolist() == [1, 2, 3]
    assert first.ids["parent"].tolist() == [-1, -1, -1]
    assert len(first.new_sources["src_id"]) == 0          # first image: nothing is new
    jitter = 2 * ARCSEC
    cat, second = step(cat, 2, detections(ra[::-1] + jitter, dec[::-1] - jitter, [3.1, 2.1, 1.1]))
    assert second.ids["src_id"].tolist() == [3, 2, 1]
    assert second.ids["parent"].tolist() == first.ids["id"][::-1].tolist()
    assert second.ids["id"].min() == first.ids["id"].max() + 1


def test_null_detections_are_force_fitted_until_the_limit(catalogue):
    det = detections(np.array([150.0, 150.2]), np.array([30.0, 30.0]), [1.0, 1.0])
    cat, _ = step(catalogue, 1, det)
    for im_id in (2, 3):  # source 2 missing: forced twice (the limit), then no more
        cat, update = step(cat, im_id, det[:1])
        forced = update.measurements["is_force_fit"]
        assert forced.sum() == 1 and update.ids["src_id"][forced].tolist() == [2]
    cat, update = step(cat, 4, det[:1])
    assert not update.measurements["is_force_fit"].any()
    cat, update = step(cat, 5, det)                        # detected again: same source resumes
    assert update.ids["src_id"].tolist() == [1, 2]


def test_transient_becomes_a_new_source_with_its_significance(catalogue):
    cat, _ = step(catalogue, 1, detections(np.array([150.0]), np.array([30.0]), [1.0]), rms=0.002)
    det = detections(np.array([150.0, 150.3]), np.array([30.0, 30.1]), [1.0, 0.05])
    cat, update = step(cat, 2, det, rms=0.001)
    new = update.new_sources
    assert new["src_id"].tolist() == [2]
    assert new["sigma_rms_min"][0] == pytest.approx(0.05 / 0.002)
    assert new["newsource_type"][0] == 1                   # 25 sigma in the earlier image: likely


def test_a_source_outside_the_earlier_images_outline_is_not_new(catalogue):
    """An earlier image covered its extraction region, not the circle of its half-diagonal round it: a
    source first seen beyond that image's side (a new pointing's sky) is no transient candidate, one
    seen inside it is; without an outline (a database of schema < 7) the circle alone decides, as before."""
    half, side = 0.7, np.linspace(-1.0, 1.0, 8, endpoint=False)  # deg: a square 1.4 deg a side, circle 1.0
    square = np.concatenate([np.column_stack([-side, -np.ones(8)]), np.column_stack([-np.ones(8), side]),
                             np.column_stack([side, np.ones(8)]), np.column_stack([np.ones(8), -side])])
    outline = np.column_stack([150.0 + square[:, 0] * half / np.cos(np.radians(30.0)), 30.0 + square[:, 1] * half])
    first = replace(context(1), outline=outline)
    plan = catalogue.plan(first, detections(np.array([150.0]), np.array([30.0]), [1.0]))
    cat = catalogue.apply(catalogue.update(plan, ForcedMeasurements(forced_at([], [], []))), first)
    beyond, inside = (150.0, 30.9), (150.2, 30.5)    # both within 1 deg of the centre
    det = detections(np.array([150.0, beyond[0], inside[0]]), np.array([30.0, beyond[1], inside[1]]), [1.0, 0.05, 0.05])
    new = step(cat, 2, det)[1].new_sources
    assert new["src_id"].tolist() == [3]
    circle_only = catalogue.apply(catalogue.update(catalogue.plan(context(1), det[:1]),
                                                   ForcedMeasurements(forced_at([], [], []))), context(1))
    assert step(circle_only, 2, det)[1].new_sources["src_id"].tolist() == [2, 3]


def test_one_to_many_makes_a_duplicate_with_the_known_parent(catalogue):
    cat, first = step(catalogue, 1, detections(np.array([150.0]), np.array([30.0]), [1.0]))
    det = detections(np.array([150.0, 150.0 + 4 * ARCSEC]), np.array([30.0, 30.0]), [1.0, 0.5])
    cat, update = step(cat, 2, det)
    assert update.ids["src_id"].tolist() == [1, 2]
    assert update.ids["is_duplicate"].tolist() == [False, True]
    assert update.ids["parent"].tolist() == [first.ids["id"][0]] * 2
    assert len(update.new_sources["src_id"]) == 0          # a split, not a transient


def test_variability_matches_the_light_curve(catalogue):
    rng = np.random.default_rng(1)
    fluxes = 1.0 + 0.3 * rng.standard_normal(8)
    errs = 0.01 + 0.01 * rng.random(8)
    cat = catalogue
    for i, (f, e) in enumerate(zip(fluxes, errs), start=1):
        cat, update = step(cat, i, detections(np.array([150.0]), np.array([30.0]), [f], err=e))
    lc = cat.lightcurves
    w = 1 / errs**2
    eta = len(fluxes) / (len(fluxes) - 1) * (np.mean(w * fluxes**2) - np.mean(w * fluxes) ** 2 / np.mean(w))
    assert lc["nr_datapoints"][0] == 8
    assert lc["v_int"][0] == pytest.approx(np.std(fluxes, ddof=1) / np.mean(fluxes), rel=1e-9)
    assert lc["eta_int"][0] == pytest.approx(eta, rel=1e-9)
    assert lc["lightcurve_max"][0] == pytest.approx(fluxes.max())
    assert lc["lightcurve_avg"][0] == pytest.approx(fluxes.mean())


def test_bands_have_separate_light_curves(catalogue):
    det = detections(np.array([150.0]), np.array([30.0]), [1.0])
    cat, _ = step(catalogue, 1, det, band=1)
    cat, update = step(cat, 2, det, band=2)
    assert update.ids["src_id"].tolist() == [1]
    assert sorted(zip(cat.lightcurves["src_id"], cat.lightcurves["freq_band"])) == [(1, 1), (1, 2)]


def test_monitor_positions_are_forced_every_image_as_their_own_source(catalogue):
    cat, ids = catalogue.add_monitor_sources(np.array([150.05]), np.array([30.05]))
    for im_id in range(1, 5):
        cat, update = step(cat, im_id, detections(np.array([150.0]), np.array([30.0]), [1.0]),
                           forced_flux=np.array([0.2]))
        monitor = update.ids["src_id"] == ids[0]
        assert monitor.sum() == 1 and update.measurements["is_force_fit"][monitor].all()
    assert cat.lightcurves["nr_datapoints"][cat.lightcurves["src_id"] == ids[0]].tolist() == [4]


def test_a_null_detection_next_to_a_detection_is_fitted_with_it_as_a_pair():
    """Two sources 40" apart (1.33 beams of 30"); in image 2 one detection holds both."""
    beam = 30.0 * ARCSEC
    cat = RunningCatalogue(de_ruiter_r_max=5.68, max_nr_consecutive_force_fits=2, detection_threshold=8.0,
                           **{**TRAP1, "fit_blends": True}, next_xtrsrc=1, next_src_id=1)
    ra, dec = np.array([150.0, 150.0]), np.array([30.0, 30.0 + 40 * ARCSEC])
    image = replace(context(1), beam_fwhm=beam)
    plan = cat.plan(image, detections(ra, dec, [2.0, 1.0]))
    cat = cat.apply(cat.update(plan, ForcedMeasurements(forced_at(ra[:0], dec[:0], []))), plan.image)

    blend = detections(ra[:1], dec[:1] + 10 * ARCSEC, [2.9])  # the flux-weighted centroid, moved
    plan = cat.plan(replace(context(2), beam_fwhm=beam), blend)
    request = plan.forced_request(cat)
    assert plan.pair_det.tolist() == [0] and plan.forced_rows[plan.pair_forced].tolist() == [1]
    # the members' starts keep their catalogue separation, their weighted centroid on the detection
    assert request.pair_dec[0, 1] - request.pair_dec[0, 0] == pytest.approx(40 * ARCSEC)
    assert (2.0 * request.pair_dec[0, 0] + request.pair_dec[0, 1]) / 3.0 == pytest.approx(blend["dec"][0])

    pairs = np.stack([detections(ra, dec, [2.05, 0.95])])
    pairs["significance_detection_level"] = [20.5, 6.0]  # the neighbour below the detection threshold (8)
    update = cat.update(plan, ForcedMeasurements(forced_at(request.ra, request.dec, [2.5]), pairs, np.array([True])))
    assert update.ids["src_id"].tolist() == [1, 2]
    assert update.measurements["int_flux"].tolist() == [2.05, 0.95]  # not 2.9 and 2.5
    assert update.measurements["is_force_fit"].tolist() == [False, True]

    failed = cat.update(plan, ForcedMeasurements(forced_at(request.ra, request.dec, [2.5]), pairs, np.array([False])))
    assert failed.measurements["int_flux"].tolist() == [2.9, 2.5]  # the fits of TraP 1.x

    handed = pairs.copy()  # a fit that gave the detection's light to the neighbour: not used either
    handed["significance_detection_level"] = [1.2, 29.0]
    handed["int_flux"] = [0.12, 2.9]
    given = cat.update(plan, ForcedMeasurements(forced_at(request.ra, request.dec, [2.5]), handed, np.array([True])))
    assert given.measurements["int_flux"].tolist() == [2.9, 2.5]

    pairs["significance_detection_level"] = [205.0, 95.0]  # the neighbour too is above the threshold (8)
    pairs["dec"][0, 1] += 2 * ARCSEC
    seen = cat.update(plan, ForcedMeasurements(forced_at(request.ra, request.dec, [2.5]), pairs, np.array([True])))
    assert seen.measurements["is_force_fit"].tolist() == [False, False]  # a detection of source 2
    assert seen.ids["src_id"].tolist() == [1, 2] and seen.ids["parent"].tolist() == [1, 2]
    after = cat.apply(seen, plan.image).sources
    assert after["n_consecutive_force_fits"].tolist() == [0, 0]
    assert after["wm_dec"][1] == pytest.approx(dec[1] + 1 * ARCSEC)  # its position now follows it


def test_pairs_need_fit_blends_and_a_point_like_detection(catalogue):
    beam = 30.0 * ARCSEC
    ra, dec = np.array([150.0, 150.0]), np.array([30.0, 30.0 + 40 * ARCSEC])
    for cat, wide, expected in ((catalogue, False, 0), (replace(catalogue, fit_blends=True), True, 0),
                                (replace(catalogue, fit_blends=True), False, 1)):
        plan = cat.plan(replace(context(1), beam_fwhm=beam), detections(ra, dec, [2.0, 1.0]))
        cat = cat.apply(cat.update(plan, ForcedMeasurements(forced_at(ra[:0], dec[:0], []))), plan.image)
        det = detections(ra[:1], dec[:1], [2.9])
        det["semimajor_axis"] = (2.5 if wide else 1.0) * beam / 2 / ARCSEC
        plan = cat.plan(replace(context(2), beam_fwhm=beam), det)
        assert len(plan.pair_det) == expected


def test_a_resolved_source_is_force_fitted_with_its_shape_not_as_a_pair_member(catalogue):
    """Two sources 40" apart, the second resolved (its detections 2 beams across); an image detects
    only the first: the second is force-fitted with its own shape (its sums' mean), not fitted as
    the second point of a pair, which would measure a fraction of its flux; a pair member whose
    shape is wide only along the line to its neighbour (measured blended with it) is still fitted as
    a pair."""
    beam = 30.0 * ARCSEC
    beam_cov = np.diag([(15.0 / np.sqrt(2 * np.log(2))) ** 2] * 2)  # arcsec**2, round, FWHM 30"
    cat = replace(catalogue, fit_blends=True)
    ra, dec = np.array([150.0, 150.0]), np.array([30.0, 30.0 + 40 * ARCSEC])
    first = detections(ra, dec, [2.0, 1.0])
    first["gaussian_fit"] = True
    first["intrinsic_ee"][1] = first["intrinsic_nn"][1] = 3.0 * beam_cov[0, 0]  # 2 beams across
    image = replace(context(1), beam_fwhm=beam, beam_cov=beam_cov)
    plan = cat.plan(image, first)
    cat = cat.apply(cat.update(plan, ForcedMeasurements(forced_at(ra[:0], dec[:0], []))), plan.image)
    assert cat.sources["acc_shape_weight"] == pytest.approx(np.array([4e4, 1e4]) / np.linalg.det(beam_cov))

    plan = cat.plan(replace(context(2), beam_fwhm=beam, beam_cov=beam_cov), detections(ra[:1], dec[:1], [2.0]))
    request = plan.forced_request(cat)
    assert len(plan.pair_det) == 0 and plan.forced_rows.tolist() == [1]
    np.testing.assert_allclose(request.shape, [[3.0 * beam_cov[0, 0], 0.0, 3.0 * beam_cov[0, 0]]])
    # a shape wide only along the line between them (a pair member measured blended with its
    # neighbour) is fitted as a pair
    along = first.copy()
    along["intrinsic_ee"][1] = 0.0
    blended = replace(catalogue, fit_blends=True)
    plan = blended.plan(image, along)
    blended = blended.apply(blended.update(plan, ForcedMeasurements(forced_at(ra[:0], dec[:0], []))), image)
    plan = blended.plan(replace(context(2), beam_fwhm=beam, beam_cov=beam_cov), detections(ra[:1], dec[:1], [2.0]))
    assert plan.forced_request(blended).shape.any() and len(plan.pair_det) == 1
    # as TraP does (no shapes): the pair fit
    tied = replace(cat, fit_source_shape=False)
    assert len(tied.plan(replace(context(2), beam_fwhm=beam, beam_cov=beam_cov), detections(ra[:1], dec[:1], [2.0]))
               .pair_det) == 1


def test_an_obvious_link_survives_an_under_set_position_error(catalogue):
    """A bright isolated source measured 10" off with 1.1" position errors (r = 6.6 > r_max) still
    continues its light curve with link_radius; without it (TraP 1.x) it splits in two."""
    beam = 30.0 * ARCSEC

    def tight(ra, dec, flux):
        return add_uncertainties(detections(ra, dec, flux), 0.5, 0.5)

    ra, dec = np.array([150.0, 150.2]), np.array([30.0, 30.0])
    for link_radius, expected in ((0.5, [1, 2]), (0.0, [3, 2])):
        cat = replace(catalogue, link_radius=link_radius)
        plan = cat.plan(replace(context(1), beam_fwhm=beam), tight(ra, dec, [1.0, 1.0]))
        cat = cat.apply(cat.update(plan, ForcedMeasurements(forced_at(ra[:0], dec[:0], []))), plan.image)
        plan = cat.plan(replace(context(2), beam_fwhm=beam), tight(ra + np.array([12, 0]) * ARCSEC, dec, [1.0, 1.0]))
        assert cat.update(plan, ForcedMeasurements(forced_at(ra[:0], dec[:0], []))).ids["src_id"].tolist() == expected


def test_no_obvious_link_when_another_detection_or_source_is_as_close():
    from trap_dask.association import associate

    unc = np.full(2, 0.5 * ARCSEC)
    cat_ra, cat_dec = np.array([150.0]), np.array([30.0])
    # two detections 6" and 8" away: neither is obvious
    two = associate(cat_ra, cat_dec, unc[:1], unc[:1], 150.0 + np.array([6, -8]) * ARCSEC / np.cos(np.deg2rad(30)),
                    np.full(2, 30.0), unc, unc, link_radius=15 * ARCSEC)
    assert two.source.tolist() == [-1, -1]
    one = associate(cat_ra, cat_dec, unc[:1], unc[:1], 150.0 + np.array([6]) * ARCSEC / np.cos(np.deg2rad(30)),
                    np.full(1, 30.0), unc[:1], unc[:1], link_radius=15 * ARCSEC)
    assert one.source.tolist() == [0] and one.matched.tolist() == [True] and not one.is_duplicate.any()


def test_a_pair_detected_as_one_new_blend_continues_its_members(catalogue):
    """Two known sources 40" apart, seen in image 2 as one detection between them that no de Ruiter
    radius reaches: it continues the nearer member and the other is fitted with it as a pair."""
    beam = 30.0 * ARCSEC
    cat = replace(catalogue, fit_blends=True, link_radius=0.5)
    ra, dec = np.array([150.0, 150.0]), np.array([30.0, 30.0 + 40 * ARCSEC])
    tight = add_uncertainties(detections(ra, dec, [2.0, 1.0]), 0.5, 0.5)
    plan = cat.plan(replace(context(1), beam_fwhm=beam), tight)
    cat = cat.apply(cat.update(plan, ForcedMeasurements(forced_at(ra[:0], dec[:0], []))), plan.image)
    blend = add_uncertainties(detections(ra[:1], dec[:1] + 18 * ARCSEC, [2.9]), 0.5, 0.5)
    plan = cat.plan(replace(context(2), beam_fwhm=beam), blend)
    assert plan.det_source.tolist() == [0] and not plan.is_duplicate.any()  # the nearer member
    assert plan.forced_rows[plan.pair_forced].tolist() == [1]
    assert cat.plan(replace(context(2), beam_fwhm=beam), blend[:0]).det_source.tolist() == []


def test_known_sources_closer_than_a_pair_fit_resolves_are_not_fitted_as_a_pair(catalogue):
    beam = 30.0 * ARCSEC
    cat = replace(catalogue, fit_blends=True)
    for apart, pairs in ((0.4, 0), (0.6, 1)):  # PAIR_MIN_SEPARATION: 0.5 beam
        ra, dec = np.array([150.0, 150.0]), np.array([30.0, 30.0 + apart * beam])
        first = cat.plan(replace(context(1), beam_fwhm=beam), detections(ra, dec, [2.0, 1.0]))
        known = cat.apply(cat.update(first, ForcedMeasurements(forced_at(ra[:0], dec[:0], []))), first.image)
        plan = known.plan(replace(context(2), beam_fwhm=beam), detections(ra[:1], dec[:1], [2.9]))
        assert len(plan.pair_det) == pairs


def test_a_dormant_source_resumes_its_src_id_after_the_forced_fits_stopped(catalogue):
    """Forced fits stop after max_nr_consecutive_force_fits (2) null detections; five images later
    the source is detected again 10" off with 1.1" errors (beyond the de Ruiter radius): it resumes."""
    beam = 30.0 * ARCSEC
    cat = replace(catalogue, link_radius=0.5)
    ra, dec = np.array([150.0, 150.2]), np.array([30.0, 30.0])

    def image(im_id, det):
        nonlocal cat
        plan = cat.plan(replace(context(im_id), beam_fwhm=beam), add_uncertainties(det, 0.5, 0.5))
        request = plan.forced_request(cat)
        update = cat.update(plan, ForcedMeasurements(forced_at(request.ra, request.dec, np.zeros(len(request.ra)))))
        cat = cat.apply(update, plan.image)
        return update

    image(1, detections(ra, dec, [1.0, 1.0]))
    forced = [int(image(i, detections(ra[:1], dec[:1], [1.0])).measurements["is_force_fit"].sum()) for i in range(2, 8)]
    assert forced == [1, 1, 0, 0, 0, 0]
    again = image(8, detections(ra, dec + np.array([0, 10]) * ARCSEC, [1.0, 1.0]))
    assert again.ids["src_id"].tolist() == [1, 2] and len(again.new_sources["src_id"]) == 0
    assert cat.next_src_id == 3


@pytest.mark.parametrize("band_1, band_2, weights", [
    ([2.0, 1.0], [3.0, 1.0], (2 / 3, 1 / 3)),  # the pair's fluxes in the band of the image
    ([1.0, 1.0], [3.0, 1.0], (1 / 2, 1 / 2)),  # (1 Jy each is a flux, not "unknown")
    (None, [3.0, 1.0], (3 / 4, 1 / 4)),        # not yet measured in it: their means over the other bands
])
def test_pair_members_start_where_their_fluxes_put_their_centroid(band_1, band_2, weights):
    """Two sources 40" apart (1.33 beams of 30") measured in band 2 (and band 1); an image of band 1
    detects one blob between them: the pair fit's starts keep their separation and put their
    centroid, weighted by flux, on the detection."""
    beam = 30.0 * ARCSEC
    cat = RunningCatalogue(de_ruiter_r_max=5.68, max_nr_consecutive_force_fits=2, detection_threshold=8.0,
                           **{**TRAP1, "fit_blends": True}, next_xtrsrc=1, next_src_id=1)
    ra, dec = np.array([150.0, 150.0]), np.array([30.0, 30.0 + 40 * ARCSEC])
    for im_id, (band, flux) in enumerate(((2, band_2), (1, band_1)), start=1):
        if flux is not None:
            plan = cat.plan(replace(context(im_id, band=band), beam_fwhm=beam), detections(ra, dec, flux))
            cat = cat.apply(cat.update(plan, ForcedMeasurements(forced_at(ra[:0], dec[:0], []))), plan.image)
    blend = detections(ra[:1], dec[:1] + 10 * ARCSEC, [2.9])
    request = cat.plan(replace(context(3, band=1), beam_fwhm=beam), blend).forced_request(cat)
    first, second = request.pair_dec[0]
    assert second - first == pytest.approx(40 * ARCSEC)
    assert weights[0] * first + weights[1] * second == pytest.approx(blend["dec"][0])


def test_a_shifted_image_is_force_fitted_where_it_shows_its_sources_and_adds_unshifted_positions(catalogue):
    """An image shifted 10" east: the null detection is force-fitted 10" east of its catalogue
    position, and a source it finds enters the catalogue with the shift taken out; a run that
    continues the database takes the same shifts from the images table (astrometry offsets of the
    images measured with at least MIN_MATCHES matches, under remove_image_shift)."""
    from dataclasses import replace

    from trap_dask.catalogue import EarlierImages
    from trap_dask.messages import MIN_MATCHES

    east = 10.0 / 3600.0
    cat, _ = step(catalogue, 0, detections([150.0, 150.1], [30.0, 30.0], [1.0, 1.0]))
    image = replace(context(1), shift_ra=east)
    det = detections([150.0 + east / np.cos(np.deg2rad(30.0)), 150.05 + east / np.cos(np.deg2rad(30.0))],
                     [30.0, 30.02], [1.0, 1.0])
    plan = cat.plan(image, det)
    request = plan.forced_request(cat)
    assert plan.det_source.tolist() == [0, -1]  # the first continues its source, the second is new
    assert request.ra == pytest.approx([150.1 + east / np.cos(np.deg2rad(30.0))], abs=1e-5)
    assert request.dec == pytest.approx([30.0], abs=1e-5)
    update = cat.update(plan, ForcedMeasurements(forced_at(request.ra, request.dec, [1.0])))
    new = update.sources["src_id"] == 3  # (the fixture counts ids from 1)
    assert update.sources["wm_ra"][new] == pytest.approx([150.05], abs=1e-5)  # to 0.04"
    assert update.sources["wm_ra"][0] == pytest.approx(150.0, abs=1e-5)  # its detection unshifted too
    cat = cat.apply(update, image)
    images = {"id": [0, 1], "freq_band": [1, 1], "centre_ra": [150.0, 150.0], "centre_dec": [30.0, 30.0],
              "xtr_radius": [1.0, 1.0], "rms_min": [0.001] * 2, "rms_max": [0.001] * 2, "url": ["", ""],
              "rb_smaj": [0.0] * 2, "astrometry_n": [0, MIN_MATCHES], "astrometry_offset_ra": [None, 10.0],
              "astrometry_offset_dec": [None, 0.0], "xtr_outline": [None, None]}
    stored = EarlierImages.from_images_table(images)
    assert stored.shift_ra.tolist() == pytest.approx(cat.earlier.shift_ra.tolist()) == [0.0, east]
    assert EarlierImages.from_images_table(images, remove_shift=False).shift_ra.tolist() == [0.0, 0.0]
    assert EarlierImages.from_images_table({**images, "astrometry_n": [0, MIN_MATCHES - 1]}).shift_ra.tolist() == [0, 0]


@pytest.mark.parametrize("earlier_beam, new", [(30.0, True), (60.0, False)])
def test_a_new_source_is_a_candidate_only_where_an_earlier_image_could_tell_it_from_its_neighbour(
        catalogue, earlier_beam, new):
    """A source found 24" (0.8 beam) from a known one: an earlier image of the same 30" beam would
    have told them apart, one of a 60" beam saw one source there (they are 0.4 of its beam apart):
    a pair member first resolved by a sharper image is no transient candidate."""
    from dataclasses import replace

    beam = 30.0 * ARCSEC
    first = replace(context(0), beam_fwhm=earlier_beam * ARCSEC)
    plan = catalogue.plan(first, add_uncertainties(detections([150.0], [30.0], [1.0]), 1.0, 1.0))
    cat = catalogue.apply(catalogue.update(plan, ForcedMeasurements(forced_at([], [], []))), first)
    image = replace(context(1), beam_fwhm=beam)
    det = add_uncertainties(detections([150.0, 150.0], [30.0, 30.0 + 24 * ARCSEC], [1.0, 1.0]), 1.0, 1.0)
    plan = cat.plan(image, det)  # (1" systematic errors: no duplicate of the known source either)
    update = cat.update(plan, ForcedMeasurements(forced_at([], [], [])))
    assert plan.det_source.tolist() == [0, -1] and not plan.is_duplicate.any()
    assert len(update.new_sources["src_id"]) == int(new)


@pytest.mark.parametrize("data_sys_err, chained", [(None, True), ((1.0, 1.0), False)])
def test_the_errors_the_data_show_keep_over_set_ones_from_chaining_light_curves(catalogue, data_sys_err, chained):
    """60" position errors set by the user (two beams): a new detection 3 beams before a row of
    sources 3 beams apart, the last undetected, passed each light curve on to the next. Where the
    data show 1" (ImageContext.data_sys_err, which the writer sets beside the user's errors), the
    links they would make come first."""
    from dataclasses import replace

    cat = replace(catalogue, optimal_association=True)
    beam = 30 * ARCSEC
    first = add_uncertainties(detections(np.full(3, 150.0), 30.0 + np.array([0.0, 3.0, 6.0]) * beam, [1.0] * 3), 60, 60)
    cat, _ = step(cat, 0, first)
    det = add_uncertainties(detections(np.full(3, 150.0), 30.0 + np.array([0.0, 3.0, -3.0]) * beam, [1.0] * 3), 60, 60)
    plan = cat.plan(replace(context(1), beam_fwhm=beam, data_sys_err=data_sys_err), det)
    assert plan.det_source.tolist() == ([1, 2, 0] if chained else [0, 1, 2])


@pytest.mark.parametrize("reach, data_sys_err, duplicate", [
    (None, None, True),          # 'auto' where the data's scatter is not measured: TraP's
    (None, (1.0, 1.0), False),   # 'auto': the data's 1" put the source far out of reach
    (None, (60.0, 60.0), True),  # 'auto' with the set errors no larger than the data's: TraP's
    (0.0, (1.0, 1.0), True),     # TraP 1.x: anywhere within the de Ruiter radius
    (5.0, (1.0, 1.0), True),     # a reach set in beams
])
def test_over_set_errors_do_not_take_a_transient_beside_a_known_source_for_its_duplicate(
        catalogue, reach, data_sys_err, duplicate):
    """60" position errors set by the user (two beams): a new detection 4 beams from a known
    source that is detected again lies within its de Ruiter radius. TraP makes it that source's
    duplicate (no transient candidate); under duplicate_reach 'auto' the data's 1" decide."""
    beam = 30 * ARCSEC
    cat = replace(catalogue, duplicate_reach=reach)
    cat, _ = step(cat, 0, add_uncertainties(detections(np.array([150.0]), np.array([30.0]), [1.0]), 60, 60))
    det = add_uncertainties(detections(np.full(2, 150.0), 30.0 + np.array([0.0, 4.0]) * beam, [1.0, 1.0]), 60, 60)
    plan = cat.plan(replace(context(1), beam_fwhm=beam, data_sys_err=data_sys_err), det)
    assert plan.det_source.tolist() == [0, -1]
    assert plan.is_duplicate.tolist() == [False, duplicate]


def test_sources_of_another_field_change_nothing_in_an_image(catalogue):
    """A catalogue that also holds a far field's sources (a run of several fields) associates,
    force-fits and flags an image exactly as one holding its own field's alone: each image looks
    only at the known sources around it (RunningCatalogue.neighbourhood)."""
    rng = np.random.default_rng(3)
    ra, dec = 150.0 + rng.uniform(-0.5, 0.5, 40), 30.0 + rng.uniform(-0.5, 0.5, 40)
    far = replace(context(1), centre_ra=200.0, centre_dec=-20.0)
    far_det = detections(200.0 + rng.uniform(-0.5, 0.5, 500), -20.0 + rng.uniform(-0.5, 0.5, 500), [1.0] * 500)
    both = catalogue
    plan = both.plan(far, far_det)
    both = both.apply(both.update(plan, ForcedMeasurements(forced_at([], [], []))), far)
    alone, offset = catalogue, len(far_det)
    for im_id in (2, 3, 4):
        seen = rng.random(40) < 0.8
        det = detections(ra[seen] + rng.normal(0, 2, seen.sum()) * ARCSEC, dec[seen], [1.0] * seen.sum())
        if im_id == 3:  # and a transient
            det = np.concatenate([det, detections(np.array([150.1]), np.array([30.2]), [1.0])])
        (alone, one), (both, two) = (step(cat, im_id, det) for cat in (alone, both))
        assert len(both.neighbourhood((150.0, 30.0), 2.0).rows) <= len(alone.sources["src_id"])
        np.testing.assert_array_equal(one.measurements, two.measurements)
        assert (two.ids["src_id"] - offset).tolist() == one.ids["src_id"].tolist()
        assert (two.new_sources["src_id"] - offset).tolist() == one.new_sources["src_id"].tolist()


def test_a_known_source_beyond_the_extraction_radius_is_still_a_candidate(catalogue):
    """Over-set position errors (60") reach past the image's extraction radius (1 deg here): a
    known source just outside it is continued by a detection just inside, as when every known
    source is searched."""
    outside = detections(np.array([150.0]), np.array([31.03]), [1.0])
    cat, _ = step(catalogue, 1, add_uncertainties(outside, 60, 60))
    inside = add_uncertainties(detections(np.array([150.0]), np.array([30.99]), [1.0]), 60, 60)
    plan = cat.plan(context(2), inside)
    assert plan.det_source.tolist() == [0]


def test_a_merge_partner_past_the_extraction_radius_is_still_merged():
    """A detection just inside the extraction radius continues a known source just past it, whose
    unseen twin 18" further out then merges into it, as when every known source is searched."""
    cat = RunningCatalogue(de_ruiter_r_max=5.68, max_nr_consecutive_force_fits=2, detection_threshold=8.0,
                           merge_duplicates=True)
    wide = replace(context(0), xtr_radius=2.0)  # no beam: no merges in this first image
    twins = detections(np.full(2, 150.0), 31.0 + np.array([27.0, 45.0]) * ARCSEC, [1.0, 1.0])
    plan = cat.plan(wide, twins)
    cat = cat.apply(cat.update(plan, ForcedMeasurements(forced_at([], [], []))), wide)
    edge = replace(context(1), beam_fwhm=30 * ARCSEC)  # extraction radius 1 deg: the edge at dec 31
    plan = cat.plan(edge, detections(np.array([150.0]), np.array([31.0 - 3.6 * ARCSEC]), [1.0]))
    assert plan.det_source.tolist() == [0]
    assert (plan.merge_keep.tolist(), plan.merge_drop.tolist()) == ([0], [1])


def test_a_detection_past_the_extraction_radius_continues_its_source(catalogue):
    """An all-sky image's extraction radius can fall short of its farthest pixels on the sky (a
    horizon between the inscribed circle and the corners): a detection 80 deg out, past its 61,
    still continues its known source."""
    image = replace(context(0), centre_dec=50.0, xtr_radius=61.0, beam_fwhm=1.0)
    det = add_uncertainties(detections(np.full(2, 150.0), np.array([50.0, -30.0]), [1.0, 1.0]), 300.0, 300.0)
    cat, _ = step(catalogue, 0, det)
    plan = cat.plan(replace(image, im_id=1), det)
    assert plan.det_source.tolist() == [0, 1]


def test_the_mean_flux_of_a_source_without_a_light_curve_is_not_known():
    """The mean flux of a source without a light curve (in the band, or in any) is not known: NaN,
    also when none of the sources asked for has one."""
    cat, _ = step(RunningCatalogue(de_ruiter_r_max=5.68, max_nr_consecutive_force_fits=2, detection_threshold=8.0,
                                   **TRAP1), 0, detections(np.array([150.0]), np.array([30.0]), [0.05]))
    for band in (1, None):
        assert np.isnan(cat._mean_flux(np.array([7, 8]), band)).all()
        assert cat._mean_flux(np.array([0, 8]), band)[0] == pytest.approx(0.05)
