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
