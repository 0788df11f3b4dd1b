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
======================== ======= ==========================================================
"""

from __future__ import annotations

import numpy as np

from trap_dask.db.schema import MEASURED_SOURCE_COLUMNS

#: The measured columns of ``extracted_sources`` (trap_dask.db.schema is their one definition)
#: followed by the pixel position x, y, which is not exported.
SOURCE_DTYPE = np.dtype([*MEASURED_SOURCE_COLUMNS.items(), ("x", "f8"), ("y", "f8")])
#: Columns of SOURCE_DTYPE that are not written to ``extracted_sources``.
NOT_EXPORTED: tuple[str, ...] = ("x", "y")


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
