"""Frequency bands: images are grouped by effective frequency; variability is per band."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

#: Relative tolerance within which a user's band edges (Hz) equal a stored band's.
SAME_EDGES_RTOL = 1e-9


@dataclass(frozen=True)
class Band:
    """One frequency band (Hz)."""

    band_id: int
    freq_low: float
    freq_central: float
    freq_high: float

    def contains(self, freq: float) -> bool:
        return self.freq_low <= freq <= self.freq_high

    def overlaps(self, other: Band) -> bool:
        """Whether the two bands share frequencies beyond an edge they may have in common."""
        return self.freq_low < other.freq_high and other.freq_low < self.freq_high

    def has_edges(self, low: float, high: float) -> bool:
        """Whether this band spans ``low`` to ``high`` (Hz), so has the same centre and width."""
        return (math.isclose(self.freq_low, low, rel_tol=SAME_EDGES_RTOL)
                and math.isclose(self.freq_high, high, rel_tol=SAME_EDGES_RTOL))


def assign_band(
    freq_eff: float, freq_bw: float, bands: list[Band], fixed: bool
) -> tuple[Band | None, bool]:
    """The band of an image at ``freq_eff`` with bandwidth ``freq_bw`` (Hz).

    Returns ``(band, is_new)``. With ``fixed`` bands (the user's ``frequency_band`` list) an
    image outside all of them gives ``(None, False)``; otherwise a new band centred on the image
    and as wide as its bandwidth is made when no existing band contains ``freq_eff``.
    """
    for band in bands:
        if band.contains(freq_eff):
            return band, False
    if fixed:
        return None, False
    next_id = max((b.band_id for b in bands), default=-1) + 1
    half = 0.5 * freq_bw
    return Band(next_id, freq_eff - half, freq_eff, freq_eff + half), True


def fixed_bands(ranges: list[tuple[float, float]], stored: Sequence[Band] = ()) -> list[Band]:
    """Bands from user-given (low, high) pairs in Hz, in the given order.

    A pair with the edges of a ``stored`` band (one already in the database) is that band; the
    others are numbered after every stored band, so no id is used twice.
    """
    bands: list[Band] = []
    next_id = max((b.band_id for b in stored), default=-1) + 1
    for lo, hi in ranges:
        band = next((b for b in stored if b.has_edges(lo, hi)), None)
        if band is None:
            band, next_id = Band(next_id, lo, 0.5 * (lo + hi), hi), next_id + 1
        bands.append(band)
    return bands


def overlapped_stored(bands: Sequence[Band], stored: Sequence[Band]) -> list[tuple[Band, Band]]:
    """(new band, stored band) for each band of ``bands`` that is not one of ``stored`` (those of the
    database) yet shares frequencies with one: from the append on, images there go to the new band."""
    return [(band, old) for band in bands if band not in stored for old in stored if band.overlaps(old)]
