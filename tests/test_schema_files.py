"""schema/ holds the DDL and description generated from the one schema definition in code."""

from pathlib import Path

import pytest

from trap_dask.db.schema import SCHEMA_VERSION, ddl, describe_markdown

SCHEMA_DIR = Path(__file__).resolve().parents[1] / "schema"


@pytest.mark.parametrize("dialect", ["sqlite", "postgresql"])
def test_ddl_files_match_the_code(dialect):
    path = SCHEMA_DIR / f"v{SCHEMA_VERSION}_{dialect}.sql"
    assert path.read_text() == ddl(dialect), f"regenerate with: python -m trap_dask.db.schema {dialect} > {path}"


def test_schema_readme_matches_the_code():
    assert (SCHEMA_DIR / "README.md").read_text() == describe_markdown()


#: sha256 of the DDL of both dialects (comment lines left out) for each schema version: a change
#: to a table, a column, an index or a storage option changes it. Then bump SCHEMA_VERSION, add
#: the step from the previous version to trap_dask/db/migrations.py (and a test that appends to a
#: database of the previous version), regenerate schema/, and pin the new hash here.
DDL_SHA256 = {
    3: "1e94f3a3c6af818e9627a14f5f95a233791c4a243ad91c97b78fe84c59f05eed",
    4: "7199ef71e231a6de936cb1dba21b0237b8f9f1f3498abb8546f97f41b88b96cb",
    5: "7089da0d58ea6fff95d83eca689f45a52743d32898f61283a5863b7381528c83",
    6: "1d396c24a7f7870dc1f71cd7e83dd93563d0f95560dde169ef66f2d2a30cab62",
    7: "91ca1cbdbebd28bb08456fc25411548e294e176d97cf028bb5b4da8be004f94f",
    8: "e4b73d2019801b6c09fd45b10044e1f9b1f67c876c970a811af848e338df3250",
    9: "e4b73d2019801b6c09fd45b10044e1f9b1f67c876c970a811af848e338df3250",  # what images.checksum holds
}


def ddl_sha256() -> str:
    import hashlib

    body = "".join(line for dialect in ("sqlite", "postgresql")
                   for line in ddl(dialect).splitlines(True) if not line.startswith("--"))
    return hashlib.sha256(body.encode()).hexdigest()


def test_the_schema_version_changes_with_the_ddl():
    assert SCHEMA_VERSION in DDL_SHA256, f"pin the DDL of version {SCHEMA_VERSION}: {ddl_sha256()}"
    assert ddl_sha256() == DDL_SHA256[SCHEMA_VERSION], (
        f"the DDL of schema version {SCHEMA_VERSION} changed: bump SCHEMA_VERSION, add a migration, "
        f"and pin the new hash {ddl_sha256()}")


def test_every_earlier_version_has_its_migration():
    from trap_dask.db.migrations import MIGRATIONS

    assert sorted(MIGRATIONS) == list(range(1, SCHEMA_VERSION))


def test_parameters_are_config_rows_not_columns():
    """A new parameter changes no DDL: ``config`` holds (section, key, value, type) rows, as in TraP 1.x."""
    from trap_dask.config import PARAMETERS
    from trap_dask.db import schema

    assert not set(PARAMETERS) & set(schema.config.c.keys())
    assert {"section", "key", "value", "type"} <= set(schema.config.c.keys())
