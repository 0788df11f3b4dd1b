"""Merging two light curves of one sky source: the pure parts, and end to end through the writer
and the export database on both backends, before and after an append."""

from __future__ import annotations

from datetime import datetime, timedelta

import numpy as np
import pytest
from _runs import to_schema_7
from sqlalchemy import select

from trap_dask.catalogue import ForcedMeasurements
from trap_dask.config import Config, build_config
from trap_dask.db import migrations, schema
from trap_dask.db.backends import make_engine
from trap_dask.db.store import ExportStore
from trap_dask.extraction.geometry import shape_on_sky
from trap_dask.image import Beam, ImageMeta
from trap_dask.merging import converged_pairs, merge_histories
from trap_dask.quality import ImageStats
from trap_dask.shapes import SHAPE_SUMS, beam_cov
from trap_dask.sources import HISTORY_DTYPE, empty_sources
from trap_dask.tasks import ImageResult
from trap_dask.writer import Writer

ARCSEC = 1 / 3600
BEAM = 30 * ARCSEC  # FWHM


def test_converged_pairs_need_one_detection_and_merge_the_younger():
    ra, dec = np.full(4, 150.0), 30.0 + np.array([0, 18, 200, 215]) * ARCSEC
    src_id = np.array([7, 3, 5, 9])
    keep, drop, apart = converged_pairs(ra, dec, src_id, np.array([True, False, True, True]), 0.7 * BEAM)
    assert keep.tolist() == [1] and drop.tolist() == [0]  # 3 is older than 7; 5 and 9 were both seen
    assert apart[0] * 3600 == pytest.approx(18.0)
    assert len(converged_pairs(ra, dec, src_id, np.zeros(4, bool), 0.7 * BEAM)[0]) == 0


def test_merged_history_keeps_one_measurement_per_image():
    h = np.zeros(5, HISTORY_DTYPE)
    h["id"], h["im_id"], h["src_id"] = [1, 2, 5, 6, 8], [1, 2, 2, 1, 3], [10, 10, 20, 20, 20]
    h["is_force_fit"] = [False, True, False, True, False]
    merged = merge_histories(h, 10, 20)
    assert merged.rows["id"].tolist() == [1, 5, 8]   # image 2: the detection beats the forced fit
    assert merged.parent.tolist() == [-1, 1, 5]
    assert merged.set_aside.tolist() == [2, 6]


def _image(i: int, ra: list[float], dec: list[float], blur: float = 1.0) -> ImageResult:
    """Image ``i`` detecting sources at ``ra``, ``dec`` (deg), of a beam ``blur`` times BEAM."""
    meta = ImageMeta(url=f"/data/image{i}.fits", taustart_ts=datetime(2024, 1, 1) + timedelta(days=i), tau_time=60.0,
                     freq_eff=150e6, freq_bw=2e6, beam=Beam(blur * BEAM / 2, blur * BEAM / 3, 0.0), shape=(512, 512),
                     centre_ra=150.0, centre_dec=30.0, pixel_scale=5 * ARCSEC, header="")
    det = empty_sources(len(ra))
    det["ra"], det["dec"] = ra, dec
    det["ra_fit_err"] = det["dec_fit_err"] = 0.3 * ARCSEC
    det["peak_flux"] = det["int_flux"] = 0.1
    det["peak_flux_err"] = det["int_flux_err"] = 0.001
    det["significance_detection_level"] = 100.0
    det["error_radius"] = 0.5
    # a little wider than the beam (30 and 20 arcsec**2 east and north): each detection adds
    # (int_flux / int_flux_err)**2 / det(beam) = 1e4 / det(beam) to its shape sums
    det["gaussian_fit"], det["intrinsic_ee"], det["intrinsic_nn"] = True, 30.0, 20.0
    fitted = beam_cov(meta.beam.smaj, meta.beam.smin, meta.beam.pa) + np.diag([30.0, 20.0])
    det["semimajor_axis"], det["semiminor_axis"], det["parallactic_angle"] = shape_on_sky(fitted[None] * ARCSEC**2)
    return ImageResult(meta, f"{i:064x}", ImageStats(0.001, 0.001, 0.001), None, 0.5, det)


def _forced(ra: np.ndarray, dec: np.ndarray) -> np.ndarray:
    rows = empty_sources(len(ra))
    rows["ra"], rows["dec"], rows["is_force_fit"] = ra, dec, True
    rows["peak_flux"] = rows["int_flux"] = 0.1
    rows["peak_flux_err"] = rows["int_flux_err"] = 0.001
    return rows


def _feed(writer: Writer, result: ImageResult) -> None:
    request = writer.associate(result)
    writer.commit(ForcedMeasurements(_forced(request.ra, request.dec),
                                     backfill=_forced(request.backfill_ra, request.backfill_dec)))


def _config(settings) -> Config:
    """A run's configuration on ``settings``' database, with tight systematic errors (0.5"): a source
    measured 18" off starts a second source."""
    server = {"db_host": settings.host, "db_port": settings.port, "db_user": settings.user} if settings.host else {}
    return build_config(dict(db_backend=settings.backend, db_name=settings.name, ew_sys_err="0.5",
                             ns_sys_err="0.5", **server), {}, None)


def _table(settings, table, order) -> list[dict]:
    engine = make_engine(settings)
    with engine.connect() as conn:
        rows = [dict(r) for r in conn.execute(select(table).order_by(*(table.c[o] for o in order))).mappings()]
    engine.dispose()
    return rows


def test_a_duplicate_is_merged_into_the_older_source(db_settings):
    """A source measured 18" (0.6 beam) off with tight position errors starts a second source
    (beyond the 15" obvious link); the next image detects one source there: the younger is merged
    into the older in that image's transaction, and an append carries on with the merged one."""
    config = _config(db_settings)
    ExportStore.create(db_settings, overwrite=False).close()
    writer = Writer(db_settings, config, None)
    off = 30.0 + 18 * ARCSEC
    _feed(writer, _image(1, [150.0, 150.2], [30.0, 30.0]))
    _feed(writer, _image(2, [150.0, 150.2], [off, 30.0]))       # a second source, B
    sources = _table(db_settings, schema.extracted_sources, ["id"])
    a, c = sources[0]["src_id"], sources[1]["src_id"]
    b = max(r["src_id"] for r in sources)
    assert len({a, b, c}) == 3 and len(_table(db_settings, schema.newsource, ["id"])) == 1
    _feed(writer, _image(3, [150.0, 150.2], [off, 30.0]))       # one source there: merge
    writer.finish("completed")

    rows = _table(db_settings, schema.extracted_sources, ["id"])
    of_a = [r for r in rows if r["src_id"] == a]
    first = of_a[0]["im_id"]  # image ids count from the export's first
    assert [r["im_id"] - first for r in of_a] == [0, 1, 2] and not any(r["is_force_fit"] for r in of_a)
    assert [r["parent"] for r in of_a] == [-1, of_a[0]["id"], of_a[1]["id"]]
    aside = [r for r in rows if r["src_id"] == b]
    assert sorted((r["im_id"] - first, r["is_force_fit"]) for r in aside) == [(0, True), (1, True)]
    merges = _table(db_settings, schema.merges, ["id"])
    assert len(merges) == 1
    m = merges[0]
    assert (m["src_id"], m["merged_into"], m["im_id"] - first, m["n_moved"], m["n_set_aside"]) == (b, a, 2, 1, 2)
    assert m["separation"] == pytest.approx(18.0, abs=0.5) and m["newsource_trigger"] is not None
    assert _table(db_settings, schema.newsource, ["id"]) == []
    var = {r["src_id"]: r for r in _table(db_settings, schema.variability, ["src_id"])}
    assert b not in var and var[a]["nr_datapoints"] == 3
    catalogue = {r["src_id"]: r for r in _table(db_settings, schema.runningcatalog, ["src_id"])}
    assert catalogue[b]["merged_into"] == a and catalogue[a]["merged_into"] == -1
    # the merged source's shape sums hold every detection of both: A's first, B's, and this image's
    one = 1e4 / np.linalg.det(beam_cov(BEAM / 2, BEAM / 3, 0.0))
    assert catalogue[a]["acc_shape_weight"] == pytest.approx(3 * one)
    assert catalogue[a]["acc_shape_ee"] == pytest.approx(3 * one * 30.0)
    assert catalogue[b]["acc_shape_weight"] == 0.0 and catalogue[b]["acc_shape_nn"] == 0.0

    appended = Writer(db_settings, config, None, append=True)
    _feed(appended, _image(4, [150.0, 150.2], [off, 30.0]))
    appended.finish("completed")
    last = [r for r in _table(db_settings, schema.extracted_sources, ["id"]) if r["im_id"] == first + 3]
    assert sorted(r["src_id"] for r in last) == sorted([a, c]) and not any(r["is_force_fit"] for r in last)
    var = {r["src_id"]: r for r in _table(db_settings, schema.variability, ["src_id"])}
    assert var[a]["nr_datapoints"] == 4 and b not in var
    assert len(_table(db_settings, schema.merges, ["id"])) == 1


def test_an_upgraded_database_holds_the_shape_sums_its_run_made(db_settings, monkeypatch):
    """Schema 8's shape sums of a database of version 7, filled on upgrade from the stored
    measurements, are the run's own, also after a merge that set measurements aside (A and a new
    B both detected in one image, then merged): the retired source's go to the kept one, which
    holds the shapes of all 4 detections of either."""
    config = _config(db_settings)
    ExportStore.create(db_settings, overwrite=False).close()
    writer = Writer(db_settings, config, None)
    off = 30.0 + 18 * ARCSEC
    _feed(writer, _image(1, [150.0, 150.2], [30.0, 30.0]))
    _feed(writer, _image(2, [150.0, 150.0, 150.2], [30.0, off, 30.0]))
    _feed(writer, _image(3, [150.0, 150.2], [off, 30.0]))
    writer.finish("completed")
    merges = _table(db_settings, schema.merges, ["id"])
    assert len(merges) == 1 and merges[0]["n_set_aside"] == 2

    def shape_sums() -> dict[int, tuple]:
        return {r["src_id"]: tuple(r[f"acc_shape_{name}"] for name in SHAPE_SUMS)
                for r in _table(db_settings, schema.runningcatalog, ["src_id"])}

    made = shape_sums()
    one = 1e4 / np.linalg.det(beam_cov(BEAM / 2, BEAM / 3, 0.0))
    assert made[merges[0]["merged_into"]][0] == pytest.approx(4 * one) and made[merges[0]["src_id"]][0] == 0.0
    to_schema_7(db_settings)
    monkeypatch.setattr(migrations, "MIGRATION_ROWS", 2)  # the measurements read in parts
    ExportStore.open(db_settings).close()  # as an append opens it: upgraded
    upgraded = shape_sums()
    assert upgraded.keys() == made.keys()
    for src_id, sums in made.items():
        assert upgraded[src_id] == pytest.approx(sums, rel=1e-9, abs=1e-12)


def test_a_pair_that_sharper_images_resolved_is_not_merged_by_a_blurred_one(db_settings):
    """Two sources 40" apart (1.3 beams), resolved by two images; a third of a beam 3 times as wide
    sees one source between them. They were merged as one (40" is within 0.7 of its beam), and each
    next sharp image started them again (a helper's survey of beams alternating 1x and 2x: one
    source over 10 src_ids); the merge now needs them within 0.7 of the sharpest beam seen."""
    config = _config(db_settings)
    ExportStore.create(db_settings, overwrite=False).close()
    writer = Writer(db_settings, config, None)
    north = 30.0 + 40 * ARCSEC
    for i in (1, 2):
        _feed(writer, _image(i, [150.0, 150.0], [30.0, north]))
    _feed(writer, _image(3, [150.0], [30.0 + 8 * ARCSEC], blur=3.0))
    _feed(writer, _image(4, [150.0, 150.0], [30.0, north]))
    writer.finish("completed")
    assert _table(db_settings, schema.merges, ["id"]) == []
    rows = _table(db_settings, schema.extracted_sources, ["id"])
    assert len({r["src_id"] for r in rows}) == 2 and _table(db_settings, schema.newsource, ["id"]) == []


def test_a_sharp_image_of_another_field_leaves_the_merges_here_alone(db_settings):
    """The sharpest beam a merge is held to is that of the images covering the pair: a first image
    of another field and band, of a beam 10 times as sharp, once stopped every merge here."""
    from dataclasses import replace

    config = _config(db_settings)
    ExportStore.create(db_settings, overwrite=False).close()
    writer = Writer(db_settings, config, None)
    other = _image(0, [200.0, 200.1, 200.2], [-30.0, -30.0, -30.0], blur=0.1)
    _feed(writer, replace(other, meta=replace(other.meta, freq_eff=1.4e9, centre_ra=200.0, centre_dec=-30.0)))
    off = 30.0 + 18 * ARCSEC
    _feed(writer, _image(1, [150.0, 150.2], [30.0, 30.0]))
    _feed(writer, _image(2, [150.0, 150.2], [off, 30.0]))  # a second source, B
    _feed(writer, _image(3, [150.0, 150.2], [off, 30.0]))  # one source there: merged
    writer.finish("completed")
    assert len(_table(db_settings, schema.merges, ["id"])) == 1


def test_a_source_merged_away_is_not_a_neighbour_in_the_astrometry(db_settings):
    """Once B is merged into A, B's frozen position 18" from A is no longer a sky source: the
    next image's astrometry takes A as isolated (a confident match) again, as it does C."""
    config = _config(db_settings)
    ExportStore.create(db_settings, overwrite=False).close()
    writer = Writer(db_settings, config, None)
    off = 30.0 + 18 * ARCSEC
    for i, dec in enumerate((30.0, off, off), start=1):  # B starts in image 2 and is merged in image 3
        _feed(writer, _image(i, [150.0, 150.2], [dec, 30.0]))
    s = writer.catalogue.sources
    image = _image(4, [150.0, 150.2], [off, 30.0])
    centre = (image.meta.centre_ra, image.meta.centre_dec)
    assert (s["merged_into"] >= 0).sum() == 1 and len(writer.catalogue.neighbourhood(centre, 180.0).rows) == 2
    astrometry, _ = writer._astrometry(image.sources, BEAM, centre, image.xtr_radius)
    writer.finish("completed")
    assert astrometry.n == 2


@pytest.mark.parametrize("max_batch, n_batches, flush_between", [(16, 1, False), (2, 2, False), (16, None, True)])
def test_merges_in_a_batch_equal_merges_image_by_image(db_settings, monkeypatch, max_batch, n_batches, flush_between):
    """Images that arrive while the writer is behind are staged and written in batches; a merge
    among them reads the staged measurements (not yet in the database), or those of the batch the
    committer thread is writing (MAX_BATCH 2), and a second merge sees the first one's relabelling:
    the database ends as when every image is committed on its own. ``flush_between``: the staged
    images are written between an image's association (when its merges' history is read) and its
    commit, as a client's flush may do while the image's forced fits are made."""
    from dataclasses import replace

    from test_backend_contract import table_rows

    from trap_dask import writer as writer_module
    from trap_dask.db.backends import drop_database

    off, further = 30.0 + 18 * ARCSEC, 30.0 + 30 * ARCSEC  # B, then E, each merged into A
    sky = [([150.0, 150.2], [30.0, 30.0]), ([150.0, 150.2], [off, 30.0]), ([150.0, 150.2], [off, 30.0]),
           ([150.0, 150.2], [further, 30.0]), ([150.0, 150.2], [further, 30.0]), ([150.0, 150.2], [30.0, 30.0])]

    def run(settings, behind: bool) -> dict:
        config = _config(settings)
        ExportStore.create(settings, overwrite=False).close()
        writer = Writer(settings, config, None, commit_process=False)  # the thread, as the docstring says
        for i, (ra, dec) in enumerate(sky, start=1):
            request = writer.associate(replace(_image(i, ra, dec), done_at=1.0 if behind and i > 1 else 0.0))
            if behind and flush_between:
                writer.flush()
            writer.commit(ForcedMeasurements(_forced(request.ra, request.dec),
                                             backfill=_forced(request.backfill_ra, request.backfill_dec)))
        totals = writer.finish("completed")
        store = ExportStore.open(settings)
        try:
            return {"rows": table_rows(store), "batches": totals["n_batches"]}
        finally:
            store.close()

    monkeypatch.setattr(writer_module, "MAX_BATCH", max_batch)
    alone = run(db_settings, behind=False)
    batched_settings = replace(db_settings, name=db_settings.name.replace("export", "export_b") + "_b")
    try:
        batched = run(batched_settings, behind=True)
    finally:
        drop_database(batched_settings)
    assert len(alone["rows"]["merges"]) == 2 and alone["batches"] == 0
    assert batched["batches"] == n_batches or n_batches is None
    assert batched["rows"] == alone["rows"]
