"""The README's query examples run against a real export database."""

import re
import sqlite3
from pathlib import Path

import pytest

from trap_dask.config import build_config
from trap_dask.pipeline import run_pipeline
from trap_dask.simulate import SurveySpec, simulate_survey

README = (Path(__file__).resolve().parents[1] / "README.md").read_text()
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def demo_db(tmp_path_factory):
    folder = tmp_path_factory.mktemp("readme")
    simulate_survey(folder / "demo_survey", SurveySpec(n_epochs=5, shape=(256, 256), n_steady=8, n_variable=2,
                                                       n_transient=1, n_resolved=0, n_pairs=0, min_separation=4.0))
    values = {"input_images": (str(folder / "demo_survey"),), "db_name": str(folder / "demo.db"),
              "scheduler": "threads"}
    run_pipeline(build_config(values, {}, None))
    return folder


def test_readme_pandas_example_rebuilds_a_light_curve(demo_db, monkeypatch):
    block = re.search(r"```python\n(.*?)```", README, re.S).group(1)
    monkeypatch.chdir(demo_db)
    namespace: dict = {}
    exec(compile(block, "README.md", "exec"), namespace)  # asserts the parent chain itself
    assert len(namespace["lc"]) == 5


def test_readme_sqlite_examples_run(demo_db):
    commands = re.findall(r'^sqlite3 demo\.db "(.*?)"$', README, re.M | re.S)
    assert len(commands) == 2
    with sqlite3.connect(demo_db / "demo.db") as conn:
        for sql in commands:
            assert conn.execute(" ".join(sql.split())).fetchall()


def test_readme_result_commands_run(demo_db, monkeypatch, capsys):
    """The five commands of "Looking at the results", with a source of this (smaller) demo."""
    import shlex

    from trap_dask import results
    from trap_dask.cli import main

    lines = re.findall(r"^(trap-dask (?:candidates|lightcurve|etav|stamps|report) demo\.db.*?)\s+#", README, re.M)
    assert [shlex.split(line)[1] for line in lines] == ["candidates", "lightcurve", "etav", "stamps", "report"]
    monkeypatch.chdir(demo_db)
    src = str(int(results.candidates("demo.db", combine="or").src_id.iloc[0]))
    for line in lines:
        argv = [src if word == "34" else word for word in shlex.split(line)[1:]]
        assert main(argv) == 0, line
    assert "candidates (" in capsys.readouterr().out
    for made in ("lc34.png", "etav.png", "stamps34.png", "demo_report/index.html"):
        assert (demo_db / made).stat().st_size > 1000, made
