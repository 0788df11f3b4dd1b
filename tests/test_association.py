"""Association by de Ruiter radius: every case on hand-made catalogues, and a brute-force check."""

from __future__ import annotations

import numpy as np
import pytest

from trap_dask.association import associate, de_ruiter_radius

ARCSEC = 1.0 / 3600.0
S = 2.0 * ARCSEC  # per-source uncertainty; a pair's combined uncertainty is S * sqrt(2)


def _assoc(cat, det, r_max=5.68):
    """Associate (ra, dec) lists with uncertainty S everywhere."""
    cat = np.asarray(cat, dtype=float).reshape(-1, 2)
    det = np.asarray(det, dtype=float).reshape(-1, 2)
    cu, du = np.full(len(cat), S), np.full(len(det), S)
    return associate(cat[:, 0], cat[:, 1], cu, cu, det[:, 0], det[:, 1], du, du, r_max=r_max)


def _dec_at(r):
    """Dec offset (deg) giving de Ruiter radius r between two sources of uncertainty S."""
    return r * S * np.sqrt(2.0)


def _reference(cat_ra, cat_dec, cat_ew, cat_ns, det_ra, det_dec, det_ew, det_ns, r_max):
    """All-pairs greedy matching, written independently as plainly as possible."""
    r = de_ruiter_radius(
        cat_ra[:, None], cat_dec[:, None], cat_ew[:, None], cat_ns[:, None],
        det_ra[None, :], det_dec[None, :], det_ew[None, :], det_ns[None, :],
    )  # fmt: skip
    pairs = sorted((r[i, j], i, j) for i, j in zip(*np.nonzero(r < r_max)))
    source = np.full(len(det_ra), -1)
    used = set()
    for _, i, j in pairs:
        if source[j] < 0 and i not in used:
            source[j] = i
            used.add(i)
    parent = np.full(len(det_ra), -1)
    for _, i, j in reversed(pairs):  # the last write per detection is its smallest r
        if source[j] < 0:
            parent[j] = i
    return source, parent


def test_de_ruiter_radius_values_and_ra_wrap():
    # 3 arcsec east at dec 60 is 1.5 arcsec on the sky; combined EW sigma is 1.5*sqrt(2) arcsec.
    ew, ns = 1.5 * ARCSEC, 1.0 * ARCSEC
    r = de_ruiter_radius(10.0, 60.0, ew, ns, 10.0 + 3 * ARCSEC, 60.0, ew, ns)
    assert r == pytest.approx(1.0 / np.sqrt(2.0), rel=1e-6)
    across = de_ruiter_radius(359.9999, 0.0, S, S, 0.0001, 0.0, S, S)
    inside = de_ruiter_radius(0.0001, 0.0, S, S, 0.0003, 0.0, S, S)
    assert across == pytest.approx(inside, rel=1e-6)
    assert across == pytest.approx(0.0002 / (S * np.sqrt(2.0)), rel=1e-6)  # not ~360 deg
    d = de_ruiter_radius(1.0, 2.0, S, S, 1.0, 2.0 + _dec_at(3.0), S, S)
    assert d == pytest.approx(3.0, rel=1e-9)


def test_one_to_one_and_unrelated():
    a = _assoc([(10, 20), (10, 21)], [(10, 21 + _dec_at(1)), (10, 20 + _dec_at(2)), (50, 0)])
    np.testing.assert_array_equal(a.source, [1, 0, -1])
    np.testing.assert_allclose(a.distance[:2], [1, 2], rtol=1e-6)
    assert np.isnan(a.distance[2])
    np.testing.assert_array_equal(a.parent_source, [-1, -1, -1])
    np.testing.assert_array_equal(a.is_duplicate, [False, False, False])
    np.testing.assert_array_equal(a.matched, [True, True])


def test_one_to_many_nearest_continues_others_are_duplicates():
    a = _assoc([(10, 20)], [(10, 20 + _dec_at(3)), (10, 20 - _dec_at(1)), (10, 20 + _dec_at(2))])
    np.testing.assert_array_equal(a.source, [-1, 0, -1])
    np.testing.assert_array_equal(a.is_duplicate, [True, False, True])
    np.testing.assert_array_equal(a.parent_source, [0, -1, 0])
    np.testing.assert_allclose(a.distance, [3, 1, 2], rtol=1e-6)
    np.testing.assert_array_equal(a.matched, [True])


def test_many_to_one_nearest_source_continues_others_unmatched():
    a = _assoc([(10, 20 + _dec_at(2)), (10, 20 - _dec_at(1)), (10, 20 + _dec_at(4))], [(10, 20)])
    np.testing.assert_array_equal(a.source, [1])
    np.testing.assert_array_equal(a.matched, [False, True, False])
    assert not a.is_duplicate[0] and a.parent_source[0] == -1


def test_many_to_many_chain_follows_smallest_radius_first():
    # Along a meridian: A . x . B . y with A-x = 1.2, x-B = 0.8, B-y = 1.5 (and A-y = 3.5 > r_max).
    # Greedy takes x-B first; then A-x and B-y are blocked: A is a null detection and y splits
    # off B as a duplicate. (Best-total assignment would pair A-x and B-y instead.)
    a = _assoc(
        [(10, 20), (10, 20 + _dec_at(2.0))],
        [(10, 20 + _dec_at(1.2)), (10, 20 + _dec_at(3.5))],
        r_max=3.0,
    )
    np.testing.assert_array_equal(a.source, [1, -1])
    np.testing.assert_array_equal(a.matched, [False, True])
    np.testing.assert_array_equal(a.is_duplicate, [False, True])
    np.testing.assert_array_equal(a.parent_source, [-1, 1])
    np.testing.assert_allclose(a.distance, [0.8, 1.5], rtol=1e-6)
    # With a larger r_max, A-y = 3.5 becomes the next free pair and links too.
    b = _assoc(
        [(10, 20), (10, 20 + _dec_at(2.0))],
        [(10, 20 + _dec_at(1.2)), (10, 20 + _dec_at(3.5))],
    )
    np.testing.assert_array_equal(b.source, [1, 0])
    np.testing.assert_array_equal(b.is_duplicate, [False, False])


def test_exact_ties_are_broken_by_index():
    d = _dec_at(1.0)  # +-d about dec 0 gives bit-identical radii
    a = _assoc([(10, 0)], [(10, d), (10, -d)])
    np.testing.assert_array_equal(a.source, [0, -1])
    assert a.distance[0] == a.distance[1]
    a = _assoc([(10, 0)], [(10, -d), (10, d)])
    np.testing.assert_array_equal(a.source, [0, -1])
    b = _assoc([(10, -d), (10, d)], [(10, 0)])
    np.testing.assert_array_equal(b.source, [0])


def test_ra_wrap_at_zero():
    a = _assoc([(359.9997, 5.0), (0.0004, 5.0)], [(0.0003, 5.0 + _dec_at(0.5)), (359.9998, 5.0)])
    np.testing.assert_array_equal(a.source, [1, 0])
    assert np.all(a.distance < 1.0)


def test_near_pole_field():
    # At dec 89.999 a 60-deg RA difference is only ~3.6 arcsec on the sky; the catalogue source
    # across the pole (RA 180) is a weaker candidate, the detection at dec 89.9 is far from both.
    a = _assoc([(0.0, 89.999), (180.0, 89.999)], [(60.0, 89.999), (180.0, 89.9)])
    np.testing.assert_array_equal(a.source, [0, -1])
    np.testing.assert_array_equal(a.matched, [True, False])
    flat = 60.0 * np.cos(np.deg2rad(89.999))  # deg on the sky, as the de Ruiter formula sees it
    assert a.distance[0] == pytest.approx(flat / (S * np.sqrt(2)), rel=1e-6)
    assert 1.0 < a.distance[0] < 1.5


@pytest.mark.parametrize("centre_dec", [0.0, 45.0, 89.9, -89.95])
def test_matches_brute_force_on_crowded_fields(centre_dec):
    rng = np.random.default_rng(int(abs(centre_dec) * 100))
    n, m = 300, 250
    cat_ra = rng.uniform(-0.05, 0.05, n) % 360.0  # straddles RA 0/360
    cat_dec = np.clip(centre_dec + rng.uniform(-0.05, 0.05, n), -90, 90)
    if abs(centre_dec) > 89:
        cat_ra = rng.uniform(0, 360, n)  # a cap around the pole
    cat_ew, cat_ns = rng.uniform(1, 20, (2, n)) * ARCSEC
    pick = rng.integers(0, n, m)
    det_dec = np.clip(cat_dec[pick] + rng.normal(0, 6 * ARCSEC, m), -90, 90)
    det_ra = (cat_ra[pick] + rng.normal(0, 6 * ARCSEC, m) / np.cos(np.deg2rad(det_dec))) % 360.0
    det_ew, det_ns = rng.uniform(1, 20, (2, m)) * ARCSEC
    args = (cat_ra, cat_dec, cat_ew, cat_ns, det_ra, det_dec, det_ew, det_ns)
    a = associate(*args, r_max=5.68)
    source, parent = _reference(*args, r_max=5.68)
    np.testing.assert_array_equal(a.source, source)
    np.testing.assert_array_equal(a.parent_source, parent)
    np.testing.assert_array_equal(a.is_duplicate, parent >= 0)
    np.testing.assert_array_equal(a.matched, np.isin(np.arange(n), source))
    # the fields are crowded enough that every case occurs
    assert 0 < a.is_duplicate.sum() and (~a.matched).sum() > 0 and (a.source >= 0).sum() > m / 2


def test_permuting_inputs_keeps_the_links():
    rng = np.random.default_rng(7)
    n, m = 400, 300
    cat_ra, cat_dec = rng.uniform(0, 0.1, n), rng.uniform(0, 0.1, n)
    det_ra, det_dec = rng.uniform(0, 0.1, m), rng.uniform(0, 0.1, m)
    cu, du = np.full(n, 5 * ARCSEC), np.full(m, 5 * ARCSEC)
    a = associate(cat_ra, cat_dec, cu, cu, det_ra, det_dec, du, du)
    assert (a.source >= 0).sum() > 50 and a.is_duplicate.sum() > 5
    pc, pd = rng.permutation(n), rng.permutation(m)
    b = associate(cat_ra[pc], cat_dec[pc], cu, cu, det_ra[pd], det_dec[pd], du, du)
    # map b's catalogue indices back to the original numbering
    back = lambda k: np.where(k >= 0, pc[k], -1)  # noqa: E731
    np.testing.assert_array_equal(back(b.source), a.source[pd])
    np.testing.assert_array_equal(back(b.parent_source), a.parent_source[pd])
    np.testing.assert_array_equal(b.distance, a.distance[pd])
    np.testing.assert_array_equal(b.matched, a.matched[pc])


@pytest.mark.parametrize("n_cat, n_det", [(0, 3), (3, 0), (0, 0)])
def test_empty_inputs(n_cat, n_det):
    a = _assoc(np.zeros((n_cat, 2)) + 10, np.zeros((n_det, 2)) + 10)
    assert a.source.shape == a.distance.shape == a.is_duplicate.shape == (n_det,)
    assert a.matched.shape == (n_cat,) and not a.matched.any()
    assert np.all(a.source == -1) and np.all(a.parent_source == -1) and not a.is_duplicate.any()
    assert np.all(np.isnan(a.distance))


def test_no_candidates_in_range():
    a = _assoc([(10, 20)], [(10, 21)])
    np.testing.assert_array_equal(a.source, [-1])
    assert not a.is_duplicate[0] and not a.matched[0]


def test_large_field_5000_by_1000():
    rng = np.random.default_rng(3)
    n, m = 5000, 1000
    cat_ra, cat_dec = rng.uniform(-2.5, 2.5, n) % 360, rng.uniform(-2.5, 2.5, n)
    pick = rng.choice(n, 900, replace=False)
    jitter = rng.normal(0, 2 * ARCSEC, (2, 900))
    det_ra = np.concatenate([cat_ra[pick] + jitter[0], rng.uniform(0, 2, 100)])
    det_dec = np.concatenate([cat_dec[pick] + jitter[1], rng.uniform(0, 2, 100)])
    cu, du = np.full(n, 10 * ARCSEC), np.full(m, 10 * ARCSEC)
    a = associate(cat_ra, cat_dec, cu, cu, det_ra % 360, det_dec, du, du)
    assert np.mean(a.source[:900] == pick) > 0.99


@pytest.mark.parametrize("optimal", [False, True])
def test_a_duplicate_lies_within_reach_of_its_source(optimal):
    """Over-set position errors (30", a beam) make a transient 4 beams beside a known source, which
    its own detection continues, a candidate of it: TraP makes it that source's duplicate, no new
    source. Within duplicate_reach (here a beam) it still is; beyond, a source of its own."""
    beam, unc = 30 * ARCSEC, np.full(1, 30 * ARCSEC)
    for offset, reach, duplicate in ((4.0, None, True), (4.0, beam, False), (0.5, beam, True)):
        det_dec = np.array([30.0, 30.0 + offset * beam])
        got = associate(np.full(1, 150.0), np.full(1, 30.0), unc, unc, np.full(2, 150.0), det_dec,
                        np.full(2, 30 * ARCSEC), np.full(2, 30 * ARCSEC), optimal=optimal, duplicate_reach=reach)
        assert got.source.tolist() == [0, -1]
        assert got.is_duplicate.tolist() == [False, duplicate]
        assert got.parent_source.tolist() == [-1, 0 if duplicate else -1]
        assert np.isnan(got.distance[1]) != duplicate


def test_over_set_errors_do_not_pass_light_curves_along_a_chain():
    """Sources 3 beams apart in a row, the last undetected, and a new detection 3 beams before the
    first; 60" errors (two beams) make every pair a candidate. Most links with the least sum of
    r**2 passes each light curve on to the next source, for the new detection to take the first's;
    with near_reach (where the errors the data show would make a candidate), the links within it
    come first and the natural ones stay."""
    beam = 30 * ARCSEC
    cat_dec = 30.0 + np.array([0.0, 3.0, 6.0]) * beam
    det_dec = 30.0 + np.array([0.0, 3.0, -3.0]) * beam
    unc = np.full(3, 60 * ARCSEC)
    args = (np.full(3, 150.0), cat_dec, unc, unc, np.full(3, 150.0), det_dec, unc, unc)
    assert associate(*args, optimal=True).source.tolist() == [1, 2, 0]  # the chain
    assert associate(*args, optimal=True, near_reach=beam / 2).source.tolist() == [0, 1, 2]
    assert associate(*args, optimal=True, near_reach=10 * beam).source.tolist() == [1, 2, 0]  # all near: as before


def test_a_far_links_worth_does_not_depend_on_the_rest_of_its_group():
    """Each far link is worth r_max**2 - r**2: a further far pair joining the group leaves the
    choice among the others as it was (with the group's largest r**2 in place of r_max**2 it
    flipped from one link to two)."""
    from trap_dask.association import _optimal_matching

    ci, dj, r = np.array([0, 0, 1]), np.array([0, 1, 0]), np.array([3.0, 4.0, 4.2])
    alone = _optimal_matching(ci, dj, r, 2, 3, near=np.zeros(3, bool))
    joined = _optimal_matching(np.append(ci, 1), np.append(dj, 2), np.append(r, 5.5), 2, 3, near=np.zeros(4, bool))
    assert alone.tolist() == joined[:3].tolist() == [False, True, True]
