"""Shared fixtures: export-database settings for every backend.

PostgreSQL tests use the server at 127.0.0.1:5432 (user postgres, trust auth, as in CI; override
with TRAP_TEST_PG_HOST / TRAP_TEST_PG_PORT / TRAP_TEST_PG_USER). Under CI=true an unreachable
server fails the tests; elsewhere they are skipped.
"""

from __future__ import annotations

import os
import sys
import uuid

from trap_dask.cpu import numpy_environ

# numpy dispatches as in a run (trap_dask.cpu), before anything loads it: the results computed here
# and those of the runs the tests start equal to the last bit (AVX-512 and AVX2 kernels round differently)
assert "numpy" not in sys.modules, "numpy was loaded before tests/conftest.py"
os.environ.update(numpy_environ())

import pytest  # noqa: E402

from trap_dask.db.backends import DatabaseError, DatabaseSettings, database_exists, drop_database  # noqa: E402

PG = dict(
    host=os.environ.get("TRAP_TEST_PG_HOST", "127.0.0.1"),
    port=int(os.environ.get("TRAP_TEST_PG_PORT", "5432")),
    user=os.environ.get("TRAP_TEST_PG_USER", "postgres"),
)


def postgres_settings(name: str) -> DatabaseSettings:
    """Settings for a test database on the test server; fails (CI=true: never skipped) or skips
    (elsewhere) if it is unreachable."""
    settings = DatabaseSettings(backend="postgres", name=name, **PG)
    try:
        database_exists(settings)
    except DatabaseError as exc:
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(f"PostgreSQL test server unreachable under CI=true: {exc}")
        pytest.skip(f"PostgreSQL test server unreachable: {exc}")
    return settings


#: The backends every contract, store and end-to-end test runs on; the PostgreSQL ones carry the
#: ``postgres`` marker (``-m "not postgres"`` runs without a server, where CI=true may not).
BACKENDS = ["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)]


@pytest.fixture(params=BACKENDS)
def db_settings(request, tmp_path):
    """Settings for a not-yet-existing export database on each backend; dropped afterwards."""
    if request.param == "sqlite":
        yield DatabaseSettings(backend="sqlite", name=str(tmp_path / "export.db"))
        return
    settings = postgres_settings(f"trap_dask_test_{uuid.uuid4().hex[:12]}")
    yield settings
    drop_database(settings)
