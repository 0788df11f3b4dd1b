"""Image metadata and pixels: what the pipeline needs from a FITS file.

``read_meta`` reads the header only (fast, picklable result); ``read_image`` reads the one 2-D
plane it describes. Images of any celestial projection astropy reads are accepted, including
cubes whose non-celestial axes (FREQ, STOKES, ...) are all of length 1. Every problem that makes
an image unusable raises :class:`ImageError` whose message is the reason shown to users.
"""

from __future__ import annotations

import bz2
import copy
import functools
import gzip
import io
import lzma
import math
import re
import threading
import warnings
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

import numpy as np
from astropy.io import fits
from astropy.io.fits.verify import VerifyWarning
from astropy.time import Time, TimeDelta
from astropy.utils.exceptions import AstropyUserWarning
from astropy.wcs import WCS, FITSFixedWarning
from astropy.wcs.utils import proj_plane_pixel_scales


class ImageError(ValueError):
    """An image that cannot be processed; the message is the rejection reason shown to users."""


#: "SomeError: " at the start of a line of a library's message (astropy nests its causes so).
_CLASS_PREFIX = re.compile(r"^(?:\w+\.)*\w*(?:Error|Exception|Warning): ")


def one_line(exc: BaseException) -> str:
    """An exception's message as one line for a rejection reason: its last line (where a library
    puts the cause), without exception class names; the class name only when there is no message."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    if not lines:
        return type(exc).__name__
    return _CLASS_PREFIX.sub("", lines[-1]).rstrip(":") or type(exc).__name__


@dataclass(frozen=True)
class Beam:
    """Restoring beam: semi-axes (half the FWHM) in deg, position angle in deg east of north."""

    smaj: float
    smin: float
    pa: float


@dataclass(frozen=True)
class ImageMeta:
    """Header facts for one 2-D image plane.

    Attributes
    ----------
    url : absolute path of the FITS file
    taustart_ts : start time of the observation (UTC, naive datetime)
    tau_time : integration time in s (0 when the header does not say, or says less than 0)
    freq_eff, freq_bw : effective frequency and bandwidth in Hz
    beam : restoring beam (deg)
    shape : (ny, nx) of the 2-D plane
    centre_ra, centre_dec : sky position of the image centre pixel in deg
    pixel_scale : mean pixel size in deg
    header : the FITS header as text, without its HISTORY and COMMENT cards (celestial WCS
        rebuilt from it with astropy)
    hdu : index of the HDU that holds the image in the FITS file (0: primary)
    flux_scale : Jy/beam per unit of the pixels (BUNIT; 1e-3 for mJy/beam)
    """

    url: str
    taustart_ts: datetime
    tau_time: float
    freq_eff: float
    freq_bw: float
    beam: Beam
    shape: tuple[int, int]
    centre_ra: float
    centre_dec: float
    pixel_scale: float
    header: str = field(repr=False)
    hdu: int = 0
    flux_scale: float = 1.0


#: Header keywords holding the integration time in s, in order of preference: the first positive one
#: (EXPTIME = 0 beside INTTIME = 600 is 600 s); XPOSURE is FITS 4.0's, DURATION ASKAPsoft's.
_TAU_KEYS = ("EXPTIME", "INTTIME", "TAU_TIME", "XPOSURE", "DURATION", "TELAPSE")
#: The keywords of a restoring beam (FWHM major and minor axes, deg; position angle, deg), in order
#: of preference: the usual ones, then Obit's.
_BEAM_KEYS = (("BMAJ", "BMIN", "BPA"), ("CLEANBMJ", "CLEANBMN", "CLEANBPA"))
_FLOAT = r"([-+]?(?:\d+\.?\d*|\.\d+)(?:[EeDd][-+]?\d+)?)"
#: AIPS/Obit ``HISTORY ... BMAJ= x BMIN= y BPA= z`` card (deg).
_HISTORY_BEAM = re.compile(rf"BMAJ\s*=\s*{_FLOAT}\s+BMIN\s*=\s*{_FLOAT}\s+BPA\s*=\s*{_FLOAT}")


def read_meta(
    path: str | Path, beam: Beam | None = None, freq: tuple[float, float] | None = None
) -> ImageMeta:
    """Read the metadata of the image in a FITS file from its header only.

    Parameters
    ----------
    path : FITS file; the image is the first HDU with at least two axes
    beam : restoring beam (deg) that replaces the header's
    freq : (freq_eff, freq_bw) in Hz that replace the header's

    Raises
    ------
    ImageError
        The file cannot be read, or it lacks a celestial WCS, a beam, a start time or a
        frequency (unless overridden), or it has more than one plane.
    """
    url = str(Path(path).resolve())
    try:
        return _meta(url, beam, freq)
    except fits.VerifyError as exc:  # a card whose value is no FITS value at all (EXPTIME = INF)
        card = re.search(r"card \((.+?)\)", str(exc))
        raise ImageError(f"unreadable {card.group(1) if card else 'header card'}: its value is no FITS value "
                         "(a number, a quoted string or T/F)") from None


def _meta(url: str, beam: Beam | None, freq: tuple[float, float] | None) -> ImageMeta:
    """:func:`read_meta` of an absolute path."""
    hdu, header, text = _read_header(url)
    frame = _sky_frame(_without_times(text))
    freq_eff, freq_bw = freq if freq is not None else _frequency(header, frame.axis_freq)
    taustart_ts = _start_time(header)
    beam = beam if beam is not None else _header_beam(header)
    return ImageMeta(
        url=url,
        taustart_ts=taustart_ts,
        tau_time=next(_positive(header, _TAU_KEYS), 0.0),
        freq_eff=float(freq_eff),
        freq_bw=float(freq_bw),
        beam=beam,
        shape=frame.shape,
        centre_ra=frame.centre_ra,
        centre_dec=frame.centre_dec,
        pixel_scale=frame.pixel_scale,
        header=_cards_without(text, _NOTES),
        hdu=hdu,
        flux_scale=_flux_scale(header),
    )


#: BUNIT values of images in Jy/beam (case, spaces and the FITS product's dots aside: "Jy beam-1",
#: astropy's, is "jybeam-1"). A blank or absent BUNIT is taken as Jy/beam, as TraP takes every image.
_JY_PER_BEAM = frozenset({"jy/beam", "jy/bm", "jy/beams", "jybeam-1", "jybeam**-1", "jybeam^-1", "beam-1jy"})
#: SI prefixes a BUNIT may put before Jy (case-sensitive: mJy is not MJy; a header is ASCII).
_PREFIXES = {"m": 1e-3, "u": 1e-6}


def _flux_scale(header: fits.Header) -> float:
    """Jy/beam per unit of the pixels, from BUNIT; ImageError for a unit that is not a flux
    density per beam (K, Jy/pixel, ...)."""
    unit = str(header.get("BUNIT", "") or "").replace(" ", "").replace(".", "")
    if not unit:
        return 1.0
    prefix, rest = (unit[0], unit[1:]) if unit[0] in _PREFIXES and unit[1:2] in "jJ" else ("", unit)
    if rest.lower() not in _JY_PER_BEAM:
        raise ImageError(f"BUNIT = {header['BUNIT']!r}: the pixels must be flux densities per beam "
                         "(Jy/beam, mJy/beam or uJy/beam)")
    return _PREFIXES.get(prefix, 1.0)


#: Header keywords of the time of an observation, which change from image to image of a field
#: but not its celestial WCS.
_TIME_KEYS = frozenset({"DATE-OBS", "TIME-OBS", "MJD-OBS", "DATE-BEG", "MJD-BEG", "DATE-END", "MJD-END", "DATE-AVG",
                        "MJD-AVG", "DATE", "TSTART", "TSTOP"})
#: Commentary keywords, left out of ``ImageMeta.header``.
_NOTES = frozenset({"HISTORY", "COMMENT"})
#: The keywords left out of a field's header text (:func:`_without_times`).
_NOT_FIELD = _TIME_KEYS | _NOTES


@dataclass(frozen=True)
class SkyFrame:
    """What the WCS of a header says about its image: shape (ny, nx), centre (deg), pixel size
    (deg) and the spectral axis' (frequency, channel width) in Hz, (None, None) without one."""

    shape: tuple[int, int]
    centre_ra: float
    centre_dec: float
    pixel_scale: float
    axis_freq: tuple[float | None, float | None]


def _cards(text: str, keep: Callable[[str, str], bool]) -> str:
    """A header's text (80-character cards) up to its END card, with only the cards for which
    ``keep(keyword, card)`` (with their CONTINUE cards) and the END card.

    Only the keyword field of each card (columns 1-8) is looked at: no card is parsed (astropy
    parses and verifies a card when it is looked at; for every card of a header, that was a
    third of the time :func:`read_meta` took).
    """
    kept, last_kept = [], False
    for start in range(0, len(text), 80):
        card = text[start : start + 80]
        keyword = card[:8].rstrip().upper()
        if keyword == "END":
            kept.append(card)
            break
        # a CONTINUE card (the rest of a long string) goes with the card it continues
        last_kept = last_kept if keyword == "CONTINUE" else keep(keyword, card)
        if last_kept:
            kept.append(card)
    return "".join(kept)


def _cards_without(text: str, keywords: frozenset[str]) -> str:
    """A header's text without the cards of ``keywords`` (see :func:`_cards`)."""
    return _cards(text, lambda keyword, _: keyword not in keywords)


#: The keywords of a primary header that :func:`read_meta` and :func:`read_image` look up (the
#: WCS is read from the whole text, once per field), besides NAXISn and the HISTORY cards of an
#: AIPS beam.
_LOOKED_UP = frozenset({"SIMPLE", "GROUPS", "BITPIX", "NAXIS", "BSCALE", "BZERO", "TIMESYS",
                        "RESTFRQ", "RESTFREQ", "RESTBW", "BUNIT", "TELESCOP", "CASAMBM", *_TIME_KEYS, *_TAU_KEYS,
                        *(k for keys in _BEAM_KEYS for k in keys)})
_NAXIS_N = re.compile(r"NAXIS\d+")


def _looked_up(keyword: str, card: str) -> bool:
    """Whether :func:`read_meta` or :func:`read_image` may look at this card."""
    return keyword in _LOOKED_UP or bool(_NAXIS_N.fullmatch(keyword)) or (keyword == "HISTORY" and "BMAJ" in card)


def _without_times(text: str) -> str:
    """A header's text without its time keywords (HISTORY and COMMENT neither): the same for the
    images of a survey of one field, so that :func:`_sky_frame` works out their WCS once."""
    return _cards_without(text, _NOT_FIELD)


@functools.lru_cache(maxsize=64)
def _sky_frame(text: str) -> SkyFrame:
    """The SkyFrame of a header's text (ImageError if its WCS is not that of a 2-D celestial
    image). Cached: parsing a WCS was half the time of reading an image's metadata."""
    header = fits.Header.fromstring(text)
    for axis in range(1, _whole(header, "NAXIS") + 1):
        _whole(header, f"NAXIS{axis}")
    wcs = _header_wcs(header)
    cel_axes = _celestial_axes(wcs, header)
    shape = (int(header[f"NAXIS{cel_axes[1] + 1}"]), int(header[f"NAXIS{cel_axes[0] + 1}"]))
    _check_stokes(wcs)
    cel = wcs.celestial
    centre_ra, centre_dec = (float(v) for v in cel.pixel_to_world_values((shape[1] - 1) / 2, (shape[0] - 1) / 2))
    if not (math.isfinite(centre_ra) and math.isfinite(centre_dec)):
        raise ImageError("the image centre has no valid sky position in its WCS")
    return SkyFrame(shape, centre_ra % 360.0, centre_dec, float(np.mean(proj_plane_pixel_scales(cel))),
                    _spectral_axis_frequency(wcs, header))


#: A FITS file's bytes: ``bytes``, or a writable buffer (1-D uint8 array) that may be reused.
Raw = bytes | np.ndarray


def read_image(meta: ImageMeta, raw: Raw | None = None) -> tuple[np.ndarray, WCS]:
    """Return the 2-D plane (float32, Jy/beam, NaN kept) and its celestial WCS.

    The array is indexed ``[y, x]`` with shape ``meta.shape``; blanked integer pixels become NaN,
    and so do infinite float pixels (:func:`_infinities_blanked`) and a mask written as zeros (:func:`_blanked`).
    ``raw``: the file's bytes when the caller has read them already (they are not read again); a
    uint8 array may be overwritten, the plane being a view of it (see :func:`_float_plane`).
    """
    if raw is not None:
        raw = decompressed(raw)
        plane = _float_plane(raw, meta)
        if plane is not None:  # the common case: float pixels, unscaled, read in one pass
            return _in_jy_per_beam(_blanked(plane), meta), celestial_wcs(meta)
    try:
        with warnings.catch_warnings():  # a truncated file: astropy's note, then the error below
            warnings.simplefilter("ignore", AstropyUserWarning)
            with fits.open(io.BytesIO(raw) if raw is not None else meta.url, memmap=False) as hdul:
                hdu = hdul[meta.hdu]
                data = hdu.data
                blank = hdu.header.get("BLANK") if data is not None and data.dtype.kind in "iu" else None
                floats = hdu.header.get("BITPIX", 0) < 0
    except (OSError, ValueError, IndexError, TypeError) as exc:
        if any(words in str(exc) for words in ("buffer is too small", "cannot reshape array")):  # astropy's
            raise ImageError("the file is truncated: it holds fewer pixels than its header says") from exc
        raise ImageError(f"cannot read the image data: {one_line(exc)}") from exc
    if data is None:
        raise ImageError("the FITS file has no image data")
    if data.size != meta.shape[0] * meta.shape[1]:
        raise ImageError(f"image data of shape {data.shape} do not match the header's {meta.shape} plane")
    plane = data.reshape(meta.shape)  # the other axes have length 1
    with np.errstate(over="ignore"):  # beyond float32's range: infinite, then blank
        out = plane.astype(np.float32)
    if floats:
        _infinities_blanked(out)
    if blank is not None:
        out[plane == blank] = np.nan
    return _in_jy_per_beam(_blanked(out) if floats else out, meta), celestial_wcs(meta)


#: A run of consecutive exact zeros along an edge row or column at least this long, and at least
#: ZERO_MASK_EDGE of the edge, marks a mask written as zeros.
ZERO_MASK_RUN = 16
ZERO_MASK_EDGE = 0.01


def _blanked(plane: np.ndarray) -> np.ndarray:
    """``plane`` (float pixels, ours to change, infinities already blank: :func:`_infinities_blanked`)
    with a mask written as exact zeros blanked (NaN), as a mask written as NaN is: when a row or
    column at the image's edge holds a run of consecutive exact zeros (ZERO_MASK_RUN,
    ZERO_MASK_EDGE; the outside of a primary beam, say), every exact zero of the image. Noise in
    float pixels is exactly zero only where it was quantized (fpack without dithering: one pixel
    in ten at its default level), and then in scattered pixels, not in runs of 16; without this,
    the mask's edge gave detections and a half-masked image was rejected as constant."""
    edges = (plane[0], plane[-1], plane[:, 0], plane[:, -1])
    if any(_longest_zero_run(edge) >= max(ZERO_MASK_RUN, ZERO_MASK_EDGE * len(edge)) for edge in edges):
        plane[plane == 0.0] = np.nan
    return plane


def _infinities_blanked(pixels: np.ndarray) -> np.ndarray:
    """``pixels`` (float, ours to change) with infinite ones blank (NaN): an imager's division by
    zero, or a float64 value beyond float32's range, measures nothing; were it kept, one on a
    source would make an island of infinite S/N that the artefact cut leaves out, and the source
    with it."""
    infinite = np.isinf(pixels)
    if infinite.any():
        pixels[infinite] = np.nan
    return pixels


def _longest_zero_run(values: np.ndarray) -> int:
    """The length of the longest run of consecutive exact zeros in a 1-D array."""
    zero = np.concatenate(([False], values == 0.0, [False]))
    change = np.flatnonzero(zero[1:] != zero[:-1])  # where runs start and (one past) end
    return int((change[1::2] - change[::2]).max(initial=0))


def _in_jy_per_beam(plane: np.ndarray, meta: ImageMeta) -> np.ndarray:
    """``plane`` (float32, ours to change) in Jy/beam."""
    if meta.flux_scale != 1.0:
        plane *= np.float32(meta.flux_scale)
    return plane


#: FITS BITPIX of float pixels and their (big-endian) dtypes.
_FLOAT_BITPIX = {-32: ">f4", -64: ">f8"}


def _float_plane(raw: Raw, meta: ImageMeta) -> np.ndarray | None:
    """The plane as float32 straight from a FITS file's bytes when its pixels are unscaled floats
    in a plain image HDU (what astropy would return, without its copies); None otherwise.

    32-bit pixels of a writable ``raw`` (uint8 array) are byte-swapped in place and returned as
    a view of it (no copy of the image is made; ``raw`` is changed).
    """
    located = _primary_header(raw) if meta.hdu == 0 else _hdu_header(raw, meta.hdu)
    if located is None:
        return None
    header, offset = located
    dtype = _FLOAT_BITPIX.get(header.get("BITPIX"))
    if dtype is None or header.get("BSCALE", 1) != 1 or header.get("BZERO", 0) != 0:
        return None
    naxes = [header.get(f"NAXIS{i + 1}", 0) for i in range(header.get("NAXIS", 0))]
    count = math.prod(naxes) if naxes else 0
    if count != meta.shape[0] * meta.shape[1] or offset + count * np.dtype(dtype).itemsize > len(raw):
        return None
    pixels = np.frombuffer(raw, dtype=dtype, count=count, offset=offset).reshape(meta.shape)
    if pixels.flags.writeable and dtype == ">f4":
        return _native_in_place(pixels)
    with np.errstate(over="ignore"):  # beyond float32's range: infinite, then blank
        return _infinities_blanked(pixels.astype(np.float32))


#: Pixels byte-swapped by one copy in :func:`_native_in_place`.
_SWAP_BAND = 1 << 18


def _native_in_place(pixels: np.ndarray) -> np.ndarray:
    """Big-endian float32 pixels as native float32 in the same buffer, infinite ones blank
    (:func:`_infinities_blanked`, a band at a time while it is in the cache: 45% of a pass over the
    whole image), converted a band at a time by numpy's copy, which lets go of the GIL
    (``ndarray.byteswap`` holds it: 1.2-1.5 ms per 2048^2 image, 3.6-5.7 ms for two threads at
    once; the copies 0.6-0.7 ms either way)."""
    source, native = pixels.reshape(-1), pixels.reshape(-1).view(np.float32)
    for first in range(0, len(source), _SWAP_BAND):
        band = native[first : first + _SWAP_BAND]
        np.copyto(band, source[first : first + _SWAP_BAND])
        _infinities_blanked(band)
    return native.reshape(pixels.shape)


#: FITS header blocks are this many bytes; the data start at the next block after the END card.
_FITS_BLOCK = 2880
#: The card that ends a header.
_END_CARD = b"END" + b" " * 77


#: Bytes of a primary header searched for its END card at most (then astropy reads the file).
_MAX_HEADER_BYTES = 1000 * _FITS_BLOCK
#: Bytes of a file read for its primary header first, and searched first for its END card (a
#: header of up to 576 cards; a longer one, an AIPS history, is read on to _MAX_HEADER_BYTES).
_LEADING_BYTES = 16 * _FITS_BLOCK


def _end_card(head: bytes, start: int = 0) -> int:
    """Offset of the END card in a header's bytes (on a card boundary, at or after ``start``), -1
    if there is none."""
    at = head.find(_END_CARD, start - start % 80)
    while at >= 0 and at % 80:  # the END card starts on a card boundary
        at = head.find(_END_CARD, at + 1)
    return at


def _primary_header(raw: Raw) -> tuple[fits.Header, int] | None:
    """The primary header of a FITS file's bytes (only the cards :func:`read_meta` and
    :func:`read_image` look up: _LOOKED_UP) and the offset of its data, when it is a plain image
    (SIMPLE, no random groups); None otherwise. Parses only the header's bytes."""
    for limit in (_LEADING_BYTES, _MAX_HEADER_BYTES):  # a few blocks are enough but for long headers
        head = bytes(memoryview(raw)[:limit])
        at = _end_card(head)
        if at >= 0 or len(head) < limit:
            break
    if at < 0 or not head.startswith(b"SIMPLE  ="):
        return None
    offset = -(-(at + 80) // _FITS_BLOCK) * _FITS_BLOCK
    try:  # the cards looked up only: of a radio image's 100-1500 cards, ~15 (astropy's parse is per card)
        header = fits.Header.fromstring(_cards(head[: at + 80].decode("ascii", "replace"), _looked_up))
    except (ValueError, TypeError):
        return None  # the full reader reports it
    return (header, offset) if header.get("SIMPLE") is True and not header.get("GROUPS") else None


def _hdu_header(raw: Raw, index: int) -> tuple[fits.Header, int] | None:
    """Header and data offset of HDU ``index`` of a FITS file's bytes when it is a plain image HDU
    (through astropy, which copies an array); None otherwise."""
    try:
        with fits.open(io.BytesIO(raw), memmap=False, lazy_load_hdus=True) as hdul:
            hdu = hdul[index]
            header, offset = hdu.header, getattr(hdu, "_data_offset", None)
            plain = type(hdu) in (fits.PrimaryHDU, fits.ImageHDU)
    except (OSError, ValueError, IndexError, TypeError):
        return None  # the full reader reports it
    return (header, offset) if plain and isinstance(offset, int) else None


#: Leading bytes of the compressed files astropy opens by name, and how to expand them in memory.
_COMPRESSIONS = {
    b"\x1f\x8b": gzip.decompress,
    b"BZh": bz2.decompress,
    b"\xfd7zXZ\x00": lzma.decompress,
    b"PK\x03\x04": lambda data: _unzip(data),
}


def decompressed(raw: Raw) -> Raw:
    """A FITS file's bytes, expanded when gzip, bzip2, xz or zip compressed (as astropy reads them
    by name, but not from memory)."""
    lead = bytes(memoryview(raw)[:8])
    for magic, expand in _COMPRESSIONS.items():
        if lead.startswith(magic):
            try:
                return expand(bytes(raw))  # (no copy of bytes)
            except (OSError, EOFError, ValueError, lzma.LZMAError, zipfile.BadZipFile) as exc:
                raise ImageError(f"cannot decompress the file: {one_line(exc)}") from exc
    return raw


def _unzip(data: bytes) -> bytes:
    with zipfile.ZipFile(io.BytesIO(data)) as archive:
        names = archive.namelist()
        if len(names) != 1:
            raise ValueError(f"a zip archive of {len(names)} files, not one")
        return archive.read(names[0])


def field_header(meta: ImageMeta) -> str:
    """The image's header text without its time keywords: the same for every image of one pointing
    (what its celestial WCS follows from)."""
    return _without_times(meta.header)


def celestial_wcs(meta: ImageMeta) -> WCS:
    """Return the 2-D celestial WCS of the image plane (pixel axes x, y), made without the header's
    time keywords: a copy of the one worked out for the first image of the field (0.95 -> 0.12 ms
    an image; the images of a survey differ in those keywords only)."""
    field_wcs = _field_wcs(field_header(meta))
    with _COPYING:  # copies of one WCS are made one at a time (wcslib is not known to be thread-safe)
        return copy.deepcopy(field_wcs)


#: Held while a cached WCS is copied.
_COPYING = threading.Lock()


@functools.lru_cache(maxsize=64)
def _field_wcs(text: str) -> WCS:
    """The 2-D celestial WCS of a header's text (cached: :func:`celestial_wcs` hands out copies)."""
    return _header_wcs(fits.Header.fromstring(text)).celestial


def _read_header(url: str) -> tuple[int, fits.Header, str]:
    """Return (HDU index, header, the header's text) of the first HDU with at least two axes; the
    header holds at least the cards of _LOOKED_UP (only those, on the usual path)."""
    primary = _leading_primary_header(url)
    if primary is not None:
        return 0, *primary
    try:
        with fits.open(url, memmap=True, lazy_load_hdus=True) as hdul:
            for index, hdu in enumerate(hdul):
                if hdu.is_image and hdu.header.get("NAXIS", 0) >= 2:
                    return index, hdu.header.copy(), hdu.header.tostring(padding=False)
    except FileNotFoundError as exc:
        raise ImageError("file not found") from exc
    except (OSError, ValueError, TypeError, IndexError) as exc:
        raise ImageError(f"not a readable FITS file: {one_line(exc)}") from exc
    raise ImageError("the FITS file has no image with at least two axes")


def _leading_primary_header(url: str) -> tuple[fits.Header, str] | None:
    """The primary header and its text when it is an uncompressed plain image's of at least two
    axes, parsed from the file's first _LEADING_BYTES (or more, up to _MAX_HEADER_BYTES, for a
    long header): a third of the time of astropy's reader, a tenth for a long history; else None.
    ImageError for a NAXIS that is not a whole number."""
    try:
        with open(url, "rb") as fh:
            head = fh.read(_LEADING_BYTES)
            searched = 0
            while head.startswith(b"SIMPLE  =") and _end_card(head, searched) < 0 and len(head) < _MAX_HEADER_BYTES:
                more = fh.read(_LEADING_BYTES)  # a long header (an AIPS history): read on to its END card
                if not more:
                    break
                searched, head = len(head), head + more
    except OSError:
        return None  # astropy's reader says why
    found = _primary_header(head)
    if found is None or _whole(found[0], "NAXIS") < 2:
        return None
    header, offset = found
    return header, head[:offset].decode("ascii", "replace")  # non-ASCII bytes: the WCS's parse rejects them


#: The keywords of a WCS's transformation (reference value and pixel, increments, matrix): wcslib
#: puts a default (0, or 1 for an increment) in place of one that is not a number, and only warns.
_TRANSFORM_KEY = re.compile(r"(?:CRVAL|CRPIX|CDELT|CROTA)\d+[A-Z]?|(?:CD|PC)\d+_\d+[A-Z]?")
_CD_KEY = re.compile(r"CD\d+_\d+")


def _has_cd_matrix(header: fits.Header) -> bool:
    """Whether the header gives a CD matrix: wcslib then reads no CDELTn (nor takes their default)."""
    return any(_CD_KEY.fullmatch(keyword) for keyword in header)


def _header_wcs(header: fits.Header) -> WCS:
    """Parse the WCS of a header, silencing astropy's notes about legacy keywords and cards it fixed; ImageError for a
    broken WCS, including a transformation keyword that is not a number (wcslib would put a
    default in its place: every position of the image wrong)."""
    for card in header.cards:
        if _TRANSFORM_KEY.fullmatch(card.keyword) and (
                isinstance(card.value, bool) or not isinstance(card.value, (int, float))):
            raise ImageError(f"invalid world coordinate system: {card.keyword} = {card.value!r} is not a number")
    cd_matrix = _has_cd_matrix(header)
    for axis in range(1, _whole(header, "NAXIS") + 1):
        if not cd_matrix and header.get(f"CDELT{axis}") == 0:  # wcslib: "PCi_ja matrix is singular"
            kind = str(header.get(f"CTYPE{axis}", "") or "").strip() or "no CTYPE"
            raise ImageError(f"invalid world coordinate system: CDELT{axis} = 0 ({kind}): an axis needs a "
                             "non-zero increment, also one of a single plane")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FITSFixedWarning)
            warnings.simplefilter("ignore", VerifyWarning)  # a card it fixed (BMAJ = INF): checked where used
            return WCS(header)
    except Exception as exc:  # astropy raises many types for a broken WCS
        raise ImageError(f"invalid world coordinate system: {one_line(exc)}") from exc


def _celestial_axes(wcs: WCS, header: fits.Header) -> tuple[int, int]:
    """0-based (longitude, latitude) axis indices; all other data axes must have length 1."""
    lng, lat = wcs.wcs.lng, wcs.wcs.lat
    naxis = header.get("NAXIS", 0)
    if lng < 0 or lat < 0 or max(lng, lat) >= naxis:
        raise ImageError("not a 2-D celestial image: no RA/Dec (longitude/latitude) pixel axes in its WCS")
    if wcs.wcs.lngtyp != "RA":
        raise ImageError(
            f"celestial axes {wcs.wcs.lngtyp}/{wcs.wcs.lattyp} are not RA/Dec; only equatorial images are supported"
        )
    frame, equinox = wcs.wcs.radesys.strip().upper(), wcs.wcs.equinox  # wcslib keeps the header's case
    if frame in ("FK4", "FK4-NO-E"):  # also what an EQUINOX before 1984 alone implies
        raise ImageError(f"the image's RA/Dec are {frame} (B{equinox:g}), not ICRS or FK5 (J2000) as the "
                         "database's: they would be stored up to 0.7 deg off; reproject the image")
    if frame == "FK5" and abs(equinox - 2000.0) > 0.01:
        raise ImageError(f"the image's RA/Dec are FK5 of equinox J{equinox:g}, not J2000 as the database's: "
                         "they would be stored off by the precession between the two; reproject the image")
    if frame not in ("ICRS", "FK5"):  # GAPPT: the apparent place of the day, not a fixed frame
        raise ImageError(f"the image's RA/Dec are in the {frame} frame (RADESYS), not ICRS or FK5 (J2000) as the "
                         "database's; reproject the image")
    for axis in range(naxis):
        length = header.get(f"NAXIS{axis + 1}", 0)
        if axis in (lng, lat):
            if length < 2:
                raise ImageError(f"celestial axis {axis + 1} has only {length} pixel(s)")
        elif length != 1:
            kind = header.get(f"CTYPE{axis + 1}", f"axis {axis + 1}").strip() or f"axis {axis + 1}"
            raise ImageError(f"the image has {length} planes along {kind}; only single 2-D planes are supported")
    if lng > lat:
        raise ImageError("the latitude axis precedes the longitude axis; transposed images are not supported")
    if not (all(f"CDELT{axis + 1}" in header for axis in (lng, lat))
            or any(f"{matrix}{i + 1}_{j + 1}" in header for matrix in ("CD", "PC") for i in (lng, lat)
                   for j in (lng, lat))):  # a PC matrix with CDELT's default of 1 carries the size itself
        raise ImageError(f"the header gives no pixel size for its RA/Dec axes (CDELT{lng + 1}/CDELT{lat + 1}, "
                         f"a CD or a PC matrix); astropy would take 1 deg")
    return lng, lat


def _given(header: fits.Header, keys: tuple[str, ...]) -> Iterator[str]:
    """Those of ``keys`` the header gives a value, in order: not absent, not a card without a value,
    not a string of spaces."""
    for key in keys:
        value = header.get(key)
        if value is not None and not (isinstance(value, str) and not value.strip()):
            yield key


def _whole(header: fits.Header, key: str) -> int:
    """The value of a dimension keyword (NAXIS, NAXISn), 0 if absent; ImageError if it is not a
    whole number (astropy's reader fails on such a file too)."""
    value = header.get(key, 0)
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ImageError(f"invalid {key} = {value!r}: not a whole number of pixels")
    return value


def _number(header: fits.Header, key: str) -> float:
    """The value of keyword ``key`` as a float; ImageError naming the card if it is not a number."""
    value = header[key]
    try:
        return float(value)
    except (TypeError, ValueError):
        raise ImageError(f"unreadable {key}={value!r}: not a number") from None


def _header_beam(header: fits.Header) -> Beam:
    """Beam from BMAJ/BMIN/BPA (FWHM, deg), Obit's CLEANBMJ/CLEANBMN/CLEANBPA, or the last AIPS
    HISTORY beam card. A round beam needs no position angle; keywords of a beam of no size (BMAJ = 0,
    a placeholder) give way to a HISTORY card."""
    values = []  # the keyword sets given, read one at a time: a later set is looked at only if needed
    for major, minor, angle in _BEAM_KEYS:
        if major in header and minor in header:
            bmaj, bmin = _number(header, major), _number(header, minor)
            if angle in header or bmaj == bmin:
                values.append((bmaj, bmin, _number(header, angle) if angle in header else 0.0))
                if bmaj > 0 and bmin > 0:
                    break
    history = [m for m in map(_HISTORY_BEAM.search, map(str, header.get("HISTORY", []))) if m]
    usable = [v for v in values if v[0] > 0 and v[1] > 0]
    if usable or (values and not history):
        bmaj, bmin, bpa = (usable or values)[0]
    elif history:
        bmaj, bmin, bpa = (float(v.upper().replace("D", "E")) for v in history[-1].groups())
    else:
        missing = "/".join(k for k in _BEAM_KEYS[0] if k not in header)
        tables = " (its per-plane beams are in a BEAMS table, CASAMBM = T, which trap-dask does not read)" \
            if header.get("CASAMBM") is True else ""
        raise ImageError(f"no restoring beam: the header has no {missing} and no HISTORY beam card{tables}; "
                         "add BMAJ, BMIN (FWHM, deg) and BPA (deg) to the header")
    if not (bmaj > 0 and bmin > 0 and math.isfinite(bmaj * bmin * bpa)):
        raise ImageError(f"invalid restoring beam BMAJ={bmaj} BMIN={bmin} BPA={bpa}")
    if not -180.0 <= bpa <= 180.0:  # the same beam turned by whole half turns: into [-90, 90)
        bpa = (bpa + 90.0) % 180.0 - 90.0
    # BPA is the angle of the BMAJ axis: when BMAJ < BMIN the major axis is the one across it
    pa = bpa if bmaj >= bmin else (bpa + 180.0) % 180.0 - 90.0  # BPA + 90, in [-90, 90)
    return Beam(smaj=max(bmaj, bmin) / 2.0, smin=min(bmaj, bmin) / 2.0, pa=pa)


#: Telescopes whose images give their observing frequency and bandwidth in RESTFRQ and RESTBW, as
#: TraP reads them (TELESCOP starting so: AARTFAAC-6 too).
_RESTFRQ_TELESCOPES = ("LOFAR", "AARTFAAC")


def _frequency(header: fits.Header, axis: tuple[float | None, float | None]) -> tuple[float, float]:
    """(freq_eff, freq_bw) in Hz from the WCS's spectral ``axis`` (frequency and channel width, Hz;
    see :func:`_spectral_axis_frequency`), else from RESTFRQ/RESTFREQ and RESTBW.

    RESTFRQ is, by the FITS standard, a line's rest frequency: a FREQ axis says where the image
    observed (a continuum image of MeerKAT's L band at 1.28 GHz may carry the HI line's 1.42 GHz,
    within its 856 MHz). LOFAR's images are read as TraP reads them, RESTFRQ and RESTBW first,
    where RESTFRQ agrees with their axis to within a channel.
    """
    axis_freq, axis_bw = axis
    rest = next(_positive(header, ("RESTFRQ", "RESTFREQ")), None)
    rest_bw = next(_positive(header, ("RESTBW",)), None)
    lofar = str(header.get("TELESCOP", "") or "").strip().upper().startswith(_RESTFRQ_TELESCOPES)
    if axis_freq is None:
        freq_eff, freq_bw = rest, rest_bw
    elif rest is not None and lofar and abs(rest - axis_freq) <= max(axis_bw or 0.0, 1e-6 * axis_freq):
        freq_eff, freq_bw = rest, rest_bw or axis_bw
    else:  # (LOFAR's RESTBW is the band's width, as TraP reads it, wherever the frequency came from)
        freq_eff, freq_bw = axis_freq, (rest_bw if lofar else None) or axis_bw or rest_bw
    if freq_eff is None:
        raise ImageError(f"no frequency: {_lacks(header, ('RESTFRQ', 'RESTFREQ'))}; add RESTFRQ (Hz) to the header")
    if freq_bw is None:
        lacks = (_lacks(header, ("RESTBW",)) if axis_freq is None else
                 "the spectral axis has no increment (CDELT) and the header no positive RESTBW")
        raise ImageError(f"no bandwidth: {lacks}; add RESTBW (Hz) to the header")
    return freq_eff, freq_bw


def _positive(header: fits.Header, keys: tuple[str, ...]) -> Iterator[float]:
    """The values > 0 of those of ``keys`` the header gives a value (not blank, not 0), in order;
    ImageError for one that is not a number."""
    return (value for value in (_number(header, k) for k in _given(header, keys)) if value > 0)


def _lacks(header: fits.Header, keys: tuple[str, ...]) -> str:
    """Why neither ``keys`` nor a spectral axis give a value (for :func:`_frequency`'s errors)."""
    key = next(_given(header, keys), None)
    if key is None:
        return f"the header has no {'/'.join(keys)} and no spectral (FREQ) axis"
    return f"{key}={header[key]!r} is not positive and the header has no spectral (FREQ) axis"


#: The names of the FITS STOKES axis's values (Greisen & Calabretta 2002, table 7).
_STOKES = {1: "I", 2: "Q", 3: "U", 4: "V", -1: "RR", -2: "LL", -3: "RL", -4: "LR",
           -5: "XX", -6: "YY", -7: "XY", -8: "YX"}


def _check_stokes(wcs: WCS) -> None:
    """ImageError when the plane is not Stokes I by its STOKES axis (an image without one is taken
    as Stokes I): light curves, new sources and the fits' positive Gaussians are total intensity."""
    types = [t.strip().upper() for t in wcs.wcs.ctype]
    if "STOKES" not in types:
        return
    axis = types.index("STOKES")
    pixel = np.zeros((1, wcs.naxis))
    value = float(wcs.wcs_pix2world(pixel, 0)[0, axis])
    if value != 1.0:
        raise ImageError(f"the plane is Stokes {_STOKES.get(value, 'unknown')} (STOKES = {value:g}); "
                         "trap-dask measures Stokes I (total intensity)")


def _spectral_axis_frequency(wcs: WCS, header: fits.Header) -> tuple[float | None, float | None]:
    """Frequency (Hz) of the first spectral pixel and the width of that channel (Hz).

    Velocity or wavelength axes are translated to frequency by WCSLIB (needs RESTFRQ for
    velocities). (None, None) when there is no usable spectral axis; a width of None when the
    header gives the axis no increment (CDELTn, or CDn_n beside a CD matrix: WCSLIB would take 1 Hz).
    """
    spec = wcs.wcs.spec
    if spec < 0:
        return None, None
    n = spec + 1  # wcslib takes CDELTn = 1 without it, and reads no CDELT beside a CD matrix
    given = f"CD{n}_{n}" in header if _has_cd_matrix(header) else f"CDELT{n}" in header
    freq_wcs = wcs.deepcopy()
    try:
        freq_wcs.wcs.sptr("FREQ-???", spec)
    except Exception:  # noqa: BLE001 - WCSLIB raises several types when no translation exists
        return None, None
    pixels = np.zeros((3, wcs.naxis))
    pixels[:, spec] = (0.0, -0.5, 0.5)
    freqs = freq_wcs.wcs_pix2world(pixels, 0)[:, spec]
    if not np.all(np.isfinite(freqs)):
        return None, None
    return float(freqs[0]), float(abs(freqs[2] - freqs[1])) if given else None


#: A FITS date and time to the second or finer, at most microseconds: datetime reads it as astropy
#: does (UTC).
_PLAIN_UTC = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(?:\.\d{1,6})?")


#: TIMESYS values naming a time scale otherwise than astropy does (FITS 4.0, section 9.2.1, and
#: older usage); any other value astropy does not know is taken as UTC, as TraP takes every image.
_SCALE_NAMES = {"UT": "utc", "GMT": "utc", "Z": "utc", "IAT": "tai", "ET": "tt", "TDT": "tt"}
#: TAI runs 19 s ahead of GPS time (FITS 4.0, section 9.2.1): a GPS clock's reading plus this is TAI.
_TAI_MINUS_GPS_S = 19.0


def _time_scale(header: fits.Header) -> tuple[str, float]:
    """(astropy's scale, seconds to add in it) of the header's TIMESYS (default UTC)."""
    name = str(header.get("TIMESYS", "UTC") or "UTC").strip().upper()
    if name == "GPS":
        return "tai", _TAI_MINUS_GPS_S
    if name == "LOCAL":
        raise ImageError("TIMESYS = 'LOCAL': a local clock has no known relation to UTC; give the start time "
                         "in UTC (TIMESYS = 'UTC')")
    scale = _SCALE_NAMES.get(name, name.lower())
    return (scale if scale in Time.SCALES else "utc"), 0.0


def _start_time(header: fits.Header) -> datetime:
    """Start time (UTC, naive) from DATE-OBS (else DATE-BEG) in the TIMESYS scale, else MJD-OBS
    (MJD-BEG). A DATE-OBS of a date alone takes its time of day from TIME-OBS (the older
    convention), else from MJD-OBS (AIPS and Obit write both); one ending in Z is UTC."""
    scale, offset = _time_scale(header)
    date_key = next(_given(header, ("DATE-OBS", "DATE-BEG")), None)
    mjd_key = next(_given(header, ("MJD-OBS", "MJD-BEG")), None)
    if date_key is None and mjd_key is None:
        raise ImageError("no start time: the header has neither DATE-OBS nor MJD-OBS (nor DATE-BEG/MJD-BEG)")
    value, name = (str(header[date_key]).strip(), date_key) if date_key else ("", "")
    if date_key and "T" not in value and next(_given(header, ("TIME-OBS",)), None):
        value, name = f"{value}T{str(header['TIME-OBS']).strip()}", f"{date_key} + TIME-OBS"
    if date_key and "T" not in value and mjd_key is not None:
        value = _with_time_of(value, header[mjd_key], scale)
    if date_key:
        if value.endswith("Z"):
            value, scale, offset = value[:-1], "utc", 0.0
        if scale == "utc" and _PLAIN_UTC.fullmatch(value):
            try:  # what astropy's Time gives for these (0.1 us against its 80 us)
                return datetime.fromisoformat(value)
            except ValueError:
                pass  # not a date (month 13, second 60, ...): astropy says why
        try:
            return _utc(Time(value, format="fits", scale=scale), offset)
        except (ValueError, TypeError) as exc:
            raise ImageError(f"unreadable start time {name}={value!r}: not a valid FITS date and time "
                             "(YYYY-MM-DDThh:mm:ss[.sss])") from exc
    try:
        return _utc(Time(float(header[mjd_key]), format="mjd", scale=scale), offset)
    except (ValueError, TypeError) as exc:
        raise ImageError(f"unreadable start time {mjd_key}={header[mjd_key]!r}: not a valid MJD") from exc


def _with_time_of(date: str, mjd: object, scale: str) -> str:
    """A date alone (``YYYY-MM-DD``) with the time of day of ``mjd`` (an MJD on the same clock,
    ``scale``) where the two fall on the same day (AIPS and Obit write both); else the date as it is."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # ERFA's "dubious year" for an MJD of 0
            moment = Time(float(mjd), format="mjd", scale=scale, precision=6)
            when = moment.isot  # to the microsecond (3 digits rounded 23:59:59.9999 into the next day)
    except (ValueError, TypeError):
        return date
    return when if when[:10] == date[:10] else date


def _utc(time: Time, offset: float) -> datetime:
    """``time`` plus ``offset`` seconds of its scale, in UTC (naive); a UTC leap second (23:59:60)
    is the next second, 00:00:00: datetime has no second 60."""
    if offset:
        time = time + TimeDelta(offset, format="sec", scale=time.scale)
    return time.utc.to_datetime(leap_second_strict="silent")
