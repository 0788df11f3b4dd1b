"""Pair fits (``fit_blends``) against injected truth: pulls of both members of close pairs.

For each separation (beam FWHM), images of 144 pairs each (first member 20-80 sigma, second
10-40 sigma, random orientation, beam-correlated noise) are fitted by
:func:`trap_dask.extraction.fit_pairs` from starts moved 0.3 beam per coordinate off the true
positions (independent jitter); the second member is also measured by TraP's single forced fit
at its start. Prints, per separation: usable fits, median and robust std of the flux pulls of
both members, the fraction of pulls beyond 5, the single forced fits' pulls, and the time.
Then the blind extractor on pairs 0.9-1.5 beams apart (deblended into two components): flux
ratio and pulls with the two components refitted together (the default) and fitted one at a
time on their own pixels. Last, the blind extractor on pairs 0.6-2 beams apart with and without
the hidden pairs' fits (``blends.hidden_pairs``): the pairs whose members are both found within
0.3 beam of their true positions, and the flux pulls of each member found.

    python benchmarks/pair_fits.py [--images 4] [--jitter 0.3]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import trap_dask.extraction.extract as extract  # noqa: E402
from tests._synth import Shape, correlated_noise, gaussians, make_wcs, match, robust_std  # noqa: E402
from trap_dask.extraction.extract import extract_sources, prepare_image  # noqa: E402
from trap_dask.extraction.forced import fit_pairs, forced_fit  # noqa: E402
from trap_dask.extraction.params import ExtractionParams  # noqa: E402

PIX, BEAM, RMS, N = 5.0, Shape(6.0, 4.0, 30.0), 1e-3, 768


def pairs_image(sep: float, rng: np.random.Generator):
    """A 768x768 image of 144 pairs ``sep`` beam FWHM apart (first member 20-80 sigma, second
    10-40), with its WCS and the true pixel positions (144, 2) and peaks (Jy/beam)."""
    wcs = make_wcs(N, N, 30.0, 45.0, PIX)
    g = np.arange(40.0, N - 40, 60.0)
    cx, cy = (a.ravel() for a in np.meshgrid(g, g))
    angle = rng.uniform(0, np.pi, len(cx))
    half = 0.5 * sep * BEAM.fwhm_major * np.stack([np.cos(angle), np.sin(angle)], 1)
    x, y = np.stack([cx - half[:, 0], cx + half[:, 0]], 1), np.stack([cy - half[:, 1], cy + half[:, 1]], 1)
    peak = np.stack([rng.uniform(20, 80, len(cx)), rng.uniform(10, 40, len(cx))], 1) * RMS
    data = correlated_noise((N, N), BEAM, RMS, rng) + gaussians((N, N), x.ravel(), y.ravel(), peak.ravel(), BEAM.cov())
    return prepare_image(data.astype(np.float32), wcs, BEAM.beam(PIX), ExtractionParams()), wcs, x, y, peak


def measure(sep: float, jitter: float, n_images: int, rng: np.random.Generator) -> str:
    """One table row: pair fits of ``n_images`` images of pairs ``sep`` beam FWHM apart."""
    params = ExtractionParams()
    pulls: list[list[np.ndarray]] = [[], [], []]
    usable, total, seconds = 0, 0, 0.0
    for _ in range(n_images):
        image, wcs, x, y, peak = pairs_image(sep, rng)
        off = jitter * BEAM.fwhm_major
        ra, dec = wcs.pixel_to_world_values((x + rng.normal(0, off, x.shape)).ravel(),
                                            (y + rng.normal(0, off, y.shape)).ravel())
        ra, dec = ra.reshape(-1, 2), dec.reshape(-1, 2)
        started = time.perf_counter()
        rows, ok = fit_pairs(image, ra, dec, params)
        seconds += time.perf_counter() - started
        usable, total = usable + ok.sum(), total + len(ok)
        for k in (0, 1):
            pulls[k].append(((rows["int_flux"][:, k] - peak[:, k]) / rows["int_flux_err"][:, k])[ok])
        single = forced_fit(image, ra[:, 1], dec[:, 1], params)
        pulls[2].append((single["int_flux"] - peak[:, 1]) / single["int_flux_err"])
    a, b, s = (np.concatenate(p) for p in pulls)
    return (f"| {sep:g} | {usable}/{total} | {np.median(a):+.2f}, {robust_std(a):.2f} | "
            f"{np.median(b):+.2f}, {robust_std(b):.2f} | {np.mean(np.abs(np.r_[a, b]) > 5):.1%} | "
            f"{np.median(s):+.1f}, {robust_std(s):.1f} | {1e3 * seconds / n_images:.0f} |")


def siblings(sep: float, n_images: int, rng: np.random.Generator) -> str:
    """One table row: blind extraction of pairs ``sep`` beams apart, refitted together or not."""
    images = [pairs_image(sep, rng) for _ in range(n_images)]
    cells, found = [], []
    for limit in (extract.SIBLING_MAX_EXTENT, 0.0):
        ratio, pull = [], []
        saved, extract.SIBLING_MAX_EXTENT = extract.SIBLING_MAX_EXTENT, limit
        try:
            for image, _, x, y, peak in images:
                s = extract_sources(image, ExtractionParams())
                m = match(x.ravel(), y.ravel(), s["x"], s["y"], 2.0)
                ok = m >= 0
                if limit:
                    found.append(ok)
                ratio.append(s["int_flux"][m[ok]] / peak.ravel()[ok])
                pull.append((s["int_flux"][m[ok]] - peak.ravel()[ok]) / s["int_flux_err"][m[ok]])
        finally:
            extract.SIBLING_MAX_EXTENT = saved
        r, p = np.concatenate(ratio), np.concatenate(pull)
        cells.append(f"{np.median(r):.3f} | {np.median(p):+.2f}, {robust_std(p):.2f}")
    return f"| {sep:g} | {np.mean(np.concatenate(found)):.1%} | " + " | ".join(cells) + " |"


def hidden(sep: float, n_images: int, rng: np.random.Generator) -> str:
    """One table row: blind extraction of pairs ``sep`` beams apart, with the hidden pairs' fits
    (the default) and without (an island the deblender leaves whole measured as one Gaussian)."""
    import trap_dask.extraction.blends as blends

    images = [pairs_image(sep, rng) for _ in range(n_images)]
    cells = []
    for extent in (blends.HIDDEN_MIN_EXTENT, np.inf):
        both, pulls = [], ([], [])
        saved, blends.HIDDEN_MIN_EXTENT = blends.HIDDEN_MIN_EXTENT, extent
        try:
            for image, _, x, y, peak in images:
                s = extract_sources(image, ExtractionParams())
                m = match(x.ravel(), y.ravel(), s["x"], s["y"], 0.3 * BEAM.fwhm_major).reshape(-1, 2)
                both.append((m >= 0).all(1))
                for k in (0, 1):
                    ok = m[:, k] >= 0
                    pulls[k].append((s["int_flux"][m[ok, k]] - peak[ok, k]) / s["int_flux_err"][m[ok, k]])
        finally:
            blends.HIDDEN_MIN_EXTENT = saved
        a, b = (np.concatenate(p) for p in pulls)
        cells.append(f"{np.mean(np.concatenate(both)):.0%} | {np.median(a):+.2f}, {robust_std(a):.2f} | "
                     f"{np.median(b):+.2f}, {robust_std(b):.2f}")
    return f"| {sep:g} | " + " | ".join(cells) + " |"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=4, help="images per separation")
    parser.add_argument("--jitter", type=float, default=0.3, help="rms start offset per coordinate, beam FWHM")
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()
    rng = np.random.default_rng(args.seed)
    print("| separation (beam) | usable | pulls member 1: median, robust std | member 2 | |pull| > 5 | "
          "single forced fit of member 2: median, robust std | ms per 144 pairs |")
    print("|---|---|---|---|---|---|---|")
    for sep in (0.3, 0.5, 0.7, 1.0, 1.5):
        print(measure(sep, args.jitter, args.images, rng))
    print("\n| separation (beam) | found | flux ratio, together | pulls: median, robust std | "
          "flux ratio, one at a time | pulls |")
    print("|---|---|---|---|---|---|")
    for sep in (0.9, 1.0, 1.2, 1.5):
        print(siblings(sep, args.images, rng))
    print("\n| separation (beam) | both found | pulls member 1: median, robust std | member 2 | "
          "without hidden pairs: both found | member 1 | member 2 |")
    print("|---|---|---|---|---|---|---|")
    for sep in (0.6, 0.8, 1.0, 1.2, 1.5, 2.0):
        print(hidden(sep, args.images, rng))


if __name__ == "__main__":
    main()
