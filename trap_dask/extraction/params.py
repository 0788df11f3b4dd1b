"""The settings of a source extraction, apart from the extraction itself (what makes and checks them
needs none of its modules)."""

from __future__ import annotations

import math
from dataclasses import dataclass

from trap_dask.config import DEFAULTS


@dataclass(frozen=True)
class ExtractionParams:
    """Source-extraction settings (TraP ``[extraction]`` names)."""

    # defaults: trap_dask.config.Config's (the one source)
    detection_threshold: float = DEFAULTS.detection_threshold  # x rms
    analysis_threshold: float = DEFAULTS.analysis_threshold  # x rms
    deblend_nthresh: int = DEFAULTS.deblend_nthresh  # 0 = no deblending
    force_beam: bool = DEFAULTS.force_beam  # fix the shape to the restoring beam
    drop_pixel_artefacts: bool = DEFAULTS.drop_pixel_artefacts  # leave out islands too small for the beam
    margin: int = DEFAULTS.im_margin  # pixels from the edge in which sources are ignored
    radius: float = DEFAULTS.im_radius  # pixels from the centre beyond which sources are ignored (0 = no limit)
    back_size_x: int = DEFAULTS.im_back_size_x  # background box size, pixels
    back_size_y: int = DEFAULTS.im_back_size_y
    ew_sys_err: float = DEFAULTS.ew_sys_err or 0.0  # arcsec ('auto', the default: 0 until measured)
    ns_sys_err: float = DEFAULTS.ns_sys_err or 0.0  # arcsec

    def region_radius(self, shape: tuple[int, int]) -> float:
        """Radius (pixels) of the circle around the centre of an image of ``shape`` (ny, nx) that
        holds its extraction region: ``radius`` when set (capped at the region's half-diagonal),
        else the half-diagonal of the image inside its margins; 0 when the margins leave no pixel."""
        ny, nx = shape
        if 2 * self.margin >= min(nx, ny):
            return 0.0
        half_diagonal = 0.5 * math.hypot(nx - 2 * self.margin, ny - 2 * self.margin)
        return min(self.radius, half_diagonal) if self.radius > 0 else half_diagonal
