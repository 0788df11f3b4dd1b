"""Extract sources with PySE (radio-pyse 0.7.1) from FITS images; run inside the PySE venv.

Usage: python run_pyse.py OUT.json IMAGE [IMAGE ...] [--detection 8] [--analysis 3]
       [--back-size 50] [--vectorized]

Writes one JSON record per image: ``path``, ``seconds`` (wall time of reading the file and
extracting, s) and ``sources``, columns ``ra``, ``dec`` (deg), ``ra_err``, ``dec_err`` (deg),
``peak``, ``peak_err`` (Jy/beam), ``flux``, ``flux_err`` (Jy), ``smaj_asec``, ``smin_asec``
(arcsec), ``theta_celes`` (deg). This file imports only PySE, numpy and the standard library, so
it never needs trap-dask in the venv.
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
from sourcefinder import accessors
from sourcefinder.config import Conf, ExportSettings, ImgConf

COLUMNS = ("ra", "dec", "ra_err", "dec_err", "peak", "peak_err", "flux", "flux_err",
           "smaj_asec", "smin_asec", "theta_celes")


def extract(path: str, conf: Conf) -> dict:
    """PySE's blind extraction of one image: its sources (columns above) and the time it took."""
    start = time.perf_counter()
    image = accessors.sourcefinder_image_from_accessor(accessors.open(path), conf=conf)
    found = image.extract()
    seconds = time.perf_counter() - start
    if hasattr(found, "columns"):  # the vectorised path returns a named DataFrame
        columns = {c: np.asarray(found[c], dtype=float) for c in COLUMNS}
    else:  # Gaussian fits: Detection objects, serialised in the order of conf.export.source_params
        rows = np.array([d.serialize(conf, every_parm=True) for d in found], dtype=float)
        rows = rows.reshape(-1, len(conf.export.source_params))
        columns = {c: rows[:, conf.export.source_params.index(c)] for c in COLUMNS}
    sources = {c: v.tolist() for c, v in columns.items()}
    return dict(path=path, seconds=seconds, sources=sources)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out")
    parser.add_argument("images", nargs="+")
    parser.add_argument("--detection", type=float, default=8.0, help="detection threshold, x rms")
    parser.add_argument("--analysis", type=float, default=3.0, help="analysis threshold, x rms")
    parser.add_argument("--back-size", type=int, default=50, help="background box size, pixels")
    parser.add_argument("--vectorized", action="store_true",
                        help="PySE's vectorised moments instead of its Gaussian fits")
    args = parser.parse_args()
    conf = Conf(
        image=ImgConf(detection_thr=args.detection, analysis_thr=args.analysis,
                      back_size_x=args.back_size, back_size_y=args.back_size,
                      vectorized=args.vectorized),
        export=ExportSettings(pandas_df=False),
    )
    records = [extract(path, conf) for path in args.images]
    with open(args.out, "w") as fh:
        json.dump(records, fh)


if __name__ == "__main__":
    main()
