"""Running sums reproduce light-curve statistics computed directly from the whole history."""

from __future__ import annotations

import numpy as np
import pytest

from trap_dask.variability import (
    FLUX_SUMS,
    POSITION_SUMS,
    flux_sum_increments,
    lightcurve_mean,
    position_sum_increments,
    variability_indices,
    weighted_mean_position,
)


def _accumulate(sums, index, increments):
    """Add per-measurement increments into per-source sums, as the catalogue writer does."""
    for key, inc in increments.items():
        np.add.at(sums[key], index, inc)


def _empty(keys, n):
    return {k: np.zeros(n, dtype=np.int64 if k.startswith("n") else float) for k in keys}


def _direct_v_eta(flux, err):
    """V and eta from the whole light curve, in a cancellation-free two-pass form."""
    w = 1.0 / err**2
    n = flux.size
    if n < 2:
        return 0.0, 0.0
    wmean = np.sum(w * flux) / np.sum(w)
    return np.std(flux, ddof=1) / np.mean(flux), np.sum(w * (flux - wmean) ** 2) / (n - 1)


def _light_curves(rng, n_src, n_img, level, scatter):
    flux = level[:, None] + rng.normal(0, scatter, (n_src, n_img))
    err = rng.uniform(0.5, 2.0, (n_src, n_img)) * scatter
    return flux, err


@pytest.mark.parametrize("level, scatter", [(1.0, 0.1), (1e3, 1e-3), (1e6, 1e-4)])
def test_running_sums_match_direct_computation(level, scatter):
    rng = np.random.default_rng(0)
    n_src, n_img = 6, 40
    flux, err = _light_curves(rng, n_src, n_img, level * (1.0 + np.arange(n_src)), scatter)
    flux_ref = flux[:, 0]  # each source's first measurement
    src = np.arange(n_src)

    one_at_a_time = _empty(FLUX_SUMS, n_src)
    for k in range(n_img):
        _accumulate(one_at_a_time, src, flux_sum_increments(flux[:, k], err[:, k], flux_ref))

    batches = _empty(FLUX_SUMS, n_src)  # uneven batches of images, sources interleaved
    for chunk in np.array_split(np.arange(n_img), [1, 4, 17]):
        idx = np.repeat(src, chunk.size)
        inc = flux_sum_increments(flux[:, chunk].ravel(), err[:, chunk].ravel(), flux_ref[idx])
        _accumulate(batches, idx, inc)

    direct = np.array([_direct_v_eta(flux[s], err[s]) for s in src])
    for sums in (one_at_a_time, batches):
        v, eta = variability_indices(**sums, flux_ref=flux_ref)
        np.testing.assert_allclose(v, direct[:, 0], rtol=1e-9)
        np.testing.assert_allclose(eta, direct[:, 1], rtol=1e-9)
        mean = lightcurve_mean(sums["n"], sums["sum_i"], flux_ref)
        np.testing.assert_allclose(mean, flux.mean(axis=1), rtol=1e-12)
        np.testing.assert_array_equal(sums["n"], n_img)
    # eta of pure noise with honest errors is of order 1
    assert np.all((direct[:, 1] > 0.1) & (direct[:, 1] < 10))


def test_eta_formula_as_written_in_trap_terms():
    rng = np.random.default_rng(1)
    flux, err = rng.uniform(0.5, 1.5, 9), rng.uniform(0.05, 0.2, 9)
    sums = {k: v.sum() for k, v in flux_sum_increments(flux, err).items()}
    w = 1 / err**2
    eta = 9 / 8 * (np.mean(w * flux**2) - np.mean(w * flux) ** 2 / np.mean(w))
    v, got = variability_indices(**sums)
    assert got == pytest.approx(eta, rel=1e-12)
    assert v == pytest.approx(np.std(flux, ddof=1) / np.mean(flux), rel=1e-12)


def test_without_reference_the_cancellation_guard_keeps_indices_finite_and_nonnegative():
    # Identical measurements at a huge level: variances are 0, rounding must not make them < 0.
    flux = np.full(7, 1e8 + 0.1)
    sums = {k: v.sum() for k, v in flux_sum_increments(flux, np.full(7, 1e-6)).items()}
    v, eta = variability_indices(**sums)
    assert np.isfinite(v) and np.isfinite(eta) and v >= 0 and eta >= 0
    assert v < 1e-7


def test_fewer_than_two_points_give_zero():
    inc = flux_sum_increments([2.0], [0.1])
    v, eta = variability_indices(**{k: np.array([0, x[0]]) for k, x in inc.items()})  # n = 0, 1
    np.testing.assert_array_equal(v, [0.0, 0.0])
    np.testing.assert_array_equal(eta, [0.0, 0.0])


def test_constant_light_curve_has_zero_variability():
    sums = {k: v.sum() for k, v in flux_sum_increments(np.full(5, 0.3), np.full(5, 0.01)).items()}
    v, eta = variability_indices(**sums)
    assert v == pytest.approx(0.0, abs=1e-12) and eta == pytest.approx(0.0, abs=1e-12)


def test_weighted_mean_position_matches_direct_formula():
    rng = np.random.default_rng(2)
    ra, dec = 150 + rng.normal(0, 1e-3, 12), -30 + rng.normal(0, 1e-3, 12)
    ra_err, dec_err = rng.uniform(1e-4, 5e-4, (2, 12))
    sums = _empty(POSITION_SUMS, 1)
    for k in range(12):  # one image at a time
        inc = position_sum_increments(ra[k], dec[k], ra_err[k], dec_err[k], ra_ref=ra[0])
        _accumulate(sums, 0, inc)
    pos = weighted_mean_position(**sums, ra_ref=ra[0])
    w_ra, w_dec = 1 / ra_err**2, 1 / dec_err**2
    np.testing.assert_allclose(pos.wm_ra, np.sum(w_ra * ra) / np.sum(w_ra), rtol=1e-13)
    np.testing.assert_allclose(pos.wm_dec, np.sum(w_dec * dec) / np.sum(w_dec), rtol=1e-13)
    np.testing.assert_allclose(pos.wm_ra_err, 1 / np.sqrt(w_ra.sum()), rtol=1e-12)
    np.testing.assert_allclose(pos.wm_dec_err, 1 / np.sqrt(w_dec.sum()), rtol=1e-12)
    np.testing.assert_allclose(pos.avg_ra_err, ra_err.mean(), rtol=1e-12)
    np.testing.assert_allclose(pos.avg_dec_err, dec_err.mean(), rtol=1e-12)


@pytest.mark.parametrize("ra_ref", [359.999, 0.001, 359.9999])
def test_weighted_mean_ra_across_zero(ra_ref):
    ra = np.array([359.999, 0.001, 359.9995, 0.0005])
    err = np.full(4, 1e-4)
    inc = position_sum_increments(ra, np.full(4, 10.0), err, err, ra_ref)
    pos = weighted_mean_position(**{k: v.sum() for k, v in inc.items()}, ra_ref=ra_ref)
    assert 0.0 <= pos.wm_ra < 360.0
    assert min(pos.wm_ra, 360.0 - pos.wm_ra) < 1e-9  # near 0, not 180
    assert pos.wm_dec == pytest.approx(10.0)


def test_weighted_mean_position_undefined_without_measurements():
    pos = weighted_mean_position(*(np.zeros(2) for _ in POSITION_SUMS), ra_ref=np.zeros(2))
    assert all(np.all(np.isnan(col)) for col in pos)
