"""Frequency bands (trap_dask.bands): assignment, the user's fixed bands, and their overlaps with stored ones."""

from __future__ import annotations

from trap_dask.bands import Band, assign_band, fixed_bands, overlapped_stored

STORED = [Band(0, 149e6, 150e6, 151e6), Band(1, 199e6, 200e6, 201e6)]


def test_automatic_bands_take_an_image_in_one_or_make_one_as_wide_as_its_bandwidth():
    assert assign_band(150.5e6, 1e6, STORED, fixed=False) == (STORED[0], False)
    assert assign_band(175e6, 2e6, STORED, fixed=False) == (Band(2, 174e6, 175e6, 176e6), True)
    assert assign_band(175e6, 2e6, STORED, fixed=True) == (None, False)


def test_fixed_bands_reuse_a_stored_band_of_the_same_edges_and_number_the_others_after():
    bands = fixed_bands([(1.99e8, 2.01e8), (1.45e8, 1.55e8)], STORED)
    assert bands == [STORED[1], Band(2, 145e6, 150e6, 155e6)]


def test_only_a_new_band_sharing_frequencies_with_a_stored_one_overlaps_it():
    wider, touching = Band(2, 145e6, 150e6, 155e6), Band(3, 151e6, 160e6, 169e6)
    assert overlapped_stored([STORED[0], wider, touching], STORED) == [(wider, STORED[0])]
    assert overlapped_stored(STORED, STORED) == []
