"""The in-memory tables hold the columns of the export tables (trap_dask/db/schema.py, whose measured
extracted_sources columns are trap_dask.sources.MEASURED_COLUMNS), in their order and types."""

from __future__ import annotations

import numpy as np
import pytest

from trap_dask import catalogue
from trap_dask.config import Config
from trap_dask.db import schema
from trap_dask.db.backends import DatabaseSettings
from trap_dask.db.store import ExportStore
from trap_dask.sources import NOT_EXPORTED, SOURCE_DTYPE, empty_sources

KINDS = {"f8": "f", "i8": "i", "?": "b", "O": "O"}


def _assert_follows(spec: dict[str, str], *tables, leave_out=()) -> None:
    columns = [c for table in tables for c in table.columns if c.name not in leave_out]
    names = list(dict.fromkeys(c.name for c in columns))
    assert list(spec) == names
    for column in columns:
        assert spec[column.name] == schema.numpy_dtype(column), column.name


def test_source_dtype_is_the_measured_extracted_sources_columns():
    exported = [n for n in SOURCE_DTYPE.names if n not in NOT_EXPORTED]
    measured = [c for c in schema.extracted_sources.c.keys() if c not in schema.ASSIGNED_SOURCE_COLUMNS]
    assert exported == measured
    for name in exported:
        assert SOURCE_DTYPE[name].kind == KINDS[schema.numpy_dtype(schema.extracted_sources.c[name])], name
    assert not set(NOT_EXPORTED) & set(schema.extracted_sources.c.keys())


def test_catalogue_columns_are_the_tables_columns():
    _assert_follows(catalogue.SOURCE_COLUMNS, schema.runningcatalog)
    _assert_follows(catalogue.LIGHTCURVE_COLUMNS, schema.variability, schema.variability_running_averages)
    _assert_follows(catalogue.MERGE_COLUMNS, schema.merges, leave_out=("id", "newsource_trigger"))


def test_commit_refuses_rows_that_lack_or_add_a_column(tmp_path):
    store = ExportStore.create(DatabaseSettings("sqlite", str(tmp_path / "c.db")), overwrite=False)
    try:
        run = store.start_run(Config().exportable(), None)
        image = {"id": 0, "run": run, "url": "a.fits", "rejected": False}
        ids = {"id": np.arange(2), "src_id": np.arange(2), "parent": -np.ones(2, int),
               "is_duplicate": np.zeros(2, bool)}
        odd = np.zeros(2, dtype=[*SOURCE_DTYPE.descr, ("novel", "f8")])
        with pytest.raises(ValueError, match="not in the table: novel"):
            store.commit_image(image, sources=odd, source_ids=ids)
        short = empty_sources(2)[[n for n in SOURCE_DTYPE.names if n != "chisq"]]
        with pytest.raises(ValueError, match="missing: chisq"):
            store.commit_image(image, sources=short, source_ids=ids)
        curves = catalogue.empty_columns(catalogue.LIGHTCURVE_COLUMNS, 1)
        del curves["eta_int"]
        with pytest.raises(ValueError, match="missing: eta_int"):
            store.commit_image(image, lightcurves=curves)
        store.commit_image(image, sources=empty_sources(2), source_ids=ids)  # nothing was half-written
    finally:
        store.close()


def test_columnar_rows_are_taken_and_joined_column_by_column():
    """trap_dask.columns: rows by index or mask, and parts joined in order, for every column."""
    from trap_dask.columns import concat, take

    table = {"src_id": np.array([10, 11, 12, 13]), "ra": np.array([1.0, 2.0, 3.0, 4.0])}
    assert {k: v.tolist() for k, v in take(table, np.array([3, 0])).items()} == {"src_id": [13, 10], "ra": [4.0, 1.0]}
    assert take(table, table["ra"] > 2.5)["src_id"].tolist() == [12, 13]
    joined = concat([take(table, [2]), table, {"ra": np.array([9.0]), "src_id": np.array([99])}])
    assert list(joined) == ["src_id", "ra"] and joined["src_id"].tolist() == [12, 10, 11, 12, 13, 99]
