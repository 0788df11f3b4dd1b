"""Time the source extractor (prepare_image + extract_sources) on one simulated 2048x2048 image.

    OMP_NUM_THREADS=1 OPENBLAS_NUM_THREADS=1 taskset -c 1 \\
        python benchmarks/extraction_speed.py [--deblend 32] [--profile]

The image (~1000 point sources, correlated noise) is simulated once into --workdir. Prints the
median of --runs timed runs after a warm-up (CPU time of this process), split into background
(prepare) and extraction.
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import statistics
import time
from pathlib import Path

from trap_dask.extraction.extract import extract_sources, prepare_image
from trap_dask.extraction.params import ExtractionParams
from trap_dask.image import read_image, read_meta
from trap_dask.simulate import SurveySpec, simulate_survey

SPEC = SurveySpec(n_epochs=1, shape=(2048, 2048), n_steady=950, n_variable=30, n_transient=0, n_pairs=5, seed=1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", default="/tmp/trapdask-extraction-bench", help="where the image is cached")
    parser.add_argument("--deblend", type=int, default=0, help="deblend_nthresh (default: 0)")
    parser.add_argument("--runs", type=int, default=5, help="timed runs (default: 5)")
    parser.add_argument("--profile", action="store_true", help="also print the top of a cProfile of one run")
    args = parser.parse_args()

    image = Path(args.workdir) / "epoch000_band0.fits"
    if not image.exists():
        simulate_survey(args.workdir, SPEC)
    meta = read_meta(image)
    data, wcs = read_image(meta)
    params = ExtractionParams(deblend_nthresh=args.deblend)

    def once() -> tuple[float, float, int]:
        t0 = time.process_time()
        prepared = prepare_image(data, wcs, meta.beam, params)
        t1 = time.process_time()
        n = len(extract_sources(prepared, params))
        return t1 - t0, time.process_time() - t1, n

    once()
    runs = [once() for _ in range(args.runs)]
    prepare = statistics.median(r[0] for r in runs)
    extract = statistics.median(r[1] for r in runs)
    print(f"{runs[0][2]} sources, deblend_nthresh={args.deblend}: prepare {1000 * prepare:.0f} ms, "
          f"extract {1000 * extract:.0f} ms, total {1000 * (prepare + extract):.0f} ms CPU (median of {args.runs})")
    if args.profile:
        profile = cProfile.Profile()
        profile.runcall(once)
        pstats.Stats(profile).sort_stats("tottime").print_stats(15)


if __name__ == "__main__":
    main()
