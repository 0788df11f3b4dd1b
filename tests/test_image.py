"""Reading FITS metadata and image planes: real images, synthetic headers and error cases."""

from __future__ import annotations

import pickle
from dataclasses import astuple, replace
from datetime import datetime
from pathlib import Path

import numpy as np
import pytest
from astropy.io import fits
from astropy.time import Time
from astropy.wcs.utils import proj_plane_pixel_scales

from trap_dask import image
from trap_dask.image import Beam, ImageError, celestial_wcs, read_image, read_meta
from trap_dask.tasks import read_file

DATA = Path(__file__).parent / "data"
ARCSEC = 1.0 / 3600.0

#: file -> ((BMAJ, BMIN, BPA) deg, freq_eff Hz, freq_bw Hz, DATE-OBS, (ny, nx))
REAL = {
    "GRB120422A-120429.fits": (
        (1.506752332052e-02, 6.847996711731e-03, 5.014526367188), 1.650518750500e10,
        # no RESTBW; the VOPT axis channel (-2.496e7 m/s) translated to frequency by WCSLIB
        1.3765e9, datetime(2012, 4, 29, 17, 19, 23, 1599), (512, 512),
    ),
    "SWIFT_554620-130504.fits": (
        (1.708134757148e-02, 6.596771346198e-03, 1.354555225372e01), 1.687992813000e10,
        2.248443750e9, datetime(2013, 5, 4, 18, 59, 19, 996801), (512, 512),
    ),
    "GRB201006A_final_2min_srcs-t0002-image-pb_cutout.fits": (
        (0.00901909702591635, 0.00498843516558039, 38.6860542609271), 143650817.871094,
        46875000.0, datetime(2020, 10, 6, 1, 26, 36, 800000), (256, 256),
    ),
}

BASE_CARDS = {
    "CTYPE1": "RA---SIN", "CRVAL1": 10.0, "CDELT1": -2 * ARCSEC, "CRPIX1": 10.5, "CUNIT1": "deg",
    "CTYPE2": "DEC--SIN", "CRVAL2": -40.0, "CDELT2": 2 * ARCSEC, "CRPIX2": 8.5, "CUNIT2": "deg",
    "BMAJ": 10 * ARCSEC, "BMIN": 6 * ARCSEC, "BPA": 20.0, "DATE-OBS": "2021-03-04T05:06:07.5",
    "RESTFRQ": 1.4e9, "RESTBW": 1e7, "BUNIT": "JY/BEAM",
}


def write_image(path: Path, cards: dict | None = None, data: np.ndarray | None = None,
                history: tuple[str, ...] = ()) -> Path:
    """Write a 16 x 20 SIN image; ``cards`` update BASE_CARDS (value None removes a card)."""
    data = np.arange(320, dtype=np.float32).reshape(16, 20) if data is None else data
    header = fits.Header()
    for key, value in {**BASE_CARDS, **(cards or {})}.items():
        if value is not None:
            header[key] = value
    for line in history:
        header.add_history(line)
    fits.PrimaryHDU(data=data, header=header).writeto(path)
    return path


@pytest.mark.parametrize("name", sorted(REAL))
def test_real_images_read(name: str) -> None:
    (bmaj, bmin, bpa), freq, bw, start, shape = REAL[name]
    meta = read_meta(DATA / name)
    assert meta.url == str((DATA / name).resolve())
    assert astuple(meta.beam) == pytest.approx((bmaj / 2, bmin / 2, bpa))
    assert meta.freq_eff == pytest.approx(freq, rel=1e-12)
    assert meta.freq_bw == pytest.approx(bw, rel=1e-3)
    assert meta.taustart_ts == start
    assert meta.tau_time == 0.0
    assert meta.shape == shape
    assert meta.pixel_scale == pytest.approx(5 * ARCSEC, rel=1e-9)
    assert "HISTORY" not in meta.header
    data, wcs = read_image(meta)
    assert data.dtype == np.float32 and data.shape == shape
    raw = fits.getdata(DATA / name)
    np.testing.assert_array_equal(data, raw.reshape(shape))
    assert wcs.naxis == 2 and wcs.wcs.ctype[0] == "RA---SIN" and wcs.wcs.ctype[1] == "DEC--SIN"
    ra, dec = wcs.pixel_to_world_values((shape[1] - 1) / 2, (shape[0] - 1) / 2)
    assert (meta.centre_ra, meta.centre_dec) == pytest.approx((float(ra), float(dec)), abs=1e-9)
    assert np.mean(proj_plane_pixel_scales(celestial_wcs(meta))) == pytest.approx(meta.pixel_scale)


def test_real_image_centre_against_header() -> None:
    # AMI: CRPIX = 257 (1-based) is the pixel right of/above the centre (255.5 0-based)
    meta = read_meta(DATA / "SWIFT_554620-130504.fits")
    assert meta.centre_dec == pytest.approx(2.769150000000e01 - 0.5 * 5 * ARCSEC, abs=1e-6)
    assert abs(meta.centre_ra - 1.731387083000e02) < 5 * ARCSEC


def test_missing_metadata_is_a_clear_error() -> None:
    with pytest.raises(ImageError, match="no frequency.*RESTFRQ.*add RESTFRQ"):
        read_meta(DATA / "missing_metadata.fits")



@pytest.mark.parametrize("cards, said", [
    ({"CDELT1": None, "CDELT2": None}, r"no pixel size for its RA/Dec axes \(CDELT1/CDELT2, a CD or a PC matrix\)"),
    ({"CDELT2": None}, "no pixel size"),
    ({"BPA": None}, "no restoring beam: the header has no BPA and no HISTORY beam card"),
    ({"BMAJ": None, "BMIN": None}, "the header has no BMAJ/BMIN and no HISTORY"),
])
def test_missing_cards_are_named(tmp_path: Path, cards: dict, said: str) -> None:
    """A header without a pixel size was rejected for a beam "narrower than a pixel" of 1 deg
    (astropy's default), one without BPA alone as having no BMAJ/BMIN/BPA."""
    with pytest.raises(ImageError, match=said):
        read_meta(write_image(tmp_path / "m.fits", cards))
    for matrix in ("CD", "PC"):  # either matrix gives the size (PC with CDELT's default of 1)
        cards = {"CDELT1": None, "CDELT2": None, f"{matrix}1_1": -2 * ARCSEC, f"{matrix}2_2": 2 * ARCSEC}
        assert read_meta(write_image(tmp_path / f"{matrix}.fits", cards)).pixel_scale == pytest.approx(2 * ARCSEC)


def test_beams_of_other_conventions(tmp_path: Path) -> None:
    """Obit's CLEANBMJ/CLEANBMN/CLEANBPA are a beam; a round beam needs no BPA; a BMAJ of 0 (a
    placeholder) gives way to an AIPS HISTORY beam; an elliptical beam without BPA is still refused,
    and a CASA header whose beams are in a BEAMS table says so."""
    no_beam = {"BMAJ": None, "BMIN": None, "BPA": None}
    obit = read_meta(write_image(tmp_path / "o.fits", {**no_beam, "CLEANBMJ": 8 * ARCSEC, "CLEANBMN": 4 * ARCSEC,
                                                        "CLEANBPA": 30.0}))
    assert astuple(obit.beam) == pytest.approx((4 * ARCSEC, 2 * ARCSEC, 30.0))
    round_beam = read_meta(write_image(tmp_path / "r.fits", {"BMIN": 10 * ARCSEC, "BPA": None}))
    assert astuple(round_beam.beam) == pytest.approx((5 * ARCSEC, 5 * ARCSEC, 0.0))
    history = ("AIPS   CLEAN BMAJ=  2.7778E-03 BMIN=  1.3889E-03 BPA=  45.00",)
    aips = read_meta(write_image(tmp_path / "a.fits", {"BMAJ": 0.0, "BMIN": 0.0, "BPA": 0.0}, history=history))
    assert astuple(aips.beam) == pytest.approx((2.7778e-3 / 2, 1.3889e-3 / 2, 45.0))
    with pytest.raises(ImageError, match=r"^invalid restoring beam BMAJ=0.0 BMIN=0.0 BPA=0.0$"):
        read_meta(write_image(tmp_path / "z.fits", {"BMAJ": 0.0, "BMIN": 0.0, "BPA": 0.0}))
    with pytest.raises(ImageError, match=r"^no restoring beam: the header has no BPA and no HISTORY beam card;"):
        read_meta(write_image(tmp_path / "e.fits", {"BPA": None}))
    spare = read_meta(write_image(tmp_path / "s.fits", {"CLEANBMJ": "wide", "CLEANBMN": 1.0, "CLEANBPA": 0.0}))
    assert astuple(spare.beam) == pytest.approx((5 * ARCSEC, 3 * ARCSEC, 20.0))  # Obit's unread: BMAJ is there
    with pytest.raises(ImageError, match=r"no HISTORY beam card \(its per-plane beams are in a BEAMS table, "
                                         r"CASAMBM = T, which trap-dask does not read\); add BMAJ"):
        read_meta(write_image(tmp_path / "c.fits", {**no_beam, "CASAMBM": True}))


@pytest.mark.parametrize("key, value", [("BMAJ", b"INF"), ("BMAJ", b"NAN"), ("EXPTIME", b"INF"), ("CDELT1", b"1.0.0"),
                                        ("RESTFRQ", b"INF")])
def test_a_card_that_is_no_fits_value_is_named_without_astropys_warnings(tmp_path: Path, key: str,
                                                                         value: bytes) -> None:
    """BMAJ = INF is no FITS value at all: the image is rejected naming the card (not with astropy's
    "fix it first with .verify('fix')"), and astropy's verification warnings (several lines on
    stderr, about "zero-based indexing") are not printed."""
    import warnings

    path = write_image(tmp_path / "v.fits", {"EXPTIME": 60.0})
    raw = path.read_bytes()
    at = raw.index(key.ljust(8).encode() + b"= ")
    path.write_bytes(raw[:at] + key.ljust(8).encode() + b"= " + value.rjust(20) + b" " * 50 + raw[at + 80:])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(ImageError, match=rf"^unreadable {key}: its value is no FITS value \(a number, "):
            read_meta(path)

@pytest.mark.parametrize("name", [*sorted(REAL), "missing_metadata.fits"])
def test_the_looked_up_cards_give_what_astropys_whole_header_gives(name: str, monkeypatch) -> None:
    """The usual path parses only the cards it looks up (and reads a long header, 1436 cards of
    AIPS history here, past its first blocks); astropy's reader of the whole file says the same."""
    from trap_dask import image

    freq = (1.4e9, 1e6) if name == "missing_metadata.fits" else None  # a file without a frequency
    assert image._leading_primary_header(str(DATA / name)) is not None  # the usual path took it
    fast = read_meta(DATA / name, freq=freq)
    monkeypatch.setattr(image, "_leading_primary_header", lambda url: None)
    assert read_meta(DATA / name, freq=freq) == fast


def test_missing_metadata_with_override_uses_history_beam() -> None:
    # the Obit file has no BMAJ but "HISTORY AIPS CLEAN BMAJ= 2.2222e-02 BMIN= 2.2222e-02 BPA= 0.00"
    meta = read_meta(DATA / "missing_metadata.fits", freq=(1.4e9, 2e6))
    assert (meta.freq_eff, meta.freq_bw) == (1.4e9, 2e6)
    assert astuple(meta.beam) == pytest.approx((0.011111, 0.011111, 0.0))
    assert meta.taustart_ts == datetime(2006, 3, 22)
    data, _ = read_image(meta)
    assert data.shape == (2, 3) and data.dtype == np.float32


def test_synthetic_image_metadata(tmp_path: Path) -> None:
    meta = read_meta(write_image(tmp_path / "a.fits", {"EXPTIME": 120.0}))
    assert astuple(meta.beam) == pytest.approx((5 * ARCSEC, 3 * ARCSEC, 20.0))
    assert (meta.freq_eff, meta.freq_bw) == (1.4e9, 1e7)
    assert meta.taustart_ts == datetime(2021, 3, 4, 5, 6, 7, 500000)
    assert meta.tau_time == 120.0
    assert meta.shape == (16, 20)
    assert meta.pixel_scale == pytest.approx(2 * ARCSEC)
    # reference pixel (9.5, 7.5) 0-based is the centre of a 20 x 16 image
    assert (meta.centre_ra, meta.centre_dec) == pytest.approx((10.0, -40.0), abs=1e-12)
    restored = pickle.loads(pickle.dumps(meta))
    assert restored == meta
    assert celestial_wcs(restored).wcs.compare(celestial_wcs(meta).wcs)


def test_history_beam_last_card_wins(tmp_path: Path) -> None:
    path = write_image(
        tmp_path / "h.fits", {"BMAJ": None, "BMIN": None, "BPA": None},
        history=("AIPS   CLEAN BMAJ=  1.0000E-02 BMIN=  5.0000E-03 BPA=  10.00",
                 "AIPS   CLEAN BMAJ=  2.0000D-02 BMIN=  4.0000D-03 BPA= -45.5  ITER= 3"),
    )
    assert astuple(read_meta(path).beam) == pytest.approx((0.01, 0.002, -45.5))



def test_a_beam_written_with_bmaj_below_bmin_keeps_its_orientation(tmp_path: Path) -> None:
    """BPA is the angle of the BMAJ axis: a beam of 10" x 15" at 120 deg is one of 15" x 10" at 210
    (the same ellipse), not at 120."""
    path = write_image(tmp_path / "b.fits", {"BMAJ": 10 * ARCSEC, "BMIN": 15 * ARCSEC, "BPA": 120.0})
    beam = read_meta(path).beam
    assert (beam.smaj, beam.smin) == pytest.approx((7.5 * ARCSEC, 5 * ARCSEC))
    assert beam.pa == pytest.approx(30.0)


@pytest.mark.parametrize("bpa, pa", [(400.0, 40.0), (-200.0, -20.0), (90.0, 90.0), (-135.0, -135.0)])
def test_a_beam_angle_beyond_a_half_turn_either_way_is_brought_back(tmp_path: Path, bpa: float, pa: float) -> None:
    """BPA 400 deg is the beam at 40 deg; within [-180, 180] the header's angle is kept as written."""
    assert read_meta(write_image(tmp_path / "b.fits", {"BPA": bpa})).beam.pa == pytest.approx(pa)


@pytest.mark.parametrize("bunit, scale", [("JY/BEAM", 1.0), ("Jy/beam", 1.0), (None, 1.0), ("mJy/beam", 1e-3),
                                          ("uJy/beam", 1e-6), ("mJy/bm", 1e-3), ("Jy beam-1", 1.0),
                                          ("Jy.beam-1", 1.0), ("mJy beam-1", 1e-3)])
def test_pixels_are_read_in_jy_per_beam_whatever_the_bunit(tmp_path: Path, bunit: str | None, scale: float) -> None:
    """An image in mJy/beam is read in Jy/beam (its fluxes were 1000 times too large), by the fast
    float path and by astropy's (scaled integers) alike; no BUNIT is taken as Jy/beam."""
    data = np.arange(320, dtype=np.float32).reshape(16, 20)
    for name, pixels, cards in (("f.fits", data, {}), ("i.fits", data.astype(np.int16), {"BSCALE": 1.0})):
        meta = read_meta(write_image(tmp_path / name, {"BUNIT": bunit, **cards}, pixels))
        assert meta.flux_scale == scale
        plane, _ = read_image(meta, read_file(meta.url)[0])
        assert plane.dtype == np.float32 and np.allclose(plane, data * scale, rtol=1e-6)


@pytest.mark.parametrize("bunit", ["K", "JY/PIXEL", "MJY/BEAM"])
def test_pixels_that_are_not_flux_densities_per_beam_are_rejected(tmp_path: Path, bunit: str) -> None:
    with pytest.raises(ImageError, match=rf"^BUNIT = '{bunit}': the pixels must be flux densities per beam"):
        read_meta(write_image(tmp_path / "k.fits", {"BUNIT": bunit}))


@pytest.mark.parametrize("cards", [{"RADESYS": "FK4", "EQUINOX": 1950.0}, {"EQUINOX": 1950.0}])
def test_b1950_coordinates_are_rejected(tmp_path: Path, cards: dict) -> None:
    with pytest.raises(ImageError, match=r"^the image's RA/Dec are FK4 \(B1950\), not ICRS or FK5 \(J2000\)"):
        read_meta(write_image(tmp_path / "b.fits", cards))
    assert read_meta(write_image(tmp_path / "j.fits", {"RADESYS": "FK5", "EQUINOX": 2000.0})).centre_ra > 0


@pytest.mark.parametrize("cards, said", [({"RADESYS": "FK5", "EQUINOX": 1950.0}, "FK5 of equinox J1950"),
                                         ({"RADESYS": "GAPPT"}, "in the GAPPT frame")])
def test_coordinates_of_another_equinox_or_the_apparent_place_are_rejected(tmp_path: Path, cards: dict,
                                                                           said: str) -> None:
    """Only ICRS and FK5 J2000 are the database's frame: FK5 of another equinox, or the apparent
    place of the day, were stored as if they were (0.7 deg off for J1950)."""
    with pytest.raises(ImageError, match=rf"^the image's RA/Dec are {said}.*reproject the image$"):
        read_meta(write_image(tmp_path / "f.fits", cards))
    assert read_meta(write_image(tmp_path / "icrs.fits", {"RADESYS": "ICRS"})).centre_ra > 0
    for frame in ("icrs", "fk5"):  # in any case
        assert read_meta(write_image(tmp_path / f"lower_{frame}.fits", {"RADESYS": frame})).centre_ra > 0

def test_user_overrides_win(tmp_path: Path) -> None:
    path = write_image(tmp_path / "o.fits")
    beam = Beam(1e-3, 5e-4, 45.0)
    meta = read_meta(path, beam=beam, freq=(150e6, 2e5))
    assert meta.beam == beam
    assert (meta.freq_eff, meta.freq_bw) == (150e6, 2e5)


def test_degenerate_cube_with_freq_axis(tmp_path: Path) -> None:
    cards = {"RESTFRQ": None, "RESTBW": None, "CTYPE3": "FREQ", "CRVAL3": 1.5e8, "CDELT3": 2e6,
             "CRPIX3": 1.0, "CUNIT3": "Hz", "CTYPE4": "STOKES", "CRVAL4": 1.0, "CDELT4": 1.0, "CRPIX4": 1.0}
    plane = np.random.default_rng(1).standard_normal((16, 20)).astype(np.float32)
    meta = read_meta(write_image(tmp_path / "c.fits", cards, plane[None, None]))
    assert (meta.freq_eff, meta.freq_bw, meta.shape) == (1.5e8, 2e6, (16, 20))
    data, wcs = read_image(meta)
    np.testing.assert_array_equal(data, plane)
    assert wcs.naxis == 2



@pytest.mark.parametrize("stokes, name", [(2.0, "Q"), (4.0, "V"), (-5.0, "XX"), (7.0, "unknown")])
def test_a_plane_that_is_not_stokes_i_is_rejected(tmp_path: Path, stokes: float, name: str) -> None:
    cards = {"CTYPE3": "FREQ", "CRVAL3": 1.5e8, "CDELT3": 2e6, "CRPIX3": 1.0, "CUNIT3": "Hz",
             "CTYPE4": "STOKES", "CRVAL4": stokes, "CDELT4": 1.0, "CRPIX4": 1.0}
    plane = np.ones((1, 1, 16, 20), np.float32)
    with pytest.raises(ImageError, match=rf"^the plane is Stokes {name} \(STOKES = {stokes:g}\); trap-dask "
                                         r"measures Stokes I \(total intensity\)$"):
        read_meta(write_image(tmp_path / "p.fits", cards, plane))


@pytest.mark.parametrize("cards", [{}, {"BSCALE": 2.0}])  # read straight from the bytes; through astropy
def test_a_mask_written_as_zeros_is_blank_as_one_written_as_nan(tmp_path: Path, cards: dict) -> None:
    """Zeros outside a circle (a primary beam's mask) read as NaN, the noise inside unchanged; a lone
    zero on the edge is a pixel value."""
    noise = np.random.default_rng(3).standard_normal((40, 50)).astype(np.float32)
    y, x = np.indices(noise.shape)
    outside = np.hypot(x - 24.5, y - 19.5) > 18
    zeros, nans = np.where(outside, np.float32(0), noise), np.where(outside, np.float32(np.nan), noise)
    for name, data in (("zeros.fits", zeros), ("nans.fits", nans)):
        write_image(tmp_path / name, cards, data / cards.get("BSCALE", 1.0))
    read = [read_image(read_meta(tmp_path / name), read_file(str(tmp_path / name))[0])[0]
            for name in ("zeros.fits", "nans.fits")]
    np.testing.assert_array_equal(read[0], read[1])
    lone = noise.copy()
    lone[0, 7] = 0.0
    plane, _ = read_image(read_meta(write_image(tmp_path / "lone.fits", {}, lone)))
    np.testing.assert_array_equal(plane, lone)


def test_a_quantized_image_keeps_its_zeros(tmp_path: Path) -> None:
    """fpack's quantization without dithering leaves one pixel in ten of the noise exactly zero,
    scattered: pixel values, not a mask (every zero of such an image was blanked, its noise
    measured without them)."""
    noise = np.random.default_rng(5).standard_normal((64, 80)).astype(np.float32)
    header = fits.Header({key: value for key, value in BASE_CARDS.items() if value is not None})
    packed = fits.CompImageHDU(noise, header=header, quantize_level=4, quantize_method=-1)  # -1: no dithering
    fits.HDUList([fits.PrimaryHDU(), packed]).writeto(tmp_path / "q.fits.fz")
    plane, _ = read_image(read_meta(tmp_path / "q.fits.fz"))
    assert 0.05 < np.mean(plane == 0.0) and not np.isnan(plane).any()



@pytest.mark.parametrize("reader", ["bytes", "astropy"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_infinite_pixels_read_as_blank(tmp_path: Path, reader: str, dtype: type) -> None:
    """+-inf pixels, and float64 values beyond float32's range, read as NaN pixels do, through either
    reader (from the file's bytes, as a run reads; through astropy); the other pixels are unchanged."""
    noise = np.random.default_rng(4).standard_normal((16, 20)).astype(dtype)
    spoilt, blank = noise.copy(), noise.copy()
    spoilt[3, 4], spoilt[5, 6] = np.inf, -np.inf
    blank[3, 4] = blank[5, 6] = np.nan
    if dtype is np.float64:
        spoilt[7, 8], blank[7, 8] = 1e300, np.nan
    paths = write_image(tmp_path / "inf.fits", {}, spoilt), write_image(tmp_path / "nan.fits", {}, blank)
    read = [read_image(read_meta(path), read_file(str(path))[0] if reader == "bytes" else None)[0] for path in paths]
    assert np.isnan(read[0]).sum() == (3 if dtype is np.float64 else 2)
    np.testing.assert_array_equal(read[0], read[1])

def test_a_restfrq_that_is_a_line_is_not_the_observing_frequency(tmp_path: Path) -> None:
    """A FREQ axis says where an image observed; RESTFRQ is a line's rest frequency, also within the
    band: a MeerKAT L-band continuum image (1.284 GHz, 856 MHz wide) carrying the HI line's
    1.4204 GHz was stored at 1.4204 GHz. LOFAR's images are read as TraP reads them: RESTFRQ and
    RESTBW where RESTFRQ agrees with the axis to within a channel."""
    cards = {"CTYPE3": "FREQ", "CRVAL3": 1.284e9, "CDELT3": 8.56e8, "CRPIX3": 1.0, "CUNIT3": "Hz", "RESTBW": None}
    plane = np.ones((1, 16, 20), np.float32)
    for name, rest in (("hi.fits", 1.420405752e9), ("far.fits", 1.5e8)):
        meta = read_meta(write_image(tmp_path / name, {**cards, "RESTFRQ": rest}, plane))
        assert (meta.freq_eff, meta.freq_bw) == (1.284e9, 8.56e8)
    lofar = {**cards, "CRVAL3": 1.5e8, "CDELT3": 2e6, "TELESCOP": "LOFAR"}
    same = read_meta(write_image(tmp_path / "lofar.fits", {**lofar, "RESTFRQ": 1.505e8, "RESTBW": 1.9e6}, plane))
    assert (same.freq_eff, same.freq_bw) == (1.505e8, 1.9e6)
    line = read_meta(write_image(tmp_path / "lofar_hi.fits", {**lofar, "RESTFRQ": 1.420405752e9}, plane))
    assert (line.freq_eff, line.freq_bw) == (1.5e8, 2e6)
    band = read_meta(write_image(tmp_path / "aartfaac.fits", {**lofar, "TELESCOP": "AARTFAAC-6", "RESTFRQ": 1.6e8,
                                                              "RESTBW": 1.9e6}, plane))
    assert (band.freq_eff, band.freq_bw) == (1.5e8, 1.9e6)  # RESTFRQ 5 channels off: the axis; its RESTBW


CD_MATRIX = {"CD1_1": -2 * ARCSEC, "CD2_2": 2 * ARCSEC, "CDELT1": None, "CDELT2": None}


@pytest.mark.parametrize("increment", [{}, CD_MATRIX, {"PC3_3": 1.0}, {**CD_MATRIX, "CDELT3": 2e6}])
def test_a_spectral_axis_without_an_increment_has_no_bandwidth(tmp_path: Path, increment: dict) -> None:
    """A FREQ axis without CDELT3 (with PC3_3 alone, or beside a CD matrix of RA/Dec without CD3_3,
    where WCSLIB reads no CDELT3): WCSLIB takes an increment of 1, and every image was stored with a
    bandwidth of 1 Hz, each its own band. RESTBW gives the bandwidth then, else the image is
    rejected saying so."""
    cards = {"CTYPE3": "FREQ", "CRVAL3": 1.5e8, "CRPIX3": 1.0, "CUNIT3": "Hz", "RESTFRQ": None, "RESTBW": None,
             **increment}
    plane = np.ones((1, 16, 20), np.float32)
    with pytest.raises(ImageError, match=r"^no bandwidth: the spectral axis has no increment \(CDELT\) and the "
                                         r"header no positive RESTBW; add RESTBW \(Hz\) to the header$"):
        read_meta(write_image(tmp_path / "no_cdelt3.fits", cards, plane))
    meta = read_meta(write_image(tmp_path / "restbw.fits", {**cards, "RESTBW": 2e6}, plane))
    assert (meta.freq_eff, meta.freq_bw) == (1.5e8, 2e6)


def test_time_fallbacks(tmp_path: Path) -> None:
    mjd = read_meta(write_image(tmp_path / "m.fits", {"DATE-OBS": None, "MJD-OBS": 59000.25}))
    assert mjd.taustart_ts == datetime(2020, 5, 31, 6)
    tai = read_meta(write_image(tmp_path / "t.fits", {"DATE-OBS": "2020-01-01T00:00:37", "TIMESYS": "TAI"}))
    assert tai.taustart_ts == datetime(2020, 1, 1)  # TAI - UTC = 37 s
    zulu = read_meta(write_image(tmp_path / "z.fits", {"DATE-OBS": "2020-01-01T10:20:30Z", "TIMESYS": "TAI"}))
    assert zulu.taustart_ts == datetime(2020, 1, 1, 10, 20, 30)  # Z: UTC
    split = read_meta(write_image(tmp_path / "s.fits", {"DATE-OBS": "2020-01-01", "TIME-OBS": "10:20:30.5"}))
    assert split.taustart_ts == datetime(2020, 1, 1, 10, 20, 30, 500000)  # the older date + time convention
    split_z = read_meta(write_image(tmp_path / "sz.fits", {"DATE-OBS": "2020-01-01", "TIME-OBS": "10:20:30Z"}))
    assert split_z.taustart_ts == datetime(2020, 1, 1, 10, 20, 30)
    with pytest.raises(ImageError, match=r"^unreadable start time DATE-OBS \+ TIME-OBS='2020-01-01T25:00:00'"):
        read_meta(write_image(tmp_path / "bad.fits", {"DATE-OBS": "2020-01-01", "TIME-OBS": "25:00:00"}))



def test_start_times_of_other_conventions(tmp_path: Path) -> None:
    """Seen in real imagers' headers: a DATE-OBS of a date alone beside MJD-OBS (AIPS, Obit) was
    read as midnight; FITS 4.0's DATE-BEG or MJD-BEG alone was refused; GPS time was taken as UTC
    (18 s off) and a LOCAL one refused with astropy's words."""
    aips = read_meta(write_image(tmp_path / "a.fits", {"DATE-OBS": "2020-05-31", "MJD-OBS": 59000.4375}))
    assert aips.taustart_ts == datetime(2020, 5, 31, 10, 30)
    late = read_meta(write_image(tmp_path / "late.fits", {"DATE-OBS": "2020-01-01", "MJD-OBS": 58849.9999999999}))
    assert late.taustart_ts == datetime(2020, 1, 1, 23, 59, 59, 999991)  # (milliseconds made it the next day)
    for mjd in (59010.25, 0.0, "soon"):  # another day, or no MJD: the date alone, as before
        other = read_meta(write_image(tmp_path / "o.fits", {"DATE-OBS": "2020-05-31", "MJD-OBS": mjd}))
        assert other.taustart_ts == datetime(2020, 5, 31)
        (tmp_path / "o.fits").unlink()
    midnight = read_meta(write_image(tmp_path / "d.fits", {"DATE-OBS": "2020-05-31"}))
    assert midnight.taustart_ts == datetime(2020, 5, 31)  # nothing gives its time of day
    beg = read_meta(write_image(tmp_path / "b.fits", {"DATE-OBS": None, "DATE-BEG": "2020-05-31T06:00:00"}))
    mjd_beg = read_meta(write_image(tmp_path / "mb.fits", {"DATE-OBS": None, "MJD-BEG": 59000.25}))
    assert beg.taustart_ts == mjd_beg.taustart_ts == datetime(2020, 5, 31, 6)
    gps = read_meta(write_image(tmp_path / "g.fits", {"DATE-OBS": "2020-01-01T00:00:18", "TIMESYS": "GPS"}))
    assert gps.taustart_ts == datetime(2020, 1, 1)  # GPS = TAI - 19 s, TAI - UTC = 37 s
    iat = read_meta(write_image(tmp_path / "i.fits", {"DATE-OBS": "2020-01-01T00:00:37", "TIMESYS": "IAT"}))
    assert iat.taustart_ts == datetime(2020, 1, 1)  # IAT: TAI's older name
    with pytest.raises(ImageError, match=r"^TIMESYS = 'LOCAL': a local clock has no known relation to UTC"):
        read_meta(write_image(tmp_path / "l.fits", {"TIMESYS": "LOCAL"}))
    with pytest.raises(ImageError, match=r"^no start time: the header has neither DATE-OBS nor MJD-OBS"):
        read_meta(write_image(tmp_path / "n.fits", {"DATE-OBS": None}))


@pytest.mark.parametrize("value", ["2021-03-04T05:06:07", "2021-03-04T05:06:07.5", "2021-03-04T05:06:07.123456",
                                   "2021-03-04T05:06:07.123456789", "2021-03-04", "2021-03-04T05:06:60"])
def test_start_times_are_astropys(tmp_path: Path, value: str) -> None:
    """A plain UTC DATE-OBS is read without astropy's Time, to the same datetime; finer than
    microseconds, a date alone or a 60th second go through astropy as before."""
    expected = Time(value, format="fits", scale="utc").utc.to_datetime()  # (60 s: the next minute)
    assert read_meta(write_image(tmp_path / "t.fits", {"DATE-OBS": value})).taustart_ts == expected


def test_a_start_in_a_leap_second_is_read_as_the_next_second(tmp_path: Path) -> None:
    """23:59:60 UTC on a day with a leap second is a valid time that Python's datetime cannot hold:
    the image starts as far into the next second rather than being rejected as unreadable."""
    meta = read_meta(write_image(tmp_path / "leap.fits", {"DATE-OBS": "2016-12-31T23:59:60.5"}))
    assert meta.taustart_ts == datetime(2017, 1, 1, 0, 0, 0, 500000)


def test_header_text_without_keywords_looks_at_the_keyword_field_only() -> None:
    """Cards go by their keyword (columns 1-8, any case); a value that mentions one stays; nothing after END."""
    from trap_dask.image import _cards_without, _without_times

    cards = [fits.Card("SIMPLE", True), fits.Card("DATE-OBS", "2021-03-04T05:06:07"), fits.Card("HISTORY", "DATE-OBS"),
             fits.Card("OBJECT", "DATE-OBS"), fits.Card("COMMENT", "note"), fits.Card("MJD-OBS", 59277.2)]
    lower, end = "date    = '2021'".ljust(80), "END".ljust(80)
    text = "".join(card.image for card in cards) + lower + end + " " * 160
    kept = _without_times(text)
    assert kept == cards[0].image + cards[3].image + end
    assert _cards_without(text, frozenset({"HISTORY", "COMMENT"})) == (
        "".join(c.image for c in cards if c.keyword not in ("HISTORY", "COMMENT")) + lower + end)
    assert list(fits.Header.fromstring(kept)) == ["SIMPLE", "OBJECT"]


def test_blank_integer_pixels_become_nan(tmp_path: Path) -> None:
    data = np.arange(320, dtype=np.int32).reshape(16, 20)
    data[3, 4] = -999
    meta = read_meta(write_image(tmp_path / "i.fits", {"BLANK": -999}, data))
    image, _ = read_image(meta)
    assert np.isnan(image[3, 4]) and np.isfinite(image).sum() == 319


@pytest.mark.parametrize(
    ("cards", "data", "message"),
    [
        ({"BMAJ": None}, None, "no restoring beam"),
        ({"BMIN": -1.0}, None, "invalid restoring beam"),
        ({"DATE-OBS": None}, None, "no start time"),
        ({"DATE-OBS": "yesterday"}, None, "unreadable start time"),
        ({"RESTBW": None}, None, "no bandwidth"),
        ({"CTYPE1": "X", "CTYPE2": "Y"}, None, "not a 2-D celestial image"),
        ({"CTYPE1": "GLON-SIN", "CTYPE2": "GLAT-SIN"}, None, "GLON/GLAT are not RA/Dec"),
        ({"CTYPE1": "DEC--SIN", "CTYPE2": "RA---SIN"}, None, "transposed images are not supported"),
        ({"CTYPE3": "FREQ", "CRVAL3": 1e8, "CDELT3": 1e6, "CRPIX3": 1.0}, np.zeros((3, 16, 20), np.float32),
         "3 planes along FREQ"),
        ({}, np.zeros(20, np.float32), "no image with at least two axes"),
    ],
)
def test_unusable_headers_raise(tmp_path: Path, cards: dict, data: np.ndarray | None, message: str) -> None:
    path = write_image(tmp_path / "bad.fits", cards, data)
    with pytest.raises(ImageError, match=message):
        read_meta(path)


def test_unreadable_files_raise(tmp_path: Path) -> None:
    with pytest.raises(ImageError, match="file not found"):
        read_meta(tmp_path / "absent.fits")
    garbage = tmp_path / "garbage.fits"
    garbage.write_bytes(b"this is not FITS" * 300)
    with pytest.raises(ImageError, match="not a readable FITS file"):
        read_meta(garbage)


@pytest.mark.filterwarnings("error")
@pytest.mark.parametrize("bitpix", [np.float32, np.int16])
def test_truncated_data_raise(tmp_path: Path, bitpix: type) -> None:
    """Said as such, and without astropy's warning on the way (float pixels: read straight from
    the bytes; integers: through astropy)."""
    path = write_image(tmp_path / "trunc.fits", data=np.ones((400, 400), bitpix))
    meta = read_meta(path)
    path.write_bytes(path.read_bytes()[: 2880 * 3])
    for raw in (None, read_file(str(path))[0]):
        with pytest.raises(ImageError, match="^the file is truncated: it holds fewer pixels than its header says$"):
            read_image(meta, raw)


def test_image_in_extension_hdu(tmp_path: Path) -> None:
    header = fits.Header(list(BASE_CARDS.items()))
    plane = np.ones((16, 20), np.float32)
    fits.HDUList([fits.PrimaryHDU(), fits.ImageHDU(plane, header)]).writeto(tmp_path / "ext.fits")
    meta = read_meta(tmp_path / "ext.fits")
    assert meta.hdu == 1
    np.testing.assert_array_equal(read_image(meta)[0], plane)


@pytest.mark.parametrize("suffix", [".gz", ".bz2", ".xz", ".zip"])
def test_compressed_files_read_from_disk_and_from_memory(tmp_path: Path, suffix: str) -> None:
    import bz2
    import gzip
    import lzma
    import zipfile

    plain = write_image(tmp_path / "c.fits").read_bytes()
    packed = tmp_path / f"c.fits{suffix}"
    if suffix == ".zip":
        with zipfile.ZipFile(packed, "w", zipfile.ZIP_DEFLATED) as archive:
            archive.writestr("c.fits", plain)
    else:
        packed.write_bytes({".gz": gzip, ".bz2": bz2, ".xz": lzma}[suffix].compress(plain))
    meta = read_meta(packed)
    expected = np.arange(320, dtype=np.float32).reshape(16, 20)
    np.testing.assert_array_equal(read_image(meta)[0], expected)
    np.testing.assert_array_equal(read_image(meta, packed.read_bytes())[0], expected)
    np.testing.assert_array_equal(read_image(meta, read_file(str(packed))[0])[0], expected)


@pytest.mark.parametrize("cards, reason", [
    ({"DATE-OBS": "2021-13-45T00:00:00"},
     "unreadable start time DATE-OBS='2021-13-45T00:00:00': "
     "not a valid FITS date and time (YYYY-MM-DDThh:mm:ss[.sss])"),
    ({"DATE-OBS": "yesterday"},
     "unreadable start time DATE-OBS='yesterday': not a valid FITS date and time (YYYY-MM-DDThh:mm:ss[.sss])"),
    ({"DATE-OBS": None, "MJD-OBS": "soon"}, "unreadable start time MJD-OBS='soon': not a valid MJD"),
    ({"EXPTIME": "long"}, "unreadable EXPTIME='long': not a number"),
    ({"BMAJ": "wide"}, "unreadable BMAJ='wide': not a number"),
    ({"RESTFRQ": "low"}, "unreadable RESTFRQ='low': not a number"),
    ({"RESTFRQ": 0.0}, "no frequency: RESTFRQ=0.0 is not positive and the header has no spectral (FREQ) axis; "
                       "add RESTFRQ (Hz) to the header"),
    ({"RESTBW": -1.0}, "no bandwidth: RESTBW=-1.0 is not positive and the header has no spectral (FREQ) axis; "
                       "add RESTBW (Hz) to the header"),
    ({"CRVAL1": "east"}, "invalid world coordinate system: CRVAL1 = 'east' is not a number"),
    ({"CDELT2": "small"}, "invalid world coordinate system: CDELT2 = 'small' is not a number"),
    ({"CDELT2": 0.0}, "invalid world coordinate system: CDELT2 = 0 (DEC--SIN): an axis needs a non-zero increment, "
                      "also one of a single plane"),
])
def test_rejection_reasons_are_one_line_without_class_names(tmp_path: Path, cards: dict, reason: str) -> None:
    with pytest.raises(ImageError) as caught:
        read_meta(write_image(tmp_path / "bad.fits", cards))
    assert str(caught.value) == reason


def test_a_blank_zero_or_negative_restfrq_leaves_the_spectral_axis_to_say() -> None:
    """RESTFRQ/RESTBW blank, 0 or negative: the frequency axis's values, as when they are absent."""
    from trap_dask.image import _frequency

    for card in ("RESTFRQ =", "RESTFRQ =                  0.0", "RESTFRQ =              -1.0E8"):
        header = fits.Header.fromstring(card.ljust(80) + "RESTBW  =                 -1.0".ljust(80) + "END".ljust(80))
        assert _frequency(header, (1.4e9, 1e6)) == (1.4e9, 1e6), card


def test_a_dimension_that_is_not_a_whole_number_rejects_the_image(tmp_path: Path) -> None:
    """NAXIS1 = 20.0 is not FITS (astropy's reader fails on it too, with a TypeError): the image is
    rejected when its header is read, saying why, not when its pixels are."""
    path = write_image(tmp_path / "a.fits")
    raw = path.read_bytes()
    card = b"NAXIS1  =                   20"
    assert card in raw
    path.write_bytes(raw.replace(card, b"NAXIS1  =                 20.0"))
    with pytest.raises(ImageError, match=r"^invalid NAXIS1 = 20\.0: not a whole number of pixels$"):
        read_meta(path)


def _card(key: str, value: str) -> bytes:
    """An 80-byte header card of a value written as FITS text."""
    return f"{key:<8}= {value}".ljust(80).encode()


def test_a_long_string_of_a_looked_up_card_is_read_with_its_continue_card(tmp_path: Path, monkeypatch) -> None:
    """TIMESYS = 'TA&' continued by CONTINUE 'I' is TAI on the usual path, as astropy's reader of the
    whole file says (without its CONTINUE card the time would be read as UTC, 37 s off)."""
    from trap_dask import image

    path = write_image(tmp_path / "a.fits", {"TIMESYS": "UTC", "OBSERVER": "someone"})
    raw = path.read_bytes()
    timesys, observer = raw.index(b"TIMESYS ="), raw.index(b"OBSERVER=")
    assert observer == timesys + 80
    raw = raw[:timesys] + _card("TIMESYS", "'TA&'") + b"CONTINUE  'I'".ljust(80) + raw[timesys + 160:]
    path.write_bytes(raw)
    fast = read_meta(path)
    assert fast.taustart_ts == datetime(2021, 3, 4, 5, 5, 30, 500000)  # 05:06:07.5 TAI is 37 s earlier in UTC
    monkeypatch.setattr(image, "_leading_primary_header", lambda url: None)
    assert read_meta(path) == fast


def test_a_naxis_that_is_text_rejects_the_image(tmp_path: Path) -> None:
    path = write_image(tmp_path / "a.fits")
    raw = path.read_bytes()
    at = raw.index(b"NAXIS   =")
    path.write_bytes(raw[:at] + _card("NAXIS", "'2'") + raw[at + 80:])
    with pytest.raises(ImageError, match=r"^invalid NAXIS = '2': not a whole number of pixels$"):
        read_meta(path)


def test_a_blank_exposure_time_is_as_if_absent(tmp_path: Path) -> None:
    """EXPTIME without a value (or only spaces) says nothing: the next of INTTIME/TAU_TIME/XPOSURE/
    DURATION/TELAPSE that has a positive one, else 0 s, as when the card is absent; a value that is
    not a number still rejects."""
    cases = (({"EXPTIME": None}, 0.0), ({"EXPTIME": "   "}, 0.0), ({"EXPTIME": None, "INTTIME": 30.0}, 30.0),
             ({"EXPTIME": -5.0}, 0.0),  # a negative time says nothing either, nor does 0 (it hid INTTIME)
             ({"EXPTIME": 0.0, "INTTIME": 600.0}, 600.0), ({"XPOSURE": 45.0}, 45.0),  # FITS 4.0
             ({"DURATION": 900.0}, 900.0), ({"TELAPSE": 20.0}, 20.0))  # ASKAPsoft's; the elapsed time
    for number, (cards, tau) in enumerate(cases):
        path = write_image(tmp_path / f"blank{number}.fits", {})
        with fits.open(path, mode="update") as hdul:
            for key, value in cards.items():
                hdul[0].header[key] = value
        assert read_meta(path).tau_time == tau, cards


def test_a_wcs_note_about_other_keywords_does_not_reject() -> None:
    """A keyword outside the transformation that is not what wcslib expects (EQUINOX as text, as
    some old headers have it) leaves the image usable; CRVAL1 as text rejects it."""
    from trap_dask.image import _header_wcs

    header = fits.Header({"NAXIS": 2, "NAXIS1": 20, "NAXIS2": 16, "CTYPE1": "RA---SIN", "CTYPE2": "DEC--SIN",
                          "CRVAL1": 10.0, "CRVAL2": -40.0, "CRPIX1": 10.0, "CRPIX2": 8.0, "CDELT1": -0.001,
                          "CDELT2": 0.001, "EQUINOX": "J2000"})
    assert list(_header_wcs(header).wcs.crval) == [10.0, -40.0]
    header["CRVAL1"] = "ten"
    with pytest.raises(ImageError, match="CRVAL1"):
        _header_wcs(header)


def test_library_messages_become_one_line() -> None:
    from trap_dask.image import one_line

    nested = ValueError("Input values did not match the format class fits:\nErfaError: ERFA function \"dtf2d\" "
                        "yielded 1 of \"bad month\"")
    assert one_line(nested) == 'ERFA function "dtf2d" yielded 1 of "bad month"'
    assert one_line(KeyError()) == "KeyError"
    assert one_line(RuntimeError("boom")) == "boom"


@pytest.mark.parametrize(
    ("cards", "dtype", "extension"),
    [({}, np.float32, False), ({}, np.float64, False), ({}, np.float32, True),
     ({"BSCALE": 2.0, "BZERO": 1.0}, np.float32, False), ({"BLANK": -999}, np.int16, False)],
)
def test_pixels_from_bytes_equal_astropys(tmp_path: Path, cards: dict, dtype: type, extension: bool,
                                          monkeypatch) -> None:
    """Unscaled float planes are read straight from the file's bytes (float32 ones made native in
    place, here in bands of 7 pixels); whatever the path, the pixels are what astropy reads."""
    monkeypatch.setattr(image, "_SWAP_BAND", 7)
    data = (np.arange(320).reshape(16, 20) - 100).astype(dtype) * (1 if dtype == np.int16 else 0.25)
    if dtype == np.int16:
        data[2, 3] = -999
    path = tmp_path / "p.fits"
    if extension:
        fits.HDUList([fits.PrimaryHDU(), fits.ImageHDU(data, fits.Header(list(BASE_CARDS.items())))]).writeto(path)
    elif "BSCALE" in cards:  # astropy leaves both out of a float image it writes: put them in its bytes
        write_image(path, {"OBSERVER": "x", "OBJECT": "y"}, data)
        raw = path.read_bytes()
        at = raw.index(b"OBSERVER=")
        assert raw[at + 80 : at + 88] == b"OBJECT  "
        path.write_bytes(raw[:at] + b"".join(_card(key, str(value)) for key, value in cards.items()) + raw[at + 160:])
        assert fits.getheader(path)["BSCALE"] == 2.0
    else:
        write_image(path, cards, data)
    meta = read_meta(path)
    from_bytes, from_file = read_image(meta, path.read_bytes())[0], read_image(meta)[0]
    assert from_bytes.dtype == np.float32 and from_bytes.shape == (16, 20)
    np.testing.assert_array_equal(from_bytes, from_file)
    np.testing.assert_array_equal(from_file, fits.getdata(path).astype(np.float32))  # scaled as astropy scales
    buffer, _ = read_file(str(path))  # what the workers read: its float32 pixels become the plane
    in_place = read_image(meta, buffer)[0]
    np.testing.assert_array_equal(in_place, from_file)
    if dtype == np.float32 and not cards:
        assert np.shares_memory(in_place, buffer)
    with fits.open(path) as hdul:  # astropy applies BSCALE/BZERO and the tests' BLANK pixel is NaN
        expected = hdul[meta.hdu].data.astype(np.float32)
    if dtype == np.int16:
        expected[2, 3] = np.nan
    np.testing.assert_array_equal(from_bytes, expected)


@pytest.mark.parametrize("n_history", [0, 700])
def test_a_header_from_the_files_first_bytes_is_astropys(tmp_path: Path, n_history: int) -> None:
    """The primary header's text read from the file's first blocks (or further, for a header longer
    than those: 700 HISTORY cards) is the one astropy's reader gives, and the cards looked up from
    it have astropy's values; the metadata is that of the same image without history."""
    from trap_dask.image import _leading_primary_header

    short = write_image(tmp_path / "short.fits")
    path = write_image(tmp_path / f"h{n_history}.fits", history=tuple(f"step {i}" for i in range(n_history)))
    header, text = _leading_primary_header(str(path))
    full = fits.getheader(path)
    assert text == full.tostring()
    assert {"SIMPLE", "NAXIS1", "BMAJ", "DATE-OBS", "RESTFRQ"} <= set(header) and "CTYPE1" not in header
    assert {key: header[key] for key in header} == {key: full[key] for key in header}
    assert replace(read_meta(path), url="") == replace(read_meta(short), url="")
    meta = read_meta(path)
    np.testing.assert_array_equal(read_image(meta, read_file(str(path))[0])[0], fits.getdata(path).astype(np.float32))


def test_images_of_one_field_share_their_wcs_work_but_not_their_times(tmp_path: Path) -> None:
    """Headers that differ only in their time keywords are one WCS to work out (cached); each
    image keeps its own start time, and another pointing its own centre."""
    from trap_dask.image import _sky_frame

    first = read_meta(write_image(tmp_path / "a.fits"))
    hits = _sky_frame.cache_info().hits
    later = read_meta(write_image(tmp_path / "b.fits", {"DATE-OBS": "2021-03-05T05:06:07.5", "MJD-OBS": 59278.2}))
    assert _sky_frame.cache_info().hits == hits + 1
    assert later.taustart_ts == datetime(2021, 3, 5, 5, 6, 7, 500000) != first.taustart_ts
    assert (later.centre_ra, later.centre_dec, later.pixel_scale) == (first.centre_ra, first.centre_dec,
                                                                      first.pixel_scale)
    moved = read_meta(write_image(tmp_path / "c.fits", {"CRVAL2": -41.0}))
    assert moved.centre_dec == pytest.approx(first.centre_dec - 1.0, abs=1e-3)
    # the images' celestial WCS: worked out once for the field, each image its own copy
    from trap_dask.image import _field_wcs, _header_wcs

    wcs_first, hits = celestial_wcs(first), _field_wcs.cache_info().hits
    wcs_later, wcs_moved = celestial_wcs(later), celestial_wcs(moved)
    assert _field_wcs.cache_info().hits == hits + 1 and wcs_later is not wcs_first
    x, y = np.array([0.0, 7.5, 19.0]), np.array([0.0, 3.0, 15.0])
    for meta, wcs in ((later, wcs_later), (moved, wcs_moved)):
        direct = _header_wcs(fits.Header.fromstring(meta.header)).celestial
        assert np.array_equal(wcs.pixel_to_world_values(x, y), direct.pixel_to_world_values(x, y))
