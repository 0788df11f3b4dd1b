"""The writer: the one Dask actor that owns the export database and the running catalogue.

The client feeds it images strictly in time order. For each image, :meth:`Writer.associate`
links the blind detections to the running catalogue and returns the positions to force-fit;
:meth:`Writer.commit` adds those forced fits and writes the image, its measurements, the
association links and the catalogue/variability updates in ONE transaction. Only after that
transaction commits does the in-memory catalogue move on, so memory and database never diverge.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, replace

import numpy as np

from trap_dask.astrometry import Astrometry, ScatterHistory, automatic_sys_err, measure
from trap_dask.bands import Band, assign_band, fixed_bands
from trap_dask.catalogue import (
    LIGHTCURVE_COLUMNS,
    SOURCE_COLUMNS,
    AssociationPlan,
    EarlierImages,
    ForcedMeasurements,
    ForcedRequest,
    ImageContext,
    RunningCatalogue,
    columns_from_lists,
    take,
)
from trap_dask.config import Config
from trap_dask.db.backends import DatabaseSettings
from trap_dask.db.store import ExportStore
from trap_dask.sources import add_uncertainties, empty_sources
from trap_dask.tasks import ImageResult, ScanFailure

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class CommitSummary:
    """What one committed image added."""

    im_id: int
    rejected: bool
    n_sources: int
    n_forced: int  #: forced fits, including those of new sources in the band's previous image
    n_new: int
    band: int | None = None  #: frequency band of an accepted image
    astrometry: Astrometry = Astrometry()  #: the image's offsets from the catalogue (arcsec)
    sys_err: tuple[float, float] = (np.nan, np.nan)  #: ew/ns systematic error used to associate it (arcsec)


class Writer:
    """Dask actor: association in time order and one transaction per image."""

    def __init__(self, settings: DatabaseSettings, config: Config, config_file: str | None, append: bool = False):
        self.store = ExportStore(settings)
        self.run_id = self.store.start_run(config.exportable(), config_file)
        state = self.store.load_state() if append else None
        self.catalogue = RunningCatalogue(
            de_ruiter_r_max=config.de_ruiter_r_max,
            max_nr_consecutive_force_fits=config.max_nr_consecutive_force_fits,
            detection_threshold=config.detection_threshold,
            optimal_association=config.association_method == "optimal",
            fit_blends=config.fit_blends,
            backfill=config.backfill_new_sources,
            link_radius=config.link_radius,
            merge_duplicates=config.merge_duplicates,
        )
        #: the user's systematic errors (arcsec); None: 'auto', measured image by image
        self.sys_err = (config.ew_sys_err, config.ns_sys_err)
        self.remove_shift = config.remove_image_shift
        self.scatter = ScatterHistory()
        stored_bands = [Band(**dict(zip(state.bands, row))) for row in zip(*state.bands.values())] if state and state.bands else []
        self.fixed = bool(config.frequency_bands())
        self.bands = fixed_bands(config.frequency_bands(), stored_bands) if self.fixed else stored_bands
        self._unsaved_bands = [b for b in self.bands if b not in stored_bands]
        self.next_im_id = 0
        if state is not None:
            self.catalogue = replace(
                self.catalogue,
                sources=columns_from_lists(SOURCE_COLUMNS, state.sources),
                lightcurves=columns_from_lists(LIGHTCURVE_COLUMNS, state.lightcurves),
                earlier=EarlierImages.from_images_table(state.images),
                next_xtrsrc=state.next_xtrsrc,
                next_src_id=state.next_src_id,
            )
            self.next_im_id = state.next_image
            if state.images:
                self.scatter = ScatterHistory.from_images(*(state.images[f"astrometry_{c}"] for c in
                                                            ("n", "scatter_ra", "scatter_dec")))
        self._unsaved_monitors = self._add_monitors(config.monitor_positions(), state.monitors if state else {})
        self.n_committed = 0
        #: seconds spent associating, updating light curves and committing; rows committed
        self.seconds = {"associate": 0.0, "update": 0.0, "commit": 0.0}
        self.rows_committed = 0
        self._pending: tuple[AssociationPlan, ImageResult, Band, Astrometry, tuple[float, float]] | None = None

    def _add_monitors(self, positions: list[tuple[float, float]], stored: dict[str, list]) -> dict:
        """Register the monitor positions not yet in the database; returns their monitor rows."""
        old = np.array(list(zip(stored.get("ra", []), stored.get("dec", []))), dtype=float).reshape(-1, 2)
        new = np.array(positions, dtype=float).reshape(-1, 2)
        if len(old):
            known = np.isclose(new[:, None, :], old[None, :, :], rtol=0, atol=1e-9).all(axis=2).any(axis=1)
            new = new[~known]
        self.catalogue, src_ids = self.catalogue.add_monitor_sources(new[:, 0], new[:, 1])
        first = max(stored.get("id", [0]), default=0) + 1
        return {"id": first + np.arange(len(new)), "ra": new[:, 0], "dec": new[:, 1], "src_id": src_ids}

    # -- per image --------------------------------------------------------------------------
    def reject_unreadable(self, failure: ScanFailure) -> CommitSummary:
        """Record a file whose header could not be used as a rejected image."""
        row = {"url": failure.url, "checksum": failure.checksum, "rejected": True,
               "rejection_reason": failure.reason}
        return self._commit_rejected(row)

    def associate(self, result: ImageResult) -> ForcedRequest | CommitSummary:
        """Associate one image's detections; returns what to force-fit next.

        A rejected image is committed at once and its CommitSummary returned instead.
        """
        started = time.perf_counter()
        if self._pending is not None:
            raise RuntimeError("associate() called twice without commit(): images must be fed in order")
        meta = result.meta
        band, is_new_band = assign_band(meta.freq_eff, meta.freq_bw, self.bands, self.fixed)
        rejection = result.rejection
        if band is None and rejection is None:
            rejection = f"frequency {meta.freq_eff:.6g} Hz is outside every band in frequency_band"
        if rejection is not None:
            row = self._image_row(result) | {"rejected": True, "rejection_reason": rejection}
            if band is not None and not is_new_band:
                row["freq_band"] = band.band_id
            return self._commit_rejected(row)
        if is_new_band:
            self.bands.append(band)
            self._unsaved_bands.append(band)
        beam_fwhm = 2.0 * meta.beam.smaj
        astrometry, sys_err = self._astrometry(result.sources, beam_fwhm)
        shift = (astrometry.offset_ra / 3600.0, astrometry.offset_dec / 3600.0) \
            if self.remove_shift and astrometry.measured else (0.0, 0.0)
        image = ImageContext(
            im_id=self.next_im_id, band=band.band_id, taustart_ts=meta.taustart_ts,
            centre_ra=meta.centre_ra, centre_dec=meta.centre_dec, xtr_radius=result.xtr_radius,
            rms_min=result.stats.rms_min, rms_max=result.stats.rms_max, beam_fwhm=beam_fwhm,
            url=meta.url, shift_ra=shift[0], shift_dec=shift[1],
        )
        detections = add_uncertainties(result.sources.copy(), *sys_err)
        plan = self.catalogue.plan(image, detections)
        self._pending = (plan, result, band, astrometry, sys_err)
        self.seconds["associate"] += time.perf_counter() - started
        return plan.forced_request(self.catalogue)

    def commit(self, forced: ForcedMeasurements | None = None) -> CommitSummary:
        """Add the forced fits (answering the request from associate) and commit the image."""
        started = time.perf_counter()
        plan, result, band, astrometry, sys_err = self._pending
        measured = _with_sys_err(forced if forced is not None else ForcedMeasurements(empty_sources()), sys_err)
        history = self.store.history(plan.merging_src_ids(self.catalogue)) if len(plan.merge_keep) else None
        update = self.catalogue.update(plan, measured, history)
        updated = time.perf_counter()
        row = self._image_row(result) | {
            "rejected": False, "freq_band": band.band_id,
            "n_sources": int(np.sum(~update.measurements["is_force_fit"])),
            "n_forced": int(np.sum((update.ids["im_id"] == self.next_im_id) & update.measurements["is_force_fit"])),
            "ew_sys_err": sys_err[0], "ns_sys_err": sys_err[1], "astrometry_n": astrometry.n,
            **{f"astrometry_{name}": _finite_or_none(getattr(astrometry, name))
               for name in ("offset_ra", "offset_dec", "scatter_ra", "scatter_dec")},
        }
        try:
            self.store.commit_image(
                row,
                sources=update.measurements, source_ids=update.ids,
                catalogue=update.sources, catalogue_rows=update.changed_sources,
                lightcurves=update.lightcurves, lightcurve_rows=update.changed_lightcurves,
                new_sources=update.new_sources,
                merges=update.merges, relabelled=update.relabelled,
                **self._unsaved(),
            )
        except BaseException:
            self._pending = None
            raise
        self.catalogue = self.catalogue.apply(update, plan.image)
        self.scatter = self.scatter.add(astrometry)
        self._saved()
        self._pending = None
        self.next_im_id += 1
        self.n_committed += 1
        self.seconds["update"] += updated - started
        self.seconds["commit"] += time.perf_counter() - updated
        self.rows_committed += (len(update.measurements) + len(update.changed_sources)
                                + len(update.changed_lightcurves) + len(update.new_sources["src_id"]) + 1)
        return CommitSummary(row["id"], False, row["n_sources"], len(update.measurements) - row["n_sources"],
                             len(update.new_sources["src_id"]), band.band_id, astrometry, sys_err)

    def finish(self, status: str) -> dict:
        """Record the run's end; returns totals for the summary."""
        self.store.finish_run(self.run_id, status, self.n_committed)
        self.store.close()
        return {
            "run_id": self.run_id,
            "n_images": self.n_committed,
            "n_light_curves": int((~self.catalogue.sources["is_monitor"]).sum()),
            "writer_seconds": dict(self.seconds),
            "rows_committed": self.rows_committed,
        }

    # -- helpers --------------------------------------------------------------------------
    def _astrometry(self, detections: np.ndarray, beam_fwhm: float) -> tuple[Astrometry, tuple[float, float]]:
        """The image's offsets from the catalogue, and the systematic errors (arcsec) to associate it
        with: the user's, or under 'auto' those measured so far and on this image."""
        s = self.catalogue.sources
        blind = ~s["is_monitor"]
        astrometry = measure(s["wm_ra"][blind], s["wm_dec"][blind], s["acc_n_pos"][blind],
                             detections["ra"], detections["dec"],
                             detections["significance_detection_level"], detections["ra_fit_err"],
                             detections["dec_fit_err"], beam_fwhm)
        if self.sys_err[0] is None:
            return astrometry, automatic_sys_err(self.scatter, astrometry, beam_fwhm)
        return astrometry, (float(self.sys_err[0]), float(self.sys_err[1]))

    def _image_row(self, result: ImageResult) -> dict:
        meta, stats = result.meta, result.stats
        return {
            "id": self.next_im_id, "run": self.run_id, "url": meta.url, "checksum": result.checksum,
            "rms": stats.rms if stats else None,
            "rms_min": stats.rms_min if stats else None,
            "rms_max": stats.rms_max if stats else None,
            "freq_eff": meta.freq_eff, "freq_bw": meta.freq_bw,
            "taustart_ts": meta.taustart_ts, "tau_time": meta.tau_time,
            "rb_smaj": meta.beam.smaj, "rb_smin": meta.beam.smin, "rb_pa": meta.beam.pa,
            "centre_ra": meta.centre_ra, "centre_dec": meta.centre_dec,
            "xtr_radius": result.xtr_radius,
        }

    def _commit_rejected(self, row: dict) -> CommitSummary:
        row = {"id": self.next_im_id, "run": self.run_id, "n_sources": 0, "n_forced": 0, "rejected": True} | row
        self.store.commit_image(row, **self._unsaved())
        self._saved()
        self.next_im_id += 1
        self.n_committed += 1
        return CommitSummary(row["id"], True, 0, 0, 0)

    def _unsaved(self) -> dict:
        """Bands and monitor sources not yet in the database, to go with the next commit."""
        extra: dict = {}
        if self._unsaved_bands:
            extra["band_rows"] = [b.__dict__ for b in self._unsaved_bands]
        if len(self._unsaved_monitors["id"]):
            extra["monitors"] = self._unsaved_monitors
            rows = np.flatnonzero(np.isin(self.catalogue.sources["src_id"], self._unsaved_monitors["src_id"]))
            extra["monitor_catalogue"] = take(self.catalogue.sources, rows)
        return extra

    def _saved(self) -> None:
        self._unsaved_bands = []
        self._unsaved_monitors = {k: v[:0] for k, v in self._unsaved_monitors.items()}


def _with_sys_err(measured: ForcedMeasurements, sys_err: tuple[float, float]) -> ForcedMeasurements:
    """The worker's measurements with the image's systematic errors (arcsec) in their uncertainties."""
    return replace(measured, **{name: add_uncertainties(getattr(measured, name).copy(), *sys_err)
                                for name in ("single", "pairs", "backfill")})


def _finite_or_none(value: float) -> float | None:
    return float(value) if np.isfinite(value) else None
