"""The columnar table of source measurements passed between pipeline stages.

One row per measurement in one image: a blind detection or a forced fit. Columns and units
follow the export table ``extracted_sources`` (see ``schema/``):

======================== ======= ==========================================================
column                   unit    meaning
======================== ======= ==========================================================
ra, dec                  deg     fitted position (ICRS / the image's celestial frame)
ra_fit_err, dec_fit_err  deg     1-sigma fit error along the RA / Dec coordinate
                                 (ra_fit_err grows as 1/cos(dec) for a fixed on-sky error)
peak_flux, peak_flux_err Jy/beam
int_flux, int_flux_err   Jy
significance_detection_level     peak / local rms
semimajor_axis,          arcsec  fitted Gaussian semi-axes: half the FWHM, as PySE/TraP
semiminor_axis                   (a point source has the beam's BMAJ/2, BMIN/2)
parallactic_angle        deg     position angle of the major axis, east of north
ew_sys_err, ns_sys_err   arcsec  systematic position errors added for association
error_radius             arcsec  absolute angular error on the position
gaussian_fit             bool    True when a Gaussian fit converged (False: moments)
chisq, reduced_chisq             goodness of the fit
uncertainty_ew,          deg     sqrt(sys_err**2 + error_radius**2) / 3600
uncertainty_ns
is_force_fit             bool    measured by a forced fit, not a blind detection: at a fixed
                                 position, or with a neighbour it blended with (fit_blends)
x, y                     pixel   0-based position in the image (not exported)
intrinsic_ee, _en, _nn   arcsec2 the fitted shape less the beam, both as they lie on the sky at
                                 the source (covariance, east-north; not exported; 0 for a fit
                                 with the beam's shape; trap_dask.shapes)
======================== ======= ==========================================================
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np


class MeasuredColumn(NamedTuple):
    """A measured column of ``extracted_sources``: its numpy dtype (f8: double, ?: boolean) and comment."""

    name: str
    dtype: str
    comment: str | None = None
    nullable: bool = True


#: The measured columns of ``extracted_sources`` in table order, their one definition: the
#: schema (trap_dask.db.schema) makes the table's columns of them, and the workers, which
#: measure them, need no database library to.
MEASURED_COLUMNS = (
    MeasuredColumn("ra", "f8", "deg"),
    MeasuredColumn("dec", "f8", "deg"),
    MeasuredColumn("ra_fit_err", "f8", "deg, along the RA coordinate"),
    MeasuredColumn("dec_fit_err", "f8", "deg"),
    MeasuredColumn("peak_flux", "f8", "Jy/beam"),
    MeasuredColumn("peak_flux_err", "f8", "Jy/beam"),
    MeasuredColumn("int_flux", "f8", "Jy"),
    MeasuredColumn("int_flux_err", "f8", "Jy"),
    MeasuredColumn("significance_detection_level", "f8", "peak / local rms"),
    MeasuredColumn("semimajor_axis", "f8", "arcsec"),
    MeasuredColumn("semiminor_axis", "f8", "arcsec"),
    MeasuredColumn("parallactic_angle", "f8", "deg east of north"),
    MeasuredColumn("ew_sys_err", "f8", "arcsec"),
    MeasuredColumn("ns_sys_err", "f8", "arcsec"),
    MeasuredColumn("error_radius", "f8", "arcsec"),
    MeasuredColumn("gaussian_fit", "?"),
    MeasuredColumn("chisq", "f8"),
    MeasuredColumn("reduced_chisq", "f8"),
    MeasuredColumn("uncertainty_ew", "f8", "deg"),
    MeasuredColumn("uncertainty_ns", "f8", "deg"),
    MeasuredColumn("is_force_fit", "?", nullable=False),
)
#: The intrinsic shape's columns (ee, en, nn; trap_dask.shapes.intrinsic_shapes).
INTRINSIC_COLUMNS = ("intrinsic_ee", "intrinsic_en", "intrinsic_nn")
#: The measured columns followed by the pixel position x, y and the intrinsic shape, which are not exported.
SOURCE_DTYPE = np.dtype([*((c.name, c.dtype) for c in MEASURED_COLUMNS), ("x", "f8"), ("y", "f8"),
                         *((name, "f8") for name in INTRINSIC_COLUMNS)])
#: The measurements of a source that a merge of two light curves reads back (``extracted_sources`` columns, and the
#: band of each row's image).
HISTORY_DTYPE = np.dtype([
    ("id", "i8"), ("im_id", "i8"), ("src_id", "i8"), ("parent", "i8"), ("freq_band", "i8"),
    ("ra", "f8"), ("dec", "f8"), ("int_flux", "f8"), ("int_flux_err", "f8"),
    ("uncertainty_ew", "f8"), ("uncertainty_ns", "f8"), ("is_force_fit", "?"),
])
#: Columns of SOURCE_DTYPE that are not written to ``extracted_sources``.
NOT_EXPORTED: tuple[str, ...] = ("x", "y", *INTRINSIC_COLUMNS)


def empty_sources(n: int = 0) -> np.ndarray:
    """Return a zero-filled source table of ``n`` rows."""
    return np.zeros(n, dtype=SOURCE_DTYPE)


def add_uncertainties(sources: np.ndarray, ew_sys_err: float, ns_sys_err: float) -> np.ndarray:
    """Fill the systematic-error and association-uncertainty columns in place.

    ``ew_sys_err``/``ns_sys_err`` in arcsec; ``uncertainty_ew``/``_ns`` come out in deg as
    ``sqrt(sys_err**2 + error_radius**2) / 3600``. Returns ``sources`` for chaining.
    """
    sources["ew_sys_err"] = ew_sys_err
    sources["ns_sys_err"] = ns_sys_err
    sources["uncertainty_ew"] = np.hypot(ew_sys_err, sources["error_radius"]) / 3600.0
    sources["uncertainty_ns"] = np.hypot(ns_sys_err, sources["error_radius"]) / 3600.0
    return sources
