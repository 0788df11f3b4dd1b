"""The messages of one run: small picklable records exchanged by the workers, the client and the writer.

Workers (``tasks.py``) and the writer (``writer.py``) both import this module and neither imports
the other. The route of one image through them is in ``route.py``::

    scan (worker)      path            -> ScannedImage | ScanFailure
    process (worker)   ScannedImage    -> LoadedImage, held on that worker; its ImageResult (no pixels)
    associate (writer) ImageResult     -> ForcedRequest, or the CommitSummary of a rejected image
    force (worker)     ForcedRequest   -> ForcedMeasurements      (where the image is held)
    backfill (worker)  ForcedRequest   -> new sources in the band's previous image
    commit (writer)    ForcedMeasurements -> CommitSummary

Nothing here holds pixels: the largest field is one image's table of detections.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, NamedTuple

import numpy as np

from trap_dask.sources import SOURCE_DTYPE

if TYPE_CHECKING:  # annotations only: this module stays free of astropy and the extractor
    from trap_dask.image import ImageMeta
    from trap_dask.quality import ImageStats

#: Worker stages timed in ImageResult.seconds and ForcedMeasurements.seconds (perf_counter, s).
WORKER_STAGES = ("read", "quality", "background", "extract", "forced fits", "backfill")


#: Fewest confident matches for an image's astrometry to be measured (trap_dask.astrometry).
MIN_MATCHES = 5


@dataclass(frozen=True)
class Astrometry:
    """One image's positions against the running catalogue (arcsec on the sky; NaN: unmeasured),
    as trap_dask.astrometry measures them: here, since a CommitSummary carries it to workers that
    need not import the association.

    ``offset_*``: median of detection minus catalogue position, east and north at the image's centre
    (each offset turned there from its own east and north; east positive).
    ``scatter_*``: robust standard deviation of those offsets about the median, with the
    detections' own fit errors taken out in quadrature.
    """

    n: int = 0
    offset_ra: float = np.nan
    offset_dec: float = np.nan
    scatter_ra: float = np.nan
    scatter_dec: float = np.nan

    @property
    def measured(self) -> bool:
        return self.n >= MIN_MATCHES


class FileStamp(NamedTuple):
    """A file's size and modification time when it was read. With its path, what recognises a
    file already in the database on an append without reading it again (as rsync and make do)."""

    size: int  #: bytes
    mtime_ns: int  #: modification time, ns since 1970-01-01 UTC

    @classmethod
    def of(cls, status: os.stat_result) -> FileStamp:
        return cls(status.st_size, status.st_mtime_ns)


@dataclass(frozen=True)
class ScannedImage:
    """A file whose header gave everything needed."""

    meta: ImageMeta
    checksum: str | None  #: the file's checksum (trap_dask.checksums); None: computed when it is loaded

    @property
    def url(self) -> str:
        """The file's path, as a ScanFailure's."""
        return self.meta.url


@dataclass(frozen=True)
class ScanFailure:
    """A file whose header could not be used; it becomes a rejected image row."""

    url: str
    reason: str
    checksum: str | None  #: None when the file could not be read at all


@dataclass(frozen=True)
class ImageResult:
    """What the writer needs from a worker for one image (small: no pixels)."""

    meta: ImageMeta
    checksum: str | None
    stats: ImageStats | None
    rejection: str | None
    xtr_radius: float  #: deg
    sources: np.ndarray  #: SOURCE_DTYPE, blind detections
    seconds: dict[str, float] = field(default_factory=dict)  #: worker time per stage (WORKER_STAGES)
    cpu: float = 0.0  #: CPU seconds the worker's thread spent on it (time.thread_time), every stage
    n_artefacts: int = 0  #: islands left out as pixel artefacts (trap_dask.extraction.artefacts)
    done_at: float = 0.0  #: time.time() when the worker finished it (the writer tells from it whether it is behind)
    stamp: FileStamp | None = None  #: the file's when its bytes were read (None: they could not be)
    #: (V, 2) ra, dec (deg) around the extraction region (extract.extraction_outline); None: rejected
    outline: np.ndarray | None = None


@dataclass(frozen=True)
class ForcedRequest:
    """What the worker holding an image measures for the writer (positions in deg)."""

    ra: np.ndarray  #: (n,) forced fits: null detections, then monitors
    dec: np.ndarray
    pair_ra: np.ndarray  #: (k, 2) start positions of pairs fitted together: (detected, null)
    pair_dec: np.ndarray
    backfill_ra: np.ndarray  #: (m,) new sources, to force-fit in the band's previous image
    backfill_dec: np.ndarray
    band: int = 0  #: the image's frequency band
    backfill_image: int = -1  #: im_id of the band's previous image (-1: none)
    backfill_url: str | None = None  #: its file, read again where no worker holds it
    url: str = ""  #: the image's own file (a retried commit is recognised by it)
    #: (n, 3) intrinsic shapes (ee, en, nn covariance, arcsec**2) to force-fit with, aligned with ``ra``
    #: (zeros, or None for all: the beam's; trap_dask.shapes)
    shape: np.ndarray | None = None
    backfill_shape: np.ndarray | None = None  #: (m, 3) the same for the new sources of ``backfill_ra``

    def __len__(self) -> int:
        return len(self.ra) + len(self.pair_ra) + len(self.backfill_ra)


@dataclass(frozen=True)
class ForcedMeasurements:
    """The worker's answer to a :class:`ForcedRequest` (SOURCE_DTYPE rows)."""

    single: np.ndarray  #: (n,) aligned with ``ForcedRequest.ra``
    pairs: np.ndarray = field(default_factory=lambda: np.zeros((0, 2), SOURCE_DTYPE))  #: (k, 2)
    pair_ok: np.ndarray = field(default_factory=lambda: np.zeros(0, bool))  #: (k,) pair fit usable
    backfill: np.ndarray = field(default_factory=lambda: np.zeros(0, SOURCE_DTYPE))  #: (m,) or none
    seconds: dict[str, float] = field(default_factory=dict)  #: worker time per stage (WORKER_STAGES)
    cpu: float = 0.0  #: CPU seconds of the workers' threads on the fits and the backfill (time.thread_time)


@dataclass(frozen=True)
class CommitSummary:
    """What one input added to the database (or why it added nothing)."""

    im_id: int
    rejected: bool
    n_sources: int
    n_forced: int  #: forced fits, including those of new sources in the band's previous image
    n_new: int
    band: int | None = None  #: frequency band of an accepted image
    astrometry: Astrometry | None = None  #: the image's offsets from the catalogue (arcsec)
    sys_err: tuple[float, float] = (np.nan, np.nan)  #: ew/ns systematic error used to associate it (arcsec)
    copy_of: str | None = None  #: not recorded: a file with the contents of this earlier input of the run
    stored: bool = False  #: not recorded: in the database already (committed before a lost writer's answer)
    #: the writer holds images recorded but not yet in the database (staged for its next transaction,
    #: or in the one being written; Writer.flush), this one or earlier ones
    staged: bool = False
    #: the id of the latest image in the database: every image recorded up to it is there
    written_through: int = -1
    dropped: bool = False  #: not recorded: it reached the writer after the run had stopped (Writer.finish)
    rejection: str | None = None  #: why a rejected image was rejected
    n_artefacts: int = 0  #: islands the worker left out as pixel artefacts (ImageResult.n_artefacts)

    @property
    def recorded(self) -> bool:
        """Whether this input became an ``images`` row in this call."""
        return self.copy_of is None and not self.stored and not self.dropped
