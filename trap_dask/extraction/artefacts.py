"""Pixel artefacts: islands too small for their peak to be anything seen through the beam.

Everything on the sky reaches a radio image convolved with the restoring beam, and so does the
noise: a point source of peak S/N ``p`` covers about ``2 pi sigma_maj sigma_min ln(p / t)`` pixels
above an analysis threshold ``t`` (sigma: the beam's in pixels), and an extended one more. A hot
pixel, a correlator or imaging glitch or a few corrupt pixels are not convolved: one to a few
pixels, whatever their brightness. A Gaussian fit takes such an island for a source (as narrow as
the pixels allow or, failing that, with the beam's shape), and seen in a later image of the field
it is a new-source candidate, as in TraP. trap-dask leaves it out (``drop_pixel_artefacts``, on by
default; ``trap_dask.extraction.extract.extract``).

An island is an artefact when it holds fewer than ``MIN_BEAM_FILL`` (5%) of the pixels that a
point source of its peak would cover, unless it touches the image's edge or a blank pixel (cut
short, its count tells nothing). Of ~23,000 islands of the benchmark surveys at a detection
threshold of 4 (noise peaks included) and those of the real images in ``shared/realdata``, the
fewest held 0.27 of that; none of 463 faint sources (S/N 1-3 times thresholds of 3 to 8) under
a header beam 3 times too wide is cut, nor a source of S/N 6 under a hot pixel of S/N 30,000. A
one-pixel glitch holds 0.04 at S/N 8 (a beam of 6 x 4 pixels) and under 0.01 from S/N 40. What
the cut leaves: fainter glitches, blocks of a few pixels unless very bright, and most glitches
where the beam is hardly larger than a pixel. An island with an infinite pixel is always cut. An
image whose median island (of those not cut) holds under ``SUSPECT_MEDIAN_FILL`` has a wrong beam
in its header, not glitches: none is cut, and the worker warns (benchmarks/RESULTS.md, issue 15
round 13; ``artefact_sweep.py``).
"""

from __future__ import annotations

import numpy as np

from trap_dask.extraction.islands import NEIGHBOURS, SNR, Islands

#: Least share of a point source's pixels (above the analysis threshold, at the island's peak S/N)
#: that an island must hold to be taken as a source.
MIN_BEAM_FILL = 0.05
#: An image of at least SUSPECT_BEAM_MIN islands whose median island (of those not taken for
#: artefacts) holds under SUSPECT_MEDIAN_FILL of a point source's pixels has a header beam wider than
#: its resolution (all its sources look too small; the benchmark surveys and real images give
#: 0.95-1.03): none is cut.
SUSPECT_BEAM_MIN = 5
SUSPECT_MEDIAN_FILL = 0.3


def point_source_pixels(peak_snr: np.ndarray, analysis: float, beam_cov: np.ndarray) -> np.ndarray:
    """Pixels above S/N ``analysis`` of a point source of peak S/N ``peak_snr`` seen through the
    beam (``beam_cov``: its (2, 2) covariance in pixel**2): the area of the ellipse where the
    beam exceeds analysis / peak."""
    sigmas = np.sqrt(np.linalg.det(beam_cov))  # sigma_maj * sigma_min, pixel**2
    return 2.0 * np.pi * sigmas * np.log(np.maximum(peak_snr / analysis, 1.0))


def fill(islands: Islands, analysis: float, beam_cov: np.ndarray) -> np.ndarray:
    """Each island's pixels over those of a point source of its peak seen through the beam."""
    return islands.counts / np.maximum(point_source_pixels(islands.peak_snr, analysis, beam_cov), 1e-12)


def pixel_artefacts(islands: Islands, snr: SNR, analysis: float, beam_cov: np.ndarray) -> np.ndarray:
    """bool per island: it holds too few pixels for the beam (see the module's text)."""
    few = fill(islands, analysis, beam_cov) < MIN_BEAM_FILL
    if few.any():  # (the usual image has none)
        few[np.flatnonzero(few)[_cut_short(islands.select(few), snr)]] = False
    return few


def beam_suspect(islands: Islands, artefact: np.ndarray, analysis: float, beam_cov: np.ndarray) -> bool:
    """Whether the image's islands look too small as a whole, not a few of them: its header's beam
    is wider than its resolution. The median is of the islands not taken for artefacts (of all,
    when every one is), so that many glitches in a sparse field do not pass for a wrong beam."""
    if islands.n < SUSPECT_BEAM_MIN:
        return False
    fills = fill(islands, analysis, beam_cov)
    return bool(np.median(fills[~artefact] if not artefact.all() else fills) < SUSPECT_MEDIAN_FILL)


def _cut_short(islands: Islands, snr: SNR) -> np.ndarray:
    """bool per island: a pixel of it lies on the image's edge or next to a blank one, so that it
    may hold fewer pixels than the sky it shows (its count tells nothing)."""
    ny, nx = snr.shape
    y, x = np.divmod(islands.flat, nx)
    short = (x == 0) | (x == nx - 1) | (y == 0) | (y == ny - 1)
    inside = ~short
    for dy, dx in NEIGHBOURS:
        short[inside] |= np.isnan(snr.take(islands.flat[inside] + dy * nx + dx))
    return np.logical_or.reduceat(short, islands.starts)
