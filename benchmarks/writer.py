"""Writer throughput: rows per second that the export store commits, on each backend.

    python benchmarks/writer.py [--images 20] [--sources 1000] [--backend sqlite postgres] [--batch 1 8]

Commits ``--images`` images of ``--sources`` extracted sources each (plus their catalogue and
variability upserts) through ``ExportStore.commit_image``, one transaction per image, as the
writer actor does when it keeps up; ``--batch N`` (N > 1) commits N images per transaction with
``ExportStore.batch()`` (one insert per table, each catalogue/variability row upserted once), the
path of a writer that fell behind (one row per N). PostgreSQL: the server at 127.0.0.1:5432, user
postgres, a database named after this process, dropped afterwards.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import tempfile
import time
from datetime import datetime, timedelta
from pathlib import Path

import numpy as np

from trap_dask.catalogue import LIGHTCURVE_COLUMNS, SOURCE_COLUMNS, empty_columns
from trap_dask.config import Config
from trap_dask.db.backends import DatabaseSettings, drop_database
from trap_dask.db.store import ExportStore
from trap_dask.sources import empty_sources


def settings_for(backend: str, workdir: Path) -> DatabaseSettings:
    if backend == "sqlite":
        return DatabaseSettings("sqlite", str(workdir / "writer_bench.db"))
    return DatabaseSettings("postgres", f"trap_dask_writer_bench_{os.getpid()}", host="127.0.0.1", user="postgres")


def bench(settings: DatabaseSettings, n_images: int, n_sources: int, batch: int = 1) -> tuple[float, int]:
    """Seconds spent committing and rows committed."""
    rng = np.random.default_rng(0)
    store = ExportStore.create(settings, overwrite=True)
    run = store.start_run(Config().exportable(), None)
    sources = empty_sources(n_sources)
    for name in sources.dtype.names:
        if sources.dtype[name].kind == "f":
            sources[name] = rng.random(n_sources)
    catalogue = empty_columns(SOURCE_COLUMNS, n_sources)
    catalogue["src_id"] = np.arange(1, n_sources + 1)
    curves = empty_columns(LIGHTCURVE_COLUMNS, n_sources)
    curves["src_id"], curves["freq_band"] = catalogue["src_id"], np.ones(n_sources, int)
    curves["first_detection_time"][:] = datetime(2024, 1, 1)
    band = {"band_id": 1, "freq_low": 149e6, "freq_central": 150e6, "freq_high": 151e6}
    seconds, rows = 0.0, 0
    transaction = contextlib.nullcontext
    if batch > 1:
        transaction = store.batch  # AttributeError: this trap-dask has no batches
    for i in range(n_images):
        if i % batch == 0:
            started = time.perf_counter()
            group = transaction()
            group.__enter__()
        for columns in (catalogue, curves):  # each image moves every light curve it touches
            for values in columns.values():
                if values.dtype.kind == "f":
                    values[:] = rng.random(n_sources)
        ids = {"id": i * n_sources + np.arange(1, n_sources + 1), "src_id": catalogue["src_id"],
               "parent": (i - 1) * n_sources + np.arange(1, n_sources + 1) if i else -np.ones(n_sources, int),
               "is_duplicate": np.zeros(n_sources, bool)}
        image = {"id": i + 1, "run": run, "url": f"img{i}.fits", "rejected": False, "freq_band": 1,
                 "taustart_ts": datetime(2024, 1, 1) + timedelta(days=i)}
        store.commit_image(image, band_rows=[band] if i == 0 else None, sources=sources, source_ids=ids,
                           catalogue=catalogue, catalogue_rows=np.arange(n_sources),
                           lightcurves=curves, lightcurve_rows=np.arange(n_sources))
        if (i + 1) % batch == 0 or i + 1 == n_images:
            group.__exit__(None, None, None)
            seconds += time.perf_counter() - started
        rows += 3 * n_sources + 1
    store.close()
    return seconds, rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=20)
    parser.add_argument("--sources", type=int, default=1000, help="extracted sources per image")
    parser.add_argument("--backend", nargs="+", default=["sqlite", "postgres"], choices=["sqlite", "postgres"])
    parser.add_argument("--batch", type=int, nargs="+", default=[1],
                        help="images per transaction (ExportStore.batch); several values: a row each")
    args = parser.parse_args()
    print("| backend | images | sources / image | ms per image | rows / s |\n|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as workdir:
        for backend in args.backend:
            for batch in args.batch:
                settings = settings_for(backend, Path(workdir))
                try:
                    seconds, rows = bench(settings, args.images, args.sources, batch)
                finally:
                    drop_database(settings)
                label = backend if batch == 1 else f"{backend}, batch {batch}"
                print(f"| {label} | {args.images} | {args.sources} | {1000 * seconds / args.images:.1f} | "
                      f"{rows / seconds:,.0f} |", flush=True)


if __name__ == "__main__":
    main()
