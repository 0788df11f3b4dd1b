"""Synthetic radio images for the extraction tests: correlated noise, Gaussian sources, WCS.

The noise is white noise filtered so that its autocorrelation is the restoring beam, as in a
synthesis image, then scaled to the requested per-pixel rms. Everything is built here from first
principles (not with the package's geometry code), so the tests check it independently.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from astropy.wcs import WCS

from trap_dask.image import Beam

FWHM_PER_SIGMA = 2.0 * np.sqrt(2.0 * np.log(2.0))


def make_wcs(nx: int, ny: int, ra: float, dec: float, pixel_arcsec: float, proj: str = "SIN") -> WCS:
    """North-up celestial WCS with square pixels, reference at the image centre."""
    w = WCS(naxis=2)
    w.wcs.ctype = [f"RA---{proj}", f"DEC--{proj}"]
    w.wcs.crval = [ra, dec]
    w.wcs.crpix = [(nx + 1) / 2.0, (ny + 1) / 2.0]
    w.wcs.cdelt = [-pixel_arcsec / 3600.0, pixel_arcsec / 3600.0]
    w.wcs.cunit = ["deg", "deg"]
    return w


@dataclass(frozen=True)
class Shape:
    """A Gaussian shape in pixels: FWHM along its axes and PA (deg east of north, north-up image)."""

    fwhm_major: float
    fwhm_minor: float
    pa: float

    def cov(self) -> np.ndarray:
        """Covariance (2, 2) in pixel**2; x grows to the west (RA decreasing), y to the north."""
        t = np.radians(self.pa)
        u = np.array([-np.sin(t), np.cos(t)])  # major axis direction in (x, y)
        v = np.array([np.cos(t), np.sin(t)])
        s1, s2 = self.fwhm_major / FWHM_PER_SIGMA, self.fwhm_minor / FWHM_PER_SIGMA
        return s1**2 * np.outer(u, u) + s2**2 * np.outer(v, v)

    def beam(self, pixel_arcsec: float) -> Beam:
        """Restoring beam (semi-axes = FWHM/2 in deg) for a north-up image of this pixel size."""
        scale = pixel_arcsec / 3600.0
        return Beam(self.fwhm_major * scale / 2, self.fwhm_minor * scale / 2, self.pa)


def correlated_noise(shape: tuple[int, int], beam: Shape, rms: float, rng: np.random.Generator) -> np.ndarray:
    """Gaussian noise of per-pixel ``rms`` whose autocorrelation has the beam's shape."""
    ny, nx = shape
    white = rng.standard_normal(shape)
    ky = 2 * np.pi * np.fft.fftfreq(ny)[:, None]
    kx = 2 * np.pi * np.fft.rfftfreq(nx)[None, :]
    c = beam.cov() / 2.0  # kernel covariance: kernel * kernel = beam
    transfer = np.exp(-0.5 * (c[0, 0] * kx * kx + 2 * c[0, 1] * kx * ky + c[1, 1] * ky * ky))
    noise = np.fft.irfft2(np.fft.rfft2(white) * transfer, s=shape)
    # exact per-pixel variance of the filtered white noise
    return noise * rms / np.sqrt(np.abs(np.fft.irfft2(transfer**2, s=shape)[0, 0]))


def gaussians(
    shape: tuple[int, int], x: np.ndarray, y: np.ndarray, peak: np.ndarray, cov: np.ndarray
) -> np.ndarray:
    """Image of elliptical Gaussians (peak values, centres in 0-based pixels, cov (n, 2, 2) or (2, 2))."""
    ny, nx = shape
    cov = np.broadcast_to(cov, (len(x), 2, 2))
    inv = np.linalg.inv(cov)
    half = int(np.ceil(6 * np.sqrt(np.max(cov[:, [0, 1], [0, 1]]))))
    dy, dx = np.mgrid[-half : half + 1, -half : half + 1]
    px = np.rint(x).astype(int)[:, None] + dx.ravel()
    py = np.rint(y).astype(int)[:, None] + dy.ravel()
    ox, oy = px - x[:, None], py - y[:, None]
    q = inv[:, 0, 0, None] * ox * ox + 2 * inv[:, 0, 1, None] * ox * oy + inv[:, 1, 1, None] * oy * oy
    vals = peak[:, None] * np.exp(-0.5 * q)
    ok = (px >= 0) & (px < nx) & (py >= 0) & (py < ny)
    image = np.zeros(shape)
    np.add.at(image, (py[ok], px[ok]), vals[ok])
    return image


def scattered_positions(
    n: int, shape: tuple[int, int], min_sep: float, border: float, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """Up to ``n`` random pixel positions at least ``min_sep`` apart and ``border`` from the edges."""
    ny, nx = shape
    x = rng.uniform(border, nx - 1 - border, 4 * n)
    y = rng.uniform(border, ny - 1 - border, 4 * n)
    keep: list[int] = []
    for i in range(len(x)):  # test helper: a greedy selection, done once per fixture
        if all(np.hypot(x[i] - x[j], y[i] - y[j]) >= min_sep for j in keep):
            keep.append(i)
        if len(keep) == n:
            break
    return x[keep], y[keep]


def match(x_true: np.ndarray, y_true: np.ndarray, x: np.ndarray, y: np.ndarray, radius: float) -> np.ndarray:
    """Index of the nearest detection within ``radius`` pixels of each true position (-1: none)."""
    if len(x) == 0:
        return np.full(len(x_true), -1)
    d = np.hypot(x_true[:, None] - x[None, :], y_true[:, None] - y[None, :])
    nearest = d.argmin(1)
    return np.where(d[np.arange(len(x_true)), nearest] <= radius, nearest, -1)


def robust_std(values: np.ndarray) -> float:
    """1.4826 x the median absolute deviation."""
    return float(1.4826 * np.median(np.abs(values - np.median(values))))
