"""Running sums for light-curve statistics and weighted mean positions.

Each new measurement adds its increments to its source's sums (``np.add.at`` over a batch),
so an image updates every (source, band) in O(1) without re-reading the light curve. The same
functions give the export columns:

=============================== =============================================================
``variability`` column          from
=============================== =============================================================
v_int, eta_int                  :func:`variability_indices` of the ``int_flux`` sums
lightcurve_avg                  :func:`lightcurve_mean` of the same sums
lightcurve_max                  a running ``np.maximum.at`` of ``int_flux`` (kept beside them)
nr_datapoints                   the ``n`` sum
wm_ra, wm_dec, avg_ra_err,      :func:`weighted_mean_position` of the position sums
avg_dec_err
=============================== =============================================================

Numerical care: variances are differences of sums of squares, which cancel catastrophically
when the flux is large compared with its scatter. The flux sums are therefore taken about a
per-source reference flux (its first measurement is a good choice), which leaves V and eta
unchanged in exact arithmetic and keeps them accurate in float64. Likewise RA is accumulated as
offsets from a per-source reference RA, wrapped to [-180, 180), so a source at RA 0/360 averages
correctly.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
from numpy.typing import ArrayLike

from trap_dask.sky import wrap_ra_difference

#: Flux sums per (source, band), all taken about the reference flux ``flux_ref``
#: (d = I - flux_ref, w = 1 / err^2): n, sum d, sum d^2, sum w, sum w d, sum w d^2.
FLUX_SUMS = ("n", "sum_i", "sum_i2", "sum_w", "sum_wi", "sum_wi2")

#: Position sums per source (dra = RA - ra_ref wrapped to [-180, 180), w_ra = 1 / ra_err^2,
#: w_dec = 1 / dec_err^2): n, sum w_ra, sum w_ra dra, sum w_dec, sum w_dec dec,
#: sum ra_err, sum dec_err.
POSITION_SUMS = (
    "n_pos",
    "sum_w_ra",
    "sum_w_ra_dra",
    "sum_w_dec",
    "sum_w_dec_dec",
    "sum_ra_err",
    "sum_dec_err",
)


def flux_sum_increments(
    flux: ArrayLike, flux_err: ArrayLike, flux_ref: ArrayLike = 0.0
) -> dict[str, np.ndarray]:
    """Per-measurement increments of :data:`FLUX_SUMS`.

    Parameters
    ----------
    flux, flux_err : flux and its positive 1-sigma error (Jy or Jy/beam), one per measurement.
    flux_ref : reference flux of each measurement's (source, band), same unit; must stay the
        same for every measurement of that (source, band).
    """
    d = np.asarray(flux, dtype=float) - flux_ref
    w = 1.0 / np.square(np.asarray(flux_err, dtype=float))
    wd = w * d
    return {
        "n": np.ones(d.shape, dtype=np.int64),
        "sum_i": d,
        "sum_i2": d * d,
        "sum_w": w,
        "sum_wi": wd,
        "sum_wi2": wd * d,
    }


def lightcurve_mean(n: ArrayLike, sum_i: ArrayLike, flux_ref: ArrayLike = 0.0) -> np.ndarray:
    """Mean flux of each light curve from its sums (NaN where n = 0)."""
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.asarray(flux_ref, dtype=float) + np.asarray(sum_i, dtype=float) / np.asarray(n)


def variability_indices(
    n: ArrayLike,
    sum_i: ArrayLike,
    sum_i2: ArrayLike,
    sum_w: ArrayLike,
    sum_wi: ArrayLike,
    sum_wi2: ArrayLike,
    flux_ref: ArrayLike = 0.0,
) -> tuple[np.ndarray, np.ndarray]:
    """Flux variability coefficient V and reduced weighted chi-square eta from running sums.

    ``V = std(I, ddof=1) / mean(I)`` and
    ``eta = N / (N - 1) * (mean(w I^2) - mean(w I)^2 / mean(w))``, both 0 where N < 2.
    Both are invariant to the flux offset, so the sums may be taken about any ``flux_ref``
    (the one used in :func:`flux_sum_increments`; only the mean in V needs it). Tiny negative
    variances left by rounding are clipped to 0.

    Returns
    -------
    v, eta : dimensionless arrays, shaped like ``n``.
    """
    n = np.asarray(n, dtype=float)
    sum_i, sum_i2, sum_w, sum_wi, sum_wi2 = (
        np.asarray(a, dtype=float) for a in (sum_i, sum_i2, sum_w, sum_wi, sum_wi2)
    )
    several = n >= 2
    with np.errstate(invalid="ignore", divide="ignore"):
        scatter = np.clip(sum_i2 - sum_i**2 / n, 0.0, None)
        weighted_scatter = np.clip(sum_wi2 - sum_wi**2 / sum_w, 0.0, None)
        v = np.sqrt(scatter / (n - 1)) / lightcurve_mean(n, sum_i, flux_ref)
        eta = weighted_scatter / (n - 1)
    return np.where(several, v, 0.0), np.where(several, eta, 0.0)


def position_sum_increments(
    ra: ArrayLike, dec: ArrayLike, ra_err: ArrayLike, dec_err: ArrayLike, ra_ref: ArrayLike
) -> dict[str, np.ndarray]:
    """Per-measurement increments of :data:`POSITION_SUMS`.

    Parameters
    ----------
    ra, dec : measured position in deg.
    ra_err, dec_err : positive 1-sigma errors in deg along the RA and Dec coordinates
        (``ra_fit_err``, ``dec_fit_err``).
    ra_ref : reference RA in deg of each measurement's source (e.g. its first detection); must
        stay the same for every measurement of that source.
    """
    ra_err = np.asarray(ra_err, dtype=float)
    dec_err = np.asarray(dec_err, dtype=float)
    w_ra = 1.0 / np.square(ra_err)
    w_dec = 1.0 / np.square(dec_err)
    return {
        "n_pos": np.ones(ra_err.shape, dtype=np.int64),
        "sum_w_ra": w_ra,
        "sum_w_ra_dra": w_ra * wrap_ra_difference(np.subtract(ra, ra_ref)),
        "sum_w_dec": w_dec,
        "sum_w_dec_dec": w_dec * np.asarray(dec, dtype=float),
        "sum_ra_err": ra_err,
        "sum_dec_err": dec_err,
    }


class MeanPosition(NamedTuple):
    """Weighted mean position of a source and its errors, all in deg."""

    wm_ra: np.ndarray  #: weighted mean RA in [0, 360)
    wm_dec: np.ndarray  #: weighted mean Dec
    wm_ra_err: np.ndarray  #: 1 / sqrt(sum 1/ra_err^2)
    wm_dec_err: np.ndarray  #: 1 / sqrt(sum 1/dec_err^2)
    avg_ra_err: np.ndarray  #: mean of the ra_err values
    avg_dec_err: np.ndarray  #: mean of the dec_err values


def weighted_mean_position(
    n_pos: ArrayLike,
    sum_w_ra: ArrayLike,
    sum_w_ra_dra: ArrayLike,
    sum_w_dec: ArrayLike,
    sum_w_dec_dec: ArrayLike,
    sum_ra_err: ArrayLike,
    sum_dec_err: ArrayLike,
    ra_ref: ArrayLike,
) -> MeanPosition:
    """Inverse-variance weighted mean position from :data:`POSITION_SUMS` (NaN where n = 0).

    ``wm_ra = ra_ref + sum(w_ra dra) / sum(w_ra)`` wrapped to [0, 360), i.e.
    ``sum(ra / ra_err^2) / sum(1 / ra_err^2)`` without the wrap-around jump; the same for Dec.
    """
    n_pos = np.asarray(n_pos, dtype=float)
    empty = n_pos == 0
    with np.errstate(invalid="ignore", divide="ignore"):
        sum_w_ra = np.where(empty, np.nan, sum_w_ra)
        sum_w_dec = np.where(empty, np.nan, sum_w_dec)
        wm_ra = np.mod(np.add(ra_ref, np.divide(sum_w_ra_dra, sum_w_ra)), 360.0)
        return MeanPosition(
            wm_ra=np.where(wm_ra == 360.0, 0.0, wm_ra),  # mod of a tiny negative rounds to 360
            wm_dec=np.divide(sum_w_dec_dec, sum_w_dec),
            wm_ra_err=1.0 / np.sqrt(sum_w_ra),
            wm_dec_err=1.0 / np.sqrt(sum_w_dec),
            avg_ra_err=np.divide(sum_ra_err, n_pos),
            avg_dec_err=np.divide(sum_dec_err, n_pos),
        )
