"""Pixel <-> sky conversions of positions, position errors and Gaussian shapes.

Conventions used throughout the extraction package:

- pixel coordinates are 0-based ``(x, y)`` = (column, row), as astropy's ``*_values`` methods;
- a Gaussian shape is held as its 2x2 covariance matrix (``sigma**2``), in pixel**2 in the pixel
  frame or in deg**2 in the local sky frame (east, north);
- "semi-axes" are half the FWHM, as in TraP/PySE: ``semi_axis = HALF_FWHM_PER_SIGMA * sigma``;
- position angles are in deg east of north, in [0, 180).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:  # annotations only: the catalogue's shapes (trap_dask.shapes) need no astropy
    from astropy.wcs import WCS

    from trap_dask.image import Beam

#: Half the FWHM of a Gaussian in units of its sigma: sqrt(2 ln 2).
HALF_FWHM_PER_SIGMA = float(np.sqrt(2.0 * np.log(2.0)))

_STEP = 0.5  # pixels, finite-difference step of the local Jacobian


def pixel_to_sky(wcs: WCS, x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Sky position (ra, dec) in deg of 0-based pixel positions; RA in [0, 360)."""
    world = wcs.pixel_to_world_values(np.asarray(x, float), np.asarray(y, float))
    ra, dec = np.asarray(world[wcs.wcs.lng], float), np.asarray(world[wcs.wcs.lat], float)
    return np.mod(ra, 360.0), dec


def sky_to_pixel(wcs: WCS, ra: np.ndarray, dec: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """0-based pixel position (x, y) of sky positions in deg; NaN where not projectable."""
    world = [None, None]
    world[wcs.wcs.lng], world[wcs.wcs.lat] = np.asarray(ra, float), np.asarray(dec, float)
    x, y = wcs.world_to_pixel_values(*world)
    return np.asarray(x, float), np.asarray(y, float)


def local_jacobian(wcs: WCS, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Local derivative of the sky offset (east, north) in deg with respect to (x, y) pixels.

    Returns an array of shape (n, 2, 2): ``J[:, i, j] = d(east, north)_i / d(x, y)_j``, by
    central differences of one vectorised WCS call. East offsets are ``dRA * cos(dec)``.
    """
    x, y = np.atleast_1d(np.asarray(x, float)), np.atleast_1d(np.asarray(y, float))
    h = _STEP
    xs = np.concatenate([x + h, x - h, x, x])
    ys = np.concatenate([y, y, y + h, y - h])
    ra, dec = pixel_to_sky(wcs, xs, ys)
    ra, dec = ra.reshape(4, -1), dec.reshape(4, -1)
    _, dec0 = pixel_to_sky(wcs, x, y)
    cosd = np.cos(np.radians(dec0))

    def offsets(i: int, j: int) -> tuple[np.ndarray, np.ndarray]:
        dra = (ra[i] - ra[j] + 180.0) % 360.0 - 180.0
        return dra * cosd / (2 * h), (dec[i] - dec[j]) / (2 * h)

    e_x, n_x = offsets(0, 1)
    e_y, n_y = offsets(2, 3)
    return np.stack([np.stack([e_x, e_y], -1), np.stack([n_x, n_y], -1)], -2)


def cov_from_axes(sigma_major: np.ndarray, sigma_minor: np.ndarray, angle: np.ndarray) -> np.ndarray:
    """2x2 covariance matrices (n, 2, 2) of ellipses with given sigmas along their axes.

    ``angle`` (rad) is the direction of the major axis measured from the first coordinate axis
    towards the second one.
    """
    c, s = np.cos(angle), np.sin(angle)
    a2, b2 = np.square(sigma_major), np.square(sigma_minor)
    xx = a2 * c * c + b2 * s * s
    yy = a2 * s * s + b2 * c * c
    xy = (a2 - b2) * c * s
    return np.stack([np.stack([xx, xy], -1), np.stack([xy, yy], -1)], -2)


def axes_from_cov(cov: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Inverse of :func:`cov_from_axes`: sigma_major, sigma_minor and angle (rad) of (n, 2, 2)."""
    xx, yy, xy = cov[..., 0, 0], cov[..., 1, 1], cov[..., 0, 1]
    mean = 0.5 * (xx + yy)
    half_diff = np.hypot(0.5 * (xx - yy), xy)
    major = np.sqrt(np.maximum(mean + half_diff, 0.0))
    minor = np.sqrt(np.maximum(mean - half_diff, 0.0))
    return major, minor, 0.5 * np.arctan2(2.0 * xy, xx - yy)


def beam_sky_cov(beam: Beam) -> np.ndarray:
    """Covariance (2, 2) in deg**2 of the restoring beam in the local (east, north) frame."""
    # The major axis points at PA east of north: its angle from east towards north is 90 - PA.
    angle = np.radians(90.0 - beam.pa)
    return cov_from_axes(
        np.float64(beam.smaj / HALF_FWHM_PER_SIGMA), np.float64(beam.smin / HALF_FWHM_PER_SIGMA), angle
    )


def sky_cov_to_pixel(cov_sky: np.ndarray, jac: np.ndarray) -> np.ndarray:
    """Transform (n, 2, 2) sky covariances (deg**2) to pixel**2 with Jacobians ``jac``."""
    jinv = np.linalg.inv(jac)
    return jinv @ cov_sky @ np.swapaxes(jinv, -1, -2)


def pixel_cov_to_sky(cov_pix: np.ndarray, jac: np.ndarray) -> np.ndarray:
    """Transform (n, 2, 2) pixel covariances (pixel**2) to the local sky frame (deg**2)."""
    return jac @ cov_pix @ np.swapaxes(jac, -1, -2)


def shape_on_sky(cov_sky: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Semi-major and semi-minor axes (half FWHM, arcsec) and PA (deg east of north, [0, 180))."""
    major, minor, angle = axes_from_cov(cov_sky)
    pa = np.mod(90.0 - np.degrees(angle), 180.0)
    return major * HALF_FWHM_PER_SIGMA * 3600.0, minor * HALF_FWHM_PER_SIGMA * 3600.0, pa


def position_errors_on_sky(
    pos_cov_pix: np.ndarray, jac: np.ndarray, dec: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """1-sigma errors from a pixel position covariance (n, 2, 2).

    Returns ``ra_err`` (deg along the RA coordinate, i.e. on-sky error / cos(dec)), ``dec_err``
    (deg) and the error radius (arcsec): the largest 1-sigma angular offset in any direction.
    """
    cov = pixel_cov_to_sky(pos_cov_pix, jac)
    east_err = np.sqrt(cov[..., 0, 0])
    dec_err = np.sqrt(cov[..., 1, 1])
    ra_err = east_err / np.maximum(np.cos(np.radians(dec)), 1e-12)
    radius = axes_from_cov(cov)[0] * 3600.0
    return ra_err, dec_err, radius


def pixel_scale(wcs: WCS, x: float, y: float) -> float:
    """Geometric-mean pixel size in deg at pixel (x, y)."""
    return float(np.sqrt(abs(np.linalg.det(local_jacobian(wcs, x, y)[0]))))
