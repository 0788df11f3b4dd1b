"""Frequency bands: images are grouped by effective frequency; variability is per band."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Band:
    """One frequency band (Hz)."""

    band_id: int
    freq_low: float
    freq_central: float
    freq_high: float

    def contains(self, freq: float) -> bool:
        return self.freq_low <= freq <= self.freq_high


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
    next_id = max((b.band_id for b in bands), default=0) + 1
    half = 0.5 * freq_bw
    return Band(next_id, freq_eff - half, freq_eff, freq_eff + half), True


def fixed_bands(ranges: list[tuple[float, float]]) -> list[Band]:
    """Bands from user-given (low, high) pairs in Hz, numbered from 1 in the given order."""
    return [Band(i + 1, lo, 0.5 * (lo + hi), hi) for i, (lo, hi) in enumerate(ranges)]
