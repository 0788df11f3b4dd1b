"""The writer alone: association, light curves and commit per image, fed as fast as it takes them.

    python benchmarks/writer_alone.py [--images 100] [--sources 1000] [--backend sqlite postgres]
                                      [--worker-ms 158] [--other-fields 0]
    python benchmarks/writer_alone.py --images 2000 --block 250 [--new-per-image 2]   # a long survey

Feeds :class:`trap_dask.writer.Writer` (in this process, no Dask) synthetic worker results: a sky
of ``--sources`` point sources measured in every image with 1" of position noise, 3% of them
missed per image (forced fits answered at once) and a few transients appearing. Nothing waits on
workers, so this is the writer at the rate of any number of workers (64 of them deliver ~400
images/s of 2048^2 at 158 ms each). ``--other-fields N`` puts N known sources of other fields
(a run of many fields) in the catalogue first, from an untimed image far from this field.
Prints ms per image per phase (the commits run beside association, in the writer's committer
thread or, behind, its committer process: "waiting" is the time the writer waited for one;
behind, the images are timed once that process is up) and, from
``--worker-ms`` (one worker's time per image, ``benchmarks/stages.py``), the number of workers at
which the writer becomes the limit of a run.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import tempfile
import time
from contextlib import contextmanager
from dataclasses import replace
from datetime import datetime, timedelta
from pathlib import Path

import numpy as np
from results_table import markdown_table

from trap_dask.config import build_config
from trap_dask.db.backends import DatabaseSettings, drop_database
from trap_dask.db.store import ExportStore
from trap_dask.image import Beam, ImageMeta
from trap_dask.messages import ForcedMeasurements, ForcedRequest, ImageResult
from trap_dask.quality import ImageStats
from trap_dask.sources import empty_sources

ARCSEC = 1 / 3600
BEAM_FWHM = 30 * ARCSEC  # deg
FIELD = 2.0  # deg on a side
PG = dict(db_host="127.0.0.1", db_port=5432, db_user="postgres")


class Sky:
    """Synthetic worker results: detections of a fixed sky, forced fits on request (deg, Jy)."""

    def __init__(self, n_sources: int, seed: int = 0, new_per_image: int = 2):
        self.rng = np.random.default_rng(seed)
        self.new_per_image = new_per_image  # sources seen in one image only (transients, noise)
        self.ra = 150.0 + (self.rng.random(n_sources) - 0.5) * FIELD / np.cos(np.radians(30.0))
        self.dec = 30.0 + (self.rng.random(n_sources) - 0.5) * FIELD
        self.flux = 10 ** self.rng.uniform(-2.5, -0.5, n_sources)

    def image(self, i: int, ready: bool) -> ImageResult:
        """Image ``i``'s result; ``ready``: finished by its worker now (else: as if it came after the
        writer went idle, so the writer commits it alone)."""
        seen = self.rng.random(len(self.ra)) > 0.03
        n_new = self.new_per_image
        ra = np.concatenate([self.ra[seen], 150.0 + (self.rng.random(n_new) - 0.5) * FIELD])
        dec = np.concatenate([self.dec[seen], 30.0 + (self.rng.random(n_new) - 0.5) * FIELD])
        det = self.measured(ra, dec, np.concatenate([self.flux[seen], np.full(n_new, 0.05)]), forced=False)
        return _result(f"/data/image{i:05d}.fits", datetime(2024, 1, 1) + timedelta(hours=i), (150.0, 30.0), FIELD,
                       det, done_at=time.time() if ready else 0.0)

    def other_fields(self, n: int) -> ImageResult:
        """An image of ``n`` sources of other fields, spread over 40 x 40 deg far from this one."""
        ra, dec = 200.0 + 40.0 * self.rng.random(n), -20.0 + 40.0 * self.rng.random(n)
        return _result("/data/other_fields.fits", datetime(2023, 12, 31), (220.0, 0.0), 30.0,
                       self.measured(ra, dec, np.full(n, 0.05), forced=False), done_at=time.time())

    def measured(self, ra: np.ndarray, dec: np.ndarray, flux: np.ndarray, forced: bool) -> np.ndarray:
        rows = empty_sources(len(ra))
        noise = 0.0 if forced else ARCSEC
        rows["ra"] = ra + self.rng.normal(0, noise, len(ra)) / np.cos(np.radians(30.0))
        rows["dec"] = dec + self.rng.normal(0, noise, len(ra))
        rows["ra_fit_err"] = rows["dec_fit_err"] = 0.5 * ARCSEC
        rows["peak_flux"] = rows["int_flux"] = flux * (1 + self.rng.normal(0, 0.05, len(ra)))
        rows["peak_flux_err"] = rows["int_flux_err"] = 1e-3
        rows["significance_detection_level"] = flux / 1e-3
        rows["semimajor_axis"], rows["semiminor_axis"] = 15.0, 10.0
        rows["error_radius"] = 1.0
        rows["gaussian_fit"] = not forced
        rows["is_force_fit"] = forced
        return rows

    def forced(self, request: ForcedRequest) -> ForcedMeasurements:
        pairs = np.stack([self.measured(request.pair_ra[:, k], request.pair_dec[:, k], np.full(len(request.pair_ra),
                                                                                                0.01), True)
                          for k in (0, 1)], axis=1) if len(request.pair_ra) else None
        extra = {"pairs": pairs, "pair_ok": np.ones(len(pairs), bool)} if pairs is not None else {}
        return ForcedMeasurements(self.measured(request.ra, request.dec, np.full(len(request.ra), 0.01), True),
                                  backfill=self.measured(request.backfill_ra, request.backfill_dec,
                                                         np.full(len(request.backfill_ra), 0.01), True), **extra)


def _result(url: str, taustart: datetime, centre: tuple[float, float], xtr_radius: float, detections: np.ndarray,
            done_at: float) -> ImageResult:
    """A worker's result for a 2048^2 image of the benchmark's beam centred at ``centre`` (deg)
    whose ``detections`` lie within ``xtr_radius`` (deg); its checksum is its file's name."""
    meta = ImageMeta(url=url, taustart_ts=taustart, tau_time=60.0, freq_eff=150e6, freq_bw=2e6,
                     beam=Beam(BEAM_FWHM / 2, BEAM_FWHM / 3, 0.0), shape=(2048, 2048), centre_ra=centre[0],
                     centre_dec=centre[1], pixel_scale=4 * ARCSEC, header="")
    return ImageResult(meta, hashlib.sha256(url.encode()).hexdigest(), ImageStats(1e-3, 9e-4, 1.1e-3), None,
                       xtr_radius, detections, done_at=done_at)


#: Most images fed to a writer behind before its timed ones, while its committer process starts.
WARM_UP_MOST = 2000

#: How images reach the writer: (label, ready before the writer takes them, stage_every_image).
MODES = (("keeping up, one transaction each", False, False),
         ("keeping up, staged (what a run does)", False, True),
         ("behind (batches)", True, False))


@contextmanager
def fed_writer(backend: str, workdir: Path, sky: Sky, stage_every_image: bool = False):
    """A writer on a fresh database of ``backend`` and the function that feeds it one image of
    ``sky`` (returning the writer's seconds for it, the workers' forced fits not counted)."""
    from trap_dask.writer import Writer

    values = dict(db_backend="sqlite", db_name=str(workdir / "writer_alone.db")) if backend == "sqlite" else \
        dict(db_backend="postgres", db_name=f"trap_dask_writer_alone_{os.getpid()}", **PG)
    config = build_config(values, {}, None)
    settings = DatabaseSettings(backend=config.db_backend, name=config.db_name, host=config.db_host,
                                port=config.db_port, user=config.db_user, password=None)
    ExportStore.create(settings, overwrite=True).close()
    writer = None
    try:
        writer = Writer(settings, config, None, stage_every_image=stage_every_image)

        def feed(image: ImageResult) -> float:
            started = time.perf_counter()
            request = writer.associate(image)
            seconds = time.perf_counter() - started
            if isinstance(request, ForcedRequest):
                forced = sky.forced(request)
                started = time.perf_counter()
                writer.commit(forced)
                seconds += time.perf_counter() - started
            return seconds

        yield writer, feed
    finally:
        if writer is not None:
            writer.finish("completed")
        if backend == "postgres":
            drop_database(settings)


def bench(backend: str, workdir: Path, n_images: int, n_sources: int, behind: bool,
          stage_every_image: bool = False, other_fields: int = 0) -> dict[str, float]:
    """Seconds per phase (associate / update / commit / total) over the images after the first;
    ``behind``: every image is ready before the writer takes it (it commits them in batches);
    ``stage_every_image``: the writer of a run (batches of MAX_STAGED_KEEPING_UP while it keeps up).
    Behind, the images are timed from when the writer's committer process has written a batch
    (it starts after a whole batch behind, and takes ~1 s to start; the images before are not
    timed). ``other_fields``: known sources of other fields in the catalogue first."""
    sky = Sky(n_sources)
    with fed_writer(backend, workdir, sky, stage_every_image) as (writer, feed):
        first = 0
        if other_fields:
            feed(sky.other_fields(other_fields))
        if behind:  # its committer process starts after a whole batch behind: timed once it is up
            while writer.process_batches == 0 and first < WARM_UP_MOST:
                feed(replace(sky.image(first, ready=True), done_at=1.0))  # ready long before
                first += 1
        images = [sky.image(first + i, ready=behind) for i in range(n_images)]
        wall = 0.0
        for i, image in enumerate(images):
            if i == 1:  # the first image creates every light curve: not a steady-state image
                writer.seconds = dict.fromkeys(writer.seconds, 0.0)
            seconds = feed(image)
            wall += seconds if i else 0.0
        started = time.perf_counter()
        writer.flush()
        wall += time.perf_counter() - started
        return {**writer.seconds, "total": wall, "batches": writer.n_batches}


def long_run(backend: str, workdir: Path, n_images: int, n_sources: int, block: int,
             new_per_image: int) -> list[list]:
    """A long survey fed behind (every image ready): per ``block`` images, the writer's ms an image
    (wall, its own thread's CPU, and each phase) and the sources the catalogue holds by then, as
    ``sky``'s one-off sources (``new_per_image``) and the database's measurements accumulate."""
    sky = Sky(n_sources, new_per_image=new_per_image)
    rows = []
    with fed_writer(backend, workdir, sky) as (writer, feed):
        before, wall, cpu = dict(writer.seconds), time.perf_counter(), time.thread_time()
        for i in range(n_images):
            feed(replace(sky.image(i, ready=True), done_at=1.0))  # ready long before: behind
            if (i + 1) % block == 0:
                now, spent = dict(writer.seconds), {"wall": time.perf_counter() - wall, "cpu": time.thread_time() - cpu}
                per = {k: 1000 * (now[k] - before.get(k, 0.0)) / block for k in now} | \
                    {k: 1000 * v / block for k, v in spent.items()}
                rows.append([backend, f"{i + 1 - block}-{i + 1}", len(writer.catalogue.sources["src_id"]),
                             per["wall"], per["cpu"], per["associate"], per["update"], per["commit"], per["wait"]])
                before, wall, cpu = now, time.perf_counter(), time.thread_time()
        writer.flush()
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=100)
    parser.add_argument("--sources", type=int, default=1000, help="sources per image")
    parser.add_argument("--backend", nargs="+", default=["sqlite", "postgres"], choices=["sqlite", "postgres"])
    parser.add_argument("--worker-ms", type=float, default=158.0,
                        help="one worker's CPU time per image (ms), to say when the writer becomes the limit")
    parser.add_argument("--other-fields", type=int, default=0,
                        help="known sources of other fields in the catalogue first (a run of many fields)")
    parser.add_argument("--block", type=int, default=0,
                        help="a long survey instead: the writer behind, its ms an image per this many images")
    parser.add_argument("--new-per-image", type=int, default=2,
                        help="with --block: sources seen in one image only, added by every image")
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as workdir:
        if args.block:
            for backend in args.backend:
                rows += long_run(backend, Path(workdir), args.images, args.sources, args.block, args.new_per_image)
            print(markdown_table(["backend", "images", "catalogue sources", "ms per image", "writer thread CPU ms",
                                  "associate ms", "light curves ms", "commit ms (its own thread or process)",
                                  "waiting ms"], rows))
            return
        for backend in args.backend:
            for label, behind, staged in MODES:
                s = bench(backend, Path(workdir), args.images, args.sources, behind, staged, args.other_fields)
                per = {k: 1000 * v / (args.images - 1) for k, v in s.items() if k != "batches"}
                rows.append([backend, label, args.images, args.sources, args.other_fields,
                             per["associate"], per["update"], per["wait"], per["commit"], per["total"],
                             1000 / per["total"],
                             args.worker_ms / per["total"]])
    print(markdown_table(["backend", "images arrive", "images", "sources / image", "sources of other fields",
                          "associate ms", "light curves ms", "waiting ms", "commit ms (its own thread or process)",
                          "ms per image", "images / s", f"workers to saturate it ({args.worker_ms:g} ms/image)"],
                         rows))


if __name__ == "__main__":
    main()
