"""Configuration: layers, precedence, types and clear errors naming the key."""

import math
import subprocess
import sys

import pytest

from trap_dask.cli import build_parser, main
from trap_dask.config import PARAMETERS, Config, ConfigError, build_config, read_toml, resolve_config_file


def write(path, text):
    path.write_text(text)
    return path


def test_defaults_follow_trap():
    config = build_config({}, {}, None)
    assert config.detection_threshold == 8.0
    assert config.analysis_threshold == 3.0
    assert config.de_ruiter_r_max == 5.68
    assert config.max_nr_consecutive_force_fits == 10
    assert config.db_backend == "sqlite"
    assert math.isinf(config.rms_max)


def test_precedence_cli_over_env_over_toml(tmp_path):
    toml = write(tmp_path / "t.toml", "[extraction]\ndetection_threshold = 6\nanalysis_threshold = 2.5\n"
                 "[extraction.image]\nim_margin = 7\n")
    env = {"TRAP_DETECTION_THRESHOLD": "7", "TRAP_IM_MARGIN": "9"}
    config = build_config({"detection_threshold": "9"}, env, toml)
    assert config.detection_threshold == 9.0          # command line wins
    assert config.im_margin == 9                      # environment beats the file
    assert config.analysis_threshold == 2.5           # file beats the default


def test_unknown_key_in_toml_is_named(tmp_path):
    toml = write(tmp_path / "t.toml", "[extraction]\ndetection_treshold = 6\n")
    with pytest.raises(ConfigError, match="detection_treshold"):
        read_toml(toml)


def test_key_in_wrong_section_is_named(tmp_path):
    toml = write(tmp_path / "t.toml", "[association]\ndetection_threshold = 6\n")
    with pytest.raises(ConfigError, match=r"detection_threshold.*\[extraction\]"):
        read_toml(toml)


def test_wrong_type_is_named(tmp_path):
    toml = write(tmp_path / "t.toml", '[extraction]\ndeblend_nthresh = "many"\n')
    with pytest.raises(ConfigError, match="deblend_nthresh.*int"):
        read_toml(toml)
    with pytest.raises(ConfigError, match="TRAP_FORCE_BEAM"):
        build_config({}, {"TRAP_FORCE_BEAM": "maybe"}, None)


@pytest.mark.parametrize("flags, key", [
    ({"detection_threshold": "-1"}, "detection_threshold"),
    ({"analysis_threshold": "10"}, "analysis_threshold"),
    ({"db_backend": "oracle"}, "db_backend"),
    ({"rms_min": "2", "rms_max": "1"}, "rms_max"),
    ({"monitor_loc": "[[10, 95]]"}, "monitor_loc"),
    ({"monitor_loc": "[[NaN, 10]]"}, "monitor_loc"),
    ({"frequency_band": "[[NaN, 2e8]]"}, "frequency_band"),
    ({"monitor_loc": "[[Infinity, 10]]"}, "monitor_loc"),
    ({"detection_threshold": "inf"}, "detection_threshold"),
    ({"memory_limit": "2.5"}, "memory_limit"),  # 2 bytes to Dask: its workers restarted until it gave up
    ({"memory_limit": "1KB"}, "memory_limit"),
    ({"memory_limit": "1b"}, "memory_limit"),  # a byte, not a fraction
    ({"db_backend": "postgres", "db_name": "é" * 32}, "db_name"),  # 64 bytes: cut by the server
    ({"de_ruiter_r_max": "inf"}, "de_ruiter_r_max"),
    ({"frequency_band": "[[2e8, 1e8]]"}, "frequency_band"),
    ({"duplicate_reach": "-1"}, "duplicate_reach"),
    ({"duplicate_reach": "none"}, "duplicate_reach"),  # not 'auto', nor TraP's 0: said as one of them
])
def test_impossible_values_are_named(flags, key):
    with pytest.raises(ConfigError, match=key):
        build_config(flags, {}, None)


def test_duplicate_reach_is_auto_by_default_or_a_number_of_beams():
    assert build_config({}, {}, None).duplicate_reach is None
    assert build_config({"duplicate_reach": "auto"}, {}, None).duplicate_reach is None
    assert build_config({"duplicate_reach": "1"}, {}, None).duplicate_reach == 1.0


@pytest.mark.parametrize("stored, differs", [
    ({"ew_sys_err": None, "ns_sys_err": None, "duplicate_reach": 0.0}, False),  # 'auto' errors: TraP's reach
    ({"ew_sys_err": None, "ns_sys_err": None}, False),                          # from before the parameter
    ({"ew_sys_err": None, "ns_sys_err": None, "duplicate_reach": 1.0}, True),
    ({"ew_sys_err": 3.0, "ns_sys_err": 3.0, "duplicate_reach": 0.0}, True),     # set errors: 'auto' acts
    ({"ew_sys_err": 3.0, "ns_sys_err": 3.0}, True),
])
def test_an_auto_duplicate_reach_differs_from_trap_only_under_set_position_errors(stored, differs):
    from trap_dask.config import association_differences

    config = build_config({"ew_sys_err": "auto" if stored["ew_sys_err"] is None else "3",
                           "ns_sys_err": "auto" if stored["ns_sys_err"] is None else "3"}, {}, None)
    base = {name: getattr(config, name) for name in ("de_ruiter_r_max", "association_method",
            "max_nr_consecutive_force_fits", "frequency_band", "link_radius", "remove_image_shift", "widen_sys_err")}
    assert ("duplicate_reach" in association_differences(config, base | stored)) == differs


@pytest.mark.parametrize("flags", [{"ew_sys_err": "1"}, {"ns_sys_err": "1"}, {"ew_sys_err": "auto", "ns_sys_err": "2"}])
def test_one_position_error_set_without_the_other_is_refused(flags):
    """--ew_sys_err alone crashed the writer on the first image; --ns_sys_err alone was ignored."""
    with pytest.raises(ConfigError, match=r"^ew_sys_err = (1|auto), ns_sys_err = (auto|1|2): set both to numbers "
                                          r"\(arcsec\), or both to 'auto'$"):
        build_config(flags, {}, None)
    assert build_config({"ew_sys_err": "1", "ns_sys_err": "2"}, {}, None).ns_sys_err == 2.0


def test_memory_limits_and_database_names_at_their_bounds_are_taken():
    for limit in ("auto", "0.5", "1", "256MiB", "4GB", "2 GiB"):
        assert build_config({"memory_limit": limit}, {}, None).memory_limit == limit
    name = "x" * 63
    assert build_config({"db_backend": "postgres", "db_name": name}, {}, None).db_name == name
    assert build_config({"db_backend": "postgres"}, {}, None).db_name is None  # said later: no database given


def test_overlapping_frequency_bands_are_refused_touching_ones_not():
    """Two fixed bands that overlap would put an image between them in whichever came first."""
    with pytest.raises(ConfigError, match=r"bands \[1e\+08, 2e\+08\] Hz and \[1.5e\+08, 3e\+08\] Hz overlap"):
        build_config({"frequency_band": "[[1.5e8, 3e8], [1e8, 2e8]]"}, {}, None)
    touching = build_config({"frequency_band": "[[1e8, 1.5e8], [1.5e8, 3e8]]"}, {}, None)
    assert touching.frequency_bands() == [(1e8, 1.5e8), (1.5e8, 3e8)]


def test_password_from_pgpassword_never_exported():
    config = build_config({"db_backend": "postgres", "db_name": "x"}, {"PGPASSWORD": "s3cret"}, None)
    assert config.db_password == "s3cret"
    row = config.exportable()
    assert "db_password" not in row and "s3cret" not in repr(row)
    with pytest.raises(ConfigError) as err:
        build_config({"db_password": "s3cret", "db_port": "0"}, {}, None)
    assert "s3cret" not in str(err.value)


def test_monitor_list_inline_and_from_file(tmp_path):
    f = write(tmp_path / "m.json", "[[150.1, 30.2], [150.3, 29.9]]")
    assert build_config({"monitor_loc": str(f)}, {}, None).monitor_positions() == [(150.1, 30.2), (150.3, 29.9)]
    assert build_config({"monitor_loc": "[[1, 2]]"}, {}, None).monitor_positions() == [(1.0, 2.0)]
    # RA is brought into [0, 360): -30 is 330 (it was stored as -30)
    assert build_config({"monitor_loc": "[[-30, 2], [400, -5], [-1e-20, 0]]"}, {}, None).monitor_positions() == [
        (330.0, 2.0), (40.0, -5.0), (0.0, 0.0)]
    # an open-ended band (a database made with one is appended to) stays as it was
    assert build_config({"frequency_band": "[[1e8, Infinity]]"}, {}, None).frequency_bands() == [(1e8, math.inf)]


def test_trap_config_toml_in_cwd_is_found(tmp_path):
    assert resolve_config_file(None, tmp_path) is None
    write(tmp_path / "trap_config.toml", "[association]\nde_ruiter_r_max = 4.0\n")
    assert resolve_config_file(None, tmp_path) == tmp_path / "trap_config.toml"
    with pytest.raises(ConfigError, match="does not exist"):
        resolve_config_file(str(tmp_path / "nope.toml"), tmp_path)
    with pytest.raises(ConfigError, match="is a directory, not a TOML file"):
        resolve_config_file(str(tmp_path), tmp_path)


def test_help_documents_every_parameter_with_unit_and_default():
    run = build_parser()._subparsers._group_actions[0].choices["run"]
    text = " ".join(run.format_help().split())
    for name, field in PARAMETERS.items():
        assert f"--{name}" in text
        if field.metadata["unit"] and field.metadata["unit"] not in ("", "deg", "Hz"):
            assert f"[{field.metadata['unit']}]" in text
    assert "(default: 8.0)" in text and "(default: 5.68)" in text
    assert "--db-name" in text and "-i PATH" in text
    # each parameter's own text, as written (argparse would format a % in it; it wraps lines at hyphens)
    bare = "".join(text.split())
    for name, field in PARAMETERS.items():
        assert "".join(field.metadata["help"].split()) in bare, name
    assert "option_strings" not in text and "by 20% and" in text


def test_cli_reports_config_errors_before_any_work(tmp_path, capsys):
    code = main(["run", "-i", str(tmp_path), "--db-name", str(tmp_path / "x.db"), "--detection_threshold", "abc"])
    assert code == 2
    assert "detection_threshold" in capsys.readouterr().err
    assert not (tmp_path / "x.db").exists()


def test_help_is_fast_and_imports_no_heavy_modules():
    code = ("import sys; from trap_dask.cli import build_parser; build_parser(); "
            "print(sorted(m for m in ('dask', 'distributed', 'astropy', 'scipy', 'sqlalchemy', 'pandas', 'matplotlib') "
            "if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_config_row_has_every_parameter_but_the_password():
    row = Config(input_images=("a", "b")).exportable()
    assert set(row) == set(PARAMETERS) - {"db_password"}
    assert row["input_images"] == "a; b"


def test_libpq_environment_when_nothing_else_sets_the_server(tmp_path):
    env = {"PGHOST": "db.example.org", "PGPORT": "6543", "PGUSER": "alice"}
    config = build_config({}, env, None)
    assert (config.db_host, config.db_port, config.db_user) == ("db.example.org", 6543, "alice")
    toml = tmp_path / "c.toml"
    toml.write_text('[database]\ndb_host = "from-file"\n')
    assert build_config({}, env, toml).db_host == "from-file"
    assert build_config({}, {**env, "TRAP_DB_HOST": "from-trap"}, toml).db_host == "from-trap"
    assert build_config({"db_host": "from-flag"}, env, toml).db_host == "from-flag"


@pytest.mark.parametrize("env, variable", [
    ({"TRAP_SCHEDULER": "fast"}, "TRAP_SCHEDULER"),   # impossible value
    ({"PGPORT": "0"}, "PGPORT"),
    ({"PGPORT": "five"}, "PGPORT"),                   # wrong type
])
def test_an_error_from_the_environment_names_the_variable(env, variable):
    with pytest.raises(ConfigError, match=variable):
        build_config({}, env, None)


def test_enumerated_flags_have_choices(capsys):
    with pytest.raises(SystemExit):
        main(["run", "--scheduler", "fast"])
    assert "invalid choice: 'fast' (choose from" in capsys.readouterr().err


def test_progress_is_log_lines_off_a_terminal(monkeypatch, caplog):
    from trap_dask import pipeline

    monkeypatch.setattr(pipeline, "PROGRESS_LOG_SECONDS", 0.0)
    monkeypatch.setattr(pipeline.log, "propagate", True)  # a run in an earlier test turns it off
    caplog.set_level("INFO", logger="trap_dask")
    with pipeline._progress(3) as bar:  # pytest's stderr is not a terminal
        assert isinstance(bar, pipeline._LogProgress)
        for _ in range(3):
            bar.update(1)
            bar.set_postfix(sources=5, new=1, refresh=False)
    assert "3/3 images" in caplog.text and "new 1" in caplog.text


def test_the_program_exits_with_the_status_of_main_without_collecting(monkeypatch):
    """``trap-dask`` (``cli.entry``) exits with main's status and freezes the garbage collector
    first, so that interpreter shutdown does not walk every object (0.25 s after a run)."""
    from trap_dask import cli

    frozen = []
    monkeypatch.setattr(cli, "main", lambda: 3)
    monkeypatch.setattr(cli.gc, "freeze", lambda: frozen.append(True))
    with pytest.raises(SystemExit) as stop:
        cli.entry()
    assert stop.value.code == 3 and frozen == [True]


def test_a_run_imports_without_the_collector_and_gives_it_back(monkeypatch):
    """``main`` turns the garbage collector off for a run's imports (the run turns it on again:
    test_pipeline) and back on when it returns, whatever happened."""
    import gc

    from trap_dask import cli

    seen = []
    monkeypatch.setattr(cli, "_run", lambda args: seen.append(gc.isenabled()) or 0)
    assert cli.main(["run", "-i", "nowhere"]) == 0 and seen == [False] and gc.isenabled()
    with pytest.raises(SystemExit):
        cli.main(["run", "--no_such_flag"])  # argparse stops it, with the collector off
    assert gc.isenabled()


def test_ctrl_c_before_a_run_starts_is_one_line(monkeypatch, capsys):
    """Ctrl-C while the command still imports its modules (before the run's own handling): one line
    and exit status 130, not a traceback (a real Ctrl-C during a run: test_append)."""
    import gc

    from trap_dask import cli

    def interrupted():
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "main", interrupted)
    try:
        with pytest.raises(SystemExit) as exited:
            cli.entry()
    finally:
        gc.unfreeze()  # entry() freezes what exists, for its exit
    assert exited.value.code == 130
    assert capsys.readouterr().err == "trap-dask: interrupted\n"
