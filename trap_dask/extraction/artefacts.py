"""Pixel artefacts: islands too small for their peak to be anything seen through the beam.

Everything on the sky reaches a radio image convolved with the restoring beam, and so does the
noise: a point source of peak S/N ``p`` covers about ``2 pi sigma_maj sigma_min ln(p / t)`` pixels
above an analysis threshold ``t`` (sigma: the beam's in pixels), and an extended one more. A hot
pixel, a correlator or imaging glitch or a few corrupt pixels are not convolved: one to a few
pixels, whatever their brightness. A Gaussian fit takes such an island for a source (as narrow as
the pixels allow or, failing that, with the beam's shape), and seen in a later image of the field
it is a new-source candidate, as in TraP. trap-dask leaves it out (``drop_pixel_artefacts``, on by
default; ``trap_dask.extraction.extract.extract``).

An island is an artefact when it holds fewer than ``MIN_BEAM_FILL`` of the pixels that a point
source of its peak would cover. Of ~23,000 islands of the benchmark surveys at a detection
threshold of 4 (noise peaks included) and those of the real images in ``shared/realdata``, the
fewest held 0.27 of that, and ``benchmarks/artefact_sweep.py`` cuts no island of its fields for
beams of 2.5 x 2 to 12 x 8 pixels; a one-pixel glitch of S/N 8 holds 0.04 of it (a beam of
6 x 4 pixels), one of S/N 40 under 0.01 (benchmarks/RESULTS.md, issue 15 round 13).
"""

from __future__ import annotations

import numpy as np

from trap_dask.extraction.islands import Islands

#: Least share of a point source's pixels (above the analysis threshold, at the island's peak S/N)
#: that an island must hold to be taken as a source.
MIN_BEAM_FILL = 0.1


def point_source_pixels(peak_snr: np.ndarray, analysis: float, beam_cov: np.ndarray) -> np.ndarray:
    """Pixels above S/N ``analysis`` of a point source of peak S/N ``peak_snr`` seen through the
    beam (``beam_cov``: its (2, 2) covariance in pixel**2): the area of the ellipse where the
    beam exceeds analysis / peak."""
    sigmas = np.sqrt(np.linalg.det(beam_cov))  # sigma_maj * sigma_min, pixel**2
    return 2.0 * np.pi * sigmas * np.log(np.maximum(peak_snr / analysis, 1.0))


def pixel_artefacts(islands: Islands, analysis: float, beam_cov: np.ndarray) -> np.ndarray:
    """bool per island: it holds too few pixels for its peak to be seen through the beam."""
    return islands.counts < MIN_BEAM_FILL * point_source_pixels(islands.peak_snr, analysis, beam_cov)
