"""The per-image work that Dask workers run: scan headers, load + quality-check, extract, force-fit.

Each function is a plain function of picklable arguments; what they return to others is a
message of ``trap_dask.messages`` (this module imports nothing of the writer). A
:class:`LoadedImage` stays in the memory of the worker that made it (it is a Dask future on the
client) until the writer has asked for that image's forced fits, so pixels are read once and
never shipped anywhere. Each stage is timed (``seconds`` of the messages) for ``trap-dask bench``.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Mapping
from dataclasses import dataclass, replace

import numpy as np

from trap_dask.checksums import XXH3, bytes_checksum, file_checksum
from trap_dask.extraction.extract import (
    PreparedImage,
    extraction_outline,
    extraction_radius_deg,
    noise_range,
    prepare_image,
)
from trap_dask.extraction.extract import extract as extract_image
from trap_dask.extraction.forced import fit_beside_detections, fit_pairs, forced_fit
from trap_dask.extraction.params import ExtractionParams
from trap_dask.image import Beam, ImageError, ImageMeta, one_line, read_image, read_meta
from trap_dask.messages import (
    FileStamp,
    ForcedMeasurements,
    ForcedRequest,
    ImageResult,
    ScanFailure,
    ScannedImage,
)
from trap_dask.quality import ImageStats, QualityParams, beam_problem, check_quality
from trap_dask.sources import empty_sources

log = logging.getLogger(__name__)


@dataclass
class LoadedImage:
    """An image held on a worker between extraction and forced fits."""

    result: ImageResult
    prepared: PreparedImage | None  #: None for a rejected image

    @property
    def nbytes(self) -> int:
        """Bytes of its maps: what Dask weighs when it places the tasks that take it (so that they run
        where it is held rather than move the pixels)."""
        arrays = vars(self.prepared).values() if self.prepared is not None else ()
        return self.result.sources.nbytes + sum(a.nbytes for a in arrays if isinstance(a, np.ndarray))


def _register_sizeof() -> None:
    try:
        from dask.sizeof import sizeof
    except ImportError:  # the functions run without Dask too
        return
    sizeof.register(LoadedImage)(lambda image: image.nbytes)


_register_sizeof()


def scan(path: str, checksum: str | None = None, beam: Beam | None = None,
         freq: tuple[float, float] | None = None,
         stored: Mapping[str, tuple[int, int, str]] | None = None) -> ScannedImage | ScanFailure:
    """Read one file's header (and checksum it now, of the kind ``checksum`` names, see
    trap_dask.checksums; None: when it is loaded); a bad file gives a ScanFailure, never an exception.

    ``stored``: (size, mtime_ns, checksum) of files a database holds, by path: a file at one of
    those paths with that size and modification time has that checksum without being read.
    """
    kind = checksum or XXH3
    try:
        meta = read_meta(path, beam=beam, freq=freq)
        if checksum is None:
            return ScannedImage(meta, None)
        return ScannedImage(meta, _stored_checksum(meta.url, stored or {}) or file_checksum(meta.url, checksum))
    except ImageError as exc:
        return ScanFailure(url=path, reason=str(exc), checksum=_checksum_or_none(path, kind))
    except OSError as exc:
        return ScanFailure(url=path, reason=f"cannot read the file: {exc.strerror or exc}", checksum=None)
    except Exception as exc:  # noqa: BLE001 - a header astropy chokes on: one bad file never stops a run
        return ScanFailure(url=path, reason=f"unreadable header: {one_line(exc)}",
                           checksum=_checksum_or_none(path, kind))


def _checksum_or_none(path: str, kind: str) -> str | None:
    """The file's checksum, None if it cannot be read (a rejected file is recognised by it on append)."""
    try:
        return file_checksum(path, kind)
    except OSError:
        return None


def _stored_checksum(url: str, stored: Mapping[str, tuple[int, int, str]]) -> str | None:
    """The checksum recorded for the file at ``url`` if it has the size and modification time
    recorded with it, else None."""
    known = stored.get(url)
    if known is None:
        return None
    try:
        stamp = FileStamp.of(os.stat(url))
    except OSError:
        return None
    return known[2] if stamp == known[:2] else None


#: A file modified less than this long before it is read gets no stamp (ns): a write in the same tick
#: of a coarse clock (FAT's 2 s, NFS, older kernels' few ms) would leave its stamp unchanged over other
#: bytes; without one it is checksummed on the next append, as git does with "racily clean" files.
FRESH_NS = 2_000_000_000


def read_file(path: str) -> tuple[np.ndarray, FileStamp | None]:
    """A file's bytes (uint8), in a buffer that :func:`read_image` may turn into the pixels in place,
    and its stamp when it was opened (None for a file modified within FRESH_NS of that)."""
    with open(path, "rb") as fh:
        status = os.fstat(fh.fileno())
        raw = np.empty(status.st_size, dtype=np.uint8)
        size = fh.readinto(memoryview(raw))
    settled = time.time_ns() - status.st_mtime_ns >= FRESH_NS
    return raw[:size], FileStamp.of(status) if settled else None  # raw: shorter when the file shrank meanwhile


def load(image: ScannedImage, quality: QualityParams, params: ExtractionParams) -> LoadedImage:
    """Read the pixels (the file is read once, for its checksum too), check quality, prepare maps."""
    meta, clock = image.meta, _Clock()
    try:
        raw, stamp = read_file(meta.url)
    except OSError as exc:  # no checksum: a later --db_append retries the file once it can be read
        return _rejected(meta, None, None, f"cannot read the file: {exc.strerror or exc}", clock)
    checksum = image.checksum or bytes_checksum(raw)
    try:
        data, wcs = read_image(meta, raw)  # the pixels of ``raw`` become ``data``
    except ImageError as exc:
        return _rejected(meta, checksum, None, str(exc), clock, stamp)
    del raw
    clock.lap("read")
    stats, reason = check_quality(data, quality)
    reason = reason or beam_problem(meta.beam.smaj, meta.beam.smin, meta.pixel_scale, meta.shape)
    clock.lap("quality")
    if reason is not None:
        return _rejected(meta, checksum, stats, reason, clock, stamp)
    prepared = prepare_image(data, wcs, meta.beam, params, overwrite=True)  # data: ours alone
    rms_min, rms_max = noise_range(prepared, params)
    stats = replace(stats, rms_min=rms_min, rms_max=rms_max)
    clock.lap("background")
    result = ImageResult(meta, checksum, stats, None, extraction_radius_deg(prepared, params), empty_sources(),
                         seconds=clock.seconds, stamp=stamp, outline=extraction_outline(prepared, params))
    return LoadedImage(result, prepared)


class _Clock:
    """Seconds per stage (perf_counter laps), for the messages' ``seconds``."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self.last = time.perf_counter()

    def lap(self, stage: str) -> None:
        now = time.perf_counter()
        self.seconds[stage] = self.seconds.get(stage, 0.0) + now - self.last
        self.last = now


def _rejected(meta: ImageMeta, checksum: str | None, stats: ImageStats | None, reason: str,
              clock: _Clock | None = None, stamp: FileStamp | None = None) -> LoadedImage:
    if clock is not None:
        clock.lap("read")
    seconds = clock.seconds if clock is not None else {}
    return LoadedImage(ImageResult(meta, checksum, stats, reason, 0.0, empty_sources(), seconds=seconds, stamp=stamp),
                       None)


def extract(image: LoadedImage, params: ExtractionParams) -> ImageResult:
    """Blind source extraction; returns the small result the writer associates."""
    if image.prepared is None:
        return replace(image.result, done_at=time.time())
    started = time.perf_counter()
    found = extract_image(image.prepared, params)
    seconds = image.result.seconds | {"extract": time.perf_counter() - started}
    url, n = image.result.meta.url, len(found.artefacts)
    if n:
        x, y, snr = found.artefacts[found.artefacts[:, 2].argmax()]
        log.info("%s: %d %s left out as pixel artefacts (too few pixels for their peak to be seen through "
                 "the beam: hot pixels, glitches), the brightest of S/N %.0f at pixel (%d, %d)",
                 url, n, "island" if n == 1 else "islands", snr, x, y)
    if found.kept_too_small:
        beam = image.result.meta.beam
        log.warning("%s: its islands hold too few pixels for the header's beam (%.1f\" x %.1f\" FWHM) to have "
                    "seen them, as a whole and not a few glitches: the beam looks wider than the image's "
                    "resolution (check BMAJ/BMIN); %d islands that would be taken for pixel artefacts are "
                    "measured as sources", url, 7200 * beam.smaj, 7200 * beam.smin, found.kept_too_small)
    return replace(image.result, sources=found.sources, seconds=seconds, n_artefacts=n,
                   done_at=time.time())


def process(image: ScannedImage, quality: QualityParams, params: ExtractionParams) -> LoadedImage:
    """load and extract in one task, so that the pixels never move between workers.

    An image that breaks the extractor becomes a rejected image with the reason, so one bad
    image never stops a run.
    """
    loaded, cpu = None, time.thread_time()
    try:
        loaded = load(image, quality, params)
        result, prepared = extract(loaded, params), loaded.prepared
    except Exception as exc:  # noqa: BLE001 - recorded, with its reason, in the images table
        read = loaded.result if loaded is not None else None
        result = _rejected(image.meta, read.checksum if read else image.checksum, None,
                           f"processing failed: {one_line(exc)}", stamp=read.stamp if read else None).result
        prepared = None
        result = replace(result, done_at=time.time())
    return LoadedImage(replace(result, cpu=time.thread_time() - cpu), prepared)


def force(image: LoadedImage, request: ForcedRequest, params: ExtractionParams) -> ForcedMeasurements:
    """Forced fits with the beam's shape or a resolved source's (NaN fluxes where not measurable)
    and the pair fits (where those fail, the writer keeps the detection and the forced fit as they are)."""
    started, cpu = time.perf_counter(), time.thread_time()
    single = forced_fit(image.prepared, request.ra, request.dec, params, request.shape)
    try:
        pairs, ok = fit_pairs(image.prepared, request.pair_ra, request.pair_dec, params)
    except (np.linalg.LinAlgError, ValueError, FloatingPointError) as exc:
        log.warning("%s: pair fits failed (%s); measured one by one", image.result.meta.url, exc)
        measured = ForcedMeasurements(single)
    else:
        measured = ForcedMeasurements(single, pairs, ok)
    return replace(measured, seconds={"forced fits": time.perf_counter() - started}, cpu=time.thread_time() - cpu)


def backfill(previous: LoadedImage | None, request: ForcedRequest, params: ExtractionParams,
             quality: QualityParams) -> np.ndarray | None:
    """Forced fits of the new sources in the band's previous image (run where it is held), one beside
    a detection of that image fitted together with it (:func:`fit_beside_detections`); with
    ``previous`` None or another image, the image is read and extracted again from
    ``request.backfill_url`` (a run resumed with --db_append measures as one run did).
    None when that image cannot be measured any more (moved, unreadable, now rejected, a fit failed)."""
    try:
        if previous is not None and previous.result.meta.url != request.backfill_url:
            previous = None  # the route's guess of the band's previous image was not the writer's
        if previous is None:  # read and extracted again: its detections as when it was processed
            scanned = scan(request.backfill_url)
            if not isinstance(scanned, ScannedImage):
                log.warning("%s: new sources not measured in it (%s)", request.backfill_url, scanned.reason)
                return None
            previous = process(scanned, quality, params)
        if previous.prepared is None:
            log.warning("%s: new sources not measured in it (%s)", request.backfill_url, previous.result.rejection)
            return None
        return fit_beside_detections(previous.prepared, request.backfill_ra, request.backfill_dec,
                                     previous.result.sources, params, request.backfill_shape)
    except Exception as exc:  # noqa: BLE001 - a missing point before a new source never stops a run
        log.warning("%s: new sources not measured in it (%s: %s)", request.backfill_url, type(exc).__name__, exc)
        return None
