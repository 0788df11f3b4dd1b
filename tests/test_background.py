"""Background and noise maps: known levels, gradients, blank regions."""

from __future__ import annotations

import numpy as np
import pytest

from tests._synth import Shape, correlated_noise, gaussians, scattered_positions
from trap_dask.extraction.background import background_maps, interpolation_weights

BEAM = Shape(6.0, 4.0, 30.0)
RMS = 2e-3


@pytest.fixture(scope="module")
def noise() -> np.ndarray:
    return correlated_noise((512, 600), BEAM, RMS, np.random.default_rng(7))


def test_interpolation_weights_reproduce_lines_to_the_edges():
    centres = np.array([24.5, 74.5, 124.5, 160.0])
    w = interpolation_weights(171, centres)
    assert np.allclose(w.sum(1), 1.0)
    assert np.allclose(w @ (3.0 + 0.5 * centres), 3.0 + 0.5 * np.arange(171), atol=1e-4)


@pytest.mark.parametrize("stride", [1, 2])
def test_flat_level_and_noise(noise, stride):
    bg, rms = background_maps((noise + 0.01).astype(np.float32), 50, 50, stride=stride)
    assert bg.dtype == np.float32 and rms.dtype == np.float32 and bg.shape == noise.shape
    assert abs(np.median(bg) - 0.01) < 0.05 * RMS
    assert np.median(rms) == pytest.approx(RMS, rel=0.03)
    assert np.percentile(np.abs(bg - 0.01), 99) < 0.5 * RMS  # box-to-box noise of the estimate
    assert np.abs(bg - 0.01).max() < RMS


def test_gradient_and_blank_regions(noise):
    ny, nx = noise.shape
    yy, xx = np.mgrid[:ny, :nx]
    level = 0.005 + 2e-5 * xx - 1e-5 * yy  # 12 rms across the image
    data = (noise + level).astype(np.float32)
    data[:, :37] = np.nan  # blank border
    data[200:330, 250:420] = np.nan  # blank block
    bg, rms = background_maps(data, 40, 40, stride=2)
    good = np.isfinite(data)
    assert np.isfinite(bg).all() and np.isfinite(rms).all()
    err = (bg - level)[good]
    assert abs(np.median(err)) < 0.05 * RMS
    assert np.percentile(np.abs(err), 99) < 0.6 * RMS
    assert np.abs(err).max() < 1.2 * RMS
    assert np.median(rms[good]) == pytest.approx(RMS, rel=0.04)


def test_sources_barely_bias_the_background(noise):
    rng = np.random.default_rng(3)
    x, y = scattered_positions(60, noise.shape, 25, 5, rng)
    sky = gaussians(noise.shape, x, y, rng.uniform(10, 200, len(x)) * RMS, BEAM.cov())
    bg, rms = background_maps((noise + sky).astype(np.float32), 50, 50, stride=2)
    assert abs(np.median(bg)) < 0.1 * RMS
    assert np.median(rms) == pytest.approx(RMS, rel=0.05)


def test_all_blank_image_gives_nan_maps():
    bg, rms = background_maps(np.full((64, 80), np.nan, dtype=np.float32), 20, 20)
    assert bg.shape == (64, 80) and np.isnan(bg).all() and np.isnan(rms).all()


def test_banded_interpolation_equals_the_matrix_product(noise):
    """The maps built band by band are Wy @ grid @ Wx.T (float32 rounding apart)."""
    from trap_dask.extraction.background import interpolate, residual_and_rms

    rng = np.random.default_rng(4)
    grid = rng.normal(size=(5, 7)).astype(np.float32)
    cy, cx = np.array([10.0, 30.5, 50.0, 70.5, 90.0]), np.linspace(5.0, 95.0, 7)
    dense = interpolation_weights(101, cy) @ grid @ interpolation_weights(97, cx).T
    assert np.allclose(interpolate(grid, cy, cx, 101, 97), dense, rtol=0, atol=1e-6)
    one_row = grid[:1] @ interpolation_weights(97, cx).T  # a single row of boxes: constant along y
    assert np.allclose(interpolate(grid[:1], cy[:1], cx, 101, 97), np.broadcast_to(one_row, (101, 97)), atol=1e-6)
    data = (noise + 0.01).astype(np.float32)
    residual, rms = residual_and_rms(data, 50, 50, stride=2)
    background, rms_maps = background_maps(data, 50, 50, stride=2)
    assert np.array_equal(residual, data - background) and np.array_equal(rms, rms_maps)
    overwritten, rms_in_place = residual_and_rms(data, 50, 50, stride=2, overwrite=True)  # into data
    assert overwritten is data and np.array_equal(data, residual) and np.array_equal(rms_in_place, rms)





@pytest.mark.parametrize("seed", range(4))
def test_the_noise_floor_is_the_maximum_with_the_interpolated_map(seed):
    """A floor looked at only where the map can reach it (extrapolated bands, rows near it) gives
    the elementwise maximum of the map and the floor, bit for bit: on steep grids whose
    extrapolation and whose interior go below it, and on grids just above it."""
    from trap_dask.extraction.background import FLOOR_MARGIN, interpolate

    rng = np.random.default_rng(seed)
    cy, cx = np.array([10.0, 30.5, 50.0, 70.5, 90.0]), np.linspace(5.0, 95.0, 7)
    floor = 1.0
    steep = (1.0 + np.abs(rng.normal(size=(5, 7))) * np.linspace(0.2, 8.0, 7)).astype(np.float32)
    steep[2, 3] = 0.3  # an interior box below the floor
    near = np.full((5, 7), floor * (1.0 + FLOOR_MARGIN / 2), dtype=np.float32)  # just above: looked at
    above = np.full((5, 7), 3.0, dtype=np.float32)
    for grid in (steep, near, above):
        plain = interpolate(grid, cy, cx, 101, 97)
        assert np.array_equal(interpolate(grid, cy, cx, 101, 97, floor=floor), np.maximum(plain, np.float32(floor)))
    assert (interpolate(steep, cy, cx, 101, 97) < floor).any()  # the floor had work to do


@pytest.mark.parametrize("shape", [(1, 3), (7, 150), (99, 77), (101, 50), (203, 150)])
def test_boxes_are_the_nan_padded_image_cut_into_tiles(shape):
    """The box stack is filled tile by tile in place: the same as cutting the NaN-padded image."""
    from trap_dask.extraction.background import _boxes

    data = np.random.default_rng(sum(shape)).standard_normal(shape).astype(np.float32)
    for box_y, box_x, stride in ((50, 50, 1), (7, 13, 2), (1, 1, 1), (200, 3, 3)):
        stack, _, _ = _boxes(data, box_y, box_x, stride)
        gy, gx, npix = stack.shape
        sub = data[::stride, ::stride]
        by, bx = -(-sub.shape[0] // gy), -(-sub.shape[1] // gx)
        padded = np.full((gy * by, gx * bx), np.nan, dtype=np.float32)
        padded[: sub.shape[0], : sub.shape[1]] = sub
        expected = padded.reshape(gy, by, gx, bx).transpose(0, 2, 1, 3).reshape(gy, gx, by * bx)
        assert npix == by * bx and np.array_equal(stack, expected, equal_nan=True)


def test_a_noise_map_made_where_looked_at_equals_the_array(noise, monkeypatch):
    """For an image of more than FULL_NOISE_MAP_PIXELS, residual_and_rms gives a NoiseMap: bands
    of rows equal the array's, pixels and flat indices to float32 rounding; the residual is the same."""
    from trap_dask.extraction import background

    data = (noise + 0.01 + 1e-4 * np.arange(noise.shape[1])).astype(np.float32)
    residual, array = background.residual_and_rms(data.copy(), 50, 50, stride=2)
    monkeypatch.setattr(background, "FULL_NOISE_MAP_PIXELS", data.size - 1)
    lazy_residual, lazy = background.residual_and_rms(data.copy(), 50, 50, stride=2)
    assert isinstance(lazy, background.NoiseMap) and isinstance(array, np.ndarray)
    assert np.array_equal(lazy_residual, residual) and lazy.shape == array.shape and lazy.any_finite()
    assert np.array_equal(lazy[100:173], array[100:173]) and np.array_equal(lazy[:], array)
    rng = np.random.default_rng(3)
    iy, ix = rng.integers(0, data.shape[0], 5000), rng.integers(0, data.shape[1], 5000)
    assert np.allclose(lazy[iy, ix], array[iy, ix], rtol=3e-7, atol=0)
    assert np.array_equal(lazy.take(iy * data.shape[1] + ix), lazy[iy, ix])
    assert lazy[iy.reshape(50, 100), ix.reshape(50, 100)].shape == (50, 100)
    assert lazy[7:7].shape == (0, data.shape[1])
