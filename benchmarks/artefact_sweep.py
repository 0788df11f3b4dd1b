"""Pixel artefacts (``trap_dask.extraction.artefacts``): what the cut removes, over beams and thresholds.

    python benchmarks/artefact_sweep.py [--seeds 3] [--workdir DIR]

1. Extraction. For each beam (FWHM 2.5 x 2 to 12 x 8 pixels) and detection threshold (4, 5, 8;
   analysis threshold 3), a simulated field (steady, variable, resolved sources and close pairs)
   is extracted as the workers do: every island the cut takes for an artefact in it is a real
   detection (or a noise peak, which is also seen through the beam) lost. Then one-pixel glitches,
   2 x 2 blocks and 3-pixel streaks of S/N 6 to 500 are added at least 5 beams from every source,
   and the glitches detected are counted with the cut and without it (``--no-drop_pixel_artefacts``).
2. The pipeline. A 12-epoch survey whose epochs 4, 7 and 10 hold glitches, run with and without
   the cut: its new sources, light curves and detections.
3. A wrong header beam. 150 faint sources (S/N 1-3 times the detection threshold) under a header
   beam 2 to 5 times wider than the image's: the true sources each cut (0.1, 0.07, and
   ``MIN_BEAM_FILL``, the default) takes for artefacts; an image whose median island holds under
   0.3 of a point source's pixels keeps them all (``artefacts.beam_suspect``).

Prints Markdown tables (benchmarks/RESULTS.md, issue 15 round 13).
"""

from __future__ import annotations

import argparse
import glob
import tempfile
from dataclasses import replace
from pathlib import Path

import numpy as np
from astropy.io import fits
from results_table import markdown_table

from trap_dask.image import Beam

BEAMS_PX = ((2.5, 2.0), (4.0, 3.0), (6.0, 4.0), (12.0, 8.0))  #: FWHM major x minor, pixels
DETECTION = (4.0, 5.0, 8.0)
GLITCH_SNR = (6.0, 10.0, 20.0, 50.0, 500.0)
#: (dy, dx) offsets of each glitch's pixels
GLITCHES = {"1 pixel": [(0, 0)], "2 x 2": [(0, 0), (0, 1), (1, 0), (1, 1)], "3-pixel streak": [(0, -1), (0, 0), (0, 1)]}
PIXEL = 5.0 / 3600.0  # deg
RMS = 1e-3  # Jy/beam


def _spec(beam_px: tuple[float, float], seed: int, n_epochs: int = 2, shape=(512, 512)):
    from trap_dask.simulate import SurveySpec

    beam = Beam(smaj=beam_px[0] * PIXEL / 2, smin=beam_px[1] * PIXEL / 2, pa=30.0)
    scale = max(beam_px[0] / 6.0, 1.0)  # fewer sources where the beam is large, so they stay apart
    return SurveySpec(n_epochs=n_epochs, shape=shape, pixel_scale=PIXEL, beam=beam, rms=RMS, seed=seed,
                      n_steady=int(120 / scale**2), n_variable=int(10 / scale**2), n_transient=0,
                      n_resolved=int(10 / scale**2), n_pairs=int(10 / scale**2))


def _params(detection: float, analysis: float = 3.0):
    from trap_dask.config import build_config
    from trap_dask.pipeline import extraction_params, quality_params

    config = build_config({"input_images": ("x",), "detection_threshold": detection,
                           "analysis_threshold": analysis}, {}, None)
    return extraction_params(config), quality_params(config)


def _extract(path: str, detection: float, cut: bool, analysis: float = 3.0):
    """(sources, artefacts) of one file, with the cut or without it."""
    from trap_dask import tasks
    from trap_dask.extraction.extract import extract

    params, quality = _params(detection, analysis)
    params = replace(params, drop_pixel_artefacts=cut)
    found = extract(tasks.load(tasks.scan(path), quality, params).prepared, params)
    return found.sources, found.artefacts


def _glitch_sites(truth_x: np.ndarray, truth_y: np.ndarray, shape, beam_px: float, n: int,
                  rng: np.random.Generator) -> list[tuple[int, int]]:
    """``n`` pixels at least 5 beams from every source and 20 pixels from the edges."""
    sites: list[tuple[int, int]] = []
    while len(sites) < n:
        y, x = (int(v) for v in rng.integers(20, np.array(shape) - 20))
        far = np.hypot(truth_x - x, truth_y - y).min(initial=np.inf) > 5 * beam_px
        if far and all(np.hypot(x - a, y - b) > 5 * beam_px for b, a in sites):
            sites.append((y, x))
    return sites


def _add_glitches(path: str, out: str, sites, kind: str, snrs) -> None:
    with fits.open(path) as hdul:
        data, header = hdul[0].data.astype(np.float32), hdul[0].header
    plane = data.reshape(data.shape[-2:])
    for (y, x), snr in zip(sites, snrs):
        for dy, dx in GLITCHES[kind]:
            plane[y + dy, x + dx] += snr * RMS
    fits.writeto(out, data, header, overwrite=True)


def _truth_pixels(path: str, survey: Path):
    """Pixel positions of every true source (the image's WCS)."""
    from astropy.wcs import WCS

    from trap_dask.simulate import TRUTH_NAME, load_truth

    truth = load_truth(survey / TRUTH_NAME)
    with fits.open(path) as hdul:
        wcs = WCS(hdul[0].header).celestial
    x, y = wcs.all_world2pix(truth["sources"]["ra"], truth["sources"]["dec"], 0)
    return x, y


def extraction_sweep(workdir: Path, seeds: int) -> str:
    from trap_dask.simulate import simulate_survey

    rows, rng = [], np.random.default_rng(1)
    for beam_px in BEAMS_PX:
        for seed in range(seeds):
            survey = workdir / f"beam{beam_px[0]:g}x{beam_px[1]:g}-s{seed}"
            if not survey.exists():
                simulate_survey(survey, _spec(beam_px, seed))
            clean = sorted(glob.glob(str(survey / "*.fits")))[-1]
            tx, ty = _truth_pixels(clean, survey)
            sites = _glitch_sites(tx, ty, (512, 512), beam_px[0], len(GLITCH_SNR) * len(GLITCHES), rng)
            for detection in DETECTION:
                sources, lost = _extract(clean, detection, cut=True)
                row = [f"{beam_px[0]:g} x {beam_px[1]:g}", seed, f"{detection:g}", len(sources), len(lost),
                       sum(snr > detection for snr in GLITCH_SNR)]
                for k, kind in enumerate(GLITCHES):
                    chosen = sites[k * len(GLITCH_SNR):(k + 1) * len(GLITCH_SNR)]
                    glitched = str(workdir / "glitched.fits")
                    _add_glitches(clean, glitched, chosen, kind, GLITCH_SNR)
                    counts = []
                    for cut in (False, True):
                        found, _ = _extract(glitched, detection, cut)
                        counts.append(sum(bool(len(found)) and np.hypot(found["x"] - x, found["y"] - y).min() < 2.5
                                          for y, x in chosen))
                    row.append(f"{counts[0]} -> {counts[1]}")
                rows.append(row)
    return markdown_table(["beam FWHM, pixels", "seed", "detection threshold", "detections (clean field)",
                           "islands cut in the clean field", "glitches of each kind above the threshold",
                           *(f"{kind}s detected, without -> with the cut" for kind in GLITCHES)], rows)


def pipeline_check(workdir: Path) -> str:
    """A 12-epoch survey with glitches in three epochs, run with and without the cut."""
    import sqlite3

    from trap_dask.config import build_config
    from trap_dask.pipeline import run_pipeline
    from trap_dask.simulate import simulate_survey

    survey = workdir / "pipeline"
    if not survey.exists():
        simulate_survey(survey, _spec((6.0, 4.0), 7, n_epochs=12, shape=(1024, 1024)))
    files = sorted(glob.glob(str(survey / "*.fits")))
    glitched = workdir / "pipeline-glitched"
    glitched.mkdir(exist_ok=True)
    tx, ty = _truth_pixels(files[0], survey)
    rng = np.random.default_rng(2)
    for i, path in enumerate(files):
        out = str(glitched / Path(path).name)
        if i in (4, 7, 10):
            _add_glitches(path, out, _glitch_sites(tx, ty, (1024, 1024), 6.0, 5, rng), "1 pixel",
                          (8.0, 15.0, 40.0, 150.0, 1000.0))
        else:
            _add_glitches(path, out, [], "1 pixel", ())
    rows = []
    for label, inputs in (("clean", survey), ("glitches in 3 epochs", glitched)):
        for cut in (False, True):
            db = workdir / f"run-{label[:5]}-{cut}.db"
            config = build_config({"input_images": (str(inputs),), "db_name": str(db), "db_overwrite": True,
                                   "nr_threads": 2, "drop_pixel_artefacts": cut}, {}, None)
            summary = run_pipeline(config)
            with sqlite3.connect(db) as conn:
                new = conn.execute("SELECT count(*) FROM newsource").fetchone()[0]
            rows.append([label, "with" if cut else "without", summary.n_sources, summary.n_light_curves, new,
                         summary.n_artefacts])
    return markdown_table(["survey (12 x 1024^2)", "cut", "detections", "light curves", "new sources",
                           "pixel artefacts left out"], rows)


def wrong_beam_check(workdir: Path) -> str:
    """Faint sources (S/N 1-3 times the detection threshold) under a header beam wider than the
    image's resolution by a factor: how many each cut (``MIN_BEAM_FILL``) takes for artefacts."""
    from trap_dask.extraction import artefacts
    from trap_dask.simulate import simulate_survey

    rows, fills = [], (0.1, 0.07, artefacts.MIN_BEAM_FILL)
    for detection, analysis in ((8.0, 3.0), (5.0, 3.0), (4.0, 3.0), (3.0, 2.0)):
        survey = workdir / f"faint-{detection:g}"
        if not survey.exists():
            spec = replace(_spec((6.0, 4.0), 11), n_epochs=1, n_steady=150, n_variable=0, n_resolved=0, n_pairs=0,
                           flux_range=(detection, 3 * detection))
            simulate_survey(survey, spec)
        path = sorted(glob.glob(str(survey / "*.fits")))[0]
        tx, ty = _truth_pixels(path, survey)
        for factor in (2.0, 2.5, 3.0, 4.0, 5.0):
            wider = str(workdir / "wider.fits")
            with fits.open(path) as hdul:
                header = hdul[0].header
                header["BMAJ"], header["BMIN"] = header["BMAJ"] * factor, header["BMIN"] * factor
                fits.writeto(wider, hdul[0].data, header, overwrite=True)
            lost, saved = [], artefacts.MIN_BEAM_FILL
            try:
                for fill in fills:
                    artefacts.MIN_BEAM_FILL = fill
                    _, cut = _extract(wider, detection, True, analysis)
                    lost.append(int(sum(len(cut) and np.hypot(cut[:, 0] - x, cut[:, 1] - y).min() < 3
                                        for x, y in zip(tx, ty))))
            finally:
                artefacts.MIN_BEAM_FILL = saved
            rows.append([f"{factor:g}x", f"{detection:g} / {analysis:g}", len(tx), *lost])
    return markdown_table(["header beam / true", "detection / analysis threshold", "sources",
                           *(f"cut at {fill:g}" for fill in fills)], rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=3, help="fields per beam (default: %(default)s)")
    parser.add_argument("--workdir", help="keep the simulated fields here (default: a temporary directory)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as scratch:
        workdir = Path(args.workdir or scratch)
        workdir.mkdir(parents=True, exist_ok=True)
        print(extraction_sweep(workdir, args.seeds), "\n")
        print(pipeline_check(workdir), "\n")
        print(wrong_beam_check(workdir))


if __name__ == "__main__":
    main()
