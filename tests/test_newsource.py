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


@pytest.mark.parametrize(("proj", "size", "dec0", "turn"), [
    ("SIN", 400, 30.0, 0.0), ("SIN", 400, 60.0, 25.0), ("TAN", 400, -45.0, 70.0),  # 3.3 deg
    ("SIN", 3600, -30.0, 10.0), ("ZEA", 2400, 30.0, 0.0), ("CAR", 1200, 40.0, 0.0),  # 30, 20, 10 deg
])
def test_covering_images_inside_an_images_outline_is_inside_its_pixels(proj, size, dec0, turn):
    """With the outline of an image's extraction region (turned, wide, SIN, TAN, ZEA and CAR images,
    whose pixel rows are no great circles), a position counts as covered where the image's pixels hold
    it (inside its margins), not anywhere in the circle of the region's half-diagonal; positions within
    a pixel of a side may go either way. Without an outline the circle alone decides."""
    from types import SimpleNamespace

    from astropy.wcs import WCS

    from trap_dask.extraction.extract import extraction_outline, extraction_radius_deg
    from trap_dask.extraction.geometry import pixel_to_sky, sky_to_pixel
    from trap_dask.extraction.params import ExtractionParams
    from trap_dask.newsource import Outlines

    n, margin, pixel = size, 20, 30.0 / 3600
    wcs = WCS(naxis=2)
    wcs.wcs.ctype = [f"RA---{proj}", f"DEC--{proj}"]
    wcs.wcs.crval, wcs.wcs.crpix = [200.0, dec0], [(n + 1) / 2, (n + 1) / 2]
    if proj == "CAR":  # CAR's reference on the equator: the image's centre at dec0
        wcs.wcs.crval, wcs.wcs.crpix = [200.0, 0.0], [(n + 1) / 2, (n + 1) / 2 - dec0 / pixel]
    wcs.wcs.cdelt = [-pixel, pixel]
    c, s = np.cos(np.radians(turn)), np.sin(np.radians(turn))
    wcs.wcs.pc = [[c, -s], [s, c]]
    image = SimpleNamespace(shape=(n, n), wcs=wcs, centre=((n - 1) / 2, (n - 1) / 2))
    params = ExtractionParams(margin=margin)
    outline, radius = extraction_outline(image, params), extraction_radius_deg(image, params)
    centre_ra, centre_dec = (float(v[0]) for v in pixel_to_sky(wcs, np.array([(n - 1) / 2]), np.array([(n - 1) / 2])))
    rng = np.random.default_rng(4)
    x, y = rng.uniform(-0.25 * n, 1.25 * n, 20000), rng.uniform(-0.25 * n, 1.25 * n, 20000)
    ra, dec = pixel_to_sky(wcs, x, y)
    ok = np.isfinite(ra) & np.isfinite(dec)
    ra, dec = ra[ok], dec[ok]
    cover = covering_images(ra, dec, centre_ra, centre_dec, radius, Outlines.of_rows(outline[None]))[:, 0]
    circle = covering_images(ra, dec, centre_ra, centre_dec, radius)[:, 0]
    px, py = sky_to_pixel(wcs, ra, dec)
    ends = np.array([margin, n - 1 - margin], float)
    held = (px >= ends[0]) & (px <= ends[1]) & (py >= ends[0]) & (py <= ends[1])
    clear = np.minimum(np.abs(px - ends[:, None]).min(0), np.abs(py - ends[:, None]).min(0)) > 1.0
    assert held.sum() > 5000 and (~held & circle).sum() > 1000
    np.testing.assert_array_equal(cover[clear], held[clear])
    unknown = Outlines.of_rows(np.full((1, len(outline), 2), np.nan))
    np.testing.assert_array_equal(covering_images(ra, dec, centre_ra, centre_dec, radius, unknown)[:, 0], circle)


def test_outlines_are_held_once_and_read_back_from_their_text():
    """Images of one pointing share one outline; the images table's text gives the same outlines."""
    from trap_dask.newsource import Outlines, outline_from_text, outline_text

    square = np.array([[1.0, -1.0], [-1.0, -1.0], [-1.0, 1.0], [1.0, 1.0]])
    held = Outlines.of_rows(np.full((0, 4, 2), np.nan))
    for outline in (square, square + 3.0, square.copy(), np.full((4, 2), np.nan), square + 3.0):
        held = held.add(outline)
    assert len(held.shapes) == 2 and held.of.tolist() == [0, 1, 0, -1, 1]
    texts = [outline_text(o) for o in (square, None, square + 3.0)]
    assert texts[1] is None and np.array_equal(outline_from_text(texts)[[0, 2]], [square, square + 3.0])
    again = Outlines.of_rows(outline_from_text(texts))
    assert len(again.shapes) == 2 and (again.of >= 0).tolist() == [True, False, True]
    inside = covering_images([0.0, 2.5, 3.0], [0.0, 0.0, 3.0], [0.0, 0.0, 3.0], [0.0, 0.0, 3.0], 10.0, again)
    assert inside.tolist() == [[True, True, False], [False, True, False], [False, True, True]]
    # an outline of 4 points stored beside one of 8 (another version's): each still holds its own sky
    octagon = np.repeat(square, 2, axis=0)
    mixed = Outlines.of_rows(outline_from_text([outline_text(square)])).add(octagon + 3.0)
    assert mixed.shapes.shape == (2, 8, 2) and mixed.of.tolist() == [0, 1]
    assert covering_images([0.0, 3.0], [0.0, 3.0], [0.0, 3.0], [0.0, 3.0], 10.0, mixed).tolist() == [[True, False],
                                                                                                       [False, True]]
