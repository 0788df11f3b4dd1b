"""The export database schema, defined once for every backend (SQLAlchemy Core).

The TraP 1.x tables keep their names, columns and units (``config``, ``images``,
``extracted_sources``, ``frequencybands``, ``variability``); our additions are ``schema_version``,
``runs``, ``runningcatalog`` and ``_variability_running_averages`` (what a later run needs to
append), ``newsource`` (transient candidates) and ``monitor``. ``python -m trap_dask.db.schema``
prints the DDL for both backends; ``schema/`` holds that output, versioned with
:data:`SCHEMA_VERSION`.
"""

from __future__ import annotations

import sys
from typing import Any

from sqlalchemy import (
    BigInteger,
    Boolean,
    Column,
    DateTime,
    Double,
    ForeignKey,
    ForeignKeyConstraint,
    Index,
    Integer,
    MetaData,
    String,
    Table,
    Text,
)
from sqlalchemy.schema import CreateIndex, CreateTable

from trap_dask.config import PARAMETERS, SECRET_PARAMETERS, parameter_type
from trap_dask.shapes import SHAPE_SUMS
from trap_dask.sources import MEASURED_COLUMNS
from trap_dask.variability import FLUX_SUMS, POSITION_SUMS

#: Bump when a table or column changes (tests/test_schema_files.py pins the DDL's hash to it), or
#: what a column holds, and add the step to trap_dask/db/migrations.py; a database of a later
#: version is refused on append.
SCHEMA_VERSION = 9

metadata = MetaData()


#: The column type of each dtype of trap_dask.sources.MEASURED_COLUMNS (doubles: positions
#: need 53-bit mantissas on every backend).
_MEASURED_TYPES = {"f8": Double, "?": Boolean}


def _pos(name: str, comment: str) -> Column:
    """A double-precision column (positions need 53-bit mantissas on every backend)."""
    return Column(name, Double, comment=comment)


schema_version = Table(
    "schema_version", metadata,
    Column("version", Integer, primary_key=True),
    Column("software_version", String(32), nullable=False),
    Column("created_at", DateTime, nullable=False),
)

runs = Table(
    "runs", metadata,
    Column("id", Integer, primary_key=True, autoincrement=False),
    Column("software_version", String(32), nullable=False),
    Column("started_at", DateTime, nullable=False),
    Column("finished_at", DateTime),
    Column("status", String(16), nullable=False, comment="running, completed, interrupted, failed"),
    Column("n_images", Integer, comment="images committed by this run"),
    Column("config_file", Text),
)

#: The run's parameters, one row per parameter as in TraP 1.x's ``config`` table (section, key,
#: value as text, type: bool, int, float or str), so a new parameter needs no new column; never
#: the secret ones (see :func:`config_rows`).
config = Table(
    "config", metadata,
    Column("id", Integer, primary_key=True, autoincrement=False),
    Column("run", Integer, ForeignKey("runs.id"), nullable=False, comment="TraP 1.x: dataset"),
    Column("section", String(100), nullable=False, comment="the parameter's section (TOML table)"),
    Column("key", String(100), nullable=False, comment="the parameter's name"),
    Column("value", Text, comment="as text (NULL: none); floats round-trip exactly"),
    Column("type", String(5), nullable=False, comment="bool, int, float or str"),
    Index("ix_config_run_key", "run", "key", unique=True),
)

frequencybands = Table(
    "frequencybands", metadata,
    Column("band_id", Integer, primary_key=True, autoincrement=False),
    Column("freq_low", Double, nullable=False, comment="Hz"),
    Column("freq_central", Double, nullable=False, comment="Hz"),
    Column("freq_high", Double, nullable=False, comment="Hz"),
)

images = Table(
    "images", metadata,
    Column("id", Integer, primary_key=True, autoincrement=False),
    Column("run", Integer, ForeignKey("runs.id"), nullable=False),
    Column("url", Text, nullable=False),
    Column("checksum", String(64), comment="the file's checksum: 'xxh3:' and its 128-bit XXH3 (hex), or its sha256"),
    Column("rejected", Boolean, nullable=False),
    Column("rejection_reason", Text),
    Column("rms", Double, comment="Jy/beam, clipped rms of the central region"),
    Column("rms_min", Double, comment="Jy/beam, lowest local rms in the extraction region"),
    Column("rms_max", Double, comment="Jy/beam, highest local rms in the extraction region"),
    Column("freq_band", Integer, ForeignKey("frequencybands.band_id")),
    Column("freq_eff", Double, comment="Hz"),
    Column("freq_bw", Double, comment="Hz"),
    Column("taustart_ts", DateTime, comment="UTC start of the observation"),
    Column("tau_time", Double, comment="s"),
    Column("rb_smaj", Double, comment="deg, restoring beam semi-major axis (BMAJ/2)"),
    Column("rb_smin", Double, comment="deg, restoring beam semi-minor axis (BMIN/2)"),
    Column("rb_pa", Double, comment="deg east of north"),
    _pos("centre_ra", "deg"),
    _pos("centre_dec", "deg"),
    Column("xtr_radius", Double, comment="deg, radius of the extraction region"),
    Column("n_sources", Integer, comment="blind detections"),
    Column("n_forced", Integer,
           comment="forced fits: null detections, monitor positions, and new sources of the band's next image"),
    Column("ew_sys_err", Double, comment="arcsec, systematic position error the image was associated with"),
    Column("ns_sys_err", Double, comment="arcsec"),
    Column("astrometry_n", Integer, comment="confident associations measuring the offsets below"),
    Column("astrometry_offset_ra", Double, comment="arcsec east, median detection - catalogue position"),
    Column("astrometry_offset_dec", Double, comment="arcsec north"),
    Column("astrometry_scatter_ra", Double, comment="arcsec, robust scatter about the median offset"),
    Column("astrometry_scatter_dec", Double, comment="arcsec"),
    Column("file_size", BigInteger, comment="bytes of the file when it was read (NULL: never read)"),
    Column("file_mtime", BigInteger,
           comment="ns since 1970 (UTC), the file's modification time when it was read; with url and "
                   "file_size, what recognises it on an append without reading it"),
    Column("xtr_outline", Text,
           comment="deg, 'ra dec ra dec ...' of 32 points around the extraction region (the image inside its "
                   "margins, from pixel (m, m) along its edge's rows and columns); with xtr_radius, what the "
                   "image covered (NULL: not known, the circle alone)"),
)

extracted_sources = Table(
    "extracted_sources", metadata,
    Column("id", Integer, primary_key=True, autoincrement=False),
    Column("im_id", Integer, nullable=False),
    Column("src_id", Integer, nullable=False, comment="light curve (running catalogue) id"),
    Column("parent", Integer, nullable=False, comment="previous measurement of src_id, -1 if first"),
    *(Column(c.name, _MEASURED_TYPES[c.dtype], nullable=c.nullable, comment=c.comment) for c in MEASURED_COLUMNS),
    Column("is_duplicate", Boolean, nullable=False),
    Index("ix_extracted_sources_src_id", "src_id"),
    Index("ix_extracted_sources_im_id", "im_id"),
    # im_id -> images.id is declared on SQLite only, where checking it costs nothing. PostgreSQL
    # checks a foreign key row by row (a trigger per row), which doubled the COPY of each image's
    # measurements (benchmarks/RESULTS.md, issue 15 round 3); there the writer keeps it by
    # construction: an image's row and its measurements are committed in the same transaction.
    ForeignKeyConstraint(["im_id"], ["images.id"]).ddl_if(dialect="sqlite"),
)


def _sums(names: tuple[str, ...]) -> list[Column]:
    """Running-sum columns (``acc_<name>``) that let a later run continue; see trap_dask.variability."""
    return [Column(f"acc_{name}", Double) for name in names]

variability = Table(
    "variability", metadata,
    Column("src_id", Integer, primary_key=True, autoincrement=False),
    Column("freq_band", Integer, ForeignKey("frequencybands.band_id"), primary_key=True,
           autoincrement=False),
    Column("newsource", Integer, comment="id of the first extracted source of the light curve"),
    Column("v_int", Double, comment="std(int_flux)/mean(int_flux), forced fits included"),
    Column("eta_int", Double,
           comment="reduced weighted chi-square of int_flux about its mean, forced fits included"),
    Column("lightcurve_max", Double, comment="Jy"),
    Column("lightcurve_avg", Double, comment="Jy"),
    _pos("wm_ra", "deg, weighted mean of the blind detections"),
    _pos("wm_dec", "deg"),
    Column("avg_ra_err", Double, comment="deg"),
    Column("avg_dec_err", Double, comment="deg"),
    Column("nr_datapoints", Integer, comment="measurements, forced fits included"),
    Column("first_image", Integer, comment="im_id of the first measurement in this band"),
    Column("first_detection_time", DateTime),
    # no index on eta_int (version 4 had one): every image changes the eta_int of the light curves
    # it touches, and an indexed column that changes keeps an update off its page (not HOT)
)

#: The running sums behind ``variability`` (what an append continues from), in their own table
#: as in TraP 1.4.0, so that ``variability`` holds only the columns its readers know.
variability_running_averages = Table(
    "_variability_running_averages", metadata,
    Column("src_id", Integer, primary_key=True, autoincrement=False),
    Column("freq_band", Integer, ForeignKey("frequencybands.band_id"), primary_key=True,
           autoincrement=False),
    Column("flux_ref", Double, comment="Jy, reference flux of the flux sums"),
    *_sums(FLUX_SUMS),
    Column("ra_ref", Double, comment="deg, reference RA of the position sums"),
    *_sums(POSITION_SUMS),
)

runningcatalog = Table(
    "runningcatalog", metadata,
    Column("src_id", Integer, primary_key=True, autoincrement=False),
    _pos("wm_ra", "deg, position used for association"),
    _pos("wm_dec", "deg"),
    Column("wm_uncertainty_ew", Double, comment="deg"),
    Column("wm_uncertainty_ns", Double, comment="deg"),
    Column("ra_ref", Double, comment="deg, reference RA of the position sums"),
    *_sums(POSITION_SUMS),
    Column("last_xtrsrc", Integer, comment="id of the latest measurement"),
    Column("n_consecutive_force_fits", Integer, nullable=False),
    Column("is_monitor", Boolean, nullable=False),
    Column("first_im_id", Integer),
    Column("merged_into", Integer, comment="src_id whose light curve took this one's measurements (-1: none)"),
    Column("acc_shape_weight", Double,
           comment="arcsec**-4, sum of (int_flux / int_flux_err)**2 / det(beam covariance) of the blind "
                   "Gaussian fits (trap_dask.shapes)"),
    *(Column(f"acc_shape_{name}", Double,
             comment=f"arcsec**2, weighted sum of the {axes} element of the covariance of the fitted "
                     "shape less the beam's (trap_dask.shapes)")
      for name, axes in zip(SHAPE_SUMS[1:], ("east-east", "east-north", "north-north"))),
)

merges = Table(
    "merges", metadata,
    Column("id", Integer, primary_key=True, autoincrement=False),
    Column("src_id", Integer, nullable=False, comment="the younger source, retired by the merge"),
    Column("merged_into", Integer, nullable=False, comment="the older source, whose light curve took the measurements"),
    Column("im_id", Integer, ForeignKey("images.id"), nullable=False,
           comment="the image whose transaction merged them (it detected one source where there were two)"),
    Column("separation", Double, comment="arcsec, between their catalogue positions"),
    Column("n_moved", Integer, comment="measurements of src_id that now carry merged_into"),
    Column("n_set_aside", Integer,
           comment="measurements left under src_id: the other of two in one image (a detection beats a forced fit)"),
    Column("newsource_trigger", Integer, comment="trigger_xtrsrc of src_id's newsource row, removed by the merge"),
)

newsource = Table(
    "newsource", metadata,
    Column("id", Integer, primary_key=True, autoincrement=False),
    Column("src_id", Integer, nullable=False),
    Column("trigger_xtrsrc", Integer, ForeignKey("extracted_sources.id"), nullable=False),
    Column("im_id", Integer, ForeignKey("images.id"), nullable=False),
    Column("previous_limits_image", Integer, comment="earlier image with the lowest rms_min"),
    Column("newsource_type", Integer, nullable=False, comment="1: likely transient, 0: possible"),
    Column("sigma_rms_min", Double, comment="peak_flux / lowest earlier rms_min"),
    Column("sigma_rms_max", Double, comment="peak_flux / highest earlier rms_max"),
)

monitor = Table(
    "monitor", metadata,
    Column("id", Integer, primary_key=True, autoincrement=False),
    _pos("ra", "deg"),
    _pos("dec", "deg"),
    Column("src_id", Integer, nullable=False),
)


#: PostgreSQL storage parameters of the tables every image updates: room on each page for its next
#: update, so that the updates stay on the page (HOT). Given to the tables as ``postgresql_with`` only
#: where a PostgreSQL database or its DDL is made (:func:`postgresql_storage`; ``ALTER TABLE .. SET`` on
#: an upgrade): naming a dialect's option loads the dialect, 20 ms of a SQLite run's start-up.
STORAGE = {name: {"fillfactor": 50} for name in ("variability", "_variability_running_averages", "runningcatalog")}


def postgresql_storage() -> None:
    """Give the tables of STORAGE their ``postgresql_with`` (again: no change), before PostgreSQL tables
    or their DDL are made from the metadata."""
    for name, options in STORAGE.items():
        metadata.tables[name].dialect_kwargs["postgresql_with"] = options

_TYPES = {"bool": bool, "int": int, "float": float, "str": str}


def config_rows(run: int, parameters: dict[str, Any], first_id: int) -> list[dict[str, Any]]:
    """``config`` rows (ids from ``first_id``) of one run's parameters, secrets left out."""
    rows = []
    for key, value in parameters.items():
        if key in SECRET_PARAMETERS:
            continue
        kind = parameter_type(key) if key in PARAMETERS else type(value) if value is not None else str
        if value is not None and kind is not str:
            value = kind(value)
        if isinstance(value, float) and value.is_integer() and kind is int:
            value = int(value)
        section = PARAMETERS[key].metadata["section"] if key in PARAMETERS else "unknown"
        rows.append({"id": first_id + len(rows), "run": run, "section": section, "key": key,
                     "value": None if value is None else str(value), "type": kind.__name__})
    return rows


def config_values(rows) -> dict[str, Any]:
    """``{key: value}`` (typed) from ``config`` rows (mappings with key, value and type)."""
    def parse(value: str | None, kind: str) -> Any:
        if value is None:
            return None
        if kind == "bool":
            return value == "True"
        return _TYPES.get(kind, str)(value)

    return {row["key"]: parse(row["value"], row["type"]) for row in rows}


# -- the columns other modules hold in memory, derived from the tables above ------------------
def numpy_dtype(column: Column) -> str:
    """The numpy dtype that holds ``column`` in memory: f8, i8, ? (bool) or O (datetime, text)."""
    if isinstance(column.type, Boolean):
        return "?"
    if isinstance(column.type, Integer):
        return "i8"
    if isinstance(column.type, Double):
        return "f8"
    return "O"


def column_dtypes(table: Table, leave_out: tuple[str, ...] = ()) -> dict[str, str]:
    """``{column: numpy dtype}`` of ``table`` in its column order, without ``leave_out``."""
    return {c.name: numpy_dtype(c) for c in table.columns if c.name not in leave_out}


#: extracted_sources columns the writer assigns (ids, association); the others are measured
#: (trap_dask.sources.MEASURED_COLUMNS)
ASSIGNED_SOURCE_COLUMNS = ("id", "im_id", "src_id", "parent", "is_duplicate")
#: runningcatalog: one row per source (trap_dask.catalogue.SOURCE_COLUMNS)
CATALOGUE_COLUMNS = column_dtypes(runningcatalog)
#: variability with its running sums: one row per (src_id, freq_band) (catalogue.LIGHTCURVE_COLUMNS)
LIGHTCURVE_COLUMNS = {**column_dtypes(variability),
                      **column_dtypes(variability_running_averages, ("src_id", "freq_band"))}
#: merges as the catalogue makes them; the store adds the id and the retired newsource's trigger
MERGE_COLUMNS = column_dtypes(merges, ("id", "newsource_trigger"))


def ddl(dialect_name: str) -> str:
    """The CREATE statements for ``sqlite`` or ``postgresql``, as text."""
    from sqlalchemy.dialects import postgresql, sqlite

    dialect = {"sqlite": sqlite.dialect(), "postgresql": postgresql.dialect()}[dialect_name]
    if dialect_name == "postgresql":
        postgresql_storage()
    statements = []
    for table in metadata.sorted_tables:
        statements.append(str(CreateTable(table).compile(dialect=dialect)).strip() + ";")
        indexes = sorted(table.indexes, key=lambda index: index.name)
        statements.extend(str(CreateIndex(i).compile(dialect=dialect)).strip() + ";" for i in indexes)
    header = f"-- trap-dask export schema version {SCHEMA_VERSION} ({dialect_name}); generated by\n" \
             f"-- python -m trap_dask.db.schema {dialect_name}\n"
    return header + "\n\n".join(statements) + "\n"


def describe_markdown() -> str:
    """Every table and column with its type and unit/meaning, as Markdown (schema/README.md)."""
    lines = [
        f"# Export schema, version {SCHEMA_VERSION}",
        "",
        "Generated by `python -m trap_dask.db.schema markdown` from `trap_dask/db/schema.py`, the",
        f"one definition both backends are created from (`v{SCHEMA_VERSION}_sqlite.sql`, "
        f"`v{SCHEMA_VERSION}_postgresql.sql`; earlier versions' files are kept beside them).",
        "The TraP 1.x tables (config, images, extracted_sources, frequencybands, variability) keep",
        "TraP's column names and units; the others are trap-dask additions. Image, source",
        "(`src_id`), measurement and band ids count from 0, as TraP 1.4.0's readers",
        "(`trap.post_processing`) expect; `parent = -1` means none. `variability` counts forced",
        "fits in its statistics (classic TraP); `trap_dask.results.varmetric(db,",
        "forced_fits=False)` gives them without, as TraP 1.4.0 computes them. `--db_append`",
        "upgrades a database of an earlier version in place (`trap_dask/db/migrations.py`):",
        "",
    ]
    from trap_dask.db.migrations import MIGRATIONS

    lines += [f"- {version} -> {version + 1}: {step.__doc__.strip()}" for version, step in sorted(MIGRATIONS.items())]
    for table in metadata.sorted_tables:
        lines += ["", f"## {table.name}", "", "| column | type | unit / meaning |", "|---|---|---|"]
        lines += [f"| {c.name} | {c.type} | {c.comment or ''} |" for c in table.columns]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    what = sys.argv[1] if len(sys.argv) > 1 else "sqlite"
    print(describe_markdown() if what == "markdown" else ddl(what), end="")
