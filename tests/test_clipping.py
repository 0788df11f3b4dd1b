"""Kappa-sigma clipped statistics: the truncation correction, the binary searches, the block sums."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import stats

from trap_dask.extraction.clipping import IQR_PER_SIGMA, _count_below, clipped_stats, clipped_variance_factor


def test_clipped_variance_factor_matches_truncated_normal():
    assert clipped_variance_factor(3.0) == pytest.approx(stats.truncnorm(-3, 3).var(), rel=1e-9)


@pytest.mark.parametrize("nrow", [3, 200])  # row-by-row search and the all-rows binary search
def test_count_below_equals_counting(nrow):
    """The binary searches of the clipping loop count exactly what a full comparison counts,
    with ties, NaNs (sorted last), infinities and NaN limits."""
    rng = np.random.default_rng(3)
    values = np.round(rng.normal(size=(nrow, 57)), 1).astype(np.float32)  # many ties
    values[rng.uniform(size=values.shape) < 0.1] = np.nan
    values[0, :3] = [-np.inf, np.inf, np.nan]
    ordered = np.sort(values, axis=-1)
    limits = [np.round(rng.normal(size=nrow), 1).astype(np.float32), np.full(nrow, np.inf, np.float32),
              np.full(nrow, -np.inf, np.float32), np.full(nrow, np.nan, np.float32)]
    for limit in limits:
        for inclusive in (False, True):
            below = ordered <= limit[:, None] if inclusive else ordered < limit[:, None]
            assert np.array_equal(_count_below(ordered, limit, inclusive), below.sum(-1))
            rows = np.arange(nrow)[1::2]  # some rows only: their counts
            assert np.array_equal(_count_below(ordered, limit[rows], inclusive, rows), below[rows].sum(-1))


@pytest.mark.parametrize("npix", [5, 16, 625, 1000])
def test_clipped_stats_equal_direct_sums_over_the_kept_pixels(npix):
    """The block prefix sums give the clipped mean and std that direct float64 sums over each
    box's kept sorted pixels give (the same clipping, NaNs ignored, rows with few pixels)."""
    rng = np.random.default_rng(npix)
    stack = (rng.standard_normal((40, npix)) * 2e-3 + 0.01).astype(np.float32)
    stack[rng.uniform(size=stack.shape) < 0.03] += 0.05  # sources
    stack[:4, : npix // 2] = np.nan
    stack[4] = np.nan
    mean, sigma, nfinite = clipped_stats(stack.copy())
    norm = 1.0 / np.sqrt(clipped_variance_factor(3.0))
    for row, m, s, n in zip(stack, mean, sigma, nfinite):
        values = np.sort(row[np.isfinite(row)])
        assert n == len(values)
        if n == 0:
            continue
        median = values[int(np.rint(0.5 * (n - 1)))]
        offsets = values - median
        width = 3.0 * (values[int(np.rint(0.75 * (n - 1)))] - values[int(np.rint(0.25 * (n - 1)))]) / IQR_PER_SIGMA
        lo, hi = np.searchsorted(offsets, -width, "left"), np.searchsorted(offsets, width, "right")
        for _ in range(10):
            kept = offsets[lo:hi].astype(np.float64)
            mu = kept.sum() / max(hi - lo, 1)
            sd = np.sqrt(max(np.square(kept).sum() / max(hi - lo, 1) - mu**2, 0.0)) * norm
            new = (np.searchsorted(offsets, np.float32(mu - 3 * sd), "left"),
                   np.searchsorted(offsets, np.float32(mu + 3 * sd), "right"))
            if new == (lo, hi):
                break
            lo, hi = new
        assert m == pytest.approx(mu + median, rel=1e-12, abs=1e-15)
        assert s == pytest.approx(sd, rel=1e-9, abs=1e-15)
