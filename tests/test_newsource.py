"""Which earlier images cover a new source, and how significant it is against their noise."""

from __future__ import annotations

import numpy as np
import pytest
from astropy import units as u
from astropy.coordinates import SkyCoord

from trap_dask.newsource import classify_new_sources, covering_images, earlier_rms_bounds


def test_covering_images_geometry():
    img_ra, img_dec, radius = [0.0, 0.0, 200.0], [0.0, 90.0, -30.0], [1.0, 2.0, 0.5]
    ra = [0.5, 359.5, 1.5, 123.0, 200.0, 200.0]
    dec = [0.0, 0.0, 0.0, 88.5, -30.49, -29.0]
    cover = covering_images(ra, dec, img_ra, img_dec, radius)
    expected = np.array(
        [
            [True, False, False],
            [True, False, False],  # across RA 0/360
            [False, False, False],
            [False, True, False],  # near the pole, any RA
            [False, False, True],
            [False, False, False],
        ]
    )
    np.testing.assert_array_equal(cover, expected)


def test_covering_images_agrees_with_astropy():
    rng = np.random.default_rng(5)
    ra, dec = rng.uniform(0, 360, 200), np.rad2deg(np.arcsin(rng.uniform(-1, 1, 200)))
    img_ra, img_dec = rng.uniform(0, 360, 30), np.rad2deg(np.arcsin(rng.uniform(-1, 1, 30)))
    radius = rng.uniform(5, 60, 30)
    cover = covering_images(ra, dec, img_ra, img_dec, radius)
    sep = SkyCoord(ra[:, None] * u.deg, dec[:, None] * u.deg).separation(
        SkyCoord(img_ra[None, :] * u.deg, img_dec[None, :] * u.deg)
    )
    np.testing.assert_array_equal(cover, sep.deg <= radius)
    assert 0.05 < cover.mean() < 0.5


def test_covering_images_empty():
    assert covering_images([], [], [1.0], [2.0], 3.0).shape == (0, 1)
    assert covering_images([1.0], [2.0], [], [], []).shape == (1, 0)


def test_earlier_rms_bounds():
    cover = np.array([[True, True, False], [False, False, True], [False, False, False]])
    lo, hi = earlier_rms_bounds(cover, [1e-3, 2e-3, 5e-3], [3e-3, 4e-3, 9e-3])
    np.testing.assert_allclose(lo[:2], [1e-3, 5e-3])
    np.testing.assert_allclose(hi[:2], [4e-3, 9e-3])
    assert np.isnan(lo[2]) and np.isnan(hi[2])
    lo, hi = earlier_rms_bounds(np.zeros((2, 0), bool), [], [])
    assert np.all(np.isnan(lo)) and np.all(np.isnan(hi))


def test_classify_new_sources():
    peak = np.array([0.1, 0.03, 0.5, 0.1])
    rms_min = np.array([1e-3, 1e-3, 0.0625, np.nan])
    rms_max = np.array([4e-3, 1e-2, 0.125, np.nan])
    s_min, s_max, likely = classify_new_sources(peak, 4.0, rms_min, rms_max)
    np.testing.assert_allclose(s_min[:3], [100.0, 30.0, 8.0])
    np.testing.assert_allclose(s_max[:3], [25.0, 3.0, 4.0])
    assert np.isnan(s_min[3]) and np.isnan(s_max[3])
    np.testing.assert_array_equal(likely, [True, False, True, False])  # 4.0 sits on the threshold


def test_classify_new_sources_per_source_threshold():
    threshold = np.array([4.0, 6.0])
    _, s_max, likely = classify_new_sources([0.05, 0.05], threshold, [1e-3] * 2, [1e-2] * 2)
    assert s_max[0] == pytest.approx(5.0)
    np.testing.assert_array_equal(likely, [True, False])


@pytest.mark.parametrize(("proj", "dec0", "turn"), [("SIN", 30.0, 0.0), ("SIN", 60.0, 25.0), ("TAN", -45.0, 70.0)])
def test_covering_images_inside_an_images_corners_is_inside_its_pixels(proj, dec0, turn):
    """With the corners of an image's extraction region (a turned image, SIN or TAN), a position counts
    as covered where the image's pixels hold it (inside its margins), not anywhere in the circle of the
    region's half-diagonal; positions within a pixel of a side may go either way."""
    from astropy.wcs import WCS

    from trap_dask.extraction.geometry import pixel_to_sky, sky_to_pixel

    n, margin, pixel = 400, 20, 30.0 / 3600  # a 3.3 deg image
    wcs = WCS(naxis=2)
    wcs.wcs.ctype = [f"RA---{proj}", f"DEC--{proj}"]
    wcs.wcs.crval, wcs.wcs.crpix = [200.0, dec0], [(n + 1) / 2, (n + 1) / 2]
    wcs.wcs.cdelt = [-pixel, pixel]
    c, s = np.cos(np.radians(turn)), np.sin(np.radians(turn))
    wcs.wcs.pc = [[c, -s], [s, c]]
    ends = np.array([margin, n - 1 - margin], float)
    corners = np.column_stack(pixel_to_sky(wcs, ends[[0, 1, 1, 0]], ends[[0, 0, 1, 1]]))
    centre_ra, centre_dec = (float(v[0]) for v in pixel_to_sky(wcs, np.array([(n - 1) / 2]), np.array([(n - 1) / 2])))
    radius = 0.5 * np.hypot(n - 2 * margin, n - 2 * margin) * pixel
    rng = np.random.default_rng(4)
    x, y = rng.uniform(-100, n + 100, 4000), rng.uniform(-100, n + 100, 4000)
    ra, dec = pixel_to_sky(wcs, x, y)
    cover = covering_images(ra, dec, centre_ra, centre_dec, radius, corners)[:, 0]
    px, py = sky_to_pixel(wcs, ra, dec)
    held = (px >= margin) & (px <= n - 1 - margin) & (py >= margin) & (py <= n - 1 - margin)
    clear = (np.minimum(np.abs(px - ends[:, None]).min(0), np.abs(py - ends[:, None]).min(0)) > 1.0)
    assert held.sum() > 1000 and (~held & covering_images(ra, dec, centre_ra, centre_dec, radius)[:, 0]).sum() > 300
    np.testing.assert_array_equal(cover[clear], held[clear])
    unknown = covering_images(ra, dec, centre_ra, centre_dec, radius, np.full((4, 2), np.nan))[:, 0]
    np.testing.assert_array_equal(unknown, covering_images(ra, dec, centre_ra, centre_dec, radius)[:, 0])
