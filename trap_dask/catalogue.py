"""The running catalogue: every known source, its light-curve sums, and how one image updates them.

Pure state and arithmetic, no I/O: the writer actor feeds images in time order and writes the
returned :class:`ImageUpdate` to the database in one transaction, then calls
:meth:`RunningCatalogue.apply`. Columns are numpy arrays named as the database columns of
``runningcatalog`` and ``variability`` (see ``trap_dask.db.schema``), so persisting and
reloading them is a plain copy.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from datetime import datetime
from functools import cached_property

import numpy as np
from scipy.spatial import cKDTree

from trap_dask.association import angle_of_chord, associate, blended_null_detections, sky_tree, unit_vectors
from trap_dask.columns import Columns, concat, take
from trap_dask.config import DEFAULTS
from trap_dask.db import schema
from trap_dask.merging import converged_pairs, merge_histories
from trap_dask.messages import MIN_MATCHES, ForcedMeasurements, ForcedRequest
from trap_dask.newsource import Outlines, classify_new_sources, covering_images, earlier_rms_bounds, outline_from_text
from trap_dask.shapes import SHAPE_SUMS, as_triples, resolved_shapes, shape_sum_increments, variance_across
from trap_dask.sky import farthest, shifted, unshifted, within, wrap_ra_difference
from trap_dask.variability import (
    FLUX_SUMS,
    POSITION_SUMS,
    flux_sum_increments,
    lightcurve_mean,
    position_sum_increments,
    variability_indices,
    weighted_mean_position,
)

_POS = tuple(f"acc_{n}" for n in POSITION_SUMS)
_FLUX = tuple(f"acc_{n}" for n in FLUX_SUMS)

#: runningcatalog columns: one row per source (src_id); positions in deg. From trap_dask.db.schema.
SOURCE_COLUMNS: dict[str, str] = schema.CATALOGUE_COLUMNS
#: variability columns with their running sums: one row per (src_id, freq_band); fluxes in Jy,
#: positions in deg. From trap_dask.db.schema.
LIGHTCURVE_COLUMNS: dict[str, str] = schema.LIGHTCURVE_COLUMNS
#: merges columns: one row per merge (src_id retired into merged_into in image im_id; separation arcsec).
MERGE_COLUMNS: dict[str, str] = schema.MERGE_COLUMNS


def empty_columns(spec: dict[str, str], n: int = 0) -> Columns:
    return {name: np.zeros(n, dtype=dtype) for name, dtype in spec.items()}


def columns_from_lists(spec: dict[str, str], data: dict[str, list]) -> Columns:
    """Typed columns from database column lists (NULL floats become NaN); {} gives empty columns."""
    if not data or not next(iter(data.values())):
        return empty_columns(spec)
    return {name: np.array(data[name], dtype=float if dtype == "f8" else dtype) for name, dtype in spec.items()}


@dataclass(frozen=True)
class ImageContext:
    """What the catalogue needs to know about the image being associated."""

    im_id: int
    band: int
    taustart_ts: datetime
    centre_ra: float  #: deg
    centre_dec: float  #: deg
    xtr_radius: float  #: deg
    rms_min: float  #: Jy/beam
    rms_max: float  #: Jy/beam
    beam_fwhm: float = 0.0  #: deg, major axis of the restoring beam (0: no pair fits)
    url: str = ""  #: the image's file
    #: deg, the image's coherent shift east at its centre (trap_dask.sky.unshifted), taken out to associate
    shift_ra: float = 0.0
    shift_dec: float = 0.0  #: deg, north
    #: arcsec (RA, Dec): the systematic errors the data show (astrometry.automatic_sys_err, the scatter
    #: about the shift taken out) where the user's are set and a shift was taken out (else None):
    #: candidates within their reach are linked first
    data_sys_err: tuple[float, float] | None = None
    #: (V, 2) ra, dec (deg) around the extraction region (extract.extraction_outline; NaN: not known,
    #: the circle alone)
    outline: np.ndarray = field(default_factory=lambda: np.full((1, 2), np.nan))
    #: (2, 2) arcsec**2: the restoring beam's covariance, east-north, at the image's centre
    #: (trap_dask.shapes.beam_cov); None: not known, every forced fit has the beam's shape
    beam_cov: np.ndarray | None = None


#: A null detection this close to a detection (beam FWHM) is measured together with it.
BLEND_RADIUS = 2.0
#: A pair's second component counts as detected only this far (beam FWHM) from the first.
PROMOTE_MIN_SEPARATION = 0.5
#: A pair fit replaces its detection only if the detected component keeps this peak S/N at least.
PAIR_MIN_DETECTED_SNR = 3.0
#: Detections wider than this (fitted major axis over the beam's) are not refitted as points.
BLEND_MAX_EXTENT = 2.0
#: A new detection with two known sources undetected within this distance (beam FWHM) is their
#: blend: it continues the nearest, and the pair fit measures both.
BLEND_SWALLOW_RADIUS = 1.0
#: Known sources closer than this (beam FWHM) are one source to an image: when an image detects one
#: source there they are merged into one light curve, closer than this times the sharpest beam of
#: the images covering them (a pair that sharp images resolve stays two, blurred or not), and an
#: earlier image saw a new source this close to a known one as that one.
RESOLVABLE_SEPARATION = 0.7
#: Known sources at least this far apart (beam FWHM) are fitted as a pair where an image detects
#: one and not the other (benchmarks/pair_fits.py: from 0.5 beam the pulls of both stay within a
#: robust std of 1.4, where a forced fit of the undetected one counts its neighbour's light). A
#: pair blended in its first images has its catalogue position near the pair's centroid; under
#: a beam 1.1-1.6x the sharpest, 0.7 left such pairs double-counted (RESULTS.md, round 20).
PAIR_MIN_SEPARATION = 0.5
#: A null detection whose intrinsic shape's variance across the line to a detection's source is at
#: least this many times the beam's there (30% wider than the beam across it) is a resolved
#: source, not the member of a blended pair: it is not fitted as a pair's second point (pair
#: members measured blended, 0.3 beam apart jittered independently, reach 0.5; RESULTS.md, round 21).
WIDE_ACROSS_PAIR = 0.7
#: An earlier image's beam is wider than this image's when its FWHM is more than this many times
#: this one's (a survey's beams differ by a few per cent from image to image).
WIDER_BEAM = 1.1


@dataclass(frozen=True)
class Neighbourhood:
    """The known sources a detection can continue around one image (RunningCatalogue.neighbourhood)."""

    rows: np.ndarray  #: their catalogue rows, ascending
    tree: cKDTree  #: the :func:`~trap_dask.association.sky_tree` of their positions
    radius: float  #: deg from the image's centre that they were taken within


@dataclass(frozen=True)
class AssociationPlan:
    """Association of one image's blind detections, and the positions still to force-fit."""

    image: ImageContext
    detections: np.ndarray  #: SOURCE_DTYPE
    det_source: np.ndarray  #: catalogue row continued by each detection, -1 for new
    det_parent_row: np.ndarray  #: catalogue row whose last measurement is the parent, -1 for none
    is_duplicate: np.ndarray
    forced_rows: np.ndarray  #: catalogue rows to force-fit (null detections, then monitors)
    forced_ra: np.ndarray  #: deg, where this image shows them (their positions with its shift)
    forced_dec: np.ndarray
    #: (n, 3) intrinsic shapes (ee, en, nn; arcsec**2) to force-fit them with; zeros: the beam's
    forced_shape: np.ndarray
    pair_det: np.ndarray  #: detections refitted together with a null detection
    pair_forced: np.ndarray  #: index into ``forced_rows`` of each pair's null detection
    pair_ra: np.ndarray  #: (k, 2) deg, start positions of (detected, null) source
    pair_dec: np.ndarray
    backfill_det: np.ndarray  #: new sources covered by the band's previous image, to measure there
    backfill_ra: np.ndarray  #: deg, where that image shows them (with its shift instead of this one's)
    backfill_dec: np.ndarray
    backfill_shape: np.ndarray  #: (m, 3) their intrinsic shapes, as ``forced_shape``
    backfill_image: int  #: im_id of that image (-1: none)
    backfill_url: str | None  #: its file
    near: Neighbourhood  #: the known sources around the image, within its RunningCatalogue.reach
    merge_keep: np.ndarray = field(default_factory=lambda: np.zeros(0, np.intp))  #: catalogue rows kept ...
    merge_drop: np.ndarray = field(default_factory=lambda: np.zeros(0, np.intp))  #: ... and merged into them
    merge_separation: np.ndarray = field(default_factory=lambda: np.zeros(0))  #: deg, between each two

    def merging_src_ids(self, catalogue: RunningCatalogue) -> np.ndarray:
        """The src_ids whose measurements the merges of this image need (read back from the database)."""
        return catalogue.sources["src_id"][np.concatenate([self.merge_keep, self.merge_drop])]

    def forced_request(self, catalogue: RunningCatalogue) -> ForcedRequest:
        """Positions to force-fit, in the order of ``forced_rows``, the pairs to fit, and the new
        sources to measure in the band's previous image."""
        return ForcedRequest(self.forced_ra, self.forced_dec, self.pair_ra, self.pair_dec, self.backfill_ra,
                             self.backfill_dec, self.image.band, self.backfill_image, self.backfill_url,
                             shape=self.forced_shape, backfill_shape=self.backfill_shape)


@dataclass(frozen=True)
class ImageUpdate:
    """Everything one image adds or changes; written in one transaction, then applied."""

    measurements: np.ndarray  #: SOURCE_DTYPE rows to insert, aligned with the id columns below
    ids: Columns  #: id, src_id, parent, is_duplicate, im_id per measurement
    sources: Columns  #: the full new runningcatalog state
    changed_sources: np.ndarray  #: rows of ``sources`` to upsert
    lightcurves: Columns  #: the full new variability state
    changed_lightcurves: np.ndarray  #: rows of ``lightcurves`` to upsert
    new_sources: Columns  #: newsource rows
    next_xtrsrc: int
    next_src_id: int
    merges: Columns = field(default_factory=dict)  #: merges rows (src_id, merged_into, im_id, ...)
    relabelled: Columns = field(default_factory=dict)  #: id, src_id, parent of earlier measurements changed by them


@dataclass(frozen=True)
class EarlierImages:
    """Per band, the footprint and noise of every image already associated (for new sources)."""

    band: np.ndarray = field(default_factory=lambda: np.zeros(0, "i8"))
    im_id: np.ndarray = field(default_factory=lambda: np.zeros(0, "i8"))
    centre_ra: np.ndarray = field(default_factory=lambda: np.zeros(0))
    centre_dec: np.ndarray = field(default_factory=lambda: np.zeros(0))
    xtr_radius: np.ndarray = field(default_factory=lambda: np.zeros(0))
    rms_min: np.ndarray = field(default_factory=lambda: np.zeros(0))
    rms_max: np.ndarray = field(default_factory=lambda: np.zeros(0))
    url: np.ndarray = field(default_factory=lambda: np.zeros(0, "O"))
    beam_fwhm: np.ndarray = field(default_factory=lambda: np.zeros(0))  #: deg, major axis of each restoring beam
    #: deg, the coherent shift taken out of each image's positions (ImageContext.shift_ra/dec)
    shift_ra: np.ndarray = field(default_factory=lambda: np.zeros(0))
    shift_dec: np.ndarray = field(default_factory=lambda: np.zeros(0))
    outlines: Outlines = field(default_factory=lambda: Outlines(np.zeros((0, 0, 2)), np.zeros(0, "i8")))

    @classmethod
    def from_images_table(cls, images: dict[str, list], remove_shift: bool = True) -> EarlierImages:
        """From the accepted rows of the ``images`` table (``xtr_outline`` NULL before schema 7); the
        shift taken out of an image is its measured astrometry offset, under ``remove_shift``."""
        if not images:
            return cls()
        names = {"band": "freq_band", "im_id": "id", "centre_ra": "centre_ra", "centre_dec": "centre_dec",
                 "xtr_radius": "xtr_radius", "rms_min": "rms_min", "rms_max": "rms_max", "url": "url"}
        dtypes = {"band": "i8", "im_id": "i8", "url": "O"}
        n = np.asarray(images["astrometry_n"], dtype=float)
        applied = remove_shift & (np.nan_to_num(n) >= MIN_MATCHES)
        shift = {ours: np.where(applied, np.nan_to_num(np.asarray(images[theirs], dtype=float)) / 3600.0, 0.0)
                 for ours, theirs in (("shift_ra", "astrometry_offset_ra"), ("shift_dec", "astrometry_offset_dec"))}
        return cls(**{ours: np.asarray(images[theirs], dtype=dtypes.get(ours, float))
                      for ours, theirs in names.items()}, **shift,
                   beam_fwhm=2.0 * np.asarray(images["rb_smaj"], dtype=float),
                   outlines=Outlines.of_rows(outline_from_text(images["xtr_outline"])))

    def sharpest_over(self, ra: np.ndarray, dec: np.ndarray, beam_fwhm: float) -> np.ndarray:
        """Per position (deg): the smallest of ``beam_fwhm`` (deg) and the beams of the earlier
        images covering it: what the run has resolved there (sources resolved in one image are not
        one source because another blurs them)."""
        if not len(ra) or not len(self.im_id):
            return np.full(len(ra), beam_fwhm)
        covered = covering_images(ra, dec, self.centre_ra, self.centre_dec, self.xtr_radius, self.outlines)
        beams = np.where(covered & (self.beam_fwhm > 0), self.beam_fwhm, np.inf)
        return np.minimum(beams.min(axis=1), beam_fwhm)

    def shifts_of(self, im_id: np.ndarray) -> tuple[np.ndarray, ...]:
        """(shift east, shift north, centre ra, centre dec) in deg of the images ``im_id`` (zero
        shift for an image not among these)."""
        at = np.searchsorted(self.im_id, im_id)  # ids ascend: images are added in the run's order
        known = np.zeros(len(im_id), bool)
        inside = at < len(self.im_id)
        known[inside] = self.im_id[at[inside]] == im_id[inside]
        values = []
        for column in (self.shift_ra, self.shift_dec, self.centre_ra, self.centre_dec):
            value = np.zeros(len(im_id))
            value[known] = column[at[known]]
            values.append(value)
        return tuple(values)

    def add(self, image: ImageContext) -> EarlierImages:
        arrays = {name: np.append(getattr(self, name), getattr(image, name))
                  for name in self.__dataclass_fields__ if name != "outlines"}
        return EarlierImages(**arrays, outlines=self.outlines.add(image.outline))


@dataclass(frozen=True)
class RunningCatalogue:
    """Known sources and their light curves; immutable, each image gives a new one."""

    de_ruiter_r_max: float
    max_nr_consecutive_force_fits: int
    detection_threshold: float
    # defaults: trap_dask.config.Config's (the one source)
    optimal_association: bool = DEFAULTS.association_method == "optimal"
    fit_blends: bool = DEFAULTS.fit_blends
    backfill: bool = DEFAULTS.backfill_new_sources
    link_radius: float = DEFAULTS.link_radius  #: beam FWHM, see :func:`trap_dask.association.associate`
    duplicate_reach: float | None = DEFAULTS.duplicate_reach  #: beam FWHM, None: 'auto' (:meth:`_duplicate_reach`)
    #: merge converged light curves, see :func:`trap_dask.merging.converged_pairs`
    merge_duplicates: bool = DEFAULTS.merge_duplicates
    #: force-fit resolved sources with their own shape (trap_dask.shapes), not the beam's
    fit_source_shape: bool = DEFAULTS.fit_source_shape
    sources: Columns = field(default_factory=lambda: empty_columns(SOURCE_COLUMNS))
    lightcurves: Columns = field(default_factory=lambda: empty_columns(LIGHTCURVE_COLUMNS))
    earlier: EarlierImages = field(default_factory=EarlierImages)
    next_xtrsrc: int = 0  #: ids count from 0, as TraP 1.x's readers index arrays by them
    next_src_id: int = 0

    def add_monitor_sources(self, ra: np.ndarray, dec: np.ndarray) -> tuple[RunningCatalogue, np.ndarray]:
        """Register user monitor positions (deg) as sources; returns the catalogue and their src_ids."""
        n = len(ra)
        new = empty_columns(SOURCE_COLUMNS, n)
        new["src_id"] = self.next_src_id + np.arange(n)
        new["wm_ra"], new["wm_dec"], new["ra_ref"] = ra, dec, ra
        new["is_monitor"][:] = True
        new["last_xtrsrc"][:] = -1
        new["first_im_id"][:] = -1
        new["merged_into"][:] = -1
        return (
            replace(self, sources=concat([self.sources, new]), next_src_id=self.next_src_id + n),
            new["src_id"],
        )

    # -- step 1: association of the blind detections -----------------------------------------
    @cached_property
    def _blind(self) -> np.ndarray:
        """Per source: one a detection can continue (neither a monitor nor merged into another)."""
        return ~self.sources["is_monitor"] & (self.sources["merged_into"] < 0)

    @cached_property
    def _neighbourhoods(self) -> dict[tuple[float, float], Neighbourhood]:
        """The last :meth:`neighbourhood` built, by its centre (one image at a time asks)."""
        return {}

    def neighbourhood(self, centre: tuple[float, float], radius: float) -> Neighbourhood:
        """The sources a detection can continue (neither monitors nor merged into another) within
        ``radius`` (deg) of ``centre`` (ra, dec; deg), and their KD-tree: built once per image for its
        astrometry, association and merges, which then cost what the image holds, not what the
        whole catalogue (other fields of the run) does. One built around the same centre with a
        larger radius serves: a source beyond where an image looks changes none of its results."""
        radius = radius if radius < 180.0 else 180.0  # not a number: the whole sky
        cache = self._neighbourhoods
        built = cache.get(centre)
        if built is None or built.radius < radius:
            s = self.sources
            rows = np.flatnonzero(self._blind & within(s["wm_ra"], s["wm_dec"], centre, radius))
            cache.clear()
            built = cache[centre] = Neighbourhood(rows, sky_tree(s["wm_ra"][rows], s["wm_dec"][rows]), radius)
        return built

    def reach(self, image: ImageContext, detections: np.ndarray) -> float:
        """Distance (deg) from the image's centre within which every known source that its
        association, forced fits, merges and new sources use lies: its extraction radius (or its
        farthest detection), its shift, the farthest a known source can be from a detection and
        still be continued by it (a de Ruiter candidate under the largest uncertainties, a link,
        a blend), and from there a source merged with it or too close to tell from a new one
        (RESOLVABLE_SEPARATION of the band's widest beam)."""
        s = self.sources
        unc_cat = float(np.max(np.maximum(s["wm_uncertainty_ew"], s["wm_uncertainty_ns"]), where=self._blind,
                               initial=0.0))
        unc_det = float(np.max(np.maximum(detections["uncertainty_ew"], detections["uncertainty_ns"]), initial=0.0))
        # association's neighbour search bound (a chord, association._search_radius) as an angle
        candidates = float(angle_of_chord(np.deg2rad(self.de_ruiter_r_max * np.hypot(unc_cat, unc_det)) * (1 + 1e-9)))
        linked = max(self.link_radius, BLEND_SWALLOW_RADIUS) * image.beam_fwhm
        widest = float(np.max(self.earlier.beam_fwhm, where=self.earlier.band == image.band, initial=image.beam_fwhm))
        centre = (image.centre_ra, image.centre_dec)
        extent = max(image.xtr_radius, farthest(detections["ra"], detections["dec"], centre))
        # a shift moves a position along its meridian, then its parallel: no farther than the two together
        moved = abs(image.shift_ra) + abs(image.shift_dec)
        return extent + moved + max(candidates, linked) + RESOLVABLE_SEPARATION * widest

    def plan(self, image: ImageContext, detections: np.ndarray) -> AssociationPlan:
        """Associate ``detections`` and choose which known sources to force-fit in this image."""
        s = self.sources
        near = self.neighbourhood((image.centre_ra, image.centre_dec), self.reach(image, detections))
        blind = near.rows
        det_ra, det_dec = unshifted(detections["ra"], detections["dec"], image.shift_ra, image.shift_dec,
                                    (image.centre_ra, image.centre_dec))
        data_reach = self._data_reach(image, detections)
        links = associate(
            s["wm_ra"][blind], s["wm_dec"][blind],
            s["wm_uncertainty_ew"][blind], s["wm_uncertainty_ns"][blind],
            det_ra, det_dec,
            detections["uncertainty_ew"], detections["uncertainty_ns"],
            r_max=self.de_ruiter_r_max,
            optimal=self.optimal_association,
            link_radius=self.link_radius * image.beam_fwhm,
            blend_radius=BLEND_SWALLOW_RADIUS * image.beam_fwhm if self.fit_blends else 0.0,
            duplicate_reach=self._duplicate_reach(image, detections, data_reach),
            near_reach=data_reach,
            cat_tree=near.tree,
        )
        det_source = _remap(links.source, blind)
        det_parent_row = _remap(links.parent_source, blind)
        merge_keep, merge_drop, merge_separation = self._merges(image, near, det_source)
        # the detection of either source of a merge continues the kept one; neither is force-fitted
        det_source = _substitute(det_source, merge_drop, merge_keep)
        det_parent_row = _substitute(det_parent_row, merge_drop, merge_keep)
        unmatched = np.setdiff1d(blind[~links.matched], np.concatenate([merge_keep, merge_drop]))
        eligible = unmatched[s["n_consecutive_force_fits"][unmatched] < self.max_nr_consecutive_force_fits]
        monitors = np.flatnonzero(s["is_monitor"])
        candidates = np.concatenate([eligible, monitors])
        # where this image shows them: the catalogue's positions with its coherent shift
        cand_ra, cand_dec = shifted(s["wm_ra"][candidates], s["wm_dec"][candidates], image.shift_ra,
                                    image.shift_dec, (image.centre_ra, image.centre_dec))
        inside = covering_images(cand_ra, cand_dec, image.centre_ra, image.centre_dec, image.xtr_radius,
                                 Outlines.of_rows(image.outline[None]))[:, 0]
        forced_rows, forced_ra, forced_dec = candidates[inside], cand_ra[inside], cand_dec[inside]
        forced_shape = self._forced_shapes(image, {k: v[forced_rows] for k, v in self._shapes().items()})
        pair_forced, pair_det = self._blends(image, detections, det_source, forced_rows, forced_ra, forced_dec,
                                             forced_shape)
        pair_ra, pair_dec = self._pair_starts(image, detections[pair_det], det_source[pair_det],
                                              forced_rows[pair_forced])
        backfill_det, backfill_ra, backfill_dec, backfill_image, backfill_url = self._backfill(
            image, det_ra, det_dec, (det_source < 0) & ~links.is_duplicate)
        new_shapes = _shape_sums(detections[backfill_det], image)
        return AssociationPlan(
            image=image,
            detections=detections,
            det_source=det_source,
            det_parent_row=det_parent_row,
            is_duplicate=links.is_duplicate,
            forced_rows=forced_rows,
            forced_ra=forced_ra,
            forced_dec=forced_dec,
            forced_shape=forced_shape,
            pair_det=pair_det,
            pair_forced=pair_forced,
            pair_ra=pair_ra,
            pair_dec=pair_dec,
            backfill_det=backfill_det,
            backfill_ra=backfill_ra,
            backfill_dec=backfill_dec,
            backfill_shape=self._forced_shapes(image, new_shapes),
            backfill_image=backfill_image,
            backfill_url=backfill_url,
            near=near,
            merge_keep=merge_keep,
            merge_drop=merge_drop,
            merge_separation=merge_separation,
        )

    def _shapes(self) -> dict[str, np.ndarray]:
        """The catalogue's shape sums (trap_dask.shapes.SHAPE_SUMS), one per source."""
        return {name: self.sources[f"acc_shape_{name}"] for name in SHAPE_SUMS}

    def _forced_shapes(self, image: ImageContext, sums: dict[str, np.ndarray]) -> np.ndarray:
        """(n, 3) intrinsic shapes (arcsec**2) to force-fit sources of shape ``sums`` with in ``image``:
        zeros (the beam's) for point sources, under ``fit_source_shape`` false, or where the beam is not known."""
        n = len(sums["weight"])
        if not self.fit_source_shape or image.beam_cov is None:
            return np.zeros((n, 3))
        return resolved_shapes(sums, image.beam_cov)

    def _merges(self, image: ImageContext, near: Neighbourhood,
                det_source: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Catalogue rows (kept, merged into it) of the sources ``near`` the image that converged,
        and their separations (deg); see :func:`trap_dask.merging.converged_pairs`."""
        if not self.merge_duplicates or image.beam_fwhm <= 0:
            return np.zeros(0, np.intp), np.zeros(0, np.intp), np.zeros(0)
        s, blind = self.sources, near.rows
        seen = np.isin(blind, det_source[det_source >= 0])
        keep, drop, apart = converged_pairs(s["wm_ra"][blind], s["wm_dec"][blind], s["src_id"][blind], seen,
                                            RESOLVABLE_SEPARATION * image.beam_fwhm, near.tree)
        keep, drop = blind[keep], blind[drop]
        sharpest = self.earlier.sharpest_over(s["wm_ra"][keep], s["wm_dec"][keep], image.beam_fwhm)
        one = apart < RESOLVABLE_SEPARATION * sharpest  # no image of theirs resolved them
        return keep[one], drop[one], apart[one]

    def _backfill(self, image: ImageContext, det_ra: np.ndarray, det_dec: np.ndarray,
                  new: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, int, str | None]:
        """New sources to measure in the band's previous image (detections, of positions ``det_ra``,
        ``det_dec`` in deg with this image's shift taken out), where that image shows them (deg),
        and its im_id and file (-1 and None: none)."""
        earlier = self.earlier
        in_band = np.flatnonzero(earlier.band == image.band)
        if not self.backfill or not len(in_band) or not new.any():
            return np.zeros(0, np.intp), np.zeros(0), np.zeros(0), -1, None
        last = in_band[np.argmax(earlier.im_id[in_band])]
        cand = np.flatnonzero(new)
        ra, dec = shifted(det_ra[cand], det_dec[cand], earlier.shift_ra[last], earlier.shift_dec[last],
                          (earlier.centre_ra[last], earlier.centre_dec[last]))
        inside = covering_images(ra, dec, earlier.centre_ra[last], earlier.centre_dec[last], earlier.xtr_radius[last],
                                 earlier.outlines.take(last))[:, 0]
        return cand[inside], ra[inside], dec[inside], int(earlier.im_id[last]), str(earlier.url[last])

    def _blends(self, image: ImageContext, det: np.ndarray, det_source: np.ndarray, forced_rows: np.ndarray,
                forced_ra: np.ndarray, forced_dec: np.ndarray,
                forced_shape: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(index into forced_rows, detection) of null detections to fit with a detection; the null
        detections are where this image shows them (``forced_ra``, ``forced_dec``, deg).

        Only point-like detections that continue a known source take part, and only null
        detections of blind sources (not monitors) that are not wide across the line to the
        detection's source: a resolved source (its ``forced_shape`` at least WIDE_ACROSS_PAIR
        times the beam's variance across that line), which a pair of points would measure at a
        fraction of its flux, keeps the forced fit of its own shape; a pair member whose shape is
        wide only along that line (it was measured blended with its neighbour) is fitted as a pair.
        """
        none = np.zeros(0, np.intp)
        if not self.fit_blends or image.beam_fwhm <= 0:
            return none, none
        s = self.sources
        nulls = np.flatnonzero(~s["is_monitor"][forced_rows])
        point_like = det["semimajor_axis"] * 2.0 / 3600.0 <= BLEND_MAX_EXTENT * image.beam_fwhm
        dets = np.flatnonzero((det_source >= 0) & point_like)
        ni, dj = blended_null_detections(det["ra"][dets], det["dec"][dets], forced_ra[nulls], forced_dec[nulls],
                                         BLEND_RADIUS * image.beam_fwhm)
        null_rows, det_rows = forced_rows[nulls[ni]], det_source[dets[dj]]
        # the line from the detection's source to the null's
        east, north = _offsets(s["wm_ra"][null_rows], s["wm_dec"][null_rows],
                               s["wm_ra"][det_rows], s["wm_dec"][det_rows])
        keep = np.hypot(east, north) >= PAIR_MIN_SEPARATION * image.beam_fwhm
        wide = np.flatnonzero(forced_shape[nulls[ni]].any(axis=1))
        if len(wide) and image.beam_cov is not None:
            line = east[wide], north[wide]
            keep[wide] &= (variance_across(forced_shape[nulls[ni[wide]]], *line)
                           < WIDE_ACROSS_PAIR * variance_across(as_triples(image.beam_cov[None]), *line))
        return nulls[ni[keep]], dets[dj[keep]]

    def _pair_starts(self, image: ImageContext, det: np.ndarray, det_rows: np.ndarray,
                     null_rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Start positions (k, 2) in deg of (detected, null) source in each pair.

        Their catalogue positions, moved together so that their centroid weighted by mean
        flux falls on the detection: the detection shows where the pair is now, the catalogue
        how its members are placed. The fluxes are those in this band; for a pair not yet
        measured here (the first image of a band), each source's mean over the bands it was
        measured in (a pair of 60 and 13 mJy would otherwise be moved as if equal, its starts
        a fifth of their separation off); equal weights where neither is known.
        """
        s = self.sources
        rows = np.stack([det_rows, null_rows], 1)
        src_id = s["src_id"][rows.ravel()]
        weight, unset = np.ones(rows.shape), np.ones(len(rows), bool)
        for flux in (self._mean_flux(src_id, image.band), self._mean_flux(src_id)):
            flux = np.clip(flux.reshape(-1, 2), 0.0, None)
            known = unset & np.isfinite(flux).all(1) & (np.nan_to_num(flux).sum(1) > 0)
            weight[known], unset[known] = flux[known], False
        weight = weight / weight.sum(1, keepdims=True)
        cos_dec = np.cos(np.deg2rad(det["dec"]))[:, None]
        x = wrap_ra_difference(s["wm_ra"][rows] - det["ra"][:, None]) * cos_dec
        y = s["wm_dec"][rows] - det["dec"][:, None]
        x -= (weight * x).sum(1, keepdims=True)
        y -= (weight * y).sum(1, keepdims=True)
        return (det["ra"][:, None] + x / cos_dec) % 360.0, det["dec"][:, None] + y

    def _mean_flux(self, src_id: np.ndarray, band: int | None = None) -> np.ndarray:
        """Mean flux (Jy) of each source's light curve in ``band``, or over all its bands (their
        light curves' means averaged) when ``band`` is None; NaN where it has none."""
        theirs = np.isin(self.lightcurves["src_id"], src_id)  # the few asked for, not every light curve
        lc = {name: self.lightcurves[name][theirs] for name in ("src_id", "freq_band", "lightcurve_avg")}
        if band is not None:
            keys, means = _lightcurve_key(lc["src_id"], lc["freq_band"]), lc["lightcurve_avg"]
            wanted = _lightcurve_key(src_id, band)
        else:
            keys, at = np.unique(lc["src_id"], return_inverse=True)
            counts = np.bincount(at, minlength=len(keys))
            means = np.bincount(at, weights=lc["lightcurve_avg"], minlength=len(keys)) / np.maximum(counts, 1)
            wanted = np.asarray(src_id, dtype=keys.dtype)
        found = _find_rows(keys, wanted)
        return np.append(means, np.nan)[found]  # -1, none: the NaN after the last

    # -- step 2: the image's measurements and the new state ----------------------------------
    def update(self, plan: AssociationPlan, measured: ForcedMeasurements,
               history: np.ndarray | None = None) -> ImageUpdate:
        """Combine detections and forced fits (aligned with ``plan.forced_rows``) into an update.

        Where a pair fit succeeded, its components replace the detection and the forced fit of
        the pair; a second component at or above the detection threshold counts as a detection
        of its source (its position then joins the source's). Forced fits with a non-finite
        flux or error (off the image, blanked pixels) are dropped. ``history`` holds the earlier
        measurements (HISTORY_DTYPE) of the sources ``plan`` merges
        (:meth:`AssociationPlan.merging_src_ids`).
        """
        image = plan.image
        merged_sources, merged_lightcurves, merges, relabelled = self._merged(plan, history)
        det, det_source, det_parent_row, is_duplicate, forced, forced_rows = self._with_pairs(plan, measured)
        back = measured.backfill
        if len(back) not in (0, len(plan.backfill_det)):
            raise ValueError(f"{len(back)} backfill fits for {len(plan.backfill_det)} new sources")
        ok = np.isfinite(back["int_flux"]) & (back["int_flux_err"] > 0)
        back, back_det = back[ok], plan.backfill_det[: len(back)][ok]

        n_det, n_ff, n_back = len(det), len(forced), len(back)
        first_id = self.next_xtrsrc
        det_ids = first_id + np.arange(n_det)
        ff_ids = first_id + n_det + np.arange(n_ff)
        back_ids = first_id + n_det + n_ff + np.arange(n_back)

        s = merged_sources
        new_det = np.flatnonzero(det_source < 0)
        new_src_ids = self.next_src_id + np.arange(len(new_det))
        parent_row = np.where(det_source >= 0, det_source, det_parent_row)
        det_parent = _remap(parent_row, s["last_xtrsrc"])
        det_src_id = np.empty(n_det, dtype="i8")
        old_det = np.flatnonzero(det_source >= 0)
        det_src_id[old_det] = s["src_id"][det_source[old_det]]
        det_src_id[new_det] = new_src_ids

        # new sources get catalogue rows; every detection then updates its row's position sums, with
        # the image's coherent shift taken out (the catalogue's positions are in one frame)
        det_ra, det_dec = unshifted(det["ra"], det["dec"], image.shift_ra, image.shift_dec,
                                    (image.centre_ra, image.centre_dec))
        added = empty_columns(SOURCE_COLUMNS, len(new_det))
        added["src_id"] = new_src_ids
        added["ra_ref"] = det_ra[new_det]
        added["first_im_id"][:] = image.im_id
        added["merged_into"][:] = -1
        n_before = len(s["src_id"])
        s = concat([s, added])  # a copy: what follows changes it in place
        det_rows = np.where(det_source >= 0, det_source, 0)
        det_rows[new_det] = n_before + np.arange(len(new_det))
        increments = position_sum_increments(det_ra, det_dec, _ra_error(det), det["uncertainty_ns"],
                                             s["ra_ref"][det_rows])
        for name in POSITION_SUMS:
            np.add.at(s[f"acc_{name}"], det_rows, increments[name])
        for name, increment in _shape_sums(det, image).items():
            np.add.at(s[f"acc_shape_{name}"], det_rows, increment)
        s["last_xtrsrc"][det_rows] = det_ids
        s["n_consecutive_force_fits"][det_rows] = 0
        s["last_xtrsrc"][forced_rows] = ff_ids
        s["n_consecutive_force_fits"][forced_rows] += 1
        _refresh_positions(s, det_rows)

        # a new source's measurement in the band's previous image: its parent, in that image
        det_parent[back_det] = back_ids
        measurements = np.concatenate([det, forced, back])
        meas_rows = np.concatenate([det_rows, forced_rows, det_rows[back_det]])
        ff_parent = merged_sources["last_xtrsrc"][forced_rows]
        ids = {
            "id": np.concatenate([det_ids, ff_ids, back_ids]),
            "src_id": s["src_id"][meas_rows],
            "parent": np.concatenate([det_parent, np.where(ff_parent >= 0, ff_parent, -1), np.full(n_back, -1)]),
            "is_duplicate": np.concatenate([is_duplicate, np.zeros(n_ff + n_back, bool)]),
            "im_id": np.concatenate([np.full(n_det + n_ff, image.im_id), np.full(n_back, plan.backfill_image)]),
        }
        lightcurves, changed_lc = self._update_lightcurves(merged_lightcurves, image, measurements, ids)
        if len(plan.merge_keep):  # the merged light curves in every band, also those not measured here
            kept = np.isin(lightcurves["src_id"], s["src_id"][plan.merge_keep])
            changed_lc = np.union1d(changed_lc, np.flatnonzero(kept))
        new_sources = self._new_sources(image, plan.near, det, det_ra, det_dec, det_ids, det_src_id, new_det,
                                        is_duplicate)
        changed = np.unique(np.concatenate([meas_rows, plan.merge_keep, plan.merge_drop]))
        return ImageUpdate(
            measurements=measurements,
            ids=ids,
            sources=s,
            changed_sources=changed,
            lightcurves=lightcurves,
            changed_lightcurves=changed_lc,
            new_sources=new_sources,
            next_xtrsrc=first_id + n_det + n_ff + n_back,
            next_src_id=self.next_src_id + len(new_det),
            merges=merges,
            relabelled=relabelled,
        )

    def _with_pairs(self, plan: AssociationPlan, measured: ForcedMeasurements) -> tuple[np.ndarray, ...]:
        """The detections (with det_source, det_parent_row, is_duplicate) and the finite forced
        fits (with their catalogue rows) once the usable pair fits are in."""
        det, forced = plan.detections, measured.single
        det_source, det_parent_row, is_duplicate = plan.det_source, plan.det_parent_row, plan.is_duplicate
        keep = np.ones(len(forced), bool)
        # a fit that hands the detection's light to the other component (it started in the wrong
        # place) explains the detection no better than the detection itself: it is not used
        paired = measured.pair_ok & (measured.pairs[:, 0]["significance_detection_level"] >= PAIR_MIN_DETECTED_SNR)
        if paired.any():
            det, forced = det.copy(), forced.copy()
            det[plan.pair_det[paired]] = measured.pairs[paired, 0]
            first, second = measured.pairs[paired, 0], measured.pairs[paired, 1]
            # a second component above the detection threshold, and clear of the first (not its
            # wing), is a detection of its source
            apart = _separation(first["ra"], first["dec"], second["ra"], second["dec"])
            seen = (second["significance_detection_level"] > self.detection_threshold) & (
                apart >= PROMOTE_MIN_SEPARATION * plan.image.beam_fwhm)
            forced[plan.pair_forced[paired][~seen]] = second[~seen]
            forced["is_force_fit"][plan.pair_forced[paired][~seen]] = True
            keep[plan.pair_forced[paired][seen]] = False
            rows = plan.forced_rows[plan.pair_forced[paired][seen]]
            det = np.concatenate([det, second[seen]])
            det_source = np.concatenate([det_source, rows])
            det_parent_row = np.concatenate([det_parent_row, np.full(len(rows), -1)])
            is_duplicate = np.concatenate([is_duplicate, np.zeros(len(rows), bool)])
        keep &= np.isfinite(forced["int_flux"]) & (forced["int_flux_err"] > 0)
        return det, det_source, det_parent_row, is_duplicate, forced[keep], plan.forced_rows[keep]

    def _update_lightcurves(self, lc: Columns, image: ImageContext, meas: np.ndarray,
                            ids: Columns) -> tuple[Columns, np.ndarray]:
        """The light curves ``lc`` (updated in place) with this image's measurements, and the rows changed."""
        keys = _lightcurve_key(ids["src_id"], image.band)
        rows = _find_rows(_lightcurve_key(lc["src_id"], lc["freq_band"]), keys)
        missing = np.flatnonzero(rows < 0)
        # a new source measured here and in the previous image: one light curve, started by the detection
        _, first, number = np.unique(keys[missing], return_index=True, return_inverse=True)
        fresh = missing[first]
        added = empty_columns(LIGHTCURVE_COLUMNS, len(fresh))
        added["src_id"] = ids["src_id"][fresh]
        added["freq_band"][:] = image.band
        added["newsource"] = ids["id"][fresh]
        added["first_image"][:] = image.im_id
        added["first_detection_time"][:] = image.taustart_ts
        added["flux_ref"] = meas["int_flux"][fresh]
        added["ra_ref"] = meas["ra"][fresh]
        added["lightcurve_max"][:] = -np.inf
        rows[missing] = len(lc["src_id"]) + number.ravel()
        lc = concat([lc, added])  # a copy: what follows changes it in place

        flux = flux_sum_increments(meas["int_flux"], meas["int_flux_err"], lc["flux_ref"][rows])
        for name in FLUX_SUMS:
            np.add.at(lc[f"acc_{name}"], rows, flux[name])
        np.maximum.at(lc["lightcurve_max"], rows, meas["int_flux"])
        blind = ~meas["is_force_fit"]
        pos = position_sum_increments(
            meas["ra"][blind], meas["dec"][blind], _ra_error(meas[blind]),
            meas["uncertainty_ns"][blind], lc["ra_ref"][rows[blind]],
        )
        for name in POSITION_SUMS:
            np.add.at(lc[f"acc_{name}"], rows[blind], pos[name])

        changed = np.unique(rows)
        _refresh_lightcurves(lc, changed)
        return lc, changed

    # -- merges ----------------------------------------------------------------------------
    def _merged(self, plan: AssociationPlan, history: np.ndarray | None) -> tuple[Columns, Columns, Columns, Columns]:
        """The catalogue and light curves with ``plan``'s merges done (copies; without merges this
        catalogue's own, which :meth:`update` copies as it adds the image's rows), the merges rows
        (MERGE_COLUMNS), and the id, src_id and parent of the earlier measurements they change."""
        if len(plan.merge_keep) and history is None:
            raise ValueError("merges need the history of the merging sources")
        merging = bool(len(plan.merge_keep))
        s = {k: v.copy() for k, v in self.sources.items()} if merging else self.sources
        lc = {k: v.copy() for k, v in self.lightcurves.items()} if merging else self.lightcurves
        records, relabelled = [], []
        for keep, drop, apart in zip(plan.merge_keep.tolist(), plan.merge_drop.tolist(), plan.merge_separation):
            keep_src, drop_src = int(s["src_id"][keep]), int(s["src_id"][drop])
            merged = merge_histories(history, keep_src, drop_src)
            _merge_catalogue_row(s, keep, drop, merged.rows, self.earlier)
            _merge_lightcurves(lc, merged.rows, keep_src, drop_src)
            records.append({"src_id": drop_src, "merged_into": keep_src, "im_id": plan.image.im_id,
                            "separation": float(apart) * 3600.0,
                            "n_moved": int(np.sum(merged.rows["src_id"] == drop_src)),
                            "n_set_aside": len(merged.set_aside)})
            relabelled.append(merged.relabelled(keep_src, drop_src))
        if records:  # the retired sources' light curves, all at once
            lc = take(lc, np.flatnonzero(~np.isin(lc["src_id"], [r["src_id"] for r in records])))
        merges = {name: np.array([r[name] for r in records], dtype=dtype) for name, dtype in MERGE_COLUMNS.items()}
        changes = {name: np.concatenate([r[name] for r in relabelled]) if relabelled else np.zeros(0, "i8")
                   for name in ("id", "src_id", "parent")}
        return s, lc, merges, changes

    def _new_sources(self, image: ImageContext, near: Neighbourhood, det: np.ndarray, det_ra: np.ndarray,
                     det_dec: np.ndarray, det_ids: np.ndarray, det_src_id: np.ndarray, new_det: np.ndarray,
                     is_duplicate: np.ndarray) -> Columns:
        """Transient candidates: new (non-duplicate) sources (``det_ra``, ``det_dec``: their positions
        with the image's shift taken out, deg) at positions seen before in this band,
        by an image that could tell them from the known sources: one of a wider beam than this
        image's that puts the nearest within RESOLVABLE_SEPARATION saw them as one (a pair member
        first resolved by a sharper image is no transient; under one beam, as in TraP, any)."""
        cand = new_det[~is_duplicate[new_det]]
        earlier = self.earlier
        in_band = np.flatnonzero(earlier.band == image.band)
        covered = covering_images(
            det["ra"][cand], det["dec"][cand], earlier.centre_ra[in_band],
            earlier.centre_dec[in_band], earlier.xtr_radius[in_band], earlier.outlines.take(in_band),
        )
        wider = earlier.beam_fwhm[in_band] > WIDER_BEAM * image.beam_fwhm
        if wider.any():
            covered &= ~wider | (self._nearest_known(near, det_ra[cand], det_dec[cand])[:, None]
                                 >= RESOLVABLE_SEPARATION * earlier.beam_fwhm[in_band])
        seen = covered.any(axis=1)
        cand, covered = cand[seen], covered[seen]
        prev_min, prev_max = earlier_rms_bounds(covered, earlier.rms_min[in_band], earlier.rms_max[in_band])
        sigma_min, sigma_max, likely = classify_new_sources(
            det["peak_flux"][cand], self.detection_threshold, prev_min, prev_max
        )
        limits = np.where(covered, earlier.rms_min[in_band], np.inf).argmin(axis=1) if len(cand) else np.zeros(0, int)
        return {
            "src_id": det_src_id[cand],
            "trigger_xtrsrc": det_ids[cand],
            "im_id": np.full(len(cand), image.im_id),
            "previous_limits_image": earlier.im_id[in_band][limits],
            "newsource_type": likely.astype("i8"),
            "sigma_rms_min": sigma_min,
            "sigma_rms_max": sigma_max,
        }

    def _data_reach(self, image: ImageContext, det: np.ndarray) -> np.ndarray | None:
        """Per detection, the distance (deg) within which a known source would be its candidate
        under the systematic errors the data show (a detection's and a source's uncertainty taken
        alike); None under 'auto' (the errors are the data's)."""
        if image.data_sys_err is None:
            return None
        sigma = np.hypot(max(image.data_sys_err), det["error_radius"]) / 3600.0
        return self.de_ruiter_r_max * np.sqrt(2.0) * sigma

    def _duplicate_reach(self, image: ImageContext, det: np.ndarray,
                         data_reach: np.ndarray | None) -> np.ndarray | None:
        """Per detection, the distance (deg) within which a known source it does not continue
        makes it a duplicate, never below the detection's own fitted FWHM: ``duplicate_reach``
        beams; under 'auto' the ``data_reach`` where the detection's systematic errors are larger
        than the data's. None (anywhere within the de Ruiter radius, TraP 1.x) for 0, and under
        'auto' where the errors are 'auto' or the data's are not known (``data_reach`` None)."""
        if self.duplicate_reach is None:
            if data_reach is None:
                return None
            over = np.maximum(det["ew_sys_err"], det["ns_sys_err"]) > max(image.data_sys_err)
            reach = np.where(over, data_reach, 180.0)  # 180 deg: the whole sky, TraP's rule
        else:
            reach = self.duplicate_reach * image.beam_fwhm if self.duplicate_reach > 0 and image.beam_fwhm > 0 else None
        return None if reach is None else np.maximum(reach, det["semimajor_axis"] * 2.0 / 3600.0)

    @staticmethod
    def _nearest_known(near: Neighbourhood, ra: np.ndarray, dec: np.ndarray) -> np.ndarray:
        """Distance (deg) from each position (deg, the catalogue's frame) to the nearest source a
        detection can continue ``near`` it (inf: none)."""
        if not len(near.rows) or not len(ra):
            return np.full(len(ra), np.inf)
        return angle_of_chord(near.tree.query(unit_vectors(ra, dec))[0])

    # -- step 3: after the transaction committed -------------------------------------------
    def apply(self, update: ImageUpdate, image: ImageContext) -> RunningCatalogue:
        """The catalogue after ``update`` (call only once its transaction has committed)."""
        return replace(
            self,
            sources=update.sources,
            lightcurves=update.lightcurves,
            earlier=self.earlier.add(image),
            next_xtrsrc=update.next_xtrsrc,
            next_src_id=update.next_src_id,
        )


def _shape_sums(det: np.ndarray, image: ImageContext) -> dict[str, np.ndarray]:
    """What detections ``det`` add to their sources' shape sums (nothing where the beam is not known)."""
    if image.beam_cov is None:
        return {name: np.zeros(len(det)) for name in SHAPE_SUMS}
    return shape_sum_increments(det, image.beam_cov)


def _ra_error(meas: np.ndarray) -> np.ndarray:
    """Association error along the RA coordinate in deg (on-sky uncertainty_ew / cos dec)."""
    return meas["uncertainty_ew"] / np.cos(np.deg2rad(meas["dec"]))


def _offsets(ra1: np.ndarray, dec1: np.ndarray, ra2: np.ndarray, dec2: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Offsets east and north (deg) of positions 1 from positions 2 (deg), flat-sky: for neighbours only."""
    return wrap_ra_difference(ra1 - ra2) * np.cos(np.deg2rad(0.5 * (dec1 + dec2))), dec1 - dec2


def _separation(ra1: np.ndarray, dec1: np.ndarray, ra2: np.ndarray, dec2: np.ndarray) -> np.ndarray:
    """Angular distance (deg) between positions (deg), flat-sky: for neighbours only."""
    return np.hypot(*_offsets(ra1, dec1, ra2, dec2))


def _remap(index: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """``rows[index]`` where ``index >= 0``, -1 elsewhere."""
    out = np.full(len(index), -1, dtype="i8")
    ok = index >= 0
    out[ok] = rows[index[ok]]
    return out


def _find_rows(have: np.ndarray, keys: np.ndarray) -> np.ndarray:
    """Row of each key in the unique array ``have``, -1 where absent."""
    if len(have) == 0:
        return np.full(len(keys), -1, dtype="i8")
    order = np.argsort(have)
    pos = np.minimum(np.searchsorted(have, keys, sorter=order), len(have) - 1)
    return np.where(have[order[pos]] == keys, order[pos], -1)


def _lightcurve_key(src_id: np.ndarray, band: np.ndarray | int) -> np.ndarray:
    return np.asarray(src_id, dtype="i8") * 65536 + np.asarray(band, dtype="i8")


def _substitute(rows: np.ndarray, old: np.ndarray, new: np.ndarray) -> np.ndarray:
    """``rows`` with each value in ``old`` replaced by its counterpart in ``new``."""
    if not len(old):
        return rows
    out = rows.copy()
    at = _find_rows(old, rows)
    out[at >= 0] = new[at[at >= 0]]
    return out


def _merge_catalogue_row(s: Columns, keep: int, drop: int, rows: np.ndarray, earlier: EarlierImages) -> None:
    """Catalogue row ``keep`` rebuilt from the merged measurements ``rows`` (HISTORY_DTYPE, in
    processing order; their positions with the shifts of their images, ``earlier``, taken out); row
    ``drop`` marked as merged into it. In place."""
    blind = rows[~rows["is_force_fit"]]
    east, north, centre_ra, centre_dec = earlier.shifts_of(blind["im_id"])
    ra, dec = unshifted(blind["ra"], blind["dec"], east, north, (centre_ra, centre_dec))
    increments = position_sum_increments(ra, dec, _ra_error(blind), blind["uncertainty_ns"], s["ra_ref"][keep])
    for name in POSITION_SUMS:
        s[f"acc_{name}"][keep] = increments[name].sum()
    for name in SHAPE_SUMS:  # the shapes of every detection of either, also those set aside, go to the kept one
        s[f"acc_shape_{name}"][keep] += s[f"acc_shape_{name}"][drop]
        s[f"acc_shape_{name}"][drop] = 0.0
    s["first_im_id"][keep] = min(s["first_im_id"][keep], s["first_im_id"][drop])
    s["last_xtrsrc"][keep] = rows["id"][-1]
    detected = np.flatnonzero(~rows["is_force_fit"])
    s["n_consecutive_force_fits"][keep] = len(rows) - 1 - detected[-1] if len(detected) else len(rows)
    s["merged_into"][drop] = s["src_id"][keep]
    _refresh_positions(s, np.array([keep]))


def _merge_lightcurves(lc: Columns, rows: np.ndarray, keep_src: int, drop_src: int) -> None:
    """``keep_src``'s light curves rebuilt from the merged measurements ``rows`` (HISTORY_DTYPE) in
    each band, in place; each keeps the earlier start of the two. ``drop_src``'s are left for the
    caller to remove."""
    theirs = np.flatnonzero((lc["src_id"] == keep_src) | (lc["src_id"] == drop_src))
    keys = _lightcurve_key(lc["src_id"][theirs], lc["freq_band"][theirs])
    for band in np.unique(rows["freq_band"]).tolist():
        k, d = (int(theirs[i]) if i >= 0 else -1
                for i in _find_rows(keys, _lightcurve_key(np.array([keep_src, drop_src]), band)).tolist())
        if k < 0 and d < 0:
            raise RuntimeError(f"sources {keep_src} and {drop_src} have measurements in band {band} but no "
                               "light curve there: the catalogue and its light curves disagree")
        if k < 0:  # only the dropped source had a light curve in this band: it becomes the kept one's
            k, d = d, -1
            lc["src_id"][k] = keep_src
        if d >= 0 and lc["first_image"][d] < lc["first_image"][k]:
            for name in ("newsource", "first_image", "first_detection_time"):
                lc[name][k] = lc[name][d]
        mine = rows[rows["freq_band"] == band]
        flux = flux_sum_increments(mine["int_flux"], mine["int_flux_err"], lc["flux_ref"][k])
        for name in FLUX_SUMS:
            lc[f"acc_{name}"][k] = flux[name].sum()
        lc["lightcurve_max"][k] = mine["int_flux"].max()
        blind = mine[~mine["is_force_fit"]]
        pos = position_sum_increments(blind["ra"], blind["dec"], _ra_error(blind), blind["uncertainty_ns"],
                                      lc["ra_ref"][k])
        for name in POSITION_SUMS:
            lc[f"acc_{name}"][k] = pos[name].sum()
        _refresh_lightcurves(lc, np.array([k]))


def _refresh_lightcurves(lc: Columns, rows: np.ndarray) -> None:
    """Recompute the variability columns of light-curve ``rows`` from their sums, in place."""
    sums = [lc[f"acc_{n}"][rows] for n in FLUX_SUMS]
    v, eta = variability_indices(*sums, flux_ref=lc["flux_ref"][rows])
    lc["v_int"][rows], lc["eta_int"][rows] = v, eta
    lc["lightcurve_avg"][rows] = lightcurve_mean(sums[0], sums[1], lc["flux_ref"][rows])
    lc["nr_datapoints"][rows] = sums[0]
    mean = weighted_mean_position(*(lc[c][rows] for c in _POS), ra_ref=lc["ra_ref"][rows])
    lc["wm_ra"][rows], lc["wm_dec"][rows] = mean.wm_ra, mean.wm_dec
    lc["avg_ra_err"][rows], lc["avg_dec_err"][rows] = mean.avg_ra_err, mean.avg_dec_err


def _refresh_positions(s: Columns, rows: np.ndarray) -> None:
    """Recompute the association position and uncertainty (deg) of catalogue ``rows``."""
    rows = np.unique(rows)
    mean = weighted_mean_position(*(s[c][rows] for c in _POS), ra_ref=s["ra_ref"][rows])
    s["wm_ra"][rows], s["wm_dec"][rows] = mean.wm_ra, mean.wm_dec
    s["wm_uncertainty_ew"][rows] = mean.wm_ra_err * np.cos(np.deg2rad(mean.wm_dec))
    s["wm_uncertainty_ns"][rows] = mean.wm_dec_err
