"""Postage stamps: a cutout around a source from each image that holds it, in time order."""

from __future__ import annotations

import math
import os
from collections.abc import Mapping

import numpy as np
import pandas as pd
from astropy.nddata import Cutout2D, NoOverlapError
from astropy.wcs.utils import proj_plane_pixel_scales
from matplotlib.patches import Ellipse

from trap_dask.checksums import kind_of
from trap_dask.image import ImageError, read_image, read_meta
from trap_dask.messages import FileStamp
from trap_dask.results.plots import plt

#: Stamp side in beam major-axis FWHMs, and the bounds in pixels.
STAMP_BEAMS = 8.0
STAMP_PIXELS = (24, 160)


def stamp_size(smaj_deg: float, pixel_deg: float) -> int:
    """Side of a stamp in pixels: STAMP_BEAMS beam FWHMs, within STAMP_PIXELS."""
    side = STAMP_BEAMS * 2 * smaj_deg / pixel_deg
    return int(np.clip(math.ceil(side), *STAMP_PIXELS))


def stamps_figure(meas: pd.DataFrame, src_id: int, max_stamps: int = 24, columns: int = 6,
                  checksums: Mapping[int, str] | None = None) -> plt.Figure:
    """One panel per measurement of ``src_id`` (``meas`` from results.lightcurves, time order):
    the image around the source's weighted mean position (detections), the restoring beam as an
    ellipse in the lower left, the measured position as a cross (detection) or a circle (forced
    fit). ``checksums``: the checksum of each image's file when the run read it, by image id
    (results.image_checksums). An image that cannot be read any more, whose file has changed
    since, or that does not reach the source gets an empty panel saying so."""
    meas = meas.sort_values(["taustart_ts", "id"]).head(max_stamps)
    blind = meas[~meas.is_force_fit]
    centre = (blind if len(blind) else meas)[["ra", "dec"]].median()
    n = max(len(meas), 1)
    ncols = min(columns, n)
    nrows = math.ceil(n / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(1.9 * ncols, 2.1 * nrows + 0.4), squeeze=False,
                             layout="constrained")
    cutouts = []
    for row in meas.itertuples():
        cut = _stamp(row, centre, (checksums or {}).get(row.im_id))
        cutouts.append((row, *cut) if isinstance(cut, tuple) else (row, None, cut))
    finite = [c.data[np.isfinite(c.data)] for _, c, _ in cutouts if c is not None]
    values = np.concatenate(finite) if finite else np.zeros(1)
    vmin, vmax = (np.percentile(values, [1.0, 99.8]) if values.size else (0.0, 1.0))
    for ax, (row, cut, extra) in zip(axes.flat, cutouts):
        ax.set_xticks([])
        ax.set_yticks([])
        title = f"{row.taustart_ts:%Y-%m-%d %H:%M}\n{row.int_flux * 1e3:.1f} mJy"
        if cut is None:
            ax.text(0.5, 0.5, extra, ha="center", va="center", fontsize=7, transform=ax.transAxes)
            ax.set_title(title, fontsize=7)
            continue
        ax.imshow(cut.data, origin="lower", cmap="inferno", vmin=vmin, vmax=vmax, interpolation="nearest")
        px, py = cut.wcs.world_to_pixel_values(row.ra, row.dec)
        if row.is_force_fit:
            ax.plot(px, py, "o", mfc="none", mec="cyan", ms=10, mew=1.2)
        else:
            ax.plot(px, py, "+", color="cyan", ms=12, mew=1.5)
        ny, nx = cut.data.shape
        smaj, smin = 2 * row.rb_smaj / extra, 2 * row.rb_smin / extra  # FWHM in pixels
        ax.add_patch(Ellipse((0.12 * nx + smaj / 2, 0.12 * ny + smaj / 2), smin, smaj, angle=row.rb_pa,
                             fill=False, ec="white", lw=1.2))
        kind = "forced fit" if row.is_force_fit else "detection"
        ax.set_title(f"{title} ({kind})", fontsize=7)
    for ax in list(axes.flat)[len(cutouts):]:
        ax.axis("off")
    fig.suptitle(f"source {src_id} at RA {centre.ra:.4f}°, Dec {centre.dec:.4f}° "
                 f"(+ detection, ○ forced fit, ellipse: beam FWHM)", fontsize=9)
    return fig


def _stamp(row, centre: pd.Series, checksum: str | None) -> tuple[Cutout2D, float] | str:
    """The cutout of the image of measurement ``row`` around ``centre`` (ra, dec, deg) and the
    image's pixel size (deg), or why there is none. The file is read once (checked, then its pixels)."""
    from trap_dask.tasks import read_file

    try:
        raw, stamp = read_file(row.url)
        if checksum is not None and _digest(row.url, stamp, raw, kind_of(checksum)) != checksum:
            return "image changed\nsince the run"
        data, wcs = read_image(read_meta(row.url), raw)
    except (ImageError, OSError):
        return "image not readable"
    if not np.isfinite(row.rb_smaj):
        return "no beam recorded"
    x, y = wcs.world_to_pixel_values(centre.ra, centre.dec)
    pixel = float(np.mean(proj_plane_pixel_scales(wcs)))
    try:
        return Cutout2D(data, (float(x), float(y)), stamp_size(row.rb_smaj, pixel), wcs=wcs, mode="partial",
                        fill_value=np.nan), pixel
    except (NoOverlapError, ValueError):  # off the image (a NaN pixel position too)
        return "source not\non this image"


#: Checksums of the files hashed already, by path, size, modification and change times, inode and
#: kind: a report draws the stamps of many candidates from the same images, and hashes each file once.
_DIGESTS: dict[tuple, str] = {}
_MAX_DIGESTS = 4096


def _digest(url: str, stamp: FileStamp | None, raw: np.ndarray, kind: str) -> str:
    """The checksum of ``kind`` (trap_dask.checksums) of the file at ``url`` whose bytes are ``raw``,
    remembered by its stamp when it was read (None for a file modified moments ago: hashed each
    time), its inode and its status change time (which no copy that keeps modification times can
    set back)."""
    from trap_dask.tasks import bytes_checksum

    status = os.stat(url)
    if stamp is None or (status.st_size, status.st_mtime_ns) != tuple(stamp):
        return bytes_checksum(raw, kind)
    key = (url, *stamp, status.st_ino, status.st_ctime_ns, kind)
    if key not in _DIGESTS:
        if len(_DIGESTS) >= _MAX_DIGESTS:
            _DIGESTS.clear()
        _DIGESTS[key] = bytes_checksum(raw, kind)
    return _DIGESTS[key]
