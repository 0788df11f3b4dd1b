"""The writer's answers to a task retried after its worker was lost: an image is never recorded twice."""

from __future__ import annotations

from sqlalchemy import func, select
from test_merges import _forced, _image

from trap_dask.config import build_config
from trap_dask.db import schema
from trap_dask.db.backends import DatabaseSettings, make_engine
from trap_dask.db.store import ExportStore
from trap_dask.messages import CommitSummary, ForcedMeasurements, ForcedRequest
from trap_dask.writer import Writer


def _writer(tmp_path) -> tuple[Writer, DatabaseSettings]:
    settings = DatabaseSettings(backend="sqlite", name=str(tmp_path / "w.db"))
    ExportStore.create(settings, overwrite=False).close()
    config = build_config(dict(db_name=settings.name), {}, None)
    return Writer(settings, config, None), settings


def _count(settings: DatabaseSettings, table) -> int:
    engine = make_engine(settings)
    with engine.connect() as conn:
        n = conn.execute(select(func.count()).select_from(table)).scalar()
    engine.dispose()
    return n


def _commit(writer: Writer, request: ForcedRequest) -> CommitSummary:
    return writer.commit(ForcedMeasurements(_forced(request.ra, request.dec),
                                            backfill=_forced(request.backfill_ra, request.backfill_dec)))


def test_an_image_associated_again_before_its_commit_is_recorded_once(tmp_path):
    writer, settings = _writer(tmp_path)
    first = _image(1, [150.0, 150.2], [30.0, 30.0])
    _commit(writer, writer.associate(first))
    second = _image(2, [150.0, 150.2], [30.0, 30.0])
    writer.associate(second)                        # its worker is lost before the commit ...
    summary = _commit(writer, writer.associate(second))  # ... and the task runs again elsewhere
    writer.finish("completed")
    assert summary.im_id == 1 and _count(settings, schema.images) == 2
    assert _count(settings, schema.extracted_sources) == 4


def test_a_committed_image_asked_again_gets_its_summary_back(tmp_path):
    writer, settings = _writer(tmp_path)
    first, second = _image(1, [150.0], [30.0]), _image(2, [150.0], [30.0])
    done = _commit(writer, writer.associate(first))
    request = writer.associate(second)                 # the next image is being associated ...
    assert writer.associate(first) == done             # ... when the first one's task is retried
    _commit(writer, request)
    writer.finish("completed")
    assert _count(settings, schema.images) == 2 and _count(settings, schema.extracted_sources) == 2


def test_a_commit_asked_again_gets_its_summary_back(tmp_path):
    writer, settings = _writer(tmp_path)
    first, second = _image(1, [150.0], [30.0]), _image(2, [150.0], [30.0])
    request = writer.associate(first)
    done = _commit(writer, request)
    writer.associate(second)
    again = writer.commit(ForcedMeasurements(_forced(request.ra, request.dec)), request.url)  # a retried task
    assert again == done
    writer.finish("completed")
    assert _count(settings, schema.images) == 1 and _count(settings, schema.extracted_sources) == 1


def test_an_image_that_reaches_the_writer_after_the_run_stopped_is_dropped_quietly(tmp_path):
    """A task still running when a run stopped (Ctrl-C, SIGTERM) calls the writer after finish():
    it gets a 'dropped' summary (no error for Dask to report) and nothing is recorded."""
    writer, settings = _writer(tmp_path)
    first, second = _image(1, [150.0], [30.0]), _image(2, [150.0], [30.0])
    request = writer.associate(first)
    writer.finish("interrupted")                  # the run stops between the image's two calls
    late_commit = _commit(writer, request)
    late_associate = writer.associate(second)
    assert late_commit.dropped and not late_commit.recorded
    assert late_associate.dropped and not late_associate.recorded
    assert _count(settings, schema.images) == 0 and _count(settings, schema.extracted_sources) == 0
